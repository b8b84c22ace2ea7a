//! The Llama family (Llama 2/3.x, SmolLM, TinyLlama, Mistral, Qwen2, Qwen3, and Gemma 3's text
//! model, which adds norms around attention and MLP, GeGLU and two RoPE bases), top to bottom:
//! RoPE, RMSNorm, MLP, attention, decoder layer, model. Field names are the Hugging Face
//! checkpoint keys (`model.layers.{i}.self_attn.q_proj.weight`), so loading is a straight walk.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::module::embedding;
use burn::tensor::activation::softmax;
use burn::tensor::{Bool, DType, ElementConversion, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::config::{Activation, Family, ModelConfig, MoeConfig, RopeScaling};
use crate::error::Result;
use crate::lora::Lora;
use crate::quant::QuantizedWeight;
use crate::weights::{WeightLoader, WeightSource};
use temper_kernels::Products;

// ---------------------------------------------------------------------------------------------
// RoPE (Hugging Face's `rotate_half` layout: the two halves of each head are the pair, not
// interleaved neighbours as in burn's `RotaryEncoding`).

/// Inverse frequencies, `rotary_dim / 2` of them, after rope scaling (long-RoPE's short set).
pub fn rope_inv_freq(config: &ModelConfig) -> Vec<f32> {
    inv_freq(config.rotary_dim, config.rope_theta, &config.rope_scaling)
}

/// Long-RoPE's inverse frequencies for a forward whose positions go past the pretraining
/// length, with that length; `None` for other scalings.
pub fn rope_inv_freq_long(config: &ModelConfig) -> Option<(Vec<f32>, usize)> {
    let RopeScaling::LongRope {
        long_factor,
        original_max_position_embeddings,
        ..
    } = &config.rope_scaling
    else {
        return None;
    };
    Some((
        long_rope_freq(config.rotary_dim, config.rope_theta, long_factor),
        *original_max_position_embeddings,
    ))
}

/// The factor cos and sin are multiplied by (long-RoPE's `attention_factor`; 1 elsewhere).
pub fn rope_attention_factor(config: &ModelConfig) -> f64 {
    match &config.rope_scaling {
        RopeScaling::LongRope { attention_factor, .. } => *attention_factor,
        _ => 1.0,
    }
}

/// `1 / (factor_i * theta^(2i/d))`, in transformers' order of f32 operations.
fn long_rope_freq(dim: usize, theta: f64, factors: &[f32]) -> Vec<f32> {
    factors
        .iter()
        .enumerate()
        .map(|(i, f)| 1.0 / (f * (theta as f32).powf((2 * i) as f32 / dim as f32)))
        .collect()
}

fn inv_freq(dim: usize, theta: f64, scaling: &RopeScaling) -> Vec<f32> {
    // transformers computes these in f32; doing the same keeps logits bit-close.
    let base: Vec<f32> = (0..dim / 2)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / dim as f32))
        .collect();
    match scaling {
        RopeScaling::Default => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / *factor as f32).collect(),
        RopeScaling::FreqFactors(factors) => base.iter().zip(factors).map(|(f, d)| f / d).collect(),
        RopeScaling::LongRope { short_factor, .. } => long_rope_freq(dim, theta, short_factor),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_ctx,
        } => {
            let (factor, low, high, old_ctx) = (
                *factor as f32,
                *low_freq_factor as f32,
                *high_freq_factor as f32,
                *old_ctx as f32,
            );
            let low_freq_wavelen = old_ctx / low;
            let high_freq_wavelen = old_ctx / high;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        let smooth = (old_ctx / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// Precomputed `cos`/`sin` for the positions of one forward pass.
pub struct Rope<B: Backend> {
    cos: Tensor<B, 3>, // [batch, seq, rotary_dim]
    sin: Tensor<B, 3>, // [batch, seq, rotary_dim]
}

impl<B: Backend> Rope<B> {
    /// `position_ids`: `[batch, seq]`. Computed in f32 (as transformers does), multiplied by
    /// `scale` (long-RoPE's attention factor; 1 elsewhere), then cast to the activations' dtype.
    pub fn new(inv_freq: &Tensor<B, 1>, position_ids: Tensor<B, 2, Int>, dtype: DType, scale: f64) -> Self {
        let [batch, seq] = position_ids.dims();
        let half = inv_freq.dims()[0];
        let pos = position_ids.float().cast(DType::F32).reshape([batch, seq, 1]);
        let freqs = pos * inv_freq.clone().reshape([1, 1, half]); // [batch, seq, half]
        let emb = Tensor::cat(vec![freqs.clone(), freqs], 2); // [batch, seq, rotary_dim]
        let (cos, sin) = (emb.clone().cos(), emb.sin());
        let (cos, sin) = match scale == 1.0 {
            true => (cos, sin),
            false => (cos.mul_scalar(scale), sin.mul_scalar(scale)),
        };
        Self {
            cos: cos.cast(dtype),
            sin: sin.cast(dtype),
        }
    }

    /// `x`: `[batch, seq, heads, head_dim]`. When the rotary dimension is smaller than the head
    /// (Phi-3's `partial_rotary_factor`), the leading dimensions rotate and the rest pass through.
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let (head_dim, rotary) = (x.dims()[3], self.cos.dims()[2]);
        if rotary == head_dim {
            return temper_kernels::rope(x, self.cos.clone(), self.sin.clone());
        }
        let rotated = temper_kernels::rope(x.clone().narrow(3, 0, rotary), self.cos.clone(), self.sin.clone());
        Tensor::cat(vec![rotated, x.narrow(3, rotary, head_dim - rotary)], 3)
    }
}

/// A decoder layer's linear layers under `model.layers.N.`, in checkpoint order. Every walk
/// over a model's named linears (loading, shapes, adapters, saving, merging) goes through this
/// list (or [`FUSED_LAYER_LINEARS`], as [`layer_linears`] picks) and
/// [`LlamaForCausalLM::linears`].
pub const LAYER_LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Phi-3's: queries, keys and values from one `qkv_proj`, gate and up from one `gate_up_proj`.
pub const FUSED_LAYER_LINEARS: [&str; 4] = [
    "self_attn.qkv_proj",
    "self_attn.o_proj",
    "mlp.gate_up_proj",
    "mlp.down_proj",
];

/// The layer's linear names for models with (`fused`) or without fused projections.
pub fn layer_linears(fused: bool) -> &'static [&'static str] {
    match fused {
        true => &FUSED_LAYER_LINEARS,
        false => &LAYER_LINEARS,
    }
}

/// A decoder layer's norms under `model.layers.N.`.
pub const LAYER_NORMS: [&str; 2] = ["input_layernorm", "post_attention_layernorm"];

/// Qwen3's and Gemma 3's per-head norms under `model.layers.N.` (`head_dim` weights each).
pub const HEAD_NORMS: [&str; 2] = ["self_attn.q_norm", "self_attn.k_norm"];

