//! KTO (Kahneman-Tversky optimisation) over unpaired completions, as TRL's `KTOTrainer` computes
//! it from summed completion log-probabilities: each desirable completion is pushed above, each
//! undesirable one below, the batch's estimate of the policy's KL divergence from the reference.

use burn::tensor::activation::sigmoid;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KtoLossType {
    /// Desirable `1 - σ(β·(r - z))`, undesirable `1 - σ(β·(z - r))`, with `r` the log-ratio
    /// to the reference and `z` the batch's KL estimate.
    #[default]
    Kto,
    /// APO-zero for unpaired data: desirable `1 - σ(β·r)`, undesirable `σ(β·r)`; no KL term.
    ApoZeroUnpaired,
}

impl KtoLossType {
    /// Whether the loss needs the KL estimate (and so the mismatched completions).
    pub fn uses_kl(self) -> bool {
        self == Self::Kto
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KtoParams {
    pub beta: f64,
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
    pub loss_type: KtoLossType,
}

/// Per-row results of the KTO loss.
pub struct KtoOutput<B: Backend> {
    /// `[rows]`: each row's weighted loss (the objective is their mean).
    pub losses: Tensor<B, 1>,
    /// `[rows]`, detached: `β · (log π - log π_ref)` of each row's completion.
    pub rewards: Tensor<B, 1>,
}

/// The KL estimate `z` of TRL: the mean over the batch of `log π(y'|x) - log π_ref(y'|x)` on
/// mismatched completions `y'`, detached and clamped at 0 (`[]` as a `[1]` tensor).
pub fn kto_kl<B: Backend>(policy_kl: Tensor<B, 1>, reference_kl: Tensor<B, 1>) -> Tensor<B, 1> {
    kto_kl_mean(policy_kl, reference_kl).clamp_min(0.0)
}

/// [`kto_kl`] before its clamp: under data parallelism TRL averages this over the processes
/// first, then clamps.
pub fn kto_kl_mean<B: Backend>(policy_kl: Tensor<B, 1>, reference_kl: Tensor<B, 1>) -> Tensor<B, 1> {
    (policy_kl - reference_kl).mean().detach()
}

/// The KTO loss of each row from the policy's and the reference's summed completion
/// log-probabilities (`[rows]`), which rows are desirable, and the KL estimate (`[1]`;
/// ignored by `apo_zero_unpaired`).
pub fn kto_loss<B: Backend>(
    policy: Tensor<B, 1>,
    reference: Tensor<B, 1>,
    desirable: Tensor<B, 1, Bool>,
    kl: Tensor<B, 1>,
    params: KtoParams,
) -> KtoOutput<B> {
    let rows = policy.dims()[0];
    let beta = params.beta;
    let ratio = policy - reference;
    let (good, bad) = match params.loss_type {
        KtoLossType::Kto => {
            let kl = kl.expand([rows]);
            (
                sigmoid((ratio.clone() - kl.clone()) * beta).neg() + 1.0,
                sigmoid((kl - ratio.clone()) * beta).neg() + 1.0,
            )
        }
        KtoLossType::ApoZeroUnpaired => (sigmoid(ratio.clone() * beta).neg() + 1.0, sigmoid(ratio.clone() * beta)),
    };
    let losses = bad
        .mul_scalar(params.undesirable_weight)
        .mask_where(desirable, good.mul_scalar(params.desirable_weight));
    KtoOutput {
        losses,
        rewards: ratio.detach() * beta,
    }
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
    fn kto_by_hand() {
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let (policy, reference) = ([-3.0f32, -5.0, -2.0], [-4.0f32, -4.5, -2.5]);
        let desirable =
            Tensor::<B, 1, Bool>::from_data(TensorData::new(vec![true, false, true], [3]), &Default::default());
        let kl = kto_kl(t(&[-1.0, -1.2]), t(&[-1.5, -1.3]));
        assert!((kl.clone().into_scalar() - 0.3).abs() < 1e-6);
        let params = KtoParams {
            beta: 0.5,
            desirable_weight: 1.5,
            undesirable_weight: 0.7,
            loss_type: KtoLossType::Kto,
        };
        let out = kto_loss(t(&policy), t(&reference), desirable.clone(), kl, params);
        let got = out.losses.into_data().to_vec::<f32>().unwrap();
        let r = |i: usize| (policy[i] - reference[i]) as f64;
        let want = [
            1.5 * (1.0 - sig(0.5 * (r(0) - 0.3))),
            0.7 * (1.0 - sig(0.5 * (0.3 - r(1)))),
            1.5 * (1.0 - sig(0.5 * (r(2) - 0.3))),
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{g} vs {w}");
        }
        assert_eq!(out.rewards.into_data().to_vec::<f32>().unwrap(), [0.5, -0.25, 0.25]);
        // A negative estimate counts as 0.
        assert_eq!(kto_kl(t(&[-2.0]), t(&[-1.0])).into_scalar(), 0.0);

        let apo = KtoParams {
            loss_type: KtoLossType::ApoZeroUnpaired,
            ..params
        };
        let got = kto_loss(t(&policy), t(&reference), desirable, t(&[9.0]), apo)
            .losses
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let want = [
            1.5 * (1.0 - sig(0.5 * r(0))),
            0.7 * sig(0.5 * r(1)),
            1.5 * (1.0 - sig(0.5 * r(2))),
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{g} vs {w}");
        }
    }
}
