//! Fused tensor operations for the decoder: causal attention, SwiGLU, RoPE and RMSNorm, and a
//! matmul and a reshape that do not copy.
//!
//! Each is a plain function over burn tensors. On burn's ndarray backend (`NdArray<f32>`, with
//! or without `Autodiff`) and with the `ndarray` feature, it runs one hand-written kernel on all
//! cores, with its own backward pass; on every other backend it is composed from burn's tensor
//! operations (GPU backends get their own fused attention that way).
//!
//! Why: composed from burn's operations, these three are ~20 element-wise passes per layer on
//! the CPU, each allocating its output, single-threaded (burn-ndarray threads only its matmul),
//! while OpenBLAS's second thread waits. A SmolLM2 LoRA step spent about two thirds of its main
//! thread there (benches/RESULTS.md).

use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::module::attention as burn_attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Int, Tensor, TensorData};

#[cfg(feature = "ndarray")]
mod cpu;
#[cfg(feature = "ndarray")]
mod gemm;

/// `x` with the dimensions `shape` (as many elements), in row-major order.
pub fn reshape<B: Backend, const D: usize, const D2: usize>(x: Tensor<B, D>, shape: [usize; D2]) -> Tensor<B, D2> {
    #[cfg(feature = "ndarray")]
    if let Some(out) = cpu::reshape(&x, shape) {
        return out;
    }
    x.reshape(shape)
}

/// `a·b` for matrices.
///
/// # Shapes
/// `a: [m, k]`, `b: [k, n]` -> `[m, n]`
pub fn matmul<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 2> {
    #[cfg(feature = "ndarray")]
    if let Some(out) = cpu::matmul(&a, &b, false) {
        return out;
    }
    a.matmul(b)
}

/// [`matmul`], with the work split over the cores in row or column pieces, each one
/// single-threaded BLAS call: for the small f32 products (LoRA's) beside [`Products::Bf16`]
/// products, under which OpenBLAS is kept to one thread (its idle workers' spinning took a core
/// from our bf16 GEMM). The same values up to the order of the sums; composed elsewhere.
///
/// # Shapes
/// `a: [m, k]`, `b: [k, n]` -> `[m, n]`
pub fn matmul_in_pieces<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 2> {
    #[cfg(feature = "ndarray")]
    if let Some(out) = cpu::matmul(&a, &b, true) {
        return out;
    }
    a.matmul(b)
}

/// `x·weight + bias`, with the weight stored `[in, out]`.
///
/// # Shapes
/// `x: [rows, in]`, `weight: [in, out]`, `bias: [out]` -> `[rows, out]`
pub fn linear<B: Backend>(x: Tensor<B, 2>, weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Tensor<B, 2> {
    #[cfg(feature = "ndarray")]
    if let Some(out) = cpu::matmul(&x, &weight, false) {
        return with_bias(out, bias);
    }
    burn::tensor::module::linear(x, weight, bias)
}

/// The inputs of a model's matrix products: f32, or rounded to bf16 (the sums are f32 either
/// way), as PyTorch computes with bf16 weights or under `torch.autocast(dtype=torch.bfloat16)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Products {
    #[default]
    F32,
    Bf16,
}

/// Whether this processor has bf16 dot-product instructions (AVX512-BF16), with which
/// [`Products::Bf16`] runs at about twice the speed of f32 on the CPU; without them it still
/// works, computing the same bf16 products in f32.
pub fn cpu_has_bf16() -> bool {
    #[cfg(feature = "ndarray")]
    return gemm::isa() == gemm::Isa::Avx512Bf16;
    #[cfg(not(feature = "ndarray"))]
    false
}

/// `a·b` with both inputs rounded to bf16 and the sums in f32 (autocast's product), returned in
/// `a`'s dtype. Gradients flow to both, computed the same way. Backends that hold no bf16
/// tensors and have no kernel for it compute in f32.
///
/// # Shapes
/// `a: [m, k]`, `b: [k, n]` -> `[m, n]`
pub fn matmul_bf16<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 2> {
    #[cfg(feature = "ndarray")]
    if let Some(out) = cpu::matmul_bf16(&a, &b) {
        return out;
    }
    composed::matmul_bf16(a, b)
}

