//! What one optimizer step produced: the logged quantities summed over its micro-batches, the
//! normaliser that divides them, its counters, a stop request and the data cursors; and the one
//! place that packs all of it into the data-parallel all-reduce and back.

use temper_data::Cursor;

use crate::sync::{Collective, in_own_slot};

/// The quantities a step logs (TRL's names), each summed over the step's micro-batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Metric {
    Loss,
    MeanTokenAccuracy,
    RewardsChosen,
    RewardsRejected,
    RewardsAccuracies,
    RewardsMargins,
    LogpsChosen,
    LogpsRejected,
    LogitsChosen,
    LogitsRejected,
    /// ORPO's terms (`temper_trl::PreferenceOutput::extra`).
    NllLoss,
    LogOddsRatio,
    LogOddsChosen,
    /// KTO's KL estimate, summed over micro-batches (divided by their count).
    Kl,
    /// Reward models: each micro-batch's share of pairs ranked right, mean margin, and lowest,
    /// mean and highest score, summed over micro-batches (divided by their count, as TRL
    /// averages its per-batch values).
    Accuracy,
    Margin,
    MinReward,
    MeanReward,
    MaxReward,
    /// GRPO, per micro-batch (divided by their count, as TRL averages its per-micro-batch
    /// values): the mean entropy per completion token, and the clipped shares of the ratio.
    Entropy,
    ClipLowMean,
    ClipLowMin,
    ClipHighMean,
    ClipHighMax,
    ClipRegionMean,
    /// Completion tokens of the chosen and rejected rows: what divides `logits/*`. Not logged.
    ChosenTokens,
    RejectedTokens,
    /// KTO: desirable and undesirable rows (what divides its `rewards/*` and `logps/*`), and
    /// micro-batches (what divides `kl`). Not logged.
    DesirableRows,
    UndesirableRows,
    MicroBatches,
    /// GRPO: micro-batches with a completion token that counts (what divides
    /// `clip_ratio/low_min` and `/high_max`). Not logged.
    CountedMicroBatches,
    /// Mixtures of experts: the load-balancing loss (before its coefficient), per micro-batch,
    /// and the micro-batches that had one (what divides it; not logged).
    AuxLoss,
    RoutedMicroBatches,
}

impl Metric {
    /// Every metric, in the order rows show them.
    const ALL: [Metric; 33] = [
        Metric::Loss,
        Metric::MeanTokenAccuracy,
        Metric::RewardsChosen,
        Metric::RewardsRejected,
        Metric::RewardsAccuracies,
        Metric::RewardsMargins,
        Metric::LogpsChosen,
        Metric::LogpsRejected,
        Metric::LogitsChosen,
        Metric::LogitsRejected,
        Metric::NllLoss,
        Metric::LogOddsRatio,
        Metric::LogOddsChosen,
        Metric::Kl,
        Metric::Accuracy,
        Metric::Margin,
        Metric::MinReward,
        Metric::MeanReward,
        Metric::MaxReward,
        Metric::Entropy,
        Metric::ClipLowMean,
        Metric::ClipLowMin,
        Metric::ClipHighMean,
        Metric::ClipHighMax,
        Metric::ClipRegionMean,
        Metric::ChosenTokens,
        Metric::RejectedTokens,
        Metric::DesirableRows,
        Metric::UndesirableRows,
        Metric::MicroBatches,
        Metric::CountedMicroBatches,
        Metric::AuxLoss,
        Metric::RoutedMicroBatches,
    ];

