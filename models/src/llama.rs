//! The Llama family (Llama 2/3.x, SmolLM, TinyLlama, Mistral, Qwen2), top to bottom:
//! RoPE, RMSNorm, MLP, attention, decoder layer, model. Field names are the Hugging Face
//! checkpoint keys (`model.layers.{i}.self_attn.q_proj.weight`), so loading is a straight walk.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::module::embedding;
use burn::tensor::{Bool, DType, Int, Tensor, TensorData};

use crate::config::{ModelConfig, RopeScaling};
use crate::error::Result;
use crate::lora::Lora;
use crate::quant::QuantizedWeight;
use crate::weights::{WeightLoader, WeightSource};

// ---------------------------------------------------------------------------------------------
// RoPE (Hugging Face's `rotate_half` layout: the two halves of each head are the pair, not
// interleaved neighbours as in burn's `RotaryEncoding`).

/// Inverse frequencies, `head_dim / 2` of them, after rope scaling.
pub fn rope_inv_freq(config: &ModelConfig) -> Vec<f32> {
    let dim = config.head_dim;
    // transformers computes these in f32; doing the same keeps logits bit-close.
    let base: Vec<f32> = (0..dim / 2)
        .map(|i| 1.0 / (config.rope_theta as f32).powf((2 * i) as f32 / dim as f32))
        .collect();
    match &config.rope_scaling {
        RopeScaling::Default => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / *factor as f32).collect(),
        RopeScaling::FreqFactors(factors) => base.iter().zip(factors).map(|(f, d)| f / d).collect(),
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
    cos: Tensor<B, 3>, // [batch, seq, head_dim]
    sin: Tensor<B, 3>, // [batch, seq, head_dim]
}

impl<B: Backend> Rope<B> {
    /// `position_ids`: `[batch, seq]`. Computed in f32 (as transformers does), then cast to
    /// the activations' dtype.
    pub fn new(inv_freq: &Tensor<B, 1>, position_ids: Tensor<B, 2, Int>, dtype: DType) -> Self {
        let [batch, seq] = position_ids.dims();
        let half = inv_freq.dims()[0];
        let pos = position_ids.float().cast(DType::F32).reshape([batch, seq, 1]);
        let freqs = pos * inv_freq.clone().reshape([1, 1, half]); // [batch, seq, half]
        let emb = Tensor::cat(vec![freqs.clone(), freqs], 2); // [batch, seq, head_dim]
        Self {
            cos: emb.clone().cos().cast(dtype),
            sin: emb.sin().cast(dtype),
        }
    }

    /// `x`: `[batch, seq, heads, head_dim]`.
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        temper_kernels::rope(x, self.cos.clone(), self.sin.clone())
    }
}

/// The checkpoint tensors this architecture reads, by Hugging Face name, with their shapes
/// (`[out, in]` for linear weights).
pub fn checkpoint_shapes(c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, q, kv, is) = (
        c.hidden_size,
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
        c.intermediate_size,
    );
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![c.vocab_size, h])];
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for (name, o, inp, bias) in [
            ("self_attn.q_proj", q, h, c.qkv_bias),
            ("self_attn.k_proj", kv, h, c.qkv_bias),
            ("self_attn.v_proj", kv, h, c.qkv_bias),
            ("self_attn.o_proj", h, q, c.o_bias),
            ("mlp.gate_proj", is, h, c.mlp_bias),
            ("mlp.up_proj", is, h, c.mlp_bias),
            ("mlp.down_proj", h, is, c.mlp_bias),
        ] {
            out.push((format!("{p}.{name}.weight"), vec![o, inp]));
            if bias {
                out.push((format!("{p}.{name}.bias"), vec![o]));
            }
        }
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !c.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![c.vocab_size, h]));
    }
    out
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
    /// When set, the frozen weight lives here, block-quantized, and `weight` is empty.
    pub quantized: Option<QuantizedWeight<B>>,
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
        let y = temper_kernels::linear(x.clone(), self.weight(), bias.clone());
        let y = match &self.adapter {
            Some(lora) if lora.enabled => lora.apply(x, y, || self.weight(), bias),
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
            Some(q) => {
                let [blocks, out] = q.scales.dims();
                [blocks * crate::quant::BLOCK, out]
            }
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
        })
    }
}

