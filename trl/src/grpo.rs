//! GRPO (group relative policy optimisation) as TRL's `GRPOTrainer` computes it: rewards of
//! several completions per prompt become advantages relative to their group, and a clipped
//! importance-weighted policy-gradient loss (with an optional KL term against a reference)
//! pushes the policy towards the completions that beat their group.
//!
//! Two pure pieces: [`group_advantages`] over host-side rewards (one generation round), and
//! [`grpo_loss`] over per-token log-probabilities (one micro-batch).

use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor};
use serde::{Deserialize, Serialize};

/// How the per-token losses of a micro-batch are averaged (TRL's `loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GrpoLossType {
    /// Each completion's mean over its tokens, then the mean over completions (the paper's;
    /// favours short completions).
    Grpo,
    /// The mean over the micro-batch's completion tokens.
    Bnpo,
    /// Dr. GRPO: the sum over tokens divided by completions × `max_completion_length`.
    DrGrpo,
    /// DAPO: the sum over tokens divided by the completion tokens of the whole generation round
    /// (every micro-batch, every worker). TRL's default.
    #[default]
    Dapo,
}

/// How a completion's reward minus its group's mean is scaled (TRL's `scale_rewards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// Divided by the standard deviation of its group.
    #[default]
    Group,
    /// Divided by the standard deviation over the whole round.
    Batch,
    /// Not scaled (Dr. GRPO).
    None,
}

/// Where the importance ratio policy/old is taken (TRL's `importance_sampling_level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ImportanceSampling {
    /// Per token.
    #[default]
    Token,
    /// Per completion, from its mean log-ratio (GSPO).
    Sequence,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GrpoParams {
    pub loss_type: GrpoLossType,
    /// Weight of the KL term against the reference; 0: no reference.
    pub beta: f64,
    /// The ratio is clipped to `[1 - epsilon_low, 1 + epsilon_high]`.
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    /// Two-sided clipping: the unclipped ratio is also capped at `delta` (TRL's `delta`).
    pub delta: Option<f64>,
    pub importance_sampling: ImportanceSampling,
    /// Dr. GRPO's constant normaliser.
    pub max_completion_length: usize,
    /// Weigh the KL term by the importance ratio (TRL's `use_bias_correction_kl`).
    pub bias_correction_kl: bool,
}

/// A generation round's advantages and what TRL logs of them.
#[derive(Debug, Clone, PartialEq)]
pub struct Advantages {
    /// One per completion, in the rewards' order (0 for a completion no function scored).
    pub advantages: Vec<f32>,
    /// TRL's `reward`: the mean reward (NaN rewards left out).
    pub reward: f64,
    /// TRL's `reward_std`: the standard deviation of the round's rewards.
    pub reward_std: f64,
    /// TRL's `frac_reward_zero_std`: the share of completions whose standard deviation (their
    /// group's, or the round's) is 0: groups that teach nothing.
    pub frac_reward_zero_std: f64,
}

/// Each completion's reward: the weighted sum of its reward functions' values (`per_func`,
/// row-major `[completions, functions]`), a NaN value (a function with nothing to say about a
/// completion) left out, as TRL's `nansum`; NaN when no function scored it.
pub fn weighted_rewards(per_func: &[f32], weights: &[f32]) -> Vec<f32> {
    let f = weights.len().max(1);
    per_func
        .chunks_exact(f)
        .map(|row| {
            if row.iter().all(|r| r.is_nan()) {
                return f32::NAN;
            }
            row.iter()
                .zip(weights)
                .map(|(&r, &w)| r * w)
                .filter(|x| !x.is_nan())
                .sum()
        })
        .collect()
}

/// The mean of the values that are not NaN (NaN when none is), in f32 as torch's `nanmean`.
pub fn nanmean(xs: &[f32]) -> f32 {
    let (sum, n) = xs
        .iter()
        .filter(|x| !x.is_nan())
        .fold((0.0f32, 0usize), |(s, n), &x| (s + x, n + 1));
    if n == 0 { f32::NAN } else { sum / n as f32 }
}