    /// The training name, and the evaluation's (`eval_` + it) where evaluation reports it.
    fn names(self) -> (&'static str, Option<&'static str>) {
        match self {
            Metric::Loss => ("loss", Some("eval_loss")),
            Metric::MeanTokenAccuracy => ("mean_token_accuracy", None),
            Metric::RewardsChosen => ("rewards/chosen", Some("eval_rewards/chosen")),
            Metric::RewardsRejected => ("rewards/rejected", Some("eval_rewards/rejected")),
            Metric::RewardsAccuracies => ("rewards/accuracies", Some("eval_rewards/accuracies")),
            Metric::RewardsMargins => ("rewards/margins", Some("eval_rewards/margins")),
            Metric::LogpsChosen => ("logps/chosen", Some("eval_logps/chosen")),
            Metric::LogpsRejected => ("logps/rejected", Some("eval_logps/rejected")),
            Metric::LogitsChosen => ("logits/chosen", Some("eval_logits/chosen")),
            Metric::LogitsRejected => ("logits/rejected", Some("eval_logits/rejected")),
            Metric::NllLoss => ("nll_loss", Some("eval_nll_loss")),
            Metric::LogOddsRatio => ("log_odds_ratio", Some("eval_log_odds_ratio")),
            Metric::LogOddsChosen => ("log_odds_chosen", Some("eval_log_odds_chosen")),
            Metric::Kl => ("kl", Some("eval_kl")),
            Metric::Accuracy => ("accuracy", Some("eval_accuracy")),
            Metric::Margin => ("margin", Some("eval_margin")),
            Metric::MinReward => ("min_reward", Some("eval_min_reward")),
            Metric::MeanReward => ("mean_reward", Some("eval_mean_reward")),
            Metric::MaxReward => ("max_reward", Some("eval_max_reward")),
            Metric::Entropy => ("entropy", Some("eval_entropy")),
            Metric::ClipLowMean => ("clip_ratio/low_mean", Some("eval_clip_ratio/low_mean")),
            Metric::ClipLowMin => ("clip_ratio/low_min", Some("eval_clip_ratio/low_min")),
            Metric::ClipHighMean => ("clip_ratio/high_mean", Some("eval_clip_ratio/high_mean")),
            Metric::ClipHighMax => ("clip_ratio/high_max", Some("eval_clip_ratio/high_max")),
            Metric::ClipRegionMean => ("clip_ratio/region_mean", Some("eval_clip_ratio/region_mean")),
            Metric::ChosenTokens => ("chosen_tokens", None),
            Metric::RejectedTokens => ("rejected_tokens", None),
            Metric::DesirableRows => ("desirable_rows", None),
            Metric::UndesirableRows => ("undesirable_rows", None),
            Metric::MicroBatches => ("micro_batches", None),
            Metric::CountedMicroBatches => ("counted_micro_batches", None),
            Metric::AuxLoss => ("aux_loss", None),
            Metric::RoutedMicroBatches => ("routed_micro_batches", None),
        }
    }

    /// The metric `temper_trl` names an objective's extra term.
    pub(crate) fn of_trl_term(name: &str) -> Metric {
        Metric::ALL
            .into_iter()
            .find(|m| m.names().0 == name)
            .unwrap_or_else(|| panic!("temper_trl's term {name:?} has no Metric"))
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Per-step sums of the logged quantities; a metric no micro-batch added is absent (not 0).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StepSums {
    values: [Option<f64>; Metric::ALL.len()],
}

// By hand: the standard library derives `Default` for arrays of up to 32 elements.
impl Default for StepSums {
    fn default() -> Self {
        Self {
            values: [None; Metric::ALL.len()],
        }
    }
}

impl StepSums {
    pub(crate) fn add(&mut self, metric: Metric, v: f64) {
        let slot = &mut self.values[metric.index()];
        *slot = Some(slot.unwrap_or(0.0) + v);
    }

    pub(crate) fn get(&self, metric: Metric) -> f64 {
        self.values[metric.index()].unwrap_or(0.0)
    }

    /// The logged means, in [`Metric::ALL`]'s order, without the loss (reported on its own):
    /// per target token or pair (`denominator`), `logits/*` per completion token, KTO's
    /// `rewards/*` and `logps/*` per desirable or undesirable row and its `kl` per micro-batch,
    /// as TRL averages them. Training names, or with `eval`, the evaluation's (where it has one).
    pub(crate) fn logged(&self, denominator: usize, eval: bool) -> Vec<(&'static str, f64)> {
        let kto = |count: Metric| self.values[count.index()];
        let mean = |m: Metric, count: Metric| Some(self.values[m.index()]? / kto(count)?.max(1.0));
        Metric::ALL
            .into_iter()
            .filter(|&m| {
                !matches!(
                    m,
                    Metric::Loss
                        | Metric::ChosenTokens
                        | Metric::RejectedTokens
                        | Metric::DesirableRows
                        | Metric::UndesirableRows
                        | Metric::MicroBatches
                        | Metric::CountedMicroBatches
                        | Metric::RoutedMicroBatches
                )
            })
            .filter_map(|m| {
                let name = if eval { m.names().1? } else { m.names().0 };
                let value = match m {
                    Metric::LogitsChosen => mean(m, Metric::ChosenTokens)?,
                    Metric::LogitsRejected => mean(m, Metric::RejectedTokens)?,
                    Metric::Kl
                    | Metric::Accuracy
                    | Metric::Margin
                    | Metric::MinReward
                    | Metric::MeanReward
                    | Metric::MaxReward
                    | Metric::Entropy
                    | Metric::ClipLowMean
                    | Metric::ClipHighMean
                    | Metric::ClipRegionMean => mean(m, Metric::MicroBatches)?,
                    Metric::ClipLowMin | Metric::ClipHighMax => mean(m, Metric::CountedMicroBatches)?,
                    Metric::AuxLoss => mean(m, Metric::RoutedMicroBatches)?,
                    Metric::RewardsChosen | Metric::LogpsChosen if kto(Metric::DesirableRows).is_some() => {
                        mean(m, Metric::DesirableRows)?
                    }
                    Metric::RewardsRejected | Metric::LogpsRejected if kto(Metric::UndesirableRows).is_some() => {
                        mean(m, Metric::UndesirableRows)?
                    }
                    // KTO's margin: the difference of its two means, when both sides had rows.
                    Metric::RewardsMargins if self.values[m.index()].is_none() => {
                        mean(Metric::RewardsChosen, Metric::DesirableRows)?
                            - mean(Metric::RewardsRejected, Metric::UndesirableRows)?
                    }
                    _ => self.values[m.index()]? / (denominator as f64).max(1.0),
                };
                Some((name, value))
            })
            .collect()
    }

    /// Each metric as `(sum, present)`: summed over workers, a metric is present if any worker
    /// had it.
    fn pack(&self) -> impl Iterator<Item = f32> + '_ {
        self.values
            .iter()
            .flat_map(|v| [v.unwrap_or(0.0) as f32, v.is_some() as u8 as f32])
    }

    fn unpack(packed: &[f32]) -> Self {
        let mut sums = StepSums::default();
        for (slot, pair) in sums.values.iter_mut().zip(packed.chunks_exact(2)) {
            *slot = (pair[1] > 0.0).then_some(pair[0] as f64);
        }
        sums
    }
}

/// One step's result, on one worker or, after [`StepResult::pack`] went through the
/// all-reduce and [`StepResult::unpack`], over all of them.
#[derive(Debug, Clone)]
pub(crate) struct StepResult {
    /// What the step's loss is divided by: target tokens (SFT) or pairs (preference).
    pub denominator: usize,
    /// Real (non-padding) tokens and examples (or pairs).
    pub tokens: usize,
    pub examples: usize,
    pub sums: StepSums,
    /// A stop request (signal, `stop_after_steps`) from any worker.
    pub stop: bool,
    /// The data cursor after the step: this worker's, or after the all-reduce, each worker's
    /// by rank.
    pub cursors: Vec<Cursor>,
}

impl StepResult {
    /// The step's mean loss.
    pub(crate) fn loss(&self) -> f64 {
        self.sums.get(Metric::Loss) / self.denominator.max(1) as f64
    }

