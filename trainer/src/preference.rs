//! Preference objectives on a model: sequence log-probabilities of chosen and rejected rows in
//! one forward pass, the reference's (live, or precomputed once and saved), and the step loss
//! with TRL's metrics.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor, TensorData};
use temper_data::{Batch, Cursor, LoaderOptions, Pipeline, PreferenceBatch, UnpairedBatch};
use temper_models::{ForwardOptions, LlamaForCausalLM, Tokenizer};
use temper_trl::{
    DpoParams, PairLogps, PreferenceOutput, SimpoParams, dpo_loss, orpo_loss, sequence_logps, simpo_loss,
};

use crate::blocks::{HiddenFn, plain};
use crate::error::{Error, Result};
use crate::forward::{int_matrix, int_vector, token_logps_at};
use crate::step::{Metric, StepSums};

/// The preference objective of a job.
#[derive(Debug, Clone)]
pub(crate) enum PreferenceObjective {
    Dpo(DpoParams),
    Simpo(SimpoParams),
    Orpo { beta: f64 },
}

/// Log-probabilities of a preference batch's rows under one model.
pub(crate) struct RowLogps<B: Backend> {
    /// `[2 * pairs]`: summed completion log-probabilities, chosen rows then rejected rows.
    pub logps: Tensor<B, 1>,
    /// `[2 * pairs]`: the mean logit at each row's completion positions, summed per row
    /// (TRL's `logits/*` numerator).
    pub mean_logits: Tensor<B, 1>,
    /// With `with_prompts`: `[pairs]`, the chosen rows' summed log-probabilities of their prompt
    /// tokens after the first (ORPO's NLL covers the whole chosen sequence), and how many.
    pub chosen_prompt: Option<(Tensor<B, 1>, usize)>,
}

/// Padded rows of token ids, `[rows, seq_len]`, with which tokens are real and which are
/// scored.
pub(crate) struct Rows<'a> {
    pub input_ids: &'a [u32],
    pub attention_mask: &'a [u8],
    pub completion_mask: &'a [u8],
    pub rows: usize,
    pub seq_len: usize,
}

/// Summed completion log-probabilities (`[rows]`) and summed per-token mean logits of each
/// row, from one forward pass; the first `prompts_of` rows' prompt tokens are also summed, into
/// rows `rows..rows + prompts_of` of the result (ORPO's NLL), with their count.
pub(crate) fn rows_logps<B: Backend>(
    model: &LlamaForCausalLM<B>,
    hidden: HiddenFn<B>,
    rows: Rows<'_>,
    prompts_of: usize,
    device: &B::Device,
) -> (Tensor<B, 1>, Tensor<B, 1>, usize) {
    let (n, s) = (rows.rows, rows.seq_len);
    let (mut pos, mut tgt, mut row) = (Vec::new(), Vec::new(), Vec::new());
    let mut prompt_tokens = 0;
    for r in 0..n {
        for t in 0..s.saturating_sub(1) {
            let next = r * s + t + 1;
            let target_row = if rows.completion_mask[next] == 1 {
                r
            } else if r < prompts_of && rows.attention_mask[next] == 1 {
                prompt_tokens += 1;
                n + r
            } else {
                continue;
            };
            pos.push((r * s + t) as i64);
            tgt.push(rows.input_ids[next] as i64);
            row.push(target_row as i64);
        }
    }
    let num_rows = n + prompts_of;
    let ids = int_matrix(&rows.input_ids[..n * s], [n, s], device);
    let tokens = token_logps_at(model, hidden, ids, ForwardOptions::default(), pos, tgt, device);
    let row = int_vector(row, device);
    let mean_logits = sequence_logps(tokens.mean_logits, row.clone(), num_rows);
    (sequence_logps(tokens.logps, row, num_rows), mean_logits, prompt_tokens)
}