/// Gemma's norms around the MLP under `model.layers.N.`.
pub const SANDWICH_NORMS: [&str; 2] = ["pre_feedforward_layernorm", "post_feedforward_layernorm"];

/// [`layer_linears`]'s `[in, out]` sizes and whether each has a bias.
fn layer_linear_shapes(c: &ModelConfig) -> Vec<([usize; 2], bool)> {
    let (h, q, kv, is) = (
        c.hidden_size,
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
        c.intermediate_size,
    );
    match c.fused_projections {
        true => vec![
            ([h, q + 2 * kv], c.qkv_bias),
            ([q, h], c.o_bias),
            ([h, 2 * is], c.mlp_bias),
            ([is, h], c.mlp_bias),
        ],
        false => vec![
            ([h, q], c.qkv_bias),
            ([h, kv], c.qkv_bias),
            ([h, kv], c.qkv_bias),
            ([q, h], c.o_bias),
            ([h, is], c.mlp_bias),
            ([h, is], c.mlp_bias),
            ([is, h], c.mlp_bias),
        ],
    }
}

/// Random weights of the model a config describes (benchmarks: speed does not depend on the
/// values), with every norm at its identity.
pub fn random_weights(c: &ModelConfig, seed: u64) -> crate::weights::RandomSource {
    let identity = if c.norm_plus_one { 0.0 } else { 1.0 };
    crate::weights::RandomSource::new(checkpoint_shapes(c), seed).with_norm_value(identity)
}

/// The name of an expert's fused gate and up projections (transformers 5's stacked parameter's
/// name): `model.layers.N.mlp.experts.E.gate_up_proj`. Checkpoints hold the two separately.
pub const EXPERT_GATE_UP: &str = "gate_up_proj";

/// A mixture-of-experts block's checkpoint names: the block, and each expert's gate, up and
/// down projections (`mlp.experts.E.gate_proj`; Mixtral's `block_sparse_moe.experts.E.w1`).
fn moe_names(family: Family) -> [&'static str; 4] {
    match family {
        Family::Mixtral => ["block_sparse_moe", "w1", "w3", "w2"],
        _ => ["mlp", "gate_proj", "up_proj", "down_proj"],
    }
}

/// Decoder layer `i`'s linear layers under `model.layers.N.`: name, `[in, out]`, bias; in the
/// order loading reads them (attention, then the MLP, or the router and each expert's gate, up
/// and down projections as the checkpoint names them; [`LlamaForCausalLM::linears`] then walks
/// each expert's fused [`EXPERT_GATE_UP`] and its down projection).
fn layer_linear_specs(c: &ModelConfig, i: usize) -> Vec<(String, [usize; 2], bool)> {
    let attention = if c.fused_projections { 2 } else { 4 };
    let dense = layer_linears(c.fused_projections)
        .iter()
        .zip(layer_linear_shapes(c))
        .map(|(name, (shape, bias))| (name.to_string(), shape, bias));
    match &c.moe {
        Some(moe) if moe.sparse_layers[i] => {
            let [block, gate, up, down] = moe_names(c.family);
            let (h, is) = (c.hidden_size, moe.expert_intermediate_size);
            let mut out: Vec<_> = dense.take(attention).collect();
            out.push((format!("{block}.gate"), [h, moe.num_experts], false));
            for e in 0..moe.num_experts {
                let p = format!("{block}.experts.{e}");
                out.push((format!("{p}.{gate}"), [h, is], false));
                out.push((format!("{p}.{up}"), [h, is], false));
                out.push((format!("{p}.{down}"), [is, h], false));
            }
            out
        }
        _ => dense.collect(),
    }
}

/// The checkpoint tensors this architecture reads, by Hugging Face name, with their shapes
/// (`[out, in]` for linear weights), in the order [`LlamaForCausalLM::load`] reads them.
pub fn checkpoint_shapes(c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let h = c.hidden_size;
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![c.vocab_size, h])];
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for (name, [inp, o], bias) in layer_linear_specs(c, i) {
            out.push((format!("{p}.{name}.weight"), vec![o, inp]));
            if bias {
                out.push((format!("{p}.{name}.bias"), vec![o]));
            }
        }
        if c.qk_norm {
            for name in HEAD_NORMS {
                out.push((format!("{p}.{name}.weight"), vec![c.head_dim]));
            }
        }
        for name in LAYER_NORMS {
            out.push((format!("{p}.{name}.weight"), vec![h]));
        }
        if c.sandwich_norms {
            for name in SANDWICH_NORMS {
                out.push((format!("{p}.{name}.weight"), vec![h]));
            }
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if c.score_head {
        out.push((format!("{SCORE}.weight"), vec![1, h]));
    } else if !c.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![c.vocab_size, h]));
    }
    out
}

/// The sequence-classification head's module name (transformers' `score`).
pub const SCORE: &str = "score";

/// Whether a linear layer is an output head (`lm_head`, `score`): PEFT's `all-linear` leaves
/// them out, and a quantized base keeps them dense.
pub fn is_output_head(name: &str) -> bool {
    name == "lm_head" || name == SCORE
}

// ---------------------------------------------------------------------------------------------
// Building blocks.

/// A linear layer holding the weight as `[in, out]` (the transpose of the checkpoint's
/// `[out, in]`, done once at load so every matmul reads contiguous memory).
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// A LoRA adapter, placed by `temper-peft`.
    pub adapter: Option<Lora<B>>,
    /// When set, the frozen weight lives here, block-quantized or bf16, and `weight` is empty.
    pub quantized: Option<QuantizedWeight<B>>,
    /// The inputs of the base product: bf16 under `precision: bf16` on the CPU (a bf16 frozen
    /// weight always is).
    #[module(skip)]
    pub products: Products,
}

impl<B: Backend> Linear<B> {
    /// # Shapes
    /// `[..., in] -> [..., out]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        // Flatten the leading dims into one matmul: burn's `linear` on a 3-D input runs one
        // matmul per batch row (rayon over rows, each BLAS call threaded again, which fights for
        // the cores) and its weight gradient sums per-row products. One 2-D GEMM avoids both.
        let dims = x.dims();
        let in_f = dims[D - 1];
        let rows = dims[..D - 1].iter().product::<usize>();
        let x = temper_kernels::reshape(x, [rows, in_f]);
        let bias = self.bias.as_ref().map(|b| b.val());
        let y = match &self.quantized {
            Some(q) if q.is_bf16() => temper_kernels::linear_bf16_frozen(x.clone(), q.qs.val(), bias.clone()),
            _ => temper_kernels::linear_with(x.clone(), self.weight(), bias.clone(), self.products),
        };
        let y = match &self.adapter {
            Some(lora) if lora.enabled => lora.apply(x, y, || self.weight(), bias, self.products),
            _ => y,
        };
        let mut out = dims;
        out[D - 1] = y.dims()[1];
        temper_kernels::reshape(y, out)
    }

    /// The `[in, out]` weight (dequantized when the base is kept quantized).
    pub fn weight(&self) -> Tensor<B, 2> {
        match &self.quantized {
            Some(q) => q.dequantize(),
            None => self.weight.val(),
        }
    }

    /// `[in, out]`.
    pub fn dims(&self) -> [usize; 2] {
        match &self.quantized {
            Some(q) => q.dims(),
            None => self.weight.dims(),
        }
    }

    fn load(w: &mut WeightLoader<'_, B>, prefix: &str, in_f: usize, out_f: usize, bias: bool) -> Result<Self> {
        Ok(Self {
            weight: Param::from_tensor(w.linear(&format!("{prefix}.weight"), in_f, out_f)?),
            bias: if bias {
                Some(Param::from_tensor(w.vector(&format!("{prefix}.bias"), out_f)?))
            } else {
                None
            },
            adapter: None,
            quantized: None,
            products: Products::F32,
        })
    }
}

