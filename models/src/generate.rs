//! Text generation with a KV cache: greedy, or temperature + top-p sampling.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::llama::{ForwardOptions, KvCache, LlamaForCausalLM};

#[derive(Debug, Clone)]
pub struct Sampling {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// Sample among the `top_k` most likely tokens only; 0: all of them.
    pub top_k: usize,
    pub seed: u64,
    /// The longest sequence, prompt included (transformers' `max_length`): the model's context
    /// (`max_position_embeddings`), past which its positions mean nothing. `None`: no limit.
    pub max_length: Option<usize>,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            max_length: None,
        }
    }
}

impl Sampling {
    /// NaN passes every comparison but this one, so each range is written as what is allowed.
    pub fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(Error::Generate(m));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return fail(format!("temperature must be a number >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return fail(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }
}

/// Generates up to `max_new_tokens` after `prompt`, stopping after the first token in `eos`
/// (which is included, as transformers' `generate` includes it), or when the sequence reaches
/// `max_length`. A prompt id outside the vocabulary, a prompt that fills the context, or
/// logits that are not numbers (NaN weights or adapter) are errors, not tokens.
pub fn generate<B: Backend>(
    model: &LlamaForCausalLM<B>,
    prompt: &[u32],
    eos: &[u32],
    sampling: &Sampling,
    device: &B::Device,
) -> Result<Vec<u32>> {
    sampling.validate()?;
    let max_new = new_tokens(prompt, model.vocab_size(), sampling).map_err(|m| Error::Generate(format!("the {m}")))?;
    let mut rng = StdRng::seed_from_u64(sampling.seed);
    let mut cache = KvCache::new(model.num_layers());
    let mut out = Vec::new();
    let mut input = prompt.to_vec();
    while out.len() < max_new && !input.is_empty() {
        let ids: Vec<i64> = input.iter().map(|&t| t as i64).collect();
        let n = ids.len();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, n]), device);
        let hidden = model.forward_hidden(ids, ForwardOptions::default(), Some(&mut cache));
        let [_, s, h] = hidden.dims();
        // Only the last position's logits are needed: skip the head for the rest of the prompt.
        let last = hidden.slice([0..1, s - 1..s, 0..h]);
        let logits: Vec<f32> = model.head(last).into_data().to_vec().expect("head returns f32 logits");
        if logits.iter().any(|l| l.is_nan()) || !logits.iter().any(|l| l.is_finite()) {
            return Err(Error::Generate(format!(
                "the model's logits for generated token {} are not numbers (NaN or infinite weights \
                 in the model or the adapter?)",
                out.len() + 1
            )));
        }
        let next = sample(&logits, sampling, &mut rng);
        out.push(next);
        if eos.contains(&next) {
            break;
        }
        input = vec![next];
    }
    Ok(out)
}

/// How many tokens may follow `prompt`: `max_new_tokens`, or fewer where the context ends.
/// Refuses (with the message's subject first) an id outside the vocabulary and a prompt that
/// fills the context.
fn new_tokens(prompt: &[u32], vocab: usize, sampling: &Sampling) -> std::result::Result<usize, String> {
    if let Some(&id) = prompt.iter().find(|&&id| id as usize >= vocab) {
        return Err(format!(
            "prompt's token id {id} is outside the model's vocabulary ({vocab} tokens): the tokenizer does not \
             belong to this model"
        ));
    }
    match sampling.max_length {
        Some(max) if prompt.len() >= max => Err(format!(
            "prompt is {} tokens, which fills the model's context ({max})",
            prompt.len()
        )),
        Some(max) => Ok(sampling.max_new_tokens.min(max - prompt.len())),
        None => Ok(sampling.max_new_tokens),
    }
}

