//! A model's forward pass as objectives consume it: the log-probabilities of target tokens,
//! with the output head run only where a target follows.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use temper_data::{Batch, IGNORE_INDEX, SftBatch};
use temper_models::{ForwardOptions, LlamaForCausalLM};
use temper_trl::{TokenLogps, TokenLoss, head_token_logps, token_logps};

use crate::blocks::HiddenFn;
use crate::error::{Error, Result};

/// Stops at an id past the embedding, which would index out of bounds inside the backend (a
/// panic there); `during` names the step or the evaluation.
pub(crate) fn check_vocab(batch: &Batch, vocab: usize, during: impl FnOnce() -> String) -> Result<()> {
    match batch.max_token_id().filter(|&id| id as usize >= vocab) {
        Some(id) => Err(Error::TokenOutOfVocab {
            during: during(),
            id,
            vocab,
        }),
        None => Ok(()),
    }
}

pub(crate) fn int_matrix<B: Backend>(values: &[u32], shape: [usize; 2], device: &B::Device) -> Tensor<B, 2, Int> {
    let v: Vec<i64> = values.iter().map(|&x| x as i64).collect();
    Tensor::from_data(TensorData::new(v, shape), device)
}

/// The SFT loss of one batch: logits only at positions whose next token is a target, so
/// prompts and padding never reach the output head.
pub(crate) fn sft_loss<B: Backend>(
    model: &LlamaForCausalLM<B>,
    hidden: HiddenFn<B>,
    batch: &SftBatch,
    device: &B::Device,
) -> Option<TokenLoss<B>> {
    sft_token_logps(model, hidden, batch, device).map(|(logps, _)| TokenLoss::from_logps(logps))
}

/// The log-probabilities of an SFT batch's targets, and the row each belongs to.
pub(crate) fn sft_token_logps<B: Backend>(
    model: &LlamaForCausalLM<B>,
    hidden: HiddenFn<B>,
    batch: &SftBatch,
    device: &B::Device,
) -> Option<(TokenLogps<B>, Vec<usize>)> {
    let (b, s) = (batch.batch_size, batch.seq_len);
    let mut positions = Vec::new();
    let mut targets = Vec::new();
    let mut rows = Vec::new();
    for r in 0..b {
        for t in 0..s.saturating_sub(1) {
            let label = batch.labels[r * s + t + 1];
            if label != IGNORE_INDEX {
                positions.push((r * s + t) as i64);
                targets.push(label as i64);
                rows.push(r);
            }
        }
    }
    if positions.is_empty() {
        return None;
    }
    // Right padding needs no mask under causal attention: real tokens never look ahead. A
    // mixture of experts gets one all the same, so that padding stays out of its
    // load-balancing loss (as transformers' attention mask keeps it out).
    let moe = model.model.layers.iter().any(|l| l.moe.is_some());
    let options = ForwardOptions {
        position_ids: Some(int_matrix(&batch.position_ids, [b, s], device)),
        attention_mask: moe.then(|| {
            let real: Vec<u32> = batch.segment_ids.iter().map(|&id| (id != 0) as u32).collect();
            int_matrix(&real, [b, s], device)
        }),
        segment_ids: batch
            .is_packed()
            .then(|| int_matrix(&batch.segment_ids, [b, s], device)),
    };
    let logps = token_logps_at(
        model,
        hidden,
        int_matrix(&batch.input_ids, [b, s], device),
        options,
        positions,
        targets,
        device,
    );
    Some((logps, rows))
}

/// Log-probabilities of `targets` at `positions` (flat `row * seq + t` indices) of a forward
/// pass: the output head runs only where a target follows, so prompts and padding never reach
/// it. A frozen head goes through [`head_token_logps`] (no `[n, vocab]` tensor kept for the
/// backward pass); a trained one (full fine-tuning, a LoRA on `lm_head`) through its logits.
pub(crate) fn token_logps_at<B: Backend>(
    model: &LlamaForCausalLM<B>,
    hidden: HiddenFn<B>,
    input_ids: Tensor<B, 2, Int>,
    options: ForwardOptions<B>,
    positions: Vec<i64>,
    targets: Vec<i64>,
    device: &B::Device,
) -> TokenLogps<B> {
    let scoring = Scoring {
        temperature: 1.0,
        entropy: false,
    };
    scored_token_logps_at(model, hidden, input_ids, options, positions, targets, scoring, device)
}