/// [`matmul`] or [`matmul_bf16`], as `products` says.
pub fn matmul_with<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>, products: Products) -> Tensor<B, 2> {
    match products {
        Products::F32 => matmul(a, b),
        Products::Bf16 => matmul_bf16(a, b),
    }
}

/// [`linear`], or with both inputs rounded to bf16 and the sums in f32 ([`matmul_bf16`]); the
/// weight is f32 and may be trained (autocast over full fine-tuning).
pub fn linear_with<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    products: Products,
) -> Tensor<B, 2> {
    match products {
        Products::F32 => linear(x, weight, bias),
        Products::Bf16 => with_bias(matmul_bf16(x, weight), bias),
    }
}

/// `x·W + bias` with a frozen `W` held as bf16 bits (`[in, out]`, U16; see [`to_bf16_bits`]):
/// `x` rounded to bf16, sums in f32, no gradient to `W`.
///
/// # Shapes
/// `x: [rows, in]`, `bits: [in, out]`, `bias: [out]` -> `[rows, out]`
pub fn linear_bf16_frozen<B: Backend>(
    x: Tensor<B, 2>,
    bits: Tensor<B, 2, Int>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, 2> {
    #[cfg(feature = "ndarray")]
    if let Some(out) = cpu::linear_bf16_frozen(&x, &bits) {
        return with_bias(out, bias);
    }
    let weight = from_bf16_bits(bits, x.dtype());
    with_bias(composed::matmul_bf16(x, weight), bias)
}

fn with_bias<B: Backend>(out: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Tensor<B, 2> {
    match bias {
        Some(bias) => out + bias.unsqueeze::<2>(),
        None => out,
    }
}

/// `w` rounded to bf16 (to nearest even), as its bit patterns in a U16 tensor: half the memory
/// of f32 on backends that hold no bf16 floats.
pub fn to_bf16_bits<B: Backend>(w: Tensor<B, 2>) -> Tensor<B, 2, Int> {
    #[cfg(feature = "ndarray")]
    if let Some(bits) = cpu::to_bf16_bits(&w) {
        return bits;
    }
    let device = w.device();
    let shape = w.dims();
    let values = w.into_data().convert::<f32>().to_vec::<f32>().expect("f32 values");
    let bits: Vec<u16> = values
        .iter()
        .map(|&x| burn::tensor::bf16::from_f32(x).to_bits())
        .collect();
    Tensor::from_data(TensorData::new(bits, shape), (&device, DType::U16))
}

/// The values of bf16 bits (see [`to_bf16_bits`]) as a float tensor of `dtype`.
pub fn from_bf16_bits<B: Backend>(bits: Tensor<B, 2, Int>, dtype: DType) -> Tensor<B, 2> {
    let device = bits.device();
    let shape = bits.dims();
    let data = bits.into_data();
    let value = |b: u32| f32::from_bits(b << 16);
    let values: Vec<f32> = match data.clone().to_vec::<u16>() {
        Ok(bits) => bits.into_iter().map(|b| value(b as u32)).collect(),
        // A backend that widened the ints: the same bit patterns.
        Err(_) => data
            .convert::<i64>()
            .to_vec::<i64>()
            .expect("ints")
            .into_iter()
            .map(|b| value(b as u32))
            .collect(),
    };
    Tensor::<B, 2>::from_data(TensorData::new(values, shape), (&device, DType::F32)).cast(dtype)
}

/// What the loss needs from each row of logits, without gradient (see
/// `temper_trl::head_token_logps`, which writes the gradient itself).
pub struct SoftmaxRows<B: Backend> {
    /// `[rows]`: log p(target).
    pub logps: Tensor<B, 1>,
    /// `[rows]`: the mean logit.
    pub mean_logits: Tensor<B, 1>,
    /// `[rows]`: 1 where the argmax is the target (the first maximum, as burn's `argmax`), else 0.
    pub hits: Tensor<B, 1>,
    /// `[rows, vocab]`: the softmax.
    pub probs: Tensor<B, 2>,
}

/// Softmax statistics of `logits` (`[rows, vocab]`, f32) at `targets` (`[rows]`), in one pass
/// over the logits on the CPU instead of ten.
pub fn softmax_rows<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> SoftmaxRows<B> {
    #[cfg(feature = "ndarray")]
    if let Some(out) = cpu::softmax_rows(&logits, &targets) {
        return out;
    }
    composed::softmax_rows(logits, targets)
}

/// `silu(gate) * up`, the gated activation of a SwiGLU MLP.
pub fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    swiglu_with(gate, up, Products::F32)
}

/// [`swiglu`], keeping its inputs for the backward pass in bf16 when `saved` says so (half their
/// memory, the largest of a decoder layer's saved activations; PyTorch's bf16 keeps them so).
pub fn swiglu_with<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>, saved: Products) -> Tensor<B, D> {
    #[cfg(feature = "ndarray")]
    if let Some(out) = cpu::swiglu(&gate, &up, saved) {
        return out;
    }
    let _ = saved;
    composed::swiglu(gate, up)
}