/// The sample (n - 1) standard deviation of the values that are not NaN, as TRL's `nanstd`:
/// NaN for fewer than two.
pub fn nanstd(xs: &[f32]) -> f32 {
    let m = nanmean(xs);
    let (sq, n) = xs
        .iter()
        .filter(|x| !x.is_nan())
        .fold((0.0f32, 0usize), |(s, n), &x| (s + (x - m) * (x - m), n + 1));
    if n <= 1 { f32::NAN } else { (sq / (n as f32 - 1.0)).sqrt() }
}

/// Group-relative advantages of one round's rewards ([`weighted_rewards`]), `group`
/// completions of one prompt next to each other: the reward minus its group's mean, divided
/// (unless `ScaleRewards::None`) by the group's (or, `Batch`, the round's) standard deviation
/// plus 1e-4. In f32, as TRL computes them; an advantage that is not a number (a completion no
/// function scored) is 0.
///
/// # Panics
/// If `group` is 0 or does not divide the rewards (a programmer error: rounds are whole groups).
pub fn group_advantages(rewards: &[f32], group: usize, scale: ScaleRewards) -> Advantages {
    assert!(
        group > 0 && rewards.len().is_multiple_of(group),
        "{} rewards are not whole groups of {group}",
        rewards.len()
    );
    let n = rewards.len();
    let means: Vec<f32> = rewards.chunks(group).map(nanmean).collect();
    let stds: Vec<f32> = match scale {
        ScaleRewards::Group | ScaleRewards::None => rewards.chunks(group).map(nanstd).collect(),
        ScaleRewards::Batch => vec![nanstd(rewards); n / group],
    };
    let mut advantages = Vec::with_capacity(n);
    let mut zero = 0usize;
    for (i, &r) in rewards.iter().enumerate() {
        let (m, s) = (means[i / group], stds[i / group]);
        // torch.isclose(std, 0): |std| <= 1e-8 (atol) + 1e-5 · 0; NaN is not close.
        zero += (s.abs() <= 1e-8) as usize;
        let a = match scale {
            ScaleRewards::None => r - m,
            _ => (r - m) / (s + 1e-4),
        };
        advantages.push(if a.is_nan() { 0.0 } else { a });
    }
    Advantages {
        advantages,
        reward: nanmean(rewards) as f64,
        reward_std: nanstd(rewards) as f64,
        frac_reward_zero_std: zero as f64 / n.max(1) as f64,
    }
}

/// One micro-batch's loss and TRL's metrics of it.
pub struct GrpoOutput<B: Backend> {
    /// `[1]`: the micro-batch's share of the step's loss before the division by
    /// [`loss_weight`] summed over the step's micro-batches (and workers): the step's loss is
    /// `Σ loss / Σ weight`, which is TRL's for every loss type.
    pub loss: Tensor<B, 1>,
    /// The mean KL term (k3, times the ratio with `bias_correction_kl`) per completion token;
    /// `None` without a reference (`beta` 0).
    pub kl: Option<f64>,
    /// The mean entropy per completion token, when the entropies were given.
    pub entropy: Option<f64>,
    /// `clip_ratio/low_mean`, `/high_mean`, `/region_mean`: the share of completion tokens
    /// (completions, with sequence-level ratios) whose ratio fell below `1 - epsilon_low` with
    /// a negative advantage, above `1 + epsilon_high` with a positive one, or either.
    pub clip_low: f64,
    pub clip_high: f64,
    pub clip_region: f64,
    /// `clip_ratio/low_min`, `/high_max`: the lowest and highest of the completions' own shares
    /// (completions without a counted token left out; NaN when none has one).
    pub clip_low_min: f64,
    pub clip_high_max: f64,
}

