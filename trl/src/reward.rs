//! Reward modelling (TRL's `RewardTrainer`): a scalar score per sequence, trained on preference
//! pairs with the Bradley-Terry loss, the chosen sequence's score pushed above the rejected one's.

use burn::tensor::Tensor;
use burn::tensor::activation::log_sigmoid;
use burn::tensor::backend::Backend;

/// The reward loss's settings.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RewardParams {
    /// Adds `coefficient · mean((r_chosen + r_rejected)²)`, which keeps the scores centred on
    /// zero (TRL's `center_rewards_coefficient`; `None`: no such term).
    pub center_rewards_coefficient: Option<f64>,
}

/// Each pair's loss, `[pairs]`: `-log σ(r_chosen - r_rejected - margin)`, plus the centring
/// term. The micro-batch's objective (TRL's) is their mean.
///
/// # Shapes
/// `chosen, rejected, margin: [pairs] -> [pairs]`
pub fn reward_loss<B: Backend>(
    chosen: Tensor<B, 1>,
    rejected: Tensor<B, 1>,
    margin: Option<Tensor<B, 1>>,
    params: RewardParams,
) -> Tensor<B, 1> {
    let mut delta = chosen.clone() - rejected.clone();
    if let Some(margin) = margin {
        delta = delta - margin;
    }
    let loss = log_sigmoid(delta).neg();
    match params.center_rewards_coefficient {
        Some(c) => loss + (chosen + rejected).powi_scalar(2) * c,
        None => loss,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::TensorData;

    fn t(v: &[f32]) -> Tensor<NdArray, 1> {
        Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), &Default::default())
    }

    #[test]
    fn bradley_terry_with_margin_and_centring() {
        let (c, r) = (t(&[1.0, -0.5]), t(&[0.0, 0.5]));
        let plain: Vec<f32> = reward_loss(c.clone(), r.clone(), None, RewardParams::default())
            .to_data()
            .to_vec()
            .unwrap();
        // -log σ(1) and -log σ(-1).
        assert!(
            (plain[0] - 0.313_261_7).abs() < 1e-6 && (plain[1] - 1.313_261_7).abs() < 1e-6,
            "{plain:?}"
        );
        let params = RewardParams {
            center_rewards_coefficient: Some(0.5),
        };
        let both: Vec<f32> = reward_loss(c, r, Some(t(&[1.0, 0.0])), params)
            .to_data()
            .to_vec()
            .unwrap();
        // -log σ(0) + 0.5·1², -log σ(-1) + 0.5·0².
        assert!((both[0] - (std::f32::consts::LN_2 + 0.5)).abs() < 1e-6, "{both:?}");
        assert!((both[1] - 1.313_261_7).abs() < 1e-6, "{both:?}");
    }
}
