//! Direct preference optimisation and its family, as TRL computes them over sequence
//! log-probabilities: DPO's losses as TRL 1.16's `DPOTrainer._compute_loss` (a weighted list of
//! them, `sft` among them for RPO), and the reference-free SimPO (TRL's `CPOTrainer` with
//! `loss_type="simpo"`) and ORPO (`ORPOTrainer`).

use burn::tensor::activation::{log_sigmoid, relu};
use burn::tensor::backend::Backend;
use burn::tensor::{IndexingUpdateOp, Int, Tensor};
use serde::{Deserialize, Serialize};

/// One DPO loss term.
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
    /// `-log σ(β·Δ̄)` with each log-ratio averaged over its completion's tokens.
    SigmoidNorm,
    /// The negative log-likelihood of the chosen completions, per token (RPO's extra term).
    Sft,
}

/// A DPO objective: `Σ weight · loss_type`, each term averaged over pairs.
#[derive(Debug, Clone, PartialEq)]
pub struct DpoParams {
    pub beta: f64,
    pub losses: Vec<(DpoLossType, f64)>,
    pub label_smoothing: f64,
}

/// SimPO: `-log σ(β·(avg log π(chosen) - avg log π(rejected)) - γ)` (with cDPO label smoothing),
/// plus `cpo_alpha` times the chosen completions' NLL (CPO-SimPO when non-zero).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimpoParams {
    pub beta: f64,
    pub gamma: f64,
    pub label_smoothing: f64,
    pub cpo_alpha: f64,
}

/// Summed completion log-probabilities of each pair, and their lengths.
///
/// # Shapes
/// every field `[pairs]`
pub struct PairLogps<B: Backend> {
    pub chosen: Tensor<B, 1>,
    pub rejected: Tensor<B, 1>,
    pub chosen_tokens: Tensor<B, 1>,
    pub rejected_tokens: Tensor<B, 1>,
}

impl<B: Backend> PairLogps<B> {
    /// Per-token averages `(chosen, rejected)`.
    fn averages(&self) -> (Tensor<B, 1>, Tensor<B, 1>) {
        (
            self.chosen.clone() / self.chosen_tokens.clone().clamp_min(1.0),
            self.rejected.clone() / self.rejected_tokens.clone().clamp_min(1.0),
        )
    }

    /// The chosen completions' NLL per token over the whole batch, as `[pairs]` copies (so the
    /// mean over pairs is that NLL, as TRL expands it).
    fn chosen_nll(&self) -> Tensor<B, 1> {
        let pairs = self.chosen.dims()[0];
        let nll = self.chosen.clone().sum().neg() / self.chosen_tokens.clone().sum().clamp_min(1.0);
        nll.expand([pairs])
    }
}