/// Completes several prompts at once with one KV cache, each row sampled with its own seed
/// (`seeds[i]`: a row draws the same tokens whatever else is in the batch), stopping each row
/// after its first token in `eos` (included) or at `max_new_tokens` / `max_length`. Identical
/// prompts (GRPO's groups) are read once and their cache shared. Rows leave the batch as they
/// finish. Returns each prompt's generated tokens.
pub fn generate_batch<B: Backend>(
    model: &LlamaForCausalLM<B>,
    prompts: &[&[u32]],
    eos: &[u32],
    sampling: &Sampling,
    seeds: &[u64],
    device: &B::Device,
) -> Result<Vec<Vec<u32>>> {
    sampling.validate()?;
    assert_eq!(prompts.len(), seeds.len(), "one seed per prompt");
    let vocab = model.vocab_size();
    let mut limits = Vec::with_capacity(prompts.len());
    for (i, prompt) in prompts.iter().enumerate() {
        if prompt.is_empty() {
            return Err(Error::Generate(format!("prompt {i} has no token")));
        }
        limits.push(new_tokens(prompt, vocab, sampling).map_err(|m| Error::Generate(format!("{m} (prompt {i})")))?);
    }
    let n = prompts.len();
    // Each distinct prompt once (batch of one, no padding), then every row's cache from its
    // prompt's, left-padded to the longest.
    let mut distinct: Vec<&[u32]> = Vec::new();
    let mut of_row = Vec::with_capacity(n);
    for p in prompts {
        of_row.push(match distinct.iter().position(|d| d == p) {
            Some(j) => j,
            None => {
                distinct.push(p);
                distinct.len() - 1
            }
        });
    }
    let mut caches = Vec::with_capacity(distinct.len());
    let mut last_logits: Vec<Vec<f32>> = Vec::with_capacity(distinct.len());
    for p in &distinct {
        let mut cache = KvCache::new(model.num_layers());
        let ids: Vec<i64> = p.iter().map(|&t| t as i64).collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, p.len()]), device);
        let hidden = model.forward_hidden(ids, ForwardOptions::default(), Some(&mut cache));
        let [_, s, h] = hidden.dims();
        let logits = model.head(hidden.slice([0..1, s - 1..s, 0..h]));
        last_logits.push(logits.into_data().convert::<f32>().to_vec().expect("f32 logits"));
        caches.push(cache);
    }
    let longest = distinct.iter().map(|p| p.len()).max().unwrap_or(0);
    let stacked = KvCache::stack_left_padded(&caches);
    drop(caches);
    let rows = Tensor::<B, 1, Int>::from_data(
        TensorData::new(of_row.iter().map(|&j| j as i64).collect::<Vec<_>>(), [n]),
        device,
    );
    let mut cache = stacked.select_rows(rows);
    // Per live row: its index, attention mask (padding, then real tokens) and next position.
    let mut live: Vec<usize> = (0..n).collect();
    let mut masks: Vec<Vec<i64>> = prompts
        .iter()
        .map(|p| {
            let mut m = vec![0i64; longest - p.len()];
            m.resize(longest, 1);
            m
        })
        .collect();
    let mut rngs: Vec<StdRng> = seeds.iter().map(|&s| StdRng::seed_from_u64(s)).collect();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut logits: Vec<Vec<f32>> = of_row.iter().map(|&j| last_logits[j].clone()).collect();
    loop {
        // Sample each live row's next token; rows that finish leave.
        let mut still = Vec::with_capacity(live.len());
        let mut next = Vec::with_capacity(live.len());
        for (slot, &r) in live.iter().enumerate() {
            let row = &logits[slot];
            if row.iter().any(|l| l.is_nan()) || !row.iter().any(|l| l.is_finite()) {
                return Err(Error::Generate(format!(
                    "the model's logits for token {} of row {r} are not numbers (NaN or infinite weights \
                     in the model or the adapter?)",
                    out[r].len() + 1
                )));
            }
            if limits[r] == 0 {
                continue;
            }
            let token = sample(row, sampling, &mut rngs[r]);
            out[r].push(token);
            if !eos.contains(&token) && out[r].len() < limits[r] {
                still.push(slot);
                next.push(token);
            }
        }
        if still.is_empty() {
            break;
        }
        if still.len() < live.len() {
            let keep = Tensor::<B, 1, Int>::from_data(
                TensorData::new(still.iter().map(|&s| s as i64).collect::<Vec<_>>(), [still.len()]),
                device,
            );
            cache = cache.select_rows(keep);
        }
        live = still.iter().map(|&s| live[s]).collect();
        let b = live.len();
        for &r in &live {
            masks[r].push(1);
        }
        let width = masks[live[0]].len();
        let mask: Vec<i64> = live.iter().flat_map(|&r| masks[r].iter().copied()).collect();
        let positions: Vec<i64> = live
            .iter()
            .map(|&r| (prompts[r].len() + out[r].len() - 1) as i64)
            .collect();
        let ids: Vec<i64> = next.iter().map(|&t| t as i64).collect();
        let options = ForwardOptions {
            position_ids: Some(Tensor::from_data(TensorData::new(positions, [b, 1]), device)),
            attention_mask: Some(Tensor::from_data(TensorData::new(mask, [b, width]), device)),
            segment_ids: None,
        };
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, 1]), device);
        let hidden = model.forward_hidden(ids, options, Some(&mut cache));
        let flat: Vec<f32> = model.head(hidden).into_data().convert::<f32>().to_vec().expect("f32 logits");
        logits = flat.chunks(vocab).map(<[f32]>::to_vec).collect();
    }
    Ok(out)
}