/// RMSNorm, computed in f32 whatever the storage dtype (as transformers' `LlamaRMSNorm`).
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
    /// Gemma's norms scale by `offset + weight` with `offset` 1 (the checkpoint stores the
    /// difference from 1); 0 elsewhere.
    pub offset: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        if self.offset == 0.0 {
            return temper_kernels::rms_norm(x, self.weight.val(), self.eps);
        }
        // Gemma: `x̂ · (1 + w)` in f32, then cast (transformers' `Gemma3RMSNorm`; `1 + w` in
        // bf16 would keep only ~3 digits of `w`).
        let dtype = x.dtype();
        let scale = self.weight.val().cast(DType::F32).add_scalar(self.offset);
        temper_kernels::rms_norm(x.cast(DType::F32), scale, self.eps).cast(dtype)
    }

    fn load(w: &mut WeightLoader<'_, B>, name: &str, size: usize, c: &ModelConfig) -> Result<Self> {
        Ok(Self {
            weight: Param::from_tensor(w.vector(&format!("{name}.weight"), size)?),
            eps: c.rms_norm_eps,
            offset: if c.norm_plus_one { 1.0 } else { 0.0 },
        })
    }
}

/// SwiGLU, `down(silu(gate(x)) * up(x))`, or Gemma's GeGLU with gelu's tanh approximation.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `gate_proj` and `up_proj`, or Phi-3's one `gate_up_proj` (gate, then up, along its output).
    pub gate_up: Vec<Linear<B>>,
    pub down_proj: Linear<B>,
    #[module(skip)]
    pub activation: Activation,
}

impl<B: Backend> Mlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let (gate, up) = match self.gate_up.as_slice() {
            [gate, up] => (gate.forward(x.clone()), up.forward(x)),
            [fused] => {
                let both = fused.forward(x);
                let half = both.dims()[2] / 2;
                (both.clone().narrow(2, 0, half), both.narrow(2, half, half))
            }
            other => unreachable!("an MLP has 1 or 2 input projections, not {}", other.len()),
        };
        let gated = match self.activation {
            // Under bf16 products its saved inputs are bf16 (as `Attention::forward`'s).
            Activation::Silu => temper_kernels::swiglu_with(gate, up, self.down_proj.products),
            // In f32 and rounded once, as PyTorch's gelu computes on bf16 inputs.
            Activation::GeluTanh => gelu_tanh(gate.clone().cast(DType::F32)).cast(gate.dtype()) * up,
        };
        self.down_proj.forward(gated)
    }
}

/// A mixture-of-experts block (Qwen3-MoE's `mlp`, Mixtral's `block_sparse_moe`): the router
/// (`gate`) scores the experts for each token, the `top_k` most probable are chosen, and each
/// expert (a SwiGLU MLP) runs on the tokens routed to it only; its outputs are summed, weighted by
/// the chosen probabilities (renormalised over the chosen when `norm_topk_prob`).
#[derive(Module, Debug)]
pub struct SparseMoe<B: Backend> {
    /// `[hidden, experts]`, no bias.
    pub gate: Linear<B>,
    pub experts: Vec<Mlp<B>>,
    pub top_k: usize,
    pub norm_topk_prob: bool,
    /// Mixtral weighs the experts' outputs in f32 (its router keeps f32 scores); Qwen3-MoE casts
    /// the scores to the model's dtype first.
    pub f32_scores: bool,
    /// The block's and the experts' checkpoint names ([`moe_names`]).
    #[module(skip)]
    pub names: [&'static str; 4],
}

impl<B: Backend> SparseMoe<B> {
    /// The block's output and how it routed the tokens (`batch * seq` of them).
    pub fn forward(&self, x: Tensor<B, 3>) -> (Tensor<B, 3>, crate::moe::Routing<B>) {
        let [b, s, h] = x.dims();
        let (rows, k, device, dtype) = (b * s, self.top_k, x.device(), x.dtype());
        let x = temper_kernels::reshape(x, [rows, h]);
        let logits = self.gate.forward(x.clone()); // [rows, experts]
        let experts = logits.dims()[1];
        let probs = softmax(logits.cast(DType::F32), 1);
        // The choice happens on the host (one read per layer): only routed tokens are computed.
        let host: Vec<f32> = probs
            .clone()
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("f32 probabilities");
        let chosen = crate::moe::top_k_rows(&host, experts, k);
        let index: Vec<i64> = chosen.iter().map(|&e| e as i64).collect();
        let index = Tensor::<B, 2, Int>::from_data(TensorData::new(index, [rows, k]), &device);
        let mut weights = probs.clone().gather(1, index); // [rows, k], f32, differentiable (router training)
        if self.norm_topk_prob {
            weights = weights.clone() / weights.sum_dim(1);
        }
        let weights = match self.f32_scores {
            true => weights,
            false => weights.cast(dtype),
        }
        .reshape([rows * k]);
        // Each expert's slots (`token * k + rank`), in token order, from one pass over the choices.
        let mut slots_of: Vec<Vec<i64>> = vec![Vec::new(); experts];
        for (slot, &e) in chosen.iter().enumerate() {
            slots_of[e].push(slot as i64);
        }
        let mut out = Tensor::<B, 2>::zeros([rows, h], &device).cast(dtype);
        for (expert, slots) in self.experts.iter().zip(slots_of) {
            if slots.is_empty() {
                continue;
            }
            let n = slots.len();
            let tokens: Vec<i64> = slots.iter().map(|&i| i / k as i64).collect();
            let tokens = Tensor::<B, 1, Int>::from_data(TensorData::new(tokens, [n]), &device);
            let slots = Tensor::<B, 1, Int>::from_data(TensorData::new(slots, [n]), &device);
            let y = expert.forward(temper_kernels::reshape(x.clone().select(0, tokens.clone()), [1, n, h]));
            let y = temper_kernels::reshape(y, [n, h]);
            let w = weights.clone().select(0, slots).reshape([n, 1]);
            let y = match self.f32_scores {
                true => (y.cast(DType::F32) * w).cast(dtype),
                false => y * w,
            };
            out = out.select_assign(0, tokens, y, IndexingUpdateOp::Add);
        }
        (
            temper_kernels::reshape(out, [b, s, h]),
            crate::moe::Routing { probs, chosen },
        )
    }