/// How [`scored_token_logps_at`] reads the logits: divided by a sampling temperature (as GRPO
/// scores its completions), with or without each position's entropy.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scoring {
    pub temperature: f64,
    pub entropy: bool,
}

/// [`token_logps_at`] of the logits divided by `scoring.temperature`, with the entropies when
/// asked for.
#[allow(clippy::too_many_arguments)]
pub(crate) fn scored_token_logps_at<B: Backend>(
    model: &LlamaForCausalLM<B>,
    hidden: HiddenFn<B>,
    input_ids: Tensor<B, 2, Int>,
    options: ForwardOptions<B>,
    mut positions: Vec<i64>,
    mut targets: Vec<i64>,
    scoring: Scoring,
    device: &B::Device,
) -> TokenLogps<B> {
    let [rows, s] = input_ids.dims();
    let n = positions.len();
    // The head's rows, rounded up by repeating the last position (sliced off below).
    let multiple = head_rows_multiple::<B>(device);
    let padded = n.div_ceil(multiple) * multiple;
    positions.resize(padded, positions.last().copied().unwrap_or(0));
    targets.resize(padded, targets.last().copied().unwrap_or(0));
    let hidden = hidden(model, input_ids, options); // [rows, s, h]
    let h = hidden.dims()[2];
    let picked = hidden.reshape([rows * s, h]).select(0, int_vector(positions, device)); // [padded, h]
    let targets = int_vector(targets, device);
    let inverse = 1.0 / scoring.temperature;
    let out = match frozen_head_weight(model) {
        Some(weight) => {
            let rows_per_chunk = (HEAD_CHUNK_ELEMENTS / weight.dims()[0]).max(64) / 64 * 64;
            // The head is linear here: scaling its input scales the logits.
            let picked = if inverse == 1.0 { picked } else { picked.mul_scalar(inverse) };
            head_token_logps(picked, weight, targets, rows_per_chunk, scoring.entropy, model.products)
        }
        None => {
            let logits = model.head(picked.reshape([1, padded, h])); // [1, padded, vocab]
            let vocab = logits.dims()[2];
            let logits = logits.reshape([padded, vocab]);
            let logits = if inverse == 1.0 { logits } else { logits.mul_scalar(inverse) };
            token_logps(logits, targets, scoring.entropy)
        }
    };
    if padded == n {
        return out;
    }
    TokenLogps {
        logps: out.logps.slice(0..n),
        hits: out.hits.slice(0..n),
        mean_logits: out.mean_logits.slice(0..n),
        entropy: out.entropy.map(|e| e.slice(0..n)),
    }
}

/// Logits the chunked head holds at a time (64 MiB in f32).
const HEAD_CHUNK_ELEMENTS: usize = 1 << 24;

/// The output head's weight (`[vocab, hidden]`) when nothing in the head is trained (no
/// gradient on it, no adapter, not quantized) and the logits are the plain product (no
/// soft-capping: Gemma's goes through `model.head`).
fn frozen_head_weight<B: Backend>(model: &LlamaForCausalLM<B>) -> Option<Tensor<B, 2>> {
    if model.final_logit_softcapping.is_some() {
        return None;
    }
    let weight = match &model.lm_head {
        // Linear keeps `[in, out]`.
        Some(head) if head.adapter.is_none() && head.quantized.is_none() && head.bias.is_none() => {
            head.weight.val().transpose()
        }
        Some(_) => return None,
        None => model.model.embed_tokens.val(),
    };
    (!weight.is_require_grad()).then_some(weight)
}

/// What the output head's row count is rounded up to. The number of target positions changes
/// with every batch, and backends that compile a kernel per matmul shape (cubecl's: CUDA,
/// wgpu) would compile new ones for each; on the CPU padded rows are only extra work.
fn head_rows_multiple<B: Backend>(device: &B::Device) -> usize {
    if B::name(device).contains("cubecl<") { 64 } else { 1 }
}

pub(crate) fn int_vector<B: Backend>(values: Vec<i64>, device: &B::Device) -> Tensor<B, 1, Int> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n]), device)
}
