//! Supervised fine-tuning: next-token cross-entropy over the target tokens.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use crate::logps::{TokenLogps, token_logps};

/// The summed loss of a set of target tokens and how many of them the model's argmax got right
/// (TRL's `mean_token_accuracy` numerator).
pub struct TokenLoss<B: Backend> {
    /// `[1]`: Σ −log p(target), not yet divided, so gradient accumulation can divide by the
    /// number of target tokens over all micro-batches.
    pub sum: Tensor<B, 1>,
    /// `[1]`: targets equal to the argmax.
    pub correct: Tensor<B, 1, Int>,
}

impl<B: Backend> TokenLoss<B> {
    pub fn from_logps(t: TokenLogps<B>) -> Self {
        Self {
            sum: t.logps.sum().neg(),
            correct: t.hits.sum(),
        }
    }
}

/// Cross-entropy of `logits` (one row per position that has a target) against `targets`.
///
/// # Shapes
/// `logits: [n, vocab]`, `targets: [n]`
pub fn token_cross_entropy<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> TokenLoss<B> {
    TokenLoss::from_logps(token_logps(logits, targets, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::TensorData;

    type B = NdArray;

    #[test]
    fn cross_entropy_matches_torch() {
        let device = Default::default();
        // torch.nn.functional.cross_entropy(torch.tensor([[1., 2., 3.], [1000., 0., -1000.]]),
        //     torch.tensor([0, 0]), reduction="sum") -> tensor(2.4076)
        let logits = Tensor::<B, 2>::from_data(TensorData::from([[1.0f32, 2.0, 3.0], [1000.0, 0.0, -1000.0]]), &device);
        let targets = Tensor::<B, 1, Int>::from_data(TensorData::from([0i64, 0]), &device);
        let loss = token_cross_entropy(logits, targets);
        let sum: f32 = loss.sum.into_scalar();
        assert!((sum - 2.407_606).abs() < 1e-5, "{sum}");
        let correct: i64 = loss.correct.into_scalar();
        assert_eq!(correct, 1);
    }
}