    /// The router's and the experts' linear layers' names under the layer, in walk order: each
    /// expert's fused [`EXPERT_GATE_UP`] and its down projection.
    fn linear_names(&self) -> Vec<String> {
        let [block, _, _, down] = self.names;
        let mut out = vec![format!("{block}.gate")];
        for e in 0..self.experts.len() {
            out.push(format!("{block}.experts.{e}.{EXPERT_GATE_UP}"));
            out.push(format!("{block}.experts.{e}.{down}"));
        }
        out
    }
}

/// `0.5 x (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))` (PyTorch's `gelu(approximate="tanh")`).
fn gelu_tanh<B: Backend>(x: Tensor<B, 3>) -> Tensor<B, 3> {
    let inner =
        (x.clone() + x.clone().powi_scalar(3).mul_scalar(0.044715)).mul_scalar((2.0 / std::f64::consts::PI).sqrt());
    x.clone().mul_scalar(0.5) * (inner.tanh().add_scalar(1.0))
}

/// Keys and values of earlier positions, per layer, for incremental decoding.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>, // [batch, past, kv_heads, head_dim]
}

impl<B: Backend> KvCache<B> {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
        }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dims()[1])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The caches of several batches (of one sequence each, or more) as one batch, each
    /// left-padded with zeros to the longest: attend with an attention mask that is 0 over each
    /// row's padding.
    ///
    /// # Panics
    /// If the caches are empty or of different models (programmer errors).
    pub fn stack_left_padded(caches: &[KvCache<B>]) -> Self {
        let longest = caches.iter().map(KvCache::len).max().expect("at least one cache");
        let layers = (0..caches[0].layers.len())
            .map(|i| {
                let pad = |t: &Tensor<B, 4>| {
                    let [b, len, h, d] = t.dims();
                    if len == longest {
                        return t.clone();
                    }
                    let zeros = Tensor::<B, 4>::zeros([b, longest - len, h, d], &t.device()).cast(t.dtype());
                    Tensor::cat(vec![zeros, t.clone()], 1)
                };
                let (ks, vs): (Vec<_>, Vec<_>) = caches
                    .iter()
                    .map(|c| {
                        let (k, v) = c.layers[i].as_ref().expect("a filled cache");
                        (pad(k), pad(v))
                    })
                    .unzip();
                Some((Tensor::cat(ks, 0), Tensor::cat(vs, 0)))
            })
            .collect();
        Self { layers }
    }

    /// The cache of rows `rows` (`[n]`, repeats allowed) of this one's batch.
    pub fn select_rows(&self, rows: Tensor<B, 1, Int>) -> Self {
        Self {
            layers: self
                .layers
                .iter()
                .map(|l| {
                    l.as_ref()
                        .map(|(k, v)| (k.clone().select(0, rows.clone()), v.clone().select(0, rows.clone())))
                })
                .collect(),
        }
    }
}

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// `q_proj`, `k_proj` and `v_proj`, or Phi-3's one `qkv_proj` (queries, keys, values along
    /// its output).
    pub qkv: Vec<Linear<B>>,
    pub o_proj: Linear<B>,
    /// Qwen3, Gemma 3: RMSNorm over each query / key head (`head_dim` weights), before RoPE.
    pub q_norm: Option<RmsNorm<B>>,
    pub k_norm: Option<RmsNorm<B>>,
    /// Multiplies the queries so that scores scale by `query_pre_attn_scalar^-0.5` where the
    /// attention kernel divides by `sqrt(head_dim)` (Gemma); 1 elsewhere.
    pub query_scale: f64,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl<B: Backend> Attention<B> {
    /// `mask`: `[batch, 1, q, k]`, `true` where attention is not allowed; `None` means plain
    /// causal attention, which lets GPU backends use their fused causal kernels.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        mask: Option<Tensor<B, 4, Bool>>,
        cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    ) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (q, k, v) = match self.qkv.as_slice() {
            [q, k, v] => (q.forward(x.clone()), k.forward(x.clone()), v.forward(x)),
            [fused] => {
                let qkv = fused.forward(x);
                let (qw, kvw) = (h * d, kvh * d);
                (
                    qkv.clone().narrow(2, 0, qw),
                    qkv.clone().narrow(2, qw, kvw),
                    qkv.narrow(2, qw + kvw, kvw),
                )
            }
            other => unreachable!("attention has 1 or 3 input projections, not {}", other.len()),
        };
        let q = temper_kernels::reshape(head_norm(&self.q_norm, q, d), [b, s, h, d]);
        let k = temper_kernels::reshape(head_norm(&self.k_norm, k, d), [b, s, kvh, d]);
        let v = temper_kernels::reshape(v, [b, s, kvh, d]);
        let q = rope.apply(q);
        let q = if self.query_scale == 1.0 {
            q
        } else {
            q.mul_scalar(self.query_scale)
        };
        let k = rope.apply(k);
        let (k, v) = match cache {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(vec![pk, k], 1), Tensor::cat(vec![pv, v], 1)),
                    None => (k, v),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
            None => (k, v),
        };
        // Under bf16 products (`set_products`) the probabilities saved for the backward are bf16.
        let out = temper_kernels::attention_with(q, k, v, mask, self.o_proj.products); // [b, s, h, d]
        self.o_proj.forward(temper_kernels::reshape(out, [b, s, h * d]))
    }
}

/// `x` (`[batch, seq, heads * head_dim]`) with each head RMS-normalised by `norm`, if any.
fn head_norm<B: Backend>(norm: &Option<RmsNorm<B>>, x: Tensor<B, 3>, head_dim: usize) -> Tensor<B, 3> {
    let Some(norm) = norm else { return x };
    let [b, s, width] = x.dims();
    let heads = temper_kernels::reshape(x, [b, s * (width / head_dim), head_dim]);
    temper_kernels::reshape(norm.forward(heads), [b, s, width])
}

#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub self_attn: Attention<B>,
    /// The feed-forward part: a dense MLP, or (MoE models) experts.
    pub mlp: Option<Mlp<B>>,
    pub moe: Option<SparseMoe<B>>,
    pub input_layernorm: RmsNorm<B>,
    /// Before the MLP (Llama), or on the attention's output (Gemma, with the two below).
    pub post_attention_layernorm: RmsNorm<B>,
    pub pre_feedforward_layernorm: Option<RmsNorm<B>>,
    pub post_feedforward_layernorm: Option<RmsNorm<B>>,
    pub sliding_window: Option<usize>,
}

