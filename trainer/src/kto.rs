//! KTO on a model: the summed completion log-probabilities of an unpaired batch's rows under
//! the policy, its KL estimate from the rows' mismatched completions (under the policy without
//! gradient, and the reference), and the step loss with TRL's metrics.

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, ElementConversion, Tensor, TensorData};
use temper_data::UnpairedBatch;
use temper_models::LlamaForCausalLM;
use temper_trl::{KtoParams, kto_loss};

use crate::blocks::{HiddenFn, plain};
use crate::preference::{Rows, rows_logps};
use crate::step::{Metric, StepSums};
use crate::sync::{Collective, CollectiveError};

/// This worker's KL estimate of one micro-batch before clamping: the mean over its rows of the
/// policy's minus the reference's log-probabilities of the mismatched pairs (`reference` is
/// [`all_rows`]'). `model` is the policy without autodiff (TRL computes it without gradient:
/// the estimate is a constant of the loss). `None` without KL pairs.
pub(crate) fn local_kl<B: Backend>(
    model: &LlamaForCausalLM<B>,
    batch: &UnpairedBatch,
    reference: &Tensor<B, 1>,
    device: &B::Device,
) -> Option<f64> {
    let n = batch.rows;
    batch.kl.then(|| {
        let (policy_kl, _, _) = rows_logps(model, &plain, part(batch, 1), 0, device);
        temper_trl::kto_kl_mean(policy_kl, reference.clone().slice(n..2 * n))
            .into_scalar()
            .elem::<f64>()
    })
}

/// The KL estimate of each of a step's micro-batches, as TRL's `KTOTrainer` uses it: each
/// worker's estimate of its `j`-th micro-batch averaged over the workers that have one (TRL's
/// `gather(kl).mean()`), then clamped at 0. One all-reduce of `2 * slots` values
/// (`gradient_accumulation_steps` slots) on every worker, whatever its micro-batch count, so a
/// worker at the end of its data does not leave the others waiting.
pub(crate) fn gathered_kl(
    local: &[Option<f64>],
    slots: usize,
    collective: Option<&dyn Collective>,
) -> Result<Vec<f64>, CollectiveError> {
    let mut packed = vec![0.0f32; 2 * slots.max(local.len())];
    for (j, kl) in local.iter().enumerate() {
        if let Some(kl) = kl {
            packed[2 * j] = *kl as f32;
            packed[2 * j + 1] = 1.0;
        }
    }
    let totals = match collective {
        Some(c) if c.world_size() > 1 => c.all_reduce_sum(packed)?,
        _ => packed,
    };
    Ok((0..local.len())
        .map(|j| match totals[2 * j + 1] {
            0.0 => 0.0,
            workers => (totals[2 * j] as f64 / workers as f64).max(0.0),
        })
        .collect())
}

/// Every sequence of `batch`: its rows, then (with KTO's KL term) their mismatched pairs.
pub(crate) fn all_rows(batch: &UnpairedBatch) -> Rows<'_> {
    Rows {
        input_ids: &batch.input_ids,
        attention_mask: &batch.attention_mask,
        completion_mask: &batch.completion_mask,
        rows: if batch.kl { 2 * batch.rows } else { batch.rows },
        seq_len: batch.seq_len,
    }
}

/// The rows themselves (`part` 0) or their KL pairs (`part` 1).
fn part(batch: &UnpairedBatch, part: usize) -> Rows<'_> {
    let span = batch.rows * batch.seq_len;
    let at = part * span..(part + 1) * span;
    Rows {
        input_ids: &batch.input_ids[at.clone()],
        attention_mask: &batch.attention_mask[at.clone()],
        completion_mask: &batch.completion_mask[at],
        rows: batch.rows,
        seq_len: batch.seq_len,
    }
}

