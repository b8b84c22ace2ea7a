//! Text generation with a KV cache: greedy, or temperature + top-p sampling.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::llama::{ForwardOptions, KvCache, LlamaForCausalLM};

#[derive(Debug, Clone)]
pub struct Sampling {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// Generates up to `max_new_tokens` after `prompt`, stopping after the first token in `eos`
/// (which is included, as transformers' `generate` includes it).
pub fn generate<B: Backend>(
    model: &LlamaForCausalLM<B>,
    prompt: &[u32],
    eos: &[u32],
    sampling: &Sampling,
    device: &B::Device,
) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(sampling.seed);
    let mut cache = KvCache::new(model.num_layers());
    let mut out = Vec::new();
    let mut input = prompt.to_vec();
    while out.len() < sampling.max_new_tokens && !input.is_empty() {
        let ids: Vec<i64> = input.iter().map(|&t| t as i64).collect();
        let n = ids.len();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, n]), device);
        let hidden = model.forward_hidden(ids, ForwardOptions::default(), Some(&mut cache));
        let [_, s, h] = hidden.dims();
        // Only the last position's logits are needed: skip the head for the rest of the prompt.
        let last = hidden.slice([0..1, s - 1..s, 0..h]);
        let logits: Vec<f32> = model.head(last).into_data().to_vec().expect("head returns f32 logits");
        let next = sample(&logits, sampling, &mut rng);
        out.push(next);
        if eos.contains(&next) {
            break;
        }
        input = vec![next];
    }
    out
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