/// Summed completion log-probabilities of every row of a preference batch, from one forward
/// pass over chosen and rejected rows together; with `with_prompts`, the chosen rows' prompt
/// tokens too.
pub(crate) fn preference_logps<B: Backend>(
    model: &LlamaForCausalLM<B>,
    hidden: HiddenFn<B>,
    batch: &PreferenceBatch,
    with_prompts: bool,
    device: &B::Device,
) -> RowLogps<B> {
    let p = batch.pairs;
    let rows = Rows {
        input_ids: &batch.input_ids,
        attention_mask: &batch.attention_mask,
        completion_mask: &batch.completion_mask,
        rows: 2 * p,
        seq_len: batch.seq_len,
    };
    let (all, mean_logits, prompt_tokens) = rows_logps(model, hidden, rows, if with_prompts { p } else { 0 }, device);
    RowLogps {
        logps: all.clone().slice(0..2 * p),
        mean_logits: mean_logits.slice(0..2 * p),
        chosen_prompt: with_prompts.then(|| (all.slice(2 * p..3 * p), prompt_tokens)),
    }
}

/// Completion lengths of each row, `[2 * pairs]`.
fn completion_lengths(batch: &PreferenceBatch) -> Vec<f32> {
    let s = batch.seq_len;
    (0..2 * batch.pairs)
        .map(|r| {
            batch.completion_mask[r * s + 1..(r + 1) * s]
                .iter()
                .filter(|&&m| m == 1)
                .count() as f32
        })
        .collect()
}

/// The summed loss of one micro-batch over its pairs; adds TRL's `rewards/*`, `logps/*` and
/// `logits/*` (as sums over pairs) to `sums`. `reference` is `[2 * pairs]` (chosen rows, then
/// rejected rows); without one (reference-free DPO) its log-probabilities are 0.
pub(crate) fn preference_step_loss<B: Backend>(
    model: &LlamaForCausalLM<B>,
    hidden: HiddenFn<B>,
    reference: Option<Tensor<B, 1>>,
    batch: &PreferenceBatch,
    objective: &PreferenceObjective,
    device: &B::Device,
    sums: &mut StepSums,
) -> Tensor<B, 1> {
    let p = batch.pairs;
    let orpo = matches!(objective, PreferenceObjective::Orpo { .. });
    let rows = preference_logps(model, hidden, batch, orpo, device);
    let lengths = Tensor::<B, 1>::from_data(TensorData::new(completion_lengths(batch), [2 * p]), device);
    let half = |t: &Tensor<B, 1>, second: bool| {
        if second {
            t.clone().slice(p..2 * p)
        } else {
            t.clone().slice(0..p)
        }
    };
    let pairs = |logps: &Tensor<B, 1>| PairLogps {
        chosen: half(logps, false),
        rejected: half(logps, true),
        chosen_tokens: half(&lengths, false),
        rejected_tokens: half(&lengths, true),
    };
    let policy = pairs(&rows.logps);
    let out: PreferenceOutput<B> = match objective {
        PreferenceObjective::Dpo(params) => {
            let reference = reference.unwrap_or_else(|| Tensor::zeros([2 * p], device));
            dpo_loss(&policy, &pairs(&reference), params)
        }
        PreferenceObjective::Simpo(params) => simpo_loss(&policy, *params),
        PreferenceObjective::Orpo { beta } => {
            let (prompt, prompt_tokens) = rows.chosen_prompt.clone().expect("asked for prompts");
            let tokens = half(&lengths, false).sum() + prompt_tokens as f32;
            let nll = (policy.chosen.clone().sum() + prompt.sum()).neg() / tokens.clamp_min(1.0);
            orpo_loss(&policy, nll.expand([p]), *beta)
        }
    };
    let sum = |t: Tensor<B, 1>| -> f64 { t.sum().into_scalar().elem::<f32>() as f64 };
    let (cr, rr) = (out.chosen_rewards.clone(), out.rejected_rewards.clone());
    sums.add(Metric::RewardsChosen, sum(cr.clone()));
    sums.add(Metric::RewardsRejected, sum(rr.clone()));
    sums.add(Metric::RewardsAccuracies, sum(cr.clone().greater(rr.clone()).float()));
    sums.add(Metric::RewardsMargins, sum(cr - rr));
    // DPO logs summed log-probabilities; TRL's CPO (SimPO) and ORPO log per-token averages.
    let logps = rows.logps.detach();
    let logps = match objective {
        PreferenceObjective::Dpo(_) => logps,
        _ => logps / lengths.clone().clamp_min(1.0),
    };
    sums.add(Metric::LogpsChosen, sum(half(&logps, false)));
    sums.add(Metric::LogpsRejected, sum(half(&logps, true)));
    sums.add(Metric::LogitsChosen, sum(half(&rows.mean_logits, false)));
    sums.add(Metric::LogitsRejected, sum(half(&rows.mean_logits, true)));
    sums.add(Metric::ChosenTokens, sum(half(&lengths, false)));
    sums.add(Metric::RejectedTokens, sum(half(&lengths, true)));
    for (name, values) in out.extra {
        sums.add(Metric::of_trl_term(name), sum(values));
    }
    out.losses.sum()
}