/// What a micro-batch adds to the step's divisor, from its completion mask alone (so the loop
/// knows it before any forward): completions (`grpo`, `dr_grpo`), 1 (`bnpo`), completion
/// tokens (`dapo`).
pub fn loss_weight(loss_type: GrpoLossType, rows: usize, tokens: usize) -> usize {
    match loss_type {
        GrpoLossType::Grpo | GrpoLossType::DrGrpo => rows,
        GrpoLossType::Bnpo => 1,
        GrpoLossType::Dapo => tokens,
    }
}

/// The GRPO loss of a micro-batch of `[rows, tokens]` completion log-probabilities under the
/// policy (differentiable; at the sampling temperature, as TRL scores them), as generated
/// (`old`: `None` when the round is used once: the ratio is then 1, with the policy's
/// gradient) and under the reference (`None` when `beta` is 0); `advantages` `[rows]`; `mask`
/// `[rows, tokens]` (1.0 on completion tokens that count); `entropy` `[rows, tokens]` (for
/// its metric only).
pub fn grpo_loss<B: Backend>(
    logps: Tensor<B, 2>,
    old: Option<Tensor<B, 2>>,
    reference: Option<Tensor<B, 2>>,
    advantages: Tensor<B, 1>,
    mask: Tensor<B, 2>,
    entropy: Option<Tensor<B, 2>>,
    params: &GrpoParams,
) -> GrpoOutput<B> {
    let [rows, len] = logps.dims();
    let old = old.unwrap_or_else(|| logps.clone().detach());
    let log_ratio = logps.clone() - old;
    let lengths = mask.clone().sum_dim(1).clamp_min(1.0); // [rows, 1]
    let log_weights = match params.importance_sampling {
        ImportanceSampling::Token => log_ratio,
        ImportanceSampling::Sequence => (log_ratio * mask.clone()).sum_dim(1) / lengths.clone(), // [rows, 1]
    };
    let ratio = log_weights.exp();
    // TRL's k3 estimate of KL(policy || reference), weighted by the ratio (before `delta`'s
    // cap) with `use_bias_correction_kl`: its gradient then flows through the ratio too.
    let kl = reference.map(|reference| {
        let d = reference - logps.clone();
        let kl = d.clone().exp() - d - 1.0;
        match params.bias_correction_kl {
            true => kl * ratio.clone(),
            false => kl,
        }
    });
    let clipped = ratio
        .clone()
        .clamp(1.0 - params.epsilon_low, 1.0 + params.epsilon_high);
    let ratio = match params.delta {
        Some(delta) => ratio.clamp_max(delta),
        None => ratio,
    };
    let advantages = advantages.unsqueeze_dim::<2>(1); // [rows, 1]
    let per_token = (ratio.clone() * advantages.clone())
        .min_pair(clipped * advantages.clone())
        .neg()
        .expand([rows, len]);
    let per_token = match &kl {
        Some(kl) => per_token + kl.clone() * params.beta,
        None => per_token,
    };
    let masked = per_token * mask.clone();
    let tokens_t = mask.clone().sum(); // [1]
    let loss = match params.loss_type {
        GrpoLossType::Grpo => (masked.sum_dim(1) / lengths).sum().reshape([1]),
        GrpoLossType::Bnpo => masked.sum() / tokens_t.clone().clamp_min(1.0),
        GrpoLossType::DrGrpo => masked.sum() / params.max_completion_length.max(1) as f64,
        GrpoLossType::Dapo => masked.sum(),
    };
    let scalar = |t: Tensor<B, 1>| t.into_scalar().elem::<f64>();
    let tokens = scalar(tokens_t);
    // TRL's `masked_batch_mean`: over completion tokens, or over rows for `[rows, 1]` values.
    let batch_mean = |x: Tensor<B, 2>| -> f64 {
        if x.dims()[1] == 1 {
            scalar(x.mean())
        } else {
            scalar((x * mask.clone()).sum()) / tokens.max(1.0)
        }
    };
    // Each completion's own share (TRL's `masked_seq_mean`), NaN without counted tokens.
    let per_row = |x: Tensor<B, 2>| -> Vec<f64> {
        let x = (x * mask.clone()).sum_dim(1) / mask.clone().sum_dim(1);
        x.into_data().convert::<f64>().to_vec().expect("f64 values")
    };
    let ratio = ratio.detach();
    let low = ratio
        .clone()
        .lower_elem(1.0 - params.epsilon_low)
        .bool_and(advantages.clone().lower_elem(0.0).expand(ratio.dims()));
    let high = ratio
        .clone()
        .greater_elem(1.0 + params.epsilon_high)
        .bool_and(advantages.greater_elem(0.0).expand(ratio.dims()));
    let region = low.clone().bool_or(high.clone());
    let extreme = |xs: Vec<f64>, pick: fn(f64, f64) -> f64| {
        xs.into_iter().filter(|x| !x.is_nan()).reduce(pick).unwrap_or(f64::NAN)
    };
    GrpoOutput {
        loss,
        kl: kl.map(|kl| batch_mean(kl.detach())),
        entropy: entropy.map(|e| batch_mean(e.detach())),
        clip_low: batch_mean(low.clone().float()),
        clip_high: batch_mean(high.clone().float()),
        clip_region: batch_mean(region.float()),
        clip_low_min: extreme(per_row(low.float()), f64::min),
        clip_high_max: extreme(per_row(high.float()), f64::max),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::TensorData;

    type B = Autodiff<NdArray>;

    fn t2(v: &[f32], rows: usize) -> Tensor<B, 2> {
        Tensor::from_data(TensorData::new(v.to_vec(), [rows, v.len() / rows]), &Default::default())
    }

    fn t1(v: &[f32]) -> Tensor<B, 1> {
        Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), &Default::default())
    }

    fn params(loss_type: GrpoLossType) -> GrpoParams {
        GrpoParams {
            loss_type,
            beta: 0.0,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            delta: None,
            importance_sampling: ImportanceSampling::Token,
            max_completion_length: 4,
            bias_correction_kl: true,
        }
    }

    #[test]
    fn advantages_are_relative_to_the_group() {
        let a = group_advantages(&[1.0, 0.0, 1.0, 1.0], 2, ScaleRewards::Group);
        // Group 1: mean 0.5, std 0.7071; group 2: mean 1, std 0.
        let s = 0.5f32.sqrt();
        assert!((a.advantages[0] - 0.5 / (s + 1e-4)).abs() < 1e-6);
        assert!((a.advantages[1] + 0.5 / (s + 1e-4)).abs() < 1e-6);
        assert_eq!(&a.advantages[2..], [0.0, 0.0]);
        assert!((a.reward - 0.75).abs() < 1e-9);
        assert!((a.reward_std - 0.5).abs() < 1e-6); // the round's std, not the groups' mean
        // A completion no function scored: NaN reward, advantage 0, left out of the means.
        let nan = group_advantages(&[f32::NAN, 1.0, 0.0, 2.0], 2, ScaleRewards::Group);
        assert_eq!(nan.advantages[..2], [0.0, 0.0]);
        assert!((nan.reward - 1.0).abs() < 1e-9);
        assert_eq!(a.frac_reward_zero_std, 0.5);
        let none = group_advantages(&[1.0, 0.0, 1.0, 1.0], 2, ScaleRewards::None);
        assert_eq!(none.advantages, [0.5, -0.5, 0.0, 0.0]);
        assert_eq!(weighted_rewards(&[1.0, f32::NAN, 2.0, 3.0], &[0.5, 2.0]), [0.5, 7.0]);
        assert!(weighted_rewards(&[f32::NAN, f32::NAN], &[0.5, 2.0])[0].is_nan());
    }

    /// With the ratio at 1 (one use of a round), the loss is minus the mean advantage under each
    /// normalisation, and its gradient pushes up the log-probabilities of good completions.
    #[test]
    fn the_loss_types_normalise_as_trl() {
        let logps = t2(&[-1.0, -2.0, -3.0, -1.0, -1.0, -1.0], 2);
        let mask = t2(&[1.0, 1.0, 1.0, 1.0, 0.0, 0.0], 2);
        let adv = t1(&[1.0, -2.0]);
        let value = |ty| {
            let out = grpo_loss(logps.clone(), None, None, adv.clone(), mask.clone(), None, &params(ty));
            (out.loss.into_scalar(), loss_weight(ty, 2, 4))
        };
        // grpo: per row means -1 and 2, summed; divided by 2 rows.
        assert_eq!(value(GrpoLossType::Grpo), (1.0, 2));
        // bnpo: (-3 + 2) / 4 tokens; weight 1.
        assert_eq!(value(GrpoLossType::Bnpo), (-0.25, 1));
        // dr_grpo: -1 / 4 (max length); 2 rows.
        assert_eq!(value(GrpoLossType::DrGrpo), (-0.25, 2));
        // dapo: summed, over 4 tokens.
        assert_eq!(value(GrpoLossType::Dapo), (-1.0, 4));

        let logps = logps.require_grad();
        let out = grpo_loss(logps.clone(), None, None, adv, mask, None, &params(GrpoLossType::Dapo));
        let grads = out.loss.backward();
        let g: Vec<f32> = logps.grad(&grads).unwrap().into_data().to_vec().unwrap();
        assert_eq!(g, [-1.0, -1.0, -1.0, 2.0, 0.0, 0.0]);
    }

    #[test]
    fn ratios_are_clipped_and_counted() {
        // Row 0 (advantage +1): ratios e^0.5 (clipped high) and 1; row 1 (advantage -1): e^-0.5
        // (clipped low) and 1.
        let logps = t2(&[0.0, 0.0, 0.0, 0.0], 2);
        let old = t2(&[-0.5, 0.0, 0.5, 0.0], 2);
        let mask = t2(&[1.0, 1.0, 1.0, 1.0], 2);
        let mut p = params(GrpoLossType::Bnpo);
        p.beta = 0.1;
        let reference = t2(&[0.0, 0.0, 0.0, 0.0], 2);
        let out = grpo_loss(logps, Some(old), Some(reference), t1(&[1.0, -1.0]), mask, None, &p);
        // Row 0: -min(1.6487, 1.2) = -1.2 and -1; row 1: -min(-0.6065, -0.8) = 0.8 and 1.
        let want = (-1.2 - 1.0 + 0.8 + 1.0) / 4.0;
        assert!((out.loss.into_scalar() as f64 - want).abs() < 1e-6);
        assert_eq!((out.clip_low, out.clip_high, out.clip_region), (0.25, 0.25, 0.5));
        // Row 0 has no low-clipped token, row 1 half; row 0 half high-clipped, row 1 none.
        assert_eq!((out.clip_low_min, out.clip_high_max), (0.0, 0.5));
        assert_eq!(out.kl, Some(0.0));

        // Sequence level: each row's mean log-ratio, 0.25 and -0.25, inside a clip range of 0.3.
        p.importance_sampling = ImportanceSampling::Sequence;
        p.beta = 0.0;
        (p.epsilon_low, p.epsilon_high) = (0.3, 0.3);
        let out = grpo_loss(
            t2(&[0.0, 0.0, 0.0, 0.0], 2),
            Some(t2(&[-0.5, 0.0, 0.5, 0.0], 2)),
            None,
            t1(&[1.0, -1.0]),
            t2(&[1.0, 1.0, 1.0, 1.0], 2),
            None,
            &p,
        );
        let want = (-2.0 * 0.25f64.exp() + 2.0 * (-0.25f64).exp()) / 4.0;
        assert!((out.loss.into_scalar() as f64 - want).abs() < 1e-6);
        assert_eq!(out.clip_region, 0.0);
        assert_eq!(out.kl, None);
    }
}