impl<B: Backend> DecoderLayer<B> {
    /// The layer's output, and how an MoE layer routed the tokens.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        mask: Option<Tensor<B, 4, Bool>>,
        cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    ) -> (Tensor<B, 3>, Option<crate::moe::Routing<B>>) {
        let attn = self
            .self_attn
            .forward(self.input_layernorm.forward(x.clone()), rope, mask, cache);
        let feed_forward = |h: Tensor<B, 3>| match (&self.mlp, &self.moe) {
            (Some(mlp), _) => (mlp.forward(h), None),
            (None, Some(moe)) => {
                let (y, routing) = moe.forward(h);
                (y, Some(routing))
            }
            (None, None) => unreachable!("a decoder layer has an MLP or experts"),
        };
        match (&self.pre_feedforward_layernorm, &self.post_feedforward_layernorm) {
            (Some(pre), Some(post)) => {
                let h = x + self.post_attention_layernorm.forward(attn);
                let (y, routing) = feed_forward(pre.forward(h.clone()));
                (h + post.forward(y), routing)
            }
            _ => {
                let h = x + attn;
                let (y, routing) = feed_forward(self.post_attention_layernorm.forward(h.clone()));
                (h + y, routing)
            }
        }
    }

    /// The layer's linear layers' names under `model.layers.N.`, in the order
    /// `named_linears!` walks them.
    fn linear_names(&self) -> Vec<String> {
        let mut out: Vec<String> = layer_linears(self.self_attn.qkv.len() == 1)
            .iter()
            .take(self.self_attn.qkv.len() + 1)
            .map(|n| n.to_string())
            .collect();
        if let Some(mlp) = &self.mlp {
            let names = match mlp.gate_up.len() {
                1 => &FUSED_LAYER_LINEARS[2..],
                _ => &LAYER_LINEARS[4..],
            };
            out.extend(names.iter().map(|n| n.to_string()));
        }
        if let Some(moe) = &self.moe {
            out.extend(moe.linear_names());
        }
        out
    }
}

/// An MoE block from its loaded linears: the router, then each expert's gate, up and down. Each
/// expert's gate and up become one `gate_up_proj` layer (gate columns first), as transformers 5
/// stacks them and PEFT adapts them: one adapter on both.
fn sparse_moe<B: Backend>(c: &ModelConfig, moe: &MoeConfig, mut linears: Vec<Linear<B>>) -> SparseMoe<B> {
    let experts = linears.split_off(1);
    let mut experts = experts.into_iter();
    let experts = (0..moe.num_experts)
        .map(|_| {
            let (gate, up) = (experts.next().expect("gate"), experts.next().expect("up"));
            // Through the host, so that the parameter is a leaf, as the loaded ones are (autodiff
            // refuses to track a concatenation's output as a parameter).
            let (g, u) = (gate.weight.val(), up.weight.val());
            let (device, dtype) = (g.device(), g.dtype());
            let weight = Tensor::from_data(Tensor::cat(vec![g, u], 1).into_data(), (&device, dtype));
            let fused = Linear {
                weight: Param::from_tensor(weight),
                bias: None,
                adapter: None,
                quantized: None,
                products: Products::F32,
            };
            Mlp {
                gate_up: vec![fused],
                down_proj: experts.next().expect("down"),
                activation: c.activation,
            }
        })
        .collect();
    SparseMoe {
        gate: linears.pop().expect("router"),
        experts,
        top_k: moe.top_k,
        norm_topk_prob: moe.norm_topk_prob,
        f32_scores: c.family == Family::Mixtral,
        names: moe_names(c.family),
    }
}

/// The decoder without its head (`model.*` in the checkpoint).
#[derive(Module, Debug)]
pub struct LlamaModel<B: Backend> {
    pub embed_tokens: Param<Tensor<B, 2>>, // [vocab, hidden]
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
}

/// What one forward pass attends to, besides causality.
#[derive(Debug, Clone, Default)]
pub struct ForwardOptions<B: Backend> {
    /// `[batch, seq]`; defaults to `past..past + seq` for every row.
    pub position_ids: Option<Tensor<B, 2, Int>>,
    /// `[batch, past + seq]`, 1 for real tokens and 0 for padding (transformers' meaning).
    pub attention_mask: Option<Tensor<B, 2, Int>>,
    /// `[batch, seq]`, for packed rows: a token attends only to earlier tokens of the same
    /// segment (example), so examples packed into one row never see each other. Padding is a
    /// segment of its own. Not used with a KV cache.
    pub segment_ids: Option<Tensor<B, 2, Int>>,
}

/// What every decoder layer of one forward needs besides its input ([`LlamaForCausalLM::embed`]).
pub struct LayerInputs<B: Backend> {
    rope: Rope<B>,
    /// Gemma 3's sliding-window layers' RoPE.
    local_rope: Option<Rope<B>>,
    /// For full-attention layers; `None`: causal only.
    full_mask: Option<Tensor<B, 4, Bool>>,
    /// `[batch, 1, seq, seq]`, true between tokens of different packed examples (sliding-window
    /// layers add it to their own mask).
    across_segments: Option<Tensor<B, 4, Bool>>,
    /// `[batch, past + seq]`, true at padding keys (sliding-window layers build their own mask).
    padding: Option<Tensor<B, 2, Bool>>,
    batch: usize,
    seq: usize,
    past: usize,
}

/// The walk over a model's linear layers and their Hugging Face names, written once for `&`
/// (`named_linears!(model, iter, as_ref)`) and `&mut` (`..., iter_mut, as_mut, mut`). The
/// fields are listed in [`layer_linears`]'s order.
macro_rules! named_linears {
    ($model:expr, $iter:ident, $as:ident $(, $mut:tt)?) => {{
        let mut out = Vec::new();
        for (i, layer) in $model.model.layers.$iter().enumerate() {
            let names = layer.linear_names();
            let a = &$($mut)? layer.self_attn;
            let fields = a
                .qkv
                .$iter()
                .chain([&$($mut)? a.o_proj])
                .chain(layer.mlp.$iter().flat_map(|m| m.gate_up.$iter().chain([&$($mut)? m.down_proj])))
                .chain(layer.moe.$iter().flat_map(|moe| {
                    let experts = moe.experts.$iter().flat_map(|m| m.gate_up.$iter().chain([&$($mut)? m.down_proj]));
                    [&$($mut)? moe.gate].into_iter().chain(experts)
                }));
            for (name, linear) in names.iter().zip(fields) {
                out.push((format!("model.layers.{i}.{name}"), linear));
            }
        }
        if let Some(head) = $model.lm_head.$as() {
            out.push(("lm_head".to_string(), head));
        }
        if let Some(score) = $model.score.$as() {
            out.push((SCORE.to_string(), score));
        }
        out
    }};
}