/// DPO's reference log-probabilities: from the reference model at each step, or looked up in
/// those computed once before training.
pub(crate) enum Reference<B: Backend> {
    None,
    Model(Box<LlamaForCausalLM<B>>),
    Precomputed(RefCache),
}

impl<B: Backend> Reference<B> {
    /// `[2 * pairs]` for a preference batch, `[rows]` (or with KTO's KL pairs `[2 * rows]`) for
    /// an unpaired one; `None` without a reference.
    pub(crate) fn logps(&self, batch: &Batch, device: &B::Device) -> Result<Option<Tensor<B, 1>>> {
        Ok(match (self, batch) {
            // GRPO's rollouts carry their reference log-probabilities (`RolloutBatch::ref_logps`).
            (Reference::None, _) | (_, Batch::Sft(_) | Batch::Prompts(_) | Batch::Rollout(_)) => None,
            (Reference::Model(m), Batch::Preference(b)) => Some(preference_logps(m, &plain, b, false, device).logps),
            (Reference::Model(m), Batch::Unpaired(b)) => {
                Some(rows_logps(m, &plain, crate::kto::all_rows(b), 0, device).0)
            }
            (Reference::Precomputed(cache), Batch::Preference(b)) => {
                let values = cache.lookup(b)?;
                Some(Tensor::from_data(TensorData::new(values, [2 * b.pairs]), device))
            }
            (Reference::Precomputed(cache), Batch::Unpaired(b)) => {
                let values = cache.lookup_unpaired(b)?;
                let n = values.len();
                Some(Tensor::from_data(TensorData::new(values, [n]), device))
            }
        })
    }
}

/// Reference log-probabilities by pair (DPO), keyed by a hash of the pair's tokens and
/// completion masks, or by sequence (KTO: each row, and each KL pair of a prompt with another
/// row's completion): the lookup does not depend on the order or batching of the data, so a
/// shuffled or resumed run finds every pair.
#[derive(Debug, Default)]
pub(crate) struct RefCache {
    map: HashMap<u64, [f32; 2]>,
    sequences: HashMap<u64, f32>,
    /// KTO: the micro-batches per worker the sequences cover.
    covered: u64,
}

/// The first version held pairs only; the second adds sequences.
const CACHE_MAGIC_V1: &[u8; 8] = b"TMPRREF1";
const CACHE_MAGIC: &[u8; 8] = b"TMPRREF2";
pub(crate) const CACHE_FILE: &str = "ref_logps.bin";

/// How much of a pipeline a precomputed reference covers.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Cover {
    /// Pairs (or unpaired rows), up to this many (one epoch).
    Examples(usize),
    /// KTO: the first this many micro-batches, as the run will see them (its KL pairs are made
    /// within each micro-batch).
    Batches(usize),
}