/// RMSNorm, `x / sqrt(mean(x²) + eps) * weight` over the last dimension, computed in f32 whatever
/// the storage dtype (as transformers' `LlamaRMSNorm`), returned in `x`'s dtype.
///
/// # Shapes
/// `x: [batch, seq, hidden]`, `weight: [hidden]` -> like `x`
pub fn rms_norm<B: Backend>(x: Tensor<B, 3>, weight: Tensor<B, 1>, eps: f64) -> Tensor<B, 3> {
    #[cfg(feature = "ndarray")]
    if let Some(out) = cpu::rms_norm(&x, &weight, eps) {
        return out;
    }
    composed::rms_norm(x, weight, eps)
}

/// Rotary position embedding in Hugging Face's `rotate_half` layout (the two halves of each head
/// are the pairs): `x * cos + rotate_half(x) * sin`.
///
/// # Shapes
/// `x: [batch, seq, heads, head_dim]`, `cos`, `sin`: `[batch, seq, head_dim]` -> like `x`
pub fn rope<B: Backend>(x: Tensor<B, 4>, cos: Tensor<B, 3>, sin: Tensor<B, 3>) -> Tensor<B, 4> {
    #[cfg(feature = "ndarray")]
    if let Some(out) = cpu::rope(&x, &cos, &sin) {
        return out;
    }
    composed::rope(x, cos, sin)
}

/// Scaled dot-product attention, `softmax(q·kᵀ / sqrt(head_dim)) · v`, with grouped-query heads
/// (each key/value head serves `heads / kv_heads` query heads, without copying it).
///
/// `mask`: `true` where a query may not see a key. `None` means causal: query `i` sees keys up to
/// `i + keys - seq` (the last `seq` keys are the queries' own positions, as with a KV cache).
/// A given mask must block the future itself. A query that may see no key gets zeros.
///
/// # Shapes
/// `q: [batch, seq, heads, head_dim]`, `k`, `v`: `[batch, keys, kv_heads, head_dim]`,
/// `mask: [batch, 1, seq, keys]` -> `[batch, seq, heads, head_dim]`
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, Bool>>,
) -> Tensor<B, 4> {
    attention_with(q, k, v, mask, Products::F32)
}

/// [`attention`], keeping the probabilities its backward pass needs in bf16 when `saved` says so
/// (half their memory, which at 256 tokens is a fifth of a decoder layer's saved activations;
/// PyTorch's bf16 attention keeps them in bf16 too). The forward's values are the same.
pub fn attention_with<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, Bool>>,
    saved: Products,
) -> Tensor<B, 4> {
    #[cfg(feature = "ndarray")]
    if let Some(out) = cpu::attention(&q, &k, &v, mask.as_ref(), saved) {
        return out;
    }
    let _ = saved;
    composed::attention(q, k, v, mask)
}