/// A causal language model: the decoder plus the output head (`lm_head`, or the embedding
/// matrix when `tie_word_embeddings`); a reward model has a `score` head as well.
#[derive(Module, Debug)]
pub struct LlamaForCausalLM<B: Backend> {
    pub model: LlamaModel<B>,
    pub lm_head: Option<Linear<B>>,
    /// A reward model's head, `[hidden, 1]`, no bias (transformers' `*ForSequenceClassification`
    /// `score`): from the checkpoint, or added by [`LlamaForCausalLM::add_score_head`].
    pub score: Option<Linear<B>>,
    /// `[rotary_dim / 2]`, f32.
    pub inv_freq: Tensor<B, 1>,
    /// Long-RoPE: the frequencies for a forward whose positions reach past `long_rope_after`
    /// (the pretraining length).
    pub inv_freq_long: Option<Tensor<B, 1>>,
    pub long_rope_after: usize,
    /// Long-RoPE's attention factor, applied to cos and sin; 1 elsewhere.
    pub rope_scale: f64,
    /// Gemma 3: the sliding-window layers' RoPE (`rope_local_base_freq`, unscaled).
    pub inv_freq_local: Option<Tensor<B, 1>>,
    /// Gemma: embeddings times `sqrt(hidden_size)`.
    pub embed_scale: Option<f64>,
    /// Gemma: logits become `cap * tanh(logits / cap)`.
    pub final_logit_softcapping: Option<f64>,
    /// The inputs of the tied output head's product (see [`LlamaForCausalLM::set_products`]).
    #[module(skip)]
    pub products: Products,
}