    /// The all-reduce's layout. The denominator comes first: `sync_gradients` weighs this
    /// worker's gradients by it. Cursors go in this worker's slots, zeros elsewhere.
    pub(crate) fn pack(&self, c: &dyn Collective) -> Vec<f32> {
        let mut out = vec![
            self.denominator as f32,
            self.tokens as f32,
            self.examples as f32,
            self.stop as u8 as f32,
        ];
        out.extend(self.sums.pack());
        let cursor = self.cursors[0];
        out.extend(in_own_slot(
            c,
            &[cursor.epoch as f32, cursor.window as f32, cursor.batch as f32],
        ));
        out
    }

    /// The sums of every worker's [`StepResult::pack`].
    pub(crate) fn unpack(totals: &[f32], world: usize) -> Self {
        let sums_end = 4 + 2 * Metric::ALL.len();
        let cursors = totals[sums_end..sums_end + 3 * world]
            .chunks_exact(3)
            .map(|c| Cursor {
                epoch: c[0] as u64,
                window: c[1] as u64,
                batch: c[2] as u64,
            })
            .collect();
        StepResult {
            denominator: totals[0] as usize,
            tokens: totals[1] as usize,
            examples: totals[2] as usize,
            stop: totals[3] > 0.0,
            sums: StepSums::unpack(&totals[4..sums_end]),
            cursors,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Worker `.0` of two (the all-reduce itself is not needed to pack).
    struct Worker(usize);

    impl Collective for Worker {
        fn rank(&self) -> usize {
            self.0
        }
        fn world_size(&self) -> usize {
            2
        }
        fn all_reduce_sum(&self, values: Vec<f32>) -> std::result::Result<Vec<f32>, crate::sync::CollectiveError> {
            Ok(values)
        }
    }

    #[test]
    fn packing_round_trips_and_sums() {
        let mut sums = StepSums::default();
        sums.add(Metric::Loss, 6.0);
        sums.add(Metric::LogitsChosen, 4.0);
        sums.add(Metric::ChosenTokens, 8.0);
        let mine = StepResult {
            denominator: 3,
            tokens: 40,
            examples: 3,
            sums,
            stop: false,
            cursors: vec![Cursor {
                epoch: 1,
                window: 2,
                batch: 3,
            }],
        };
        let mut other = mine.clone();
        other.stop = true;
        other.cursors[0].batch = 9;
        let (a, b) = (mine.pack(&Worker(0)), other.pack(&Worker(1)));
        let total: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        let all = StepResult::unpack(&total, 2);
        assert_eq!((all.denominator, all.tokens, all.examples, all.stop), (6, 80, 6, true));
        assert_eq!(all.loss(), 2.0);
        assert_eq!((all.cursors[0].batch, all.cursors[1].batch), (3, 9));
        // Present metrics only; logits per completion token; counts not logged.
        assert_eq!(all.sums.logged(6, false), [("logits/chosen", 0.5)]);
        assert_eq!(all.sums.logged(6, true), [("eval_logits/chosen", 0.5)]);
        assert_eq!(Metric::of_trl_term("log_odds_ratio"), Metric::LogOddsRatio);
    }
}