impl RefCache {
    /// One pass of `reference` over what each pipeline's `Cover` says.
    pub(crate) fn compute<B: Backend>(
        reference: &LlamaForCausalLM<B>,
        pipelines: &[(Arc<Pipeline>, Cover)],
        device: &B::Device,
    ) -> Result<Self> {
        let mut cache = RefCache::default();
        for (pipeline, cover) in pipelines {
            let (mut pairs, mut batches) = (0, 0);
            for b in pipeline.clone().spawn(Cursor::default()) {
                match b?.batch {
                    Batch::Preference(batch) => {
                        let logps = values(preference_logps(reference, &plain, &batch, false, device).logps);
                        for (i, key) in pair_keys(&batch).into_iter().enumerate() {
                            cache.map.insert(key, [logps[i], logps[batch.pairs + i]]);
                        }
                        pairs += batch.pairs;
                    }
                    Batch::Unpaired(batch) => {
                        let rows = crate::kto::all_rows(&batch);
                        let keys = sequence_keys(&rows);
                        let logps = values(rows_logps(reference, &plain, rows, 0, device).0);
                        cache.sequences.extend(keys.into_iter().zip(logps));
                        pairs += batch.rows;
                    }
                    Batch::Sft(_) | Batch::Prompts(_) | Batch::Rollout(_) => {}
                }
                batches += 1;
                let done = match *cover {
                    Cover::Examples(max) => pairs >= max,
                    Cover::Batches(max) => batches >= max,
                };
                if done {
                    break;
                }
            }
        }
        Ok(cache)
    }

    /// Whether the sequences cover a run of `micro_batches` micro-batches per worker.
    pub(crate) fn covers(&self, micro_batches: usize) -> bool {
        self.covered >= micro_batches as u64
    }

    pub(crate) fn set_covered(&mut self, micro_batches: usize) {
        self.covered = micro_batches as u64;
    }

    /// Pairs and sequences held.
    pub(crate) fn len(&self) -> usize {
        self.map.len() + self.sequences.len()
    }

    /// `[rows]`, or with KTO's KL pairs `[2 * rows]`, as [`crate::kto::all_rows`] orders them.
    fn lookup_unpaired(&self, batch: &UnpairedBatch) -> Result<Vec<f32>> {
        sequence_keys(&crate::kto::all_rows(batch))
            .into_iter()
            .map(|key| {
                self.sequences.get(&key).copied().ok_or_else(|| Error::Checkpoint {
                    path: CACHE_FILE.into(),
                    message: "a completion of this batch (or one of its KL pairs) has no precomputed reference \
                              log-probability (did the data or the batching change since they were computed?)"
                        .into(),
                })
            })
            .collect()
    }

    fn lookup(&self, batch: &PreferenceBatch) -> Result<Vec<f32>> {
        let p = batch.pairs;
        let mut out = vec![0.0; 2 * p];
        for (i, key) in pair_keys(batch).into_iter().enumerate() {
            let [c, r] = self.map.get(&key).ok_or_else(|| Error::Checkpoint {
                path: CACHE_FILE.into(),
                message: "a pair of this batch has no precomputed reference log-probabilities (did the data \
                          change since they were computed?)"
                    .into(),
            })?;
            out[i] = *c;
            out[p + i] = *r;
        }
        Ok(out)
    }