impl<B: Backend> LlamaForCausalLM<B> {
    /// Builds the model from a checkpoint, reading each expected tensor once. Every tensor
    /// the architecture needs must be present with the expected shape.
    pub fn load(config: &ModelConfig, source: &dyn WeightSource, device: &B::Device, dtype: DType) -> Result<Self> {
        if !B::supports_dtype(device, dtype) {
            return Err(crate::error::Error::Unsupported(format!(
                "this backend cannot hold {dtype:?} tensors on {device:?} (the CPU backends compute in f32: \
                 train with `precision: f32` or `auto`, or use a GPU backend for bf16/f16)"
            )));
        }
        let mut w = WeightLoader::new(source, device, dtype);
        let c = config;
        let hs = c.hidden_size;
        let embed_tokens = Param::from_tensor(w.matrix("model.embed_tokens.weight", c.vocab_size, hs)?);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut linears = layer_linear_specs(c, i)
                .into_iter()
                .map(|(name, [in_f, out_f], bias)| Linear::load(&mut w, &format!("{p}.{name}"), in_f, out_f, bias))
                .collect::<Result<Vec<_>>>()?;
            // [q, k, v, o] or [qkv, o], then [gate, up, down], [gate_up, down], or the router
            // and each expert's [gate, up, down].
            let mut feed_forward = linears.split_off(if c.fused_projections { 2 } else { 4 });
            let o_proj = linears.pop().expect("o_proj");
            let (mlp, moe) = match &c.moe {
                Some(moe) if moe.sparse_layers[i] => (None, Some(sparse_moe(c, moe, feed_forward))),
                _ => {
                    let down_proj = feed_forward.pop().expect("down_proj");
                    let mlp = Mlp {
                        gate_up: feed_forward,
                        down_proj,
                        activation: c.activation,
                    };
                    (Some(mlp), None)
                }
            };
            let [q_norm, k_norm] = HEAD_NORMS.map(|name| {
                c.qk_norm
                    .then(|| RmsNorm::load(&mut w, &format!("{p}.{name}"), c.head_dim, c))
                    .transpose()
            });
            let [input_layernorm, post_attention_layernorm] =
                LAYER_NORMS.map(|name| RmsNorm::load(&mut w, &format!("{p}.{name}"), hs, c));
            let [pre_feedforward_layernorm, post_feedforward_layernorm] = SANDWICH_NORMS.map(|name| {
                c.sandwich_norms
                    .then(|| RmsNorm::load(&mut w, &format!("{p}.{name}"), hs, c))
                    .transpose()
            });
            layers.push(DecoderLayer {
                self_attn: Attention {
                    qkv: linears,
                    o_proj,
                    q_norm: q_norm?,
                    k_norm: k_norm?,
                    query_scale: c.query_pre_attn_scalar.map_or(1.0, |s| (c.head_dim as f64 / s).sqrt()),
                    num_heads: c.num_attention_heads,
                    num_kv_heads: c.num_key_value_heads,
                    head_dim: c.head_dim,
                },
                mlp,
                moe,
                input_layernorm: input_layernorm?,
                post_attention_layernorm: post_attention_layernorm?,
                pre_feedforward_layernorm: pre_feedforward_layernorm?,
                post_feedforward_layernorm: post_feedforward_layernorm?,
                sliding_window: c.sliding_window[i],
            });
        }
        let norm = RmsNorm::load(&mut w, "model.norm", hs, c)?;
        // A sequence classifier's checkpoint has `score` in place of `lm_head`: its language
        // head is the tied embedding or nothing (it is not a generator).
        let lm_head = if c.tie_word_embeddings || c.score_head {
            None
        } else {
            Some(Linear::load(&mut w, "lm_head", hs, c.vocab_size, false)?)
        };
        let score = c
            .score_head
            .then(|| Linear::load(&mut w, SCORE, hs, 1, false))
            .transpose()?;
        let upload = |f: Vec<f32>| Tensor::from_data(TensorData::new(f.clone(), [f.len()]), (device, DType::F32));
        Ok(Self {
            model: LlamaModel {
                embed_tokens,
                layers,
                norm,
            },
            lm_head,
            score,
            inv_freq: upload(rope_inv_freq(c)),
            inv_freq_long: rope_inv_freq_long(c).map(|(f, _)| upload(f)),
            long_rope_after: rope_inv_freq_long(c).map_or(usize::MAX, |(_, after)| after),
            rope_scale: rope_attention_factor(c),
            inv_freq_local: c
                .local_rope_theta
                .map(|theta| upload(inv_freq(c.head_dim, theta, &RopeScaling::Default))),
            embed_scale: c.embed_scale,
            final_logit_softcapping: c.final_logit_softcapping,
            products: Products::F32,
        })
    }

    pub fn num_layers(&self) -> usize {
        self.model.layers.len()
    }

    /// Rows of the embedding: token ids must be below this.
    pub fn vocab_size(&self) -> usize {
        self.model.embed_tokens.val().dims()[0]
    }

    /// Every linear layer with its Hugging Face module name (`model.layers.0.self_attn.q_proj`,
    /// ..., `lm_head` when untied), in checkpoint order.
    pub fn linears(&self) -> Vec<(String, &Linear<B>)> {
        named_linears!(self, iter, as_ref)
    }

    /// [`LlamaForCausalLM::linears`], to change them (adapters, quantization, merging).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear<B>)> {
        named_linears!(self, iter_mut, as_mut, mut)
    }

    /// Every RMSNorm with its Hugging Face module name (`model.layers.0.input_layernorm`, ...,
    /// `model.norm`).
    pub fn norms(&self) -> Vec<(String, &RmsNorm<B>)> {
        let mut out = Vec::new();
        for (i, l) in self.model.layers.iter().enumerate() {
            let a = &l.self_attn;
            for (name, norm) in HEAD_NORMS.iter().zip([&a.q_norm, &a.k_norm]) {
                if let Some(norm) = norm {
                    out.push((format!("model.layers.{i}.{name}"), norm));
                }
            }
            for (name, norm) in LAYER_NORMS
                .iter()
                .zip([&l.input_layernorm, &l.post_attention_layernorm])
            {
                out.push((format!("model.layers.{i}.{name}"), norm));
            }
            for (name, norm) in SANDWICH_NORMS
                .iter()
                .zip([&l.pre_feedforward_layernorm, &l.post_feedforward_layernorm])
            {
                if let Some(norm) = norm {
                    out.push((format!("model.layers.{i}.{name}"), norm));
                }
            }
        }
        out.push(("model.norm".to_string(), &self.model.norm));
        out
    }

    /// Every checkpoint tensor under its Hugging Face name and layout (`[out, in]` for linear
    /// weights), in `dtype`: what `save_pretrained` writes. Adapters are not included (merge
    /// them first).
    pub fn checkpoint_tensors(&self, dtype: DType) -> Vec<(String, TensorData)> {
        // Converted on the host: the ndarray backend has no bf16/f16 tensors to cast to.
        let data = |t: Tensor<B, 2>| t.into_data().convert_dtype(dtype);
        let vec = |t: Tensor<B, 1>| t.into_data().convert_dtype(dtype);
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            data(self.model.embed_tokens.val()),
        )];
        out.extend(
            self.norms()
                .into_iter()
                .map(|(name, n)| (format!("{name}.weight"), vec(n.weight.val()))),
        );
        let fused = self.fused_expert_names();
        for (name, linear) in self.linears() {
            if let Some([gate, up]) = fused.get(&name) {
                // An expert's gate and up, as the checkpoint holds them.
                let w = linear.weight.val();
                let [h, both] = w.dims();
                for (half, at) in [(gate, 0), (up, both / 2)] {
                    let part = w.clone().slice([0..h, at..at + both / 2]);
                    out.push((format!("{half}.weight"), crate::weights::transpose_2d(data(part))));
                }
                continue;
            }
            // Stored [in, out]; checkpoints hold [out, in].
            out.push((
                format!("{name}.weight"),
                crate::weights::transpose_2d(data(linear.weight.val())),
            ));
            if let Some(b) = &linear.bias {
                out.push((format!("{name}.bias"), vec(b.val())));
            }
        }
        out
    }

    /// Each expert's fused gate-up layer's name (`model.layers.N.mlp.experts.E.gate_up_proj`)
    /// with the checkpoint names of its gate and up projections (`...experts.E.gate_proj`,
    /// Mixtral's `...experts.E.w1` and `w3`).
    pub fn fused_expert_names(&self) -> std::collections::HashMap<String, [String; 2]> {
        let mut out = std::collections::HashMap::new();
        for (i, layer) in self.model.layers.iter().enumerate() {
            let Some(moe) = &layer.moe else { continue };
            let [block, gate, up, _] = moe.names;
            for e in 0..moe.experts.len() {
                let p = format!("model.layers.{i}.{block}.experts.{e}");
                out.insert(format!("{p}.{EXPERT_GATE_UP}"), [format!("{p}.{gate}"), format!("{p}.{up}")]);
            }
        }
        out
    }

    /// Turns every adapter on or off (off: the base model, e.g. DPO's reference).
    pub fn set_adapters_enabled(&mut self, enabled: bool) {
        for (_, linear) in self.linears_mut() {
            if let Some(lora) = linear.adapter.as_mut() {
                lora.enabled = enabled;
            }
        }
    }

    /// Final hidden states (after the last norm).
    ///
    /// # Shapes
    /// `input_ids: [batch, seq] -> [batch, seq, hidden]`
    pub fn forward_hidden(
        &self,
        input_ids: Tensor<B, 2, Int>,
        options: ForwardOptions<B>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let past = cache.as_ref().map_or(0, |c| c.len());
        let (mut x, inputs) = self.embed(input_ids, options, past);
        for i in 0..self.model.layers.len() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = self.layer(i, x, &inputs, slot);
        }
        self.model.norm.forward(x)
    }

    /// The embeddings of `input_ids` (`[batch, seq, hidden]`), and what every decoder layer
    /// of this forward needs besides its input; `past` tokens are in a KV cache.
    pub fn embed(
        &self,
        input_ids: Tensor<B, 2, Int>,
        options: ForwardOptions<B>,
        past: usize,
    ) -> (Tensor<B, 3>, LayerInputs<B>) {
        let device = input_ids.device();
        let [batch, seq] = input_ids.dims();
        let explicit_positions = options.position_ids.is_some();
        let position_ids = options.position_ids.unwrap_or_else(|| {
            Tensor::<B, 1, Int>::arange(past as i64..(past + seq) as i64, &device)
                .unsqueeze::<2>()
                .expand([batch, seq])
        });
        let weight = self.model.embed_tokens.val();
        let dtype = weight.dtype();
        let local_rope = self
            .inv_freq_local
            .as_ref()
            .map(|f| Rope::new(f, position_ids.clone(), dtype, 1.0));
        // Long-RoPE picks its factors per forward from the largest position, as transformers'
        // `longrope_frequency_update` does (one read of the positions when they are given).
        let inv_freq = match &self.inv_freq_long {
            Some(long) => {
                let longest = match explicit_positions {
                    true => position_ids.clone().max().into_scalar().elem::<i64>() as usize + 1,
                    false => past + seq,
                };
                if longest > self.long_rope_after { long } else { &self.inv_freq }
            }
            None => &self.inv_freq,
        };
        let rope = Rope::new(inv_freq, position_ids, dtype, self.rope_scale);
        let x = embedding(weight, input_ids); // [batch, seq, hidden]
        let x = match self.embed_scale {
            // transformers multiplies by the scale cast to the weights' dtype.
            Some(scale) => x.mul_scalar(round_to(scale, dtype)),
            None => x,
        };
        let padding = options.attention_mask.map(|m| m.equal_elem(0)); // [batch, past + seq]
        // Without padding or segments, full layers need no explicit mask (`is_causal`).
        let mut full_mask = padding
            .as_ref()
            .map(|p| build_mask::<B>(batch, seq, past, Some(p.clone()), None, &device));
        let mut across_segments = None;
        if let Some(segments) = options.segment_ids {
            assert_eq!(past, 0, "segment_ids are for training forwards, without a KV cache");
            let q = segments.clone().unsqueeze_dim::<3>(2).expand([batch, seq, seq]); // [batch, q, k]
            let k = segments.unsqueeze_dim::<3>(1).expand([batch, seq, seq]);
            let across = q.not_equal(k).unsqueeze_dim::<4>(1); // [batch, 1, q, k]
            let causal = build_mask::<B>(batch, seq, 0, None, None, &device);
            full_mask = Some(match full_mask {
                Some(m) => m.bool_or(across.clone()),
                None => causal.bool_or(across.clone()),
            });
            across_segments = Some(across);
        }
        let inputs = LayerInputs {
            rope,
            local_rope,
            full_mask,
            across_segments,
            padding,
            batch,
            seq,
            past,
        };
        (x, inputs)
    }

    /// Decoder layer `i` on `x` (`[batch, seq, hidden]`).
    pub fn layer(
        &self,
        i: usize,
        x: Tensor<B, 3>,
        inputs: &LayerInputs<B>,
        cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    ) -> Tensor<B, 3> {
        let layer = &self.model.layers[i];
        let LayerInputs { batch, seq, past, .. } = *inputs;
        let mask = match layer.sliding_window {
            Some(w) if w < past + seq => {
                let window = build_mask::<B>(batch, seq, past, inputs.padding.clone(), Some(w), &x.device());
                // Packed examples stay apart in windowed layers too.
                Some(match &inputs.across_segments {
                    Some(across) => window.bool_or(across.clone()),
                    None => window,
                })
            }
            _ => inputs.full_mask.clone(),
        };
        let rope = match (&inputs.local_rope, layer.sliding_window) {
            (Some(local), Some(_)) => local,
            _ => &inputs.rope,
        };
        let (y, routing) = layer.forward(x, rope, mask, cache);
        if let Some(routing) = routing.filter(|_| crate::moe::recording()) {
            // Real tokens only count in the load-balancing loss (transformers' attention mask).
            let valid = inputs.padding.as_ref().map(|p| {
                let total = p.dims()[1];
                p.clone()
                    .slice([0..batch, total - seq..total])
                    .bool_not()
                    .float()
                    .reshape([batch * seq])
            });
            crate::moe::record(crate::moe::RecordedRouting { routing, valid });
        }
        y
    }

    /// Gives a model without one a reward head, `[hidden, 1]` with no bias, drawn as
    /// transformers' `_init_weights` draws it: normal with mean 0 and `std`
    /// (`initializer_range`, 0.02), in the embedding's dtype.
    pub fn add_score_head(&mut self, std: f64, seed: u64) {
        if self.score.is_some() {
            return;
        }
        let embed = self.model.embed_tokens.val();
        let (device, dtype) = (embed.device(), embed.dtype());
        let hidden = embed.dims()[1];
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
        let values: Vec<f32> = (0..hidden)
            .map(|_| {
                // Box-Muller from two uniforms in (0, 1].
                let (u, v): (f64, f64) = (1.0 - rand::Rng::random::<f64>(&mut rng), rand::Rng::random(&mut rng));
                ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos() * std) as f32
            })
            .collect();
        let weight = Tensor::<B, 2>::from_data(TensorData::new(values, [hidden, 1]), (&device, DType::F32)).cast(dtype);
        self.score = Some(Linear {
            weight: Param::from_tensor(weight),
            bias: None,
            adapter: None,
            quantized: None,
            products: Products::F32,
        });
    }

    /// Computes every base product (each linear layer's and the tied output head's) with bf16
    /// inputs and f32 sums, or in f32: what `precision: bf16` means on CPU backends, whose
    /// tensors stay f32 (adapters compute in their own dtype either way).
    pub fn set_products(&mut self, products: Products) {
        self.products = products;
        for (_, linear) in self.linears_mut() {
            linear.products = products;
        }
    }

    /// A reward model's score of each row, read at `last[row]`, the row's last token that is not
    /// padding (transformers' pooling), in f32.
    ///
    /// # Shapes
    /// `hidden: [batch, seq, hidden], last: [batch] -> [batch]`
    pub fn scores(&self, hidden: Tensor<B, 3>, last: Tensor<B, 1, Int>) -> Tensor<B, 1> {
        let score = self
            .score
            .as_ref()
            .expect("scores() needs the score head (add_score_head)");
        let [b, s, h] = hidden.dims();
        let device = hidden.device();
        let rows = Tensor::<B, 1, Int>::arange(0..b as i64, &device).mul_scalar(s as i64) + last;
        let picked = temper_kernels::reshape(hidden, [b * s, h]).select(0, rows); // [batch, hidden]
        score.forward(picked).cast(DType::F32).reshape([b])
    }

    /// Projects hidden states to vocabulary logits, in f32.
    ///
    /// # Shapes
    /// `[batch, seq, hidden] -> [batch, seq, vocab]`
    pub fn head(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let logits = match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                let [b, s, h] = hidden.dims();
                let embed = self.model.embed_tokens.val(); // [vocab, hidden]
                let vocab = embed.dims()[0];
                let hidden = temper_kernels::reshape(hidden, [b * s, h]);
                let logits = temper_kernels::matmul_with(hidden, embed.transpose(), self.products);
                temper_kernels::reshape(logits, [b, s, vocab])
            }
        };
        let logits = logits.cast(DType::F32);
        match self.final_logit_softcapping {
            Some(cap) => logits.div_scalar(cap).tanh().mul_scalar(cap),
            None => logits,
        }
    }

    /// # Shapes
    /// `input_ids: [batch, seq] -> logits [batch, seq, vocab]` (f32)
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        options: ForwardOptions<B>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        self.head(self.forward_hidden(input_ids, options, cache))
    }
}

