//! Per-token log-probabilities of target tokens: what every objective here starts from.
//!
//! Two ways to the same numbers. [`token_logps`] takes logits and lets autodiff differentiate
//! the log-softmax. [`head_token_logps`] takes the hidden states and a frozen output head and
//! never keeps a `[tokens, vocab]` tensor alive: it works through the vocabulary a few hundred
//! rows at a time and writes the gradient with respect to the hidden states itself.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor};
use temper_kernels::Products;

/// `log(softmax(x))` along the last dimension, in f32, computed as `x - max - log Σ exp(x - max)`
/// so large logits do not overflow.
///
/// # Shapes
/// `[rows, vocab] -> [rows, vocab]`
pub fn log_softmax<B: Backend>(logits: Tensor<B, 2>) -> Tensor<B, 2> {
    let logits = logits.cast(DType::F32);
    let max = logits.clone().max_dim(1).detach(); // [rows, 1]
    let shifted = logits - max;
    let lse = shifted.clone().exp().sum_dim(1).log(); // [rows, 1]
    shifted - lse
}

/// Log-probabilities of the targets, one per position.
pub struct TokenLogps<B: Backend> {
    /// `[n]`, f32: log p(target) at each position, differentiable.
    pub logps: Tensor<B, 1>,
    /// `[n]`: 1 where the argmax is the target (TRL's `mean_token_accuracy`), else 0.
    pub hits: Tensor<B, 1, Int>,
    /// `[n]`, f32, without gradient: the mean logit over the vocabulary at each position
    /// (TRL's `logits/*` metrics).
    pub mean_logits: Tensor<B, 1>,
    /// `[n]`, f32, without gradient, when asked for: the entropy of the distribution at each
    /// position (GRPO's `entropy` metric).
    pub entropy: Option<Tensor<B, 1>>,
}

/// `-Σ p log p` of each row of probabilities (`[rows, vocab]` -> `[rows]`); a zero
/// probability adds nothing.
fn entropy_rows<B: Backend>(probs: Tensor<B, 2>) -> Tensor<B, 1> {
    let logs = probs.clone().clamp_min(f32::MIN_POSITIVE).log();
    (probs * logs).sum_dim(1).squeeze_dim::<1>(1).neg()
}

/// From logits (`[n, vocab]`) and targets (`[n]`), differentiable through the logits; with
/// `entropy`, each position's entropy too.
pub fn token_logps<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>, entropy: bool) -> TokenLogps<B> {
    let detached = logits.clone().detach().cast(DType::F32);
    let hits = argmax_hits(detached.clone(), targets.clone());
    let entropy = entropy.then(|| entropy_rows(log_softmax(detached.clone()).exp()));
    let mean_logits = detached.mean_dim(1).squeeze_dim::<1>(1);
    let logps = log_softmax(logits)
        .gather(1, targets.unsqueeze_dim::<2>(1))
        .squeeze_dim::<1>(1);
    TokenLogps {
        logps,
        hits,
        mean_logits,
        entropy,
    }
}

/// From hidden states (`[n, hidden]`) through a frozen output head (`weight: [vocab, hidden]`,
/// logits = hidden · weightᵀ, computed in the weight's dtype, or with bf16 inputs when
/// `products` says so, and read in f32) and targets (`[n]`). The same values as
/// [`token_logps`] on those logits (the entropies with `entropy`), and the same gradient with
/// respect to `hidden`; none flows to `weight`, so it must not be trained.
///
/// Rows go through the head `rows_per_chunk` at a time. For each chunk the gradient of
/// log p(target) with respect to the hidden state, `(onehot − softmax) · weight`, is computed
/// right away (the product backpropagation would do later), so the chunk's logits are freed
/// before the next one: the step holds `[n, hidden]` instead of several `[n, vocab]` tensors,
/// and makes about a third of the passes over them. The returned log-probabilities are
/// `value + Σ(hidden ⊙ g) − Σ(hidden ⊙ g)` with the value and the second sum held constant:
/// equal to the value, with gradient `g` times whatever flows back into each row.
pub fn head_token_logps<B: Backend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    rows_per_chunk: usize,
    entropy: bool,
    products: Products,
) -> TokenLogps<B> {
    let [n, _] = hidden.dims();
    let weight = weight.detach();
    let inputs = hidden.clone().detach();
    let (mut logps, mut grads, mut means, mut hits) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut entropies = Vec::new();
    // Under bf16 products the weight is rounded once, here: each chunk's two products then read
    // its bits (rounding it in each of them was 8 passes over SmolLM2's 28M-value head a step).
    let bits = (products == Products::Bf16).then(|| temper_kernels::to_bf16_bits(weight.clone()));
    let times_weight = |x: Tensor<B, 2>, transposed: bool| match &bits {
        Some(bits) if transposed => temper_kernels::linear_bf16_frozen(x, bits.clone().transpose(), None),
        Some(bits) => temper_kernels::linear_bf16_frozen(x, bits.clone(), None),
        None if transposed => temper_kernels::matmul(x, weight.clone().transpose()),
        None => temper_kernels::matmul(x, weight.clone()),
    };
    let step = rows_per_chunk.max(1);
    for start in (0..n).step_by(step) {
        let rows = start..(start + step).min(n);
        let t = targets.clone().slice(rows.clone());
        let chunk = inputs.clone().slice(rows);
        let logits = times_weight(chunk, true).cast(DType::F32); // [c, vocab]
        let stats = temper_kernels::softmax_rows(logits, t.clone());
        logps.push(stats.logps);
        means.push(stats.mean_logits);
        hits.push(stats.hits.int());
        if entropy {
            entropies.push(entropy_rows(stats.probs.clone()));
        }
        // (onehot − p) · W = W[target] − p · W
        let probs = stats.probs.cast(weight.dtype());
        grads.push(weight.clone().select(0, t) - times_weight(probs, false)); // [c, hidden]
    }
    let value = Tensor::cat(logps, 0);
    let grad = Tensor::cat(grads, 0).cast(hidden.dtype());
    let linear = (hidden * grad.clone()).sum_dim(1).squeeze_dim::<1>(1).cast(DType::F32);
    let constant = (inputs * grad).sum_dim(1).squeeze_dim::<1>(1).cast(DType::F32);
    TokenLogps {
        logps: linear - constant + value,
        hits: Tensor::cat(hits, 0),
        mean_logits: Tensor::cat(means, 0),
        entropy: entropy.then(|| Tensor::cat(entropies, 0)),
    }
}