    /// `magic, count (u64), then (key u64, chosen f32, rejected f32)` per pair, then `count
    /// (u64), (key u64, value f32)` per sequence, then the micro-batches covered (u64),
    /// little-endian, written beside and renamed, so a reader never sees half a file.
    pub(crate) fn save(&self, path: &Path) -> Result<()> {
        let mut bytes = Vec::with_capacity(32 + 16 * self.map.len() + 12 * self.sequences.len());
        bytes.extend_from_slice(CACHE_MAGIC);
        bytes.extend_from_slice(&(self.map.len() as u64).to_le_bytes());
        let mut entries: Vec<_> = self.map.iter().collect();
        entries.sort_by_key(|(k, _)| **k);
        for (k, [c, r]) in entries {
            bytes.extend_from_slice(&k.to_le_bytes());
            bytes.extend_from_slice(&c.to_le_bytes());
            bytes.extend_from_slice(&r.to_le_bytes());
        }
        bytes.extend_from_slice(&(self.sequences.len() as u64).to_le_bytes());
        let mut entries: Vec<_> = self.sequences.iter().collect();
        entries.sort_by_key(|(k, _)| **k);
        for (k, v) in entries {
            bytes.extend_from_slice(&k.to_le_bytes());
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        bytes.extend_from_slice(&self.covered.to_le_bytes());
        temper_models::atomic::write_file_atomic(path, &bytes).map_err(|e| Error::io(path, e))
    }

    pub(crate) fn load(path: &Path) -> Result<Self> {
        let bad = |message: &str| Error::Checkpoint {
            path: path.to_path_buf(),
            message: message.into(),
        };
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| Error::io(path, e))?;
        let v1 = bytes.len() >= 16 && &bytes[..8] == CACHE_MAGIC_V1;
        if bytes.len() < 16 || !(v1 || &bytes[..8] == CACHE_MAGIC) {
            return Err(bad("not a reference log-probability file"));
        }
        let u64_at = |at: usize| {
            bytes
                .get(at..at + 8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        };
        let count = u64_at(8).expect("checked") as usize;
        let pairs_end = count
            .checked_mul(16)
            .and_then(|n| n.checked_add(16))
            .ok_or_else(|| bad("truncated"))?;
        let sequences_count = if v1 {
            Some(0)
        } else {
            u64_at(pairs_end).map(|n| n as usize)
        };
        let sequences_start = pairs_end + if v1 { 0 } else { 8 };
        let expected = sequences_count
            .and_then(|n| n.checked_mul(12))
            .and_then(|n| n.checked_add(sequences_start + if v1 { 0 } else { 8 }));
        if expected != Some(bytes.len()) {
            return Err(bad("truncated"));
        }
        let sequences_end = bytes.len() - if v1 { 0 } else { 8 };
        let covered = if v1 { 0 } else { u64_at(sequences_end).expect("checked") };
        let sequences = bytes[sequences_start..sequences_end]
            .chunks_exact(12)
            .map(|e| {
                (
                    u64::from_le_bytes(e[..8].try_into().expect("8 bytes")),
                    f32::from_le_bytes(e[8..].try_into().expect("4 bytes")),
                )
            })
            .collect();
        let map = bytes[16..pairs_end]
            .chunks_exact(16)
            .map(|e| {
                let f = |r: std::ops::Range<usize>| f32::from_le_bytes(e[r].try_into().expect("4 bytes"));
                (
                    u64::from_le_bytes(e[..8].try_into().expect("8 bytes")),
                    [f(8..12), f(12..16)],
                )
            })
            .collect();
        Ok(RefCache {
            map,
            sequences,
            covered,
        })
    }
}

fn values<B: Backend>(t: Tensor<B, 1>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().expect("f32 values")
}

/// FNV-1a of one row's real tokens and completion mask, continuing from `h`. Stable across
/// builds and platforms, unlike `std`'s hasher, since the keys are saved.
fn hash_row(mut h: u64, ids: &[u32], attention: &[u8], completion: &[u8]) -> u64 {
    let mut eat = |x: u64| {
        for b in x.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for t in 0..ids.len() {
        if attention[t] == 1 {
            eat(ids[t] as u64 * 2 + completion[t] as u64);
        }
    }
    eat(u64::MAX); // row separator
    h
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// One key per sequence of `rows`.
fn sequence_keys(rows: &Rows<'_>) -> Vec<u64> {
    let s = rows.seq_len;
    (0..rows.rows)
        .map(|r| {
            let at = r * s..(r + 1) * s;
            hash_row(
                FNV_OFFSET,
                &rows.input_ids[at.clone()],
                &rows.attention_mask[at.clone()],
                &rows.completion_mask[at],
            )
        })
        .collect()
}

/// FNV-1a of each pair's chosen and rejected rows (real tokens and completion masks).
fn pair_keys(batch: &PreferenceBatch) -> Vec<u64> {
    let (p, s) = (batch.pairs, batch.seq_len);
    (0..p)
        .map(|i| {
            [i, p + i].into_iter().fold(FNV_OFFSET, |h, r| {
                let at = r * s..(r + 1) * s;
                hash_row(
                    h,
                    &batch.input_ids[at.clone()],
                    &batch.attention_mask[at.clone()],
                    &batch.completion_mask[at],
                )
            })
        })
        .collect()
}

/// The pipelines a precomputed reference must cover: the training data (every worker's shard,
/// so the saved values serve any rank on resume) and the evaluation data (up to
/// `max_eval_rows`). Pairs need one epoch; KTO's KL pairs are made within micro-batches, so its
/// cover is every micro-batch of the run's `micro_batches` (per worker) as each worker will see
/// them.
pub(crate) fn precompute_pipelines(
    job: &crate::config::JobConfig,
    tokenizer: &Arc<Tokenizer>,
    options: LoaderOptions,
    micro_batches: usize,
    max_eval_rows: usize,
) -> Result<Vec<(Arc<Pipeline>, Cover)>> {
    let one_epoch = LoaderOptions {
        epochs: Some(1),
        rank: 0,
        world_size: 1,
        ..options
    };
    let mut pipelines = Vec::new();
    if options.unpaired.is_some() {
        for rank in 0..options.world_size {
            let shard = LoaderOptions { rank, ..options };
            pipelines.push((
                Arc::new(Pipeline::new(&job.data, tokenizer.clone(), shard)?),
                Cover::Batches(micro_batches),
            ));
        }
    } else {
        pipelines.push((
            Arc::new(Pipeline::new(&job.data, tokenizer.clone(), one_epoch)?),
            Cover::Examples(usize::MAX),
        ));
    }
    if let Some(eval) = job.data.eval_config() {
        let eval_options = LoaderOptions {
            seed: 0,
            rank: 0,
            world_size: 1,
            ..one_epoch
        };
        pipelines.push((
            Arc::new(Pipeline::new(&eval, tokenizer.clone(), eval_options)?),
            Cover::Examples(max_eval_rows),
        ));
    }
    Ok(pipelines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_file_round_trips_and_reads_the_first_version() {
        let dir = std::env::temp_dir().join(format!("temper-refcache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(CACHE_FILE);
        let mut cache = RefCache::default();
        cache.map.insert(7, [-1.5, -2.5]);
        cache.sequences.extend([(3, -0.25), (9, -4.0)]);
        cache.set_covered(12);
        cache.save(&path).unwrap();
        let back = RefCache::load(&path).unwrap();
        assert!(back.covers(12) && !back.covers(13));
        assert_eq!((back.map, back.sequences), (cache.map.clone(), cache.sequences.clone()));
        // A file from before KTO: pairs only.
        let mut v1 = CACHE_MAGIC_V1.to_vec();
        v1.extend(1u64.to_le_bytes());
        v1.extend(7u64.to_le_bytes());
        v1.extend((-1.5f32).to_le_bytes());
        v1.extend((-2.5f32).to_le_bytes());
        std::fs::write(&path, &v1).unwrap();
        let back = RefCache::load(&path).unwrap();
        assert_eq!((back.map, back.sequences.len()), (cache.map, 0));
        std::fs::write(&path, &v1[..v1.len() - 1]).unwrap();
        assert!(RefCache::load(&path).unwrap_err().to_string().contains("truncated"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