/// Per-pair results of a preference loss.
pub struct PreferenceOutput<B: Backend> {
    /// `[pairs]`: each pair's loss (the objective is their mean).
    pub losses: Tensor<B, 1>,
    /// `[pairs]`, detached: DPO's `β · (log π(chosen) - log π_ref(chosen))`; SimPO's and ORPO's
    /// `β · avg log π(chosen)`.
    pub chosen_rewards: Tensor<B, 1>,
    pub rejected_rewards: Tensor<B, 1>,
    /// `[pairs]`, detached: further per-pair metrics under TRL's names (ORPO's).
    pub extra: Vec<(&'static str, Tensor<B, 1>)>,
}

/// The DPO loss of each pair from the policy's and the reference's summed completion
/// log-probabilities.
pub fn dpo_loss<B: Backend>(
    policy: &PairLogps<B>,
    reference: &PairLogps<B>,
    params: &DpoParams,
) -> PreferenceOutput<B> {
    let beta = params.beta;
    let eps = params.label_smoothing;
    let chosen_ratio = policy.chosen.clone() - reference.chosen.clone();
    let rejected_ratio = policy.rejected.clone() - reference.rejected.clone();
    let delta = chosen_ratio.clone() - rejected_ratio.clone();
    let per_token_delta = || {
        chosen_ratio.clone() / policy.chosen_tokens.clone().clamp_min(1.0)
            - rejected_ratio.clone() / policy.rejected_tokens.clone().clamp_min(1.0)
    };
    let mut total: Option<Tensor<B, 1>> = None;
    for &(loss_type, weight) in &params.losses {
        let term = match loss_type {
            DpoLossType::Sigmoid => smoothed_sigmoid(delta.clone() * beta, eps),
            DpoLossType::Hinge => relu((delta.clone() * beta).neg() + 1.0),
            DpoLossType::Ipo => (per_token_delta() - 1.0 / (2.0 * beta)).powi_scalar(2),
            DpoLossType::Robust => {
                let clean = log_sigmoid(delta.clone() * beta).neg() * (1.0 - eps);
                let flipped = log_sigmoid(delta.clone().neg() * beta).neg() * eps;
                (clean - flipped) / (1.0 - 2.0 * eps)
            }
            DpoLossType::SigmoidNorm => log_sigmoid(per_token_delta() * beta).neg(),
            DpoLossType::Sft => policy.chosen_nll(),
        } * weight;
        total = Some(match total {
            Some(t) => t + term,
            None => term,
        });
    }
    PreferenceOutput {
        losses: total.expect("at least one loss term (checked by the config)"),
        chosen_rewards: chosen_ratio.detach() * beta,
        rejected_rewards: rejected_ratio.detach() * beta,
        extra: Vec::new(),
    }
}

/// `-(1-ε)·log σ(x) - ε·log σ(-x)`.
fn smoothed_sigmoid<B: Backend>(x: Tensor<B, 1>, eps: f64) -> Tensor<B, 1> {
    let fwd = log_sigmoid(x.clone()).neg() * (1.0 - eps);
    if eps > 0.0 {
        fwd - log_sigmoid(x.neg()) * eps
    } else {
        fwd
    }
}

/// SimPO (reference-free, length-normalised, with a target margin γ).
pub fn simpo_loss<B: Backend>(policy: &PairLogps<B>, params: SimpoParams) -> PreferenceOutput<B> {
    let (chosen, rejected) = policy.averages();
    let margin = (chosen.clone() - rejected.clone()) * params.beta - params.gamma;
    let mut losses = smoothed_sigmoid(margin, params.label_smoothing);
    if params.cpo_alpha != 0.0 {
        losses = losses + policy.chosen_nll() * params.cpo_alpha;
    }
    PreferenceOutput {
        losses,
        chosen_rewards: chosen.detach() * params.beta,
        rejected_rewards: rejected.detach() * params.beta,
        extra: Vec::new(),
    }
}

/// ORPO: `nll - β · log σ(log odds(chosen) - log odds(rejected))`, with the odds of each
/// completion's per-token average probability. `nll` (`[pairs]` copies) is the chosen sequences'
/// NLL per token, which TRL's ORPO takes over prompt and completion.
pub fn orpo_loss<B: Backend>(policy: &PairLogps<B>, nll: Tensor<B, 1>, beta: f64) -> PreferenceOutput<B> {
    let (chosen, rejected) = policy.averages();
    let log_odds = (chosen.clone() - rejected.clone()) - (log1mexp(chosen.clone()) - log1mexp(rejected.clone()));
    let ratio = log_sigmoid(log_odds.clone());
    PreferenceOutput {
        losses: nll.clone() - ratio.clone() * beta,
        chosen_rewards: chosen.detach() * beta,
        rejected_rewards: rejected.detach() * beta,
        extra: vec![
            ("nll_loss", nll.detach()),
            ("log_odds_ratio", ratio.detach()),
            ("log_odds_chosen", log_odds.detach()),
        ],
    }
}

/// `log(1 - exp(x))` for `x < 0`, branching at -ln 2 to avoid cancellation (as TRL's ORPO).
/// Without `expm1` in burn, the near-zero branch is `log(-(exp(x) - 1))`, exact enough in f32
/// for average log-probabilities, which stay well below 0.
fn log1mexp<B: Backend>(x: Tensor<B, 1>) -> Tensor<B, 1> {
    let x = x.clamp_max(-1e-7);
    let far = x.clone().exp().neg().log1p();
    let near = (x.clone().exp() - 1.0).neg().log();
    let is_far = x.lower_elem(-std::f64::consts::LN_2);
    near.mask_where(is_far, far)
}

/// Summed log-probabilities of the target tokens of each row (`rows[i]` says which row
/// position `i` belongs to), from per-token log-probabilities ([`crate::logps`]).
///
/// # Shapes
/// `token_logps: [n]`, `rows: [n]` -> `[num_rows]`
pub fn sequence_logps<B: Backend>(token_logps: Tensor<B, 1>, rows: Tensor<B, 1, Int>, num_rows: usize) -> Tensor<B, 1> {
    let device = token_logps.device();
    Tensor::<B, 1>::zeros([num_rows], &device).select_assign(0, rows, token_logps, IndexingUpdateOp::Add)
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

    fn vec(x: Tensor<B, 1>) -> Vec<f32> {
        x.into_data().to_vec().unwrap()
    }

    fn close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5 * w.abs().max(1.0), "{got:?} vs {want:?}");
        }
    }

    fn pairs(chosen: &[f32], rejected: &[f32]) -> PairLogps<B> {
        PairLogps {
            chosen: t(chosen),
            rejected: t(rejected),
            chosen_tokens: t(&[2.0, 3.0]),
            rejected_tokens: t(&[4.0, 1.0]),
        }
    }

    fn dpo(losses: &[(DpoLossType, f64)], label_smoothing: f64) -> DpoParams {
        DpoParams {
            beta: 0.1,
            losses: losses.to_vec(),
            label_smoothing,
        }
    }

    #[test]
    fn losses_match_trls_formulas() {
        // With policy == reference every log-ratio is 0: sigmoid gives ln 2, hinge 1, IPO 1/(2β)².
        let z = || pairs(&[-3.0, -7.0], &[-3.0, -7.0]);
        let run = |loss_type, ls| vec(dpo_loss(&z(), &z(), &dpo(&[(loss_type, 1.0)], ls)).losses);
        assert!((run(DpoLossType::Sigmoid, 0.0)[0] - std::f32::consts::LN_2).abs() < 1e-6);
        assert!((run(DpoLossType::Hinge, 0.0)[1] - 1.0).abs() < 1e-6);
        assert!((run(DpoLossType::Ipo, 0.0)[0] - 25.0).abs() < 1e-4);
        // Robust at Δ = 0: ((1-ε) ln2 - ε ln2) / (1-2ε) = ln 2.
        assert!((run(DpoLossType::Robust, 0.2)[0] - std::f32::consts::LN_2).abs() < 1e-6);
        // torch: -F.logsigmoid(torch.tensor(0.1 * 2.0)) * 0.9 - F.logsigmoid(torch.tensor(-0.2)) * 0.1 = 0.61814
        let one = |v| PairLogps::<B> {
            chosen: t(&[v]),
            rejected: t(&[-v]),
            chosen_tokens: t(&[1.0]),
            rejected_tokens: t(&[1.0]),
        };
        let out = dpo_loss(&one(1.0), &one(0.0), &dpo(&[(DpoLossType::Sigmoid, 1.0)], 0.1));
        close(&vec(out.losses), &[0.618_14]);
    }

    /// Values from torch with TRL's expressions (trl 1.16: `_compute_loss`, experimental
    /// `CPOTrainer.cpo_loss`, `ORPOTrainer.odds_ratio_loss` and its `log1mexp`).
    #[test]
    fn weighted_terms_simpo_and_orpo_match_trl() {
        let policy = || pairs(&[-3.0, -7.5], &[-4.0, -6.0]);
        let reference = pairs(&[-3.5, -7.0], &[-3.0, -6.5]);
        let norm = dpo_loss(&policy(), &reference, &dpo(&[(DpoLossType::SigmoidNorm, 1.0)], 0.0));
        close(&vec(norm.losses), &[0.668_459_65, 0.727_036]);
        // RPO: sigmoid + 0.5 · NLL of the chosen tokens (10.5 over 5 tokens = 2.1).
        let rpo = dpo(&[(DpoLossType::Sigmoid, 1.0), (DpoLossType::Sft, 0.5)], 0.0);
        close(
            &vec(dpo_loss(&policy(), &reference, &rpo).losses),
            &[1.670_957, 1.794_396_6],
        );

        let params = SimpoParams {
            beta: 2.0,
            gamma: 0.5,
            label_smoothing: 0.1,
            cpo_alpha: 0.3,
        };
        let simpo = simpo_loss(&policy(), params);
        close(&vec(simpo.losses), &[2.181_413, 1.281_502_2]);
        close(&vec(simpo.chosen_rewards), &[-3.0, -5.0]);

        let orpo = orpo_loss(&policy(), t(&[1.7, 1.7]), 0.1);
        close(&vec(orpo.losses), &[1.810_732_8, 1.702_741]);
        close(&vec(orpo.extra[2].1.clone()), &[-0.706_192_7, 3.583_168_7]);
        close(
            &vec(log1mexp(t(&[-0.01, -0.5, -0.7, -3.0]))),
            &[-4.610_166, -0.932_752_1, -0.686_341, -0.051_069_18],
        );
    }
}