/// Picks the next token from one row of logits.
pub fn sample(logits: &[f32], sampling: &Sampling, rng: &mut impl Rng) -> u32 {
    if sampling.temperature <= 0.0 {
        return argmax(logits);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l - max) / sampling.temperature).exp()))
        .collect();
    if sampling.top_k == 0 && sampling.top_p >= 1.0 {
        // The whole distribution: no order needed.
        let total: f32 = probs.iter().map(|p| p.1).sum();
        let mut r = rng.random::<f32>() * total;
        for (id, p) in &probs {
            r -= p;
            if r <= 0.0 && *p > 0.0 {
                return *id;
            }
        }
        return probs.iter().rev().find(|p| p.1 > 0.0).map_or(0, |p| p.0);
    }
    if sampling.top_k > 0 && sampling.top_k < probs.len() {
        // The k most likely first (ties broken towards the lower id, as a stable sort would).
        probs.select_nth_unstable_by(sampling.top_k - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        probs.truncate(sampling.top_k);
    }
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f32 = probs.iter().map(|p| p.1).sum();
    // Nucleus: the smallest prefix whose mass reaches top_p (at least one token).
    let mut kept = 0;
    let mut mass = 0.0;
    for (_, p) in &probs {
        kept += 1;
        mass += p / total;
        if mass >= sampling.top_p {
            break;
        }
    }
    probs.truncate(kept);
    let kept_total: f32 = probs.iter().map(|p| p.1).sum();
    let mut r = rng.random::<f32>() * kept_total;
    for (id, p) in &probs {
        r -= p;
        if r <= 0.0 {
            return *id;
        }
    }
    probs.last().map(|p| p.0).unwrap_or(0)
}

fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_top_p() {
        let logits = [0.0, 3.0, 1.0, 2.9];
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(sample(&logits, &Sampling::default(), &mut rng), 1);
        // top_p tiny: only the most likely token survives, whatever the temperature.
        let s = Sampling {
            temperature: 10.0,
            top_p: 1e-6,
            ..Sampling::default()
        };
        for _ in 0..20 {
            assert_eq!(sample(&logits, &s, &mut rng), 1);
        }
        // High temperature, full nucleus: every token shows up.
        let s = Sampling {
            temperature: 100.0,
            ..Sampling::default()
        };
        let mut seen = [false; 4];
        for _ in 0..200 {
            seen[sample(&logits, &s, &mut rng) as usize] = true;
        }
        assert!(seen.iter().all(|&b| b));
    }
}
