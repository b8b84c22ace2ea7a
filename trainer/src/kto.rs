//! KTO on a model: the summed completion log-probabilities of an unpaired batch's rows under
//! the policy, its KL estimate from the rows' mismatched completions (under the policy without
//! gradient, and the reference), and the step loss with TRL's metrics.

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, ElementConversion, Tensor, TensorData};
use temper_data::UnpairedBatch;
use temper_models::LlamaForCausalLM;
use temper_trl::{KtoParams, kto_kl, kto_loss};

use crate::blocks::{HiddenFn, plain};
use crate::preference::{Rows, rows_logps};
use crate::step::{Metric, StepSums};

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
/// [`all_rows`].
pub(crate) fn kto_step_loss<B: Backend>(
    model: &LlamaForCausalLM<B>,
    hidden: HiddenFn<B>,
    reference: Tensor<B, 1>,
    batch: &UnpairedBatch,
    params: KtoParams,
    device: &B::Device,
    sums: &mut StepSums,
) -> Tensor<B, 1> {
    let n = batch.rows;
    let (policy, mean_logits, _) = rows_logps(model, hidden, part(batch, 0), 0, device);
    let kl = if batch.kl {
        // TRL computes these without gradient: the estimate is a constant of the loss. An
        // untracked copy keeps autodiff from holding this pass's activations until the backward.
        let untracked = model.clone().no_grad();
        let (policy_kl, _, _) = rows_logps(&untracked, &plain, part(batch, 1), 0, device);
        kto_kl(policy_kl, reference.clone().slice(n..2 * n))
    } else {
        Tensor::zeros([1], device)
    };
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
