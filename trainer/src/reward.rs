//! Reward modelling on a model: one forward pass over a preference batch's chosen and rejected
//! sequences, each scored by the `score` head at its last non-padding token, and the
//! Bradley-Terry loss with TRL's `RewardTrainer` metrics.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use temper_data::{Batch, PreferenceBatch, last_tokens};
use temper_models::{ForwardOptions, LlamaForCausalLM};
use temper_trl::{RewardParams, reward_loss};

use crate::blocks::{HiddenFn, plain};
use crate::forward::{int_matrix, int_vector};
use crate::step::{Metric, StepSums};

/// The score of each right-padded row (`[rows]`), read at its last token that is not
/// `pad_id`, as transformers' `*ForSequenceClassification` reads it.
fn score_rows<B: Backend>(
    model: &LlamaForCausalLM<B>,
    hidden: HiddenFn<B>,
    input_ids: &[u32],
    attention_mask: &[u8],
    seq_len: usize,
    pad_id: u32,
    device: &B::Device,
) -> Tensor<B, 1> {
    let rows = input_ids.len() / seq_len.max(1);
    let ids = int_matrix(input_ids, [rows, seq_len], device);
    // Right padding under a causal mask: real tokens never see the padding after them.
    let states = hidden(model, ids, ForwardOptions::default());
    let last = last_tokens(input_ids, attention_mask, seq_len, pad_id);
    model.scores(states, int_vector(last.into_iter().map(|t| t as i64).collect(), device))
}

/// The reward model's score of each sequence of a batch, in the batch's order: a preference
/// batch's chosen rows then its rejected rows, an SFT batch's rows (unpacked), an unpaired
/// batch's completions. `pad_id` is the token the batch was padded with
/// ([`temper_data::Pipeline::pad_id`]).
pub fn batch_scores<B: Backend>(
    model: &LlamaForCausalLM<B>,
    batch: &Batch,
    pad_id: u32,
    device: &B::Device,
) -> Vec<f32> {
    let scores = match batch {
        Batch::Preference(b) => score_rows(
            model,
            &plain,
            &b.input_ids,
            &b.attention_mask,
            b.seq_len,
            pad_id,
            device,
        ),
        Batch::Unpaired(b) => {
            let n = b.rows * b.seq_len; // the completions, not KTO's mismatched pairs
            score_rows(
                model,
                &plain,
                &b.input_ids[..n],
                &b.attention_mask[..n],
                b.seq_len,
                pad_id,
                device,
            )
        }
        Batch::Sft(b) => {
            let mask: Vec<u8> = b.segment_ids.iter().map(|&s| (s != 0) as u8).collect();
            score_rows(model, &plain, &b.input_ids, &mask, b.seq_len, pad_id, device)
        }
        // Generated completions: their prompt + completion rows, right-padded.
        Batch::Rollout(b) => {
            let mask: Vec<u8> = (0..b.rows)
                .flat_map(|r| {
                    let real = b.prompt_lengths[r] + b.completion_lengths[r];
                    (0..b.seq_len).map(move |t| (t < real) as u8)
                })
                .collect();
            score_rows(model, &plain, &b.input_ids, &mask, b.seq_len, pad_id, device)
        }
        Batch::Prompts(_) => panic!("prompts alone have nothing to score"),
    };
    scores.into_data().convert::<f32>().to_vec().expect("f32 scores")
}

/// The summed loss of one micro-batch over its pairs; adds TRL's `accuracy`, `margin` and
/// `min_reward` / `mean_reward` / `max_reward` (this micro-batch's values, averaged over
/// micro-batches at logging, as TRL averages them) to `sums`.
pub(crate) fn reward_step_loss<B: Backend>(
    model: &LlamaForCausalLM<B>,
    hidden: HiddenFn<B>,
    batch: &PreferenceBatch,
    params: RewardParams,
    device: &B::Device,
    sums: &mut StepSums,
) -> Tensor<B, 1> {
    let p = batch.pairs;
    let scores = score_rows(
        model,
        hidden,
        &batch.input_ids,
        &batch.attention_mask,
        batch.seq_len,
        batch.pad_id,
        device,
    );
    let (chosen, rejected) = (scores.clone().slice(0..p), scores.clone().slice(p..2 * p));
    let margin = batch
        .margins
        .as_ref()
        .map(|m| Tensor::<B, 1>::from_data(TensorData::new(m.clone(), [p]), device));
    let losses = reward_loss(chosen.clone(), rejected.clone(), margin, params);
    let values: Vec<f32> = scores
        .detach()
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32 scores");
    let (c, r) = values.split_at(p);
    let per_pair = |f: &dyn Fn(f32, f32) -> f32| c.iter().zip(r).map(|(&c, &r)| f(c, r) as f64).sum::<f64>() / p as f64;
    sums.add(Metric::Accuracy, per_pair(&|c, r| (c > r) as u8 as f32));
    sums.add(Metric::Margin, per_pair(&|c, r| c - r));
    sums.add(
        Metric::MinReward,
        values.iter().copied().fold(f32::INFINITY, f32::min) as f64,
    );
    sums.add(
        Metric::MaxReward,
        values.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64,
    );
    sums.add(
        Metric::MeanReward,
        values.iter().map(|&v| v as f64).sum::<f64>() / values.len() as f64,
    );
    sums.add(Metric::MicroBatches, 1.0);
    losses.sum()
}