/// `[c]`: 1 where a row of `logits` (`[c, vocab]`) has its argmax at the target.
fn argmax_hits<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> Tensor<B, 1, Int> {
    logits.argmax(1).squeeze_dim::<1>(1).equal(targets).int()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{Distribution, TensorData};

    type B = Autodiff<NdArray>;

    fn vec<BB: Backend, const D: usize>(x: Tensor<BB, D>) -> Vec<f32> {
        x.into_data().convert::<f32>().to_vec().unwrap()
    }

    fn close(got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol * (1.0 + w.abs()), "[{i}]: {g} vs {w}");
        }
    }

    /// The chunked head gives the logits path's values, metrics and gradient with respect to
    /// the hidden states, for any chunking, with a per-row upstream gradient (as DPO's).
    #[test]
    fn head_token_logps_matches_logits_path() {
        let device = Default::default();
        let (n, h, vocab) = (7, 5, 11);
        let weight = Tensor::<B, 2>::random([vocab, h], Distribution::Normal(0.0, 1.0), &device);
        let hidden0 = Tensor::<B, 2>::random([n, h], Distribution::Normal(0.0, 1.0), &device);
        // Every other target is the argmax, so the hit counts are not all zero.
        let argmax: Vec<i64> = hidden0
            .clone()
            .matmul(weight.clone().transpose())
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .to_vec()
            .unwrap();
        let targets: Vec<i64> = [0i64, 3, 10, 3, 7, 1, 5]
            .iter()
            .enumerate()
            .map(|(i, &t)| if i % 2 == 0 { argmax[i] } else { t })
            .collect();
        let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(targets, [n]), &device);
        let upstream = Tensor::<B, 1>::from_data(
            TensorData::new(vec![1.0f32, -2.0, 0.5, 3.0, 1.0, 0.0, -1.0], [n]),
            &device,
        );

        let hidden = hidden0.clone().require_grad();
        let want = token_logps(hidden.clone().matmul(weight.clone().transpose()), targets.clone(), true);
        let grads = (want.logps.clone() * upstream.clone()).sum().backward();
        let want_grad = vec(hidden.grad(&grads).unwrap());
        for chunk in [1, 3, 7, 100] {
            let hidden = hidden0.clone().require_grad();
            let got = head_token_logps(
                hidden.clone(),
                weight.clone(),
                targets.clone(),
                chunk,
                true,
                Products::F32,
            );
            close(&vec(got.logps.clone()), &vec(want.logps.clone()), 1e-5);
            close(
                &vec(got.entropy.clone().unwrap()),
                &vec(want.entropy.clone().unwrap()),
                1e-5,
            );
            close(&vec(got.mean_logits), &vec(want.mean_logits.clone()), 1e-5);
            assert_eq!(vec(got.hits.float()), vec(want.hits.clone().float()));
            assert!(vec(want.hits.clone().float()).iter().sum::<f32>() >= 4.0);
            let grads = (got.logps * upstream.clone()).sum().backward();
            close(&vec(hidden.grad(&grads).unwrap()), &want_grad, 1e-5);
        }
        // bf16 products (the weight rounded once for all chunks): within bf16's precision of
        // the f32 values, and not equal to them.
        for chunk in [3, 100] {
            let hidden = hidden0.clone().require_grad();
            let got = head_token_logps(hidden.clone(), weight.clone(), targets.clone(), chunk, false, Products::Bf16);
            let logps = vec(got.logps.clone());
            close(&logps, &vec(want.logps.clone()), 3e-2);
            assert_ne!(logps, vec(want.logps.clone()));
            let grads = (got.logps * upstream.clone()).sum().backward();
            close(&vec(hidden.grad(&grads).unwrap()), &want_grad, 3e-2);
        }
    }
}