/// The summed loss of one micro-batch over its rows; adds TRL's `kl`, `rewards/*`, `logps/*`
/// and `logits/*` (sums, divided at logging by the desirable or undesirable row count, or the
/// completion tokens) to `sums`. `reference` is the reference's log-probabilities of
/// [`all_rows`]; `kl` the micro-batch's KL estimate ([`gathered_kl`]; 0 without KL pairs).
#[allow(clippy::too_many_arguments)]
pub(crate) fn kto_step_loss<B: Backend>(
    model: &LlamaForCausalLM<B>,
    hidden: HiddenFn<B>,
    reference: Tensor<B, 1>,
    kl: f64,
    batch: &UnpairedBatch,
    params: KtoParams,
    device: &B::Device,
    sums: &mut StepSums,
) -> Tensor<B, 1> {
    let n = batch.rows;
    let (policy, mean_logits, _) = rows_logps(model, hidden, part(batch, 0), 0, device);
    let kl = Tensor::<B, 1>::from_data(TensorData::new(vec![kl as f32], [1]), device);
    let desirable = Tensor::<B, 1, Bool>::from_data(TensorData::new(batch.desirable.clone(), [n]), device);
    let out = kto_loss(
        policy.clone(),
        reference.slice(0..n),
        desirable.clone(),
        kl.clone(),
        params,
    );

    let sum = |t: Tensor<B, 1>| -> f64 { t.sum().into_scalar().elem::<f32>() as f64 };
    let tokens: Vec<f32> = (0..n)
        .map(|r| {
            let row = &batch.completion_mask[r * batch.seq_len + 1..(r + 1) * batch.seq_len];
            row.iter().filter(|&&m| m == 1).count() as f32
        })
        .collect();
    let tokens = Tensor::<B, 1>::from_data(TensorData::new(tokens, [n]), device);
    sums.add(Metric::Kl, sum(kl));
    sums.add(Metric::MicroBatches, 1.0);
    let logps = policy.detach();
    for (wanted, count, [rewards, logps_m, logits, tokens_m]) in [
        (
            true,
            Metric::DesirableRows,
            [
                Metric::RewardsChosen,
                Metric::LogpsChosen,
                Metric::LogitsChosen,
                Metric::ChosenTokens,
            ],
        ),
        (
            false,
            Metric::UndesirableRows,
            [
                Metric::RewardsRejected,
                Metric::LogpsRejected,
                Metric::LogitsRejected,
                Metric::RejectedTokens,
            ],
        ),
    ] {
        let rows = batch.desirable.iter().filter(|&&d| d == wanted).count();
        if rows == 0 {
            continue; // TRL logs a side only when the batch has rows of it
        }
        let mask = if wanted {
            desirable.clone()
        } else {
            desirable.clone().bool_not()
        }
        .float();
        sums.add(count, rows as f64);
        sums.add(rewards, sum(out.rewards.clone() * mask.clone()));
        sums.add(logps_m, sum(logps.clone() * mask.clone()));
        sums.add(logits, sum(mean_logits.clone().detach() * mask.clone()));
        sums.add(tokens_m, sum(tokens.clone() * mask));
    }
    out.losses.sum()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier, Mutex};

    use super::*;

    /// Two workers summing through shared memory.
    struct Pair {
        rank: usize,
        shared: Arc<(Barrier, Mutex<Vec<Vec<f32>>>)>,
    }

    impl Collective for Pair {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            2
        }
        fn all_reduce_sum(&self, values: Vec<f32>) -> Result<Vec<f32>, CollectiveError> {
            let (barrier, slots) = &*self.shared;
            slots.lock().unwrap()[self.rank] = values;
            barrier.wait();
            let sum = {
                let slots = slots.lock().unwrap();
                (0..slots[0].len()).map(|i| slots[0][i] + slots[1][i]).collect()
            };
            barrier.wait();
            Ok(sum)
        }
    }

    #[test]
    fn the_kl_estimate_is_averaged_over_workers_then_clamped() {
        // Alone: each micro-batch's own estimate, clamped.
        assert_eq!(
            gathered_kl(&[Some(0.5), Some(-0.25), None], 3, None).unwrap(),
            [0.5, 0.0, 0.0]
        );
        // Two workers, two slots; worker 1 has one micro-batch left. Slot 0: (0.5 - 0.25) / 2;
        // slot 1: worker 0's -0.25 alone, clamped (TRL clamps after the mean, not before).
        let shared = Arc::new((Barrier::new(2), Mutex::new(vec![Vec::new(), Vec::new()])));
        let local = [vec![Some(0.5), Some(-0.25)], vec![Some(-0.25)]];
        let got: Vec<Vec<f64>> = (0..2)
            .map(|rank| {
                let (shared, local) = (shared.clone(), local[rank].clone());
                std::thread::spawn(move || gathered_kl(&local, 2, Some(&Pair { rank, shared })).unwrap())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        assert_eq!(got, [vec![0.125, 0.0], vec![0.125]]);
    }
}
