//! Direct preference optimisation and its family, as TRL's `DPOTrainer` computes them
//! (trl 1.16, `_compute_loss`), over sequence log-probabilities.

use burn::tensor::activation::{log_sigmoid, relu};
use burn::tensor::backend::Backend;
use burn::tensor::{IndexingUpdateOp, Int, Tensor};
use serde::{Deserialize, Serialize};

use crate::sft::log_softmax;

/// Which preference loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DpoLossType {
    /// `-log σ(β·Δ)`; with `label_smoothing` ε, the conservative form (cDPO):
    /// `-(1-ε)·log σ(β·Δ) - ε·log σ(-β·Δ)`.
    #[default]
    Sigmoid,
    /// `relu(1 - β·Δ)`.
    Hinge,
    /// `(Δ̄ - 1/(2β))²` with each log-ratio averaged over its completion's tokens.
    Ipo,
    /// `(-(1-ε)·log σ(β·Δ) + ε·log σ(-β·Δ)) / (1 - 2ε)`: unbiased under label noise ε.
    Robust,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpoParams {
    pub beta: f64,
    pub loss_type: DpoLossType,
    pub label_smoothing: f64,
}

/// Per-pair results of a DPO loss.
pub struct DpoOutput<B: Backend> {
    /// `[pairs]`: each pair's loss (the objective is their mean).
    pub losses: Tensor<B, 1>,
    /// `[pairs]`: `β · (log π(chosen) - log π_ref(chosen))`, detached.
    pub chosen_rewards: Tensor<B, 1>,
    pub rejected_rewards: Tensor<B, 1>,
}

/// The DPO loss of each pair from the policy's and the reference's summed completion
/// log-probabilities. `chosen_tokens` / `rejected_tokens` are the completions' lengths (IPO
/// averages per token).
///
/// # Shapes
/// every input `[pairs]`
pub fn dpo_loss<B: Backend>(
    policy_chosen: Tensor<B, 1>,
    policy_rejected: Tensor<B, 1>,
    ref_chosen: Tensor<B, 1>,
    ref_rejected: Tensor<B, 1>,
    chosen_tokens: Tensor<B, 1>,
    rejected_tokens: Tensor<B, 1>,
    params: DpoParams,
) -> DpoOutput<B> {
    let beta = params.beta;
    let eps = params.label_smoothing;
    let chosen_ratio = policy_chosen - ref_chosen;
    let rejected_ratio = policy_rejected - ref_rejected;
    let delta = chosen_ratio.clone() - rejected_ratio.clone();
    let losses = match params.loss_type {
        DpoLossType::Sigmoid => {
            let fwd = log_sigmoid(delta.clone() * beta).neg() * (1.0 - eps);
            if eps > 0.0 {
                fwd - log_sigmoid(delta.neg() * beta) * eps
            } else {
                fwd
            }
        }
        DpoLossType::Hinge => relu((delta * beta).neg() + 1.0),
        DpoLossType::Ipo => {
            let c = chosen_ratio.clone() / chosen_tokens.clamp_min(1.0);
            let r = rejected_ratio.clone() / rejected_tokens.clamp_min(1.0);
            (c - r - 1.0 / (2.0 * beta)).powi_scalar(2)
        }
        DpoLossType::Robust => {
            let clean = log_sigmoid(delta.clone() * beta).neg() * (1.0 - eps);
            let flipped = log_sigmoid(delta.neg() * beta).neg() * eps;
            (clean - flipped) / (1.0 - 2.0 * eps)
        }
    };
    DpoOutput {
        losses,
        chosen_rewards: chosen_ratio.detach() * beta,
        rejected_rewards: rejected_ratio.detach() * beta,
    }
}

/// Summed log-probabilities of the target tokens of each row: `logits` at the positions that
/// predict a completion token (`rows[i]` says which row position `i` belongs to).
///
/// # Shapes
/// `logits: [n, vocab]`, `targets: [n]`, `rows: [n]` -> `[num_rows]`
pub fn sequence_logps<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    rows: Tensor<B, 1, Int>,
    num_rows: usize,
) -> Tensor<B, 1> {
    let picked = log_softmax(logits)
        .gather(1, targets.unsqueeze_dim::<2>(1))
        .squeeze_dim::<1>(1); // [n]
    let device = picked.device();
    Tensor::<B, 1>::zeros([num_rows], &device).select_assign(0, rows, picked, IndexingUpdateOp::Add)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::TensorData;

    type B = NdArray;

    fn t(v: &[f32]) -> Tensor<B, 1> {
        Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), &Default::default())
    }

    #[test]
    fn losses_match_trls_formulas() {
        // With policy == reference every log-ratio is 0: sigmoid gives ln 2, hinge 1, IPO 1/(2β)².
        let z = || t(&[-3.0, -7.0]);
        let p = |loss_type, label_smoothing| DpoParams {
            beta: 0.1,
            loss_type,
            label_smoothing,
        };
        let run = |params| -> Vec<f32> {
            dpo_loss(z(), z(), z(), z(), t(&[2.0, 3.0]), t(&[4.0, 1.0]), params)
                .losses
                .into_data()
                .to_vec()
                .unwrap()
        };
        assert!((run(p(DpoLossType::Sigmoid, 0.0))[0] - std::f32::consts::LN_2).abs() < 1e-6);
        assert!((run(p(DpoLossType::Hinge, 0.0))[1] - 1.0).abs() < 1e-6);
        assert!((run(p(DpoLossType::Ipo, 0.0))[0] - 25.0).abs() < 1e-4);
        // Robust at Δ = 0: ((1-ε) ln2 - ε ln2) / (1-2ε) = ln 2.
        assert!((run(p(DpoLossType::Robust, 0.2))[0] - std::f32::consts::LN_2).abs() < 1e-6);
        // torch: -F.logsigmoid(torch.tensor(0.1 * 2.0)) * 0.9 - F.logsigmoid(torch.tensor(-0.2)) * 0.1 = 0.61814
        let out = dpo_loss(
            t(&[1.0]),
            t(&[-1.0]),
            t(&[0.0]),
            t(&[0.0]),
            t(&[1.0]),
            t(&[1.0]),
            p(DpoLossType::Sigmoid, 0.1),
        );
        let l: Vec<f32> = out.losses.into_data().to_vec().unwrap();
        assert!((l[0] - 0.618_14).abs() < 1e-4, "{l:?}");
    }
}
