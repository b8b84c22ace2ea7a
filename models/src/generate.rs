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
    let vocab = model.vocab_size();
    if let Some(&id) = prompt.iter().find(|&&id| id as usize >= vocab) {
        return Err(Error::Generate(format!(
            "prompt token id {id} is outside the model's vocabulary ({vocab} tokens): \
             the tokenizer does not belong to this model"
        )));
    }
    let room = match sampling.max_length {
        Some(max) if prompt.len() >= max => {
            return Err(Error::Generate(format!(
                "the prompt is {} tokens, which fills the model's context ({max})",
                prompt.len()
            )));
        }
        Some(max) => max - prompt.len(),
        None => usize::MAX,
    };
    let max_new = sampling.max_new_tokens.min(room);
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