/// RMSNorm, computed in f32 whatever the storage dtype (as transformers' `LlamaRMSNorm`).
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        temper_kernels::rms_norm(x, self.weight.val(), self.eps)
    }

    fn load(w: &mut WeightLoader<'_, B>, name: &str, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: Param::from_tensor(w.vector(&format!("{name}.weight"), size)?),
            eps,
        })
    }
}

/// SwiGLU: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let gated = temper_kernels::swiglu(self.gate_proj.forward(x.clone()), self.up_proj.forward(x));
        self.down_proj.forward(gated)
    }
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
}

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
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
        let q = temper_kernels::reshape(self.q_proj.forward(x.clone()), [b, s, h, d]);
        let k = temper_kernels::reshape(self.k_proj.forward(x.clone()), [b, s, kvh, d]);
        let v = temper_kernels::reshape(self.v_proj.forward(x), [b, s, kvh, d]);
        let q = rope.apply(q);
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
        let out = temper_kernels::attention(q, k, v, mask); // [b, s, h, d]
        self.o_proj.forward(temper_kernels::reshape(out, [b, s, h * d]))
    }
}

#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub self_attn: Attention<B>,
    pub mlp: Mlp<B>,
    pub input_layernorm: RmsNorm<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub sliding_window: Option<usize>,
}

impl<B: Backend> DecoderLayer<B> {
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        mask: Option<Tensor<B, 4, Bool>>,
        cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    ) -> Tensor<B, 3> {
        let h = x.clone()
            + self
                .self_attn
                .forward(self.input_layernorm.forward(x), rope, mask, cache);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
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
    /// For full-attention layers; `None`: causal only.
    full_mask: Option<Tensor<B, 4, Bool>>,
    /// `[batch, past + seq]`, true at padding keys (sliding-window layers build their own mask).
    padding: Option<Tensor<B, 2, Bool>>,
    batch: usize,
    seq: usize,
    past: usize,
}

/// The walk over a model's linear layers and their Hugging Face names, written once for `&`
/// (`named_linears!(model, iter, as_ref)`) and `&mut` (`..., iter_mut, as_mut, mut`).
macro_rules! named_linears {
    ($model:expr, $iter:ident, $as:ident $(, $mut:tt)?) => {{
        let mut out = Vec::new();
        for (i, layer) in $model.model.layers.$iter().enumerate() {
            let p = format!("model.layers.{i}");
            let (a, m) = (&$($mut)? layer.self_attn, &$($mut)? layer.mlp);
            out.push((format!("{p}.self_attn.q_proj"), &$($mut)? a.q_proj));
            out.push((format!("{p}.self_attn.k_proj"), &$($mut)? a.k_proj));
            out.push((format!("{p}.self_attn.v_proj"), &$($mut)? a.v_proj));
            out.push((format!("{p}.self_attn.o_proj"), &$($mut)? a.o_proj));
            out.push((format!("{p}.mlp.gate_proj"), &$($mut)? m.gate_proj));
            out.push((format!("{p}.mlp.up_proj"), &$($mut)? m.up_proj));
            out.push((format!("{p}.mlp.down_proj"), &$($mut)? m.down_proj));
        }
        if let Some(head) = $model.lm_head.$as() {
            out.push(("lm_head".to_string(), head));
        }
        out
    }};
}