/// The same operations composed from burn's tensor operations, whatever the backend: what other
/// backends run, and what the CPU kernels are tested against.
pub mod composed {
    use super::*;

    pub fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
        silu(gate) * up
    }

    pub fn matmul_bf16<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 2> {
        let dtype = a.dtype();
        if B::supports_dtype(&a.device(), DType::BF16) {
            a.cast(DType::BF16).matmul(b.cast(DType::BF16)).cast(dtype)
        } else {
            a.matmul(b)
        }
    }

    pub fn softmax_rows<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> SoftmaxRows<B> {
        let logits = logits.detach();
        let vocab = logits.dims()[1];
        let max = logits.clone().max_dim(1); // [rows, 1]
        let exp = (logits.clone() - max.clone()).exp();
        let sum = exp.clone().sum_dim(1); // [rows, 1]
        let targets = targets.unsqueeze_dim::<2>(1); // [rows, 1]
        let target_logit = logits.clone().gather(1, targets.clone());
        let hits = logits.clone().argmax(1).equal(targets).float().squeeze_dim::<1>(1);
        SoftmaxRows {
            logps: (target_logit - max - sum.clone().log()).squeeze_dim::<1>(1),
            mean_logits: logits.sum_dim(1).squeeze_dim::<1>(1) / vocab as f64,
            hits,
            probs: exp / sum,
        }
    }

    pub fn rms_norm<B: Backend>(x: Tensor<B, 3>, weight: Tensor<B, 1>, eps: f64) -> Tensor<B, 3> {
        let dtype = x.dtype();
        let x = x.cast(DType::F32);
        let var = x.clone().powi_scalar(2).mean_dim(2);
        let normed = x * (var + eps).sqrt().recip();
        normed.cast(dtype) * weight.unsqueeze::<3>()
    }

    pub fn rope<B: Backend>(x: Tensor<B, 4>, cos: Tensor<B, 3>, sin: Tensor<B, 3>) -> Tensor<B, 4> {
        let [b, s, h, d] = x.dims();
        let x1 = x.clone().slice([0..b, 0..s, 0..h, 0..d / 2]);
        let x2 = x.clone().slice([0..b, 0..s, 0..h, d / 2..d]);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * cos.unsqueeze_dim::<4>(2) + rotated * sin.unsqueeze_dim::<4>(2)
    }

    pub fn attention<B: Backend>(
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        mask: Option<Tensor<B, 4, Bool>>,
    ) -> Tensor<B, 4> {
        let [b, s, h, _] = q.dims();
        let [_, keys, kvh, _] = k.dims();
        let q = q.swap_dims(1, 2); // [b, h, s, d]
        let k = repeat_kv(k.swap_dims(1, 2), h / kvh); // [b, h, keys, d]
        let v = repeat_kv(v.swap_dims(1, 2), h / kvh); // [b, h, keys, d]
        let options = AttentionModuleOptions {
            is_causal: mask.is_none(),
            ..AttentionModuleOptions::default()
        };
        let mask = mask.map(|m| m.expand([b, h, s, keys]));
        burn_attention(q, k, v, mask, None, options).swap_dims(1, 2) // [b, s, h, d]
    }

    /// Grouped-query attention for backends without it: each key/value head repeated `groups`
    /// times.
    fn repeat_kv<B: Backend>(x: Tensor<B, 4>, groups: usize) -> Tensor<B, 4> {
        if groups == 1 {
            return x;
        }
        let [b, kvh, s, d] = x.dims();
        x.unsqueeze_dim::<5>(2) // [b, kvh, 1, s, d]
            .expand([b, kvh, groups, s, d])
            .reshape([b, kvh * groups, s, d])
    }
}