/// `x` as the nearest value of `dtype` (a scalar PyTorch casts to the weights' dtype).
fn round_to(x: f64, dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => burn::tensor::bf16::from_f64(x).to_f64(),
        DType::F16 => burn::tensor::f16::from_f64(x).to_f64(),
        _ => x as f32 as f64,
    }
}

/// `[batch, 1, seq, past + seq]`, `true` where query `i` (absolute position `past + i`) may
/// not see key `j`: the future, padding keys, and keys beyond the sliding window.
fn build_mask<B: Backend>(
    batch: usize,
    seq: usize,
    past: usize,
    padding: Option<Tensor<B, 2, Bool>>,
    window: Option<usize>,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let total = past + seq;
    let mut blocked = Vec::with_capacity(seq * total);
    for i in 0..seq {
        let q = past + i;
        for k in 0..total {
            // transformers' sliding window keeps keys with q - k < window.
            blocked.push(k > q || window.is_some_and(|w| q - k.min(q) >= w));
        }
    }
    let causal = Tensor::<B, 2, Bool>::from_data(TensorData::new(blocked, [seq, total]), device)
        .reshape([1, 1, seq, total])
        .expand([batch, 1, seq, total]);
    match padding {
        Some(p) => causal.bool_or(p.reshape([batch, 1, 1, total]).expand([batch, 1, seq, total])),
        None => causal,
    }
}