/// A causal language model: the decoder plus the output head (`lm_head`, or the embedding
/// matrix when `tie_word_embeddings`).
#[derive(Module, Debug)]
pub struct LlamaForCausalLM<B: Backend> {
    pub model: LlamaModel<B>,
    pub lm_head: Option<Linear<B>>,
    /// `[head_dim / 2]`, f32.
    pub inv_freq: Tensor<B, 1>,
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
        let (hs, q_out, kv_out) = (
            c.hidden_size,
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let embed_tokens = Param::from_tensor(w.matrix("model.embed_tokens.weight", c.vocab_size, hs)?);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let self_attn = Attention {
                q_proj: Linear::load(&mut w, &format!("{p}.self_attn.q_proj"), hs, q_out, c.qkv_bias)?,
                k_proj: Linear::load(&mut w, &format!("{p}.self_attn.k_proj"), hs, kv_out, c.qkv_bias)?,
                v_proj: Linear::load(&mut w, &format!("{p}.self_attn.v_proj"), hs, kv_out, c.qkv_bias)?,
                o_proj: Linear::load(&mut w, &format!("{p}.self_attn.o_proj"), q_out, hs, c.o_bias)?,
                num_heads: c.num_attention_heads,
                num_kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
            };
            let is = c.intermediate_size;
            let mlp = Mlp {
                gate_proj: Linear::load(&mut w, &format!("{p}.mlp.gate_proj"), hs, is, c.mlp_bias)?,
                up_proj: Linear::load(&mut w, &format!("{p}.mlp.up_proj"), hs, is, c.mlp_bias)?,
                down_proj: Linear::load(&mut w, &format!("{p}.mlp.down_proj"), is, hs, c.mlp_bias)?,
            };
            layers.push(DecoderLayer {
                self_attn,
                mlp,
                input_layernorm: RmsNorm::load(&mut w, &format!("{p}.input_layernorm"), hs, c.rms_norm_eps)?,
                post_attention_layernorm: RmsNorm::load(
                    &mut w,
                    &format!("{p}.post_attention_layernorm"),
                    hs,
                    c.rms_norm_eps,
                )?,
                sliding_window: c.sliding_window[i],
            });
        }
        let norm = RmsNorm::load(&mut w, "model.norm", hs, c.rms_norm_eps)?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(Linear::load(&mut w, "lm_head", hs, c.vocab_size, false)?)
        };
        let inv_freq = rope_inv_freq(c);
        let inv_freq = Tensor::from_data(
            TensorData::new(inv_freq.clone(), [inv_freq.len()]),
            (device, DType::F32),
        );
        Ok(Self {
            model: LlamaModel {
                embed_tokens,
                layers,
                norm,
            },
            lm_head,
            inv_freq,
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
        let norms: Vec<(String, TensorData)> = self
            .model
            .layers
            .iter()
            .enumerate()
            .flat_map(|(i, l)| {
                [
                    (
                        format!("model.layers.{i}.input_layernorm.weight"),
                        vec(l.input_layernorm.weight.val()),
                    ),
                    (
                        format!("model.layers.{i}.post_attention_layernorm.weight"),
                        vec(l.post_attention_layernorm.weight.val()),
                    ),
                ]
            })
            .collect();
        out.extend(norms);
        for (name, linear) in self.linears() {
            // Stored [in, out]; checkpoints hold [out, in].
            out.push((
                format!("{name}.weight"),
                crate::weights::transpose_2d(data(linear.weight.val())),
            ));
            if let Some(b) = &linear.bias {
                out.push((format!("{name}.bias"), vec(b.val())));
            }
        }
        out.push(("model.norm.weight".to_string(), vec(self.model.norm.weight.val())));
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
        let position_ids = options.position_ids.unwrap_or_else(|| {
            Tensor::<B, 1, Int>::arange(past as i64..(past + seq) as i64, &device)
                .unsqueeze::<2>()
                .expand([batch, seq])
        });
        let weight = self.model.embed_tokens.val();
        let dtype = weight.dtype();
        let rope = Rope::new(&self.inv_freq, position_ids, dtype);
        let x = embedding(weight, input_ids); // [batch, seq, hidden]
        let padding = options.attention_mask.map(|m| m.equal_elem(0)); // [batch, past + seq]
        // Without padding or segments, full layers need no explicit mask (`is_causal`).
        let mut full_mask = padding
            .as_ref()
            .map(|p| build_mask::<B>(batch, seq, past, Some(p.clone()), None, &device));
        if let Some(segments) = options.segment_ids {
            assert_eq!(past, 0, "segment_ids are for training forwards, without a KV cache");
            let q = segments.clone().unsqueeze_dim::<3>(2).expand([batch, seq, seq]); // [batch, q, k]
            let k = segments.unsqueeze_dim::<3>(1).expand([batch, seq, seq]);
            let across = q.not_equal(k).unsqueeze_dim::<4>(1); // [batch, 1, q, k]
            let causal = build_mask::<B>(batch, seq, 0, None, None, &device);
            full_mask = Some(match full_mask {
                Some(m) => m.bool_or(across),
                None => causal.bool_or(across),
            });
        }
        let inputs = LayerInputs {
            rope,
            full_mask,
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
            Some(w) if w < past + seq => Some(build_mask::<B>(
                batch,
                seq,
                past,
                inputs.padding.clone(),
                Some(w),
                &x.device(),
            )),
            _ => inputs.full_mask.clone(),
        };
        layer.forward(x, &inputs.rope, mask, cache)
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
                let logits = temper_kernels::matmul(temper_kernels::reshape(hidden, [b * s, h]), embed.transpose());
                temper_kernels::reshape(logits, [b, s, vocab])
            }
        };
        logits.cast(DType::F32)
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
