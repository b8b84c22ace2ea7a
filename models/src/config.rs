//! `config.json` of a Hugging Face checkpoint, read in two stages: the raw serde form (which
//! accepts both the transformers-4 and transformers-5 spellings and ignores keys we do not use,
//! as transformers does), then a validated [`ModelConfig`] that the model is built from.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// The architecture families Temper implements. All are Llama-shaped decoders; they differ in
/// which projections carry a bias, in sliding-window attention, in RMSNorms over each query and
/// key head (Qwen3, Gemma 3), and (Gemma 3) in norms around attention and MLP, GeGLU, scaled
/// embeddings and two RoPE bases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    /// Gemma 3's text model (`gemma3_text`: Gemma 3 270M and 1B, and the language model of the
    /// larger ones): scaled embeddings, `(1 + w)` RMSNorms around attention and MLP, q/k norms,
    /// GeGLU, interleaved sliding-window and global layers with their own RoPE bases.
    Gemma3,
    /// Phi-3 and Phi-4-mini (`phi3`): q/k/v fused into one `qkv_proj` and gate/up into one
    /// `gate_up_proj`, RoPE on a fraction of each head (`partial_rotary_factor`), long-RoPE.
    Phi3,
    /// Qwen3's mixture of experts (`qwen3_moe`: Qwen3-30B-A3B, 235B-A22B): Qwen3's attention, and
    /// in (most) layers a router choosing `num_experts_per_tok` of `num_experts` SwiGLU experts.
    Qwen3Moe,
    /// Mixtral (`mixtral`): Mistral's attention, experts under `block_sparse_moe` (`w1`, `w3`,
    /// `w2`), top-k weights renormalised.
    Mixtral,
}

impl MoeConfig {
    /// The load-balancing loss's weight in training: `router_aux_loss_coef` when config.json
    /// turns the loss on (`output_router_logits`), `None` when it adds nothing.
    pub fn aux_loss_coef(&self) -> Option<f64> {
        (self.output_router_logits && self.router_aux_loss_coef != 0.0).then_some(self.router_aux_loss_coef)
    }
}

/// A mixture-of-experts model's feed-forward layers.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    /// Experts each token is routed to (`num_experts_per_tok`).
    pub top_k: usize,
    /// Whether the chosen experts' probabilities are renormalised to sum to 1 (Qwen3-MoE's
    /// `norm_topk_prob`; always for Mixtral).
    pub norm_topk_prob: bool,
    /// Each expert's hidden size (Qwen3-MoE's `moe_intermediate_size`, Mixtral's
    /// `intermediate_size`).
    pub expert_intermediate_size: usize,
    /// Per layer: experts (`true`) or a dense MLP of `intermediate_size` (Qwen3-MoE's
    /// `mlp_only_layers` and `decoder_sparse_step`).
    pub sparse_layers: Vec<bool>,
    /// The weight of the load-balancing loss in training, when `output_router_logits` (as
    /// transformers adds it).
    pub router_aux_loss_coef: f64,
    pub output_router_logits: bool,
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    /// SwiGLU (`silu`).
    #[default]
    Silu,
    /// GeGLU with the tanh approximation (`gelu_pytorch_tanh`).
    GeluTanh,
}

impl Activation {
    /// transformers' name (`ACT2FN`).
    pub fn name(self) -> &'static str {
        match self {
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
        }
    }
}

impl Family {
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma3 => "gemma3_text",
            Family::Phi3 => "phi3",
            Family::Qwen3Moe => "qwen3_moe",
            Family::Mixtral => "mixtral",
        }
    }

    /// The class transformers builds for this family.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Gemma3 => "Gemma3ForCausalLM",
            Family::Phi3 => "Phi3ForCausalLM",
            Family::Qwen3Moe => "Qwen3MoeForCausalLM",
            Family::Mixtral => "MixtralForCausalLM",
        }
    }

    /// transformers' class of this family with a sequence-classification head (`score`).
    pub fn classifier_architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForSequenceClassification",
            Family::Mistral => "MistralForSequenceClassification",
            Family::Qwen2 => "Qwen2ForSequenceClassification",
            Family::Qwen3 => "Qwen3ForSequenceClassification",
            Family::Gemma3 => "Gemma3TextForSequenceClassification",
            Family::Phi3 => "Phi3ForSequenceClassification",
            Family::Qwen3Moe => "Qwen3MoeForSequenceClassification",
            Family::Mixtral => "MixtralForSequenceClassification",
        }
    }
}

/// How rotary frequencies are adjusted for long context.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain `1 / theta^(2i/d)`.
    Default,
    /// Positions divided by `factor` (transformers' `linear`).
    Linear { factor: f64 },
    /// Llama 3.1's wavelength-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Per-frequency divisors, as llama.cpp stores them in GGUF's `rope_freqs.weight`
    /// (which is how a Llama 3.1 GGUF carries the `llama3` scaling).
    FreqFactors(Vec<f32>),
    /// Phi-3's long-RoPE (transformers' `longrope`): per-frequency divisors, `short_factor` for a
    /// forward whose positions stay within `original_max_position_embeddings` and `long_factor`
    /// past it (chosen per forward, as transformers does), and cos/sin scaled by
    /// `attention_factor`.
    LongRope {
        short_factor: Vec<f32>,
        long_factor: Vec<f32>,
        original_max_position_embeddings: usize,
        attention_factor: f64,
        /// Whether config.json gave `attention_factor` (else it follows from the context lengths).
        explicit_attention_factor: bool,
    },
}

/// Storage dtype named by the checkpoint (`torch_dtype` / `dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointDtype {
    F32,
    F16,
    BF16,
}

impl CheckpointDtype {
    /// The name `config.json` uses (PyTorch's).
    pub fn torch_name(self) -> &'static str {
        match self {
            CheckpointDtype::F32 => "float32",
            CheckpointDtype::F16 => "float16",
            CheckpointDtype::BF16 => "bfloat16",
        }
    }
}

/// A validated model configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// The leading dimensions of each head that RoPE rotates (`head_dim` times Phi-3's
    /// `partial_rotary_factor`); the rest pass through.
    pub rotary_dim: usize,
    /// Phi-3: q/k/v are one `qkv_proj` (queries, keys, values along its output) and gate/up one
    /// `gate_up_proj` (gate first), as in the checkpoint; adapters sit on the fused layers.
    pub fused_projections: bool,
    /// Qwen3-MoE, Mixtral: the experts.
    pub moe: Option<MoeConfig>,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (always on for Qwen2, `attention_bias` for Llama).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama's `attention_bias` covers it; Qwen2 has none).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// RMSNorm over each query and key head before RoPE (Qwen3's and Gemma 3's `q_norm`, `k_norm`).
    pub qk_norm: bool,
    pub activation: Activation,
    /// Gemma: every RMSNorm scales by `1 + weight` (the checkpoint stores the offset from 1).
    pub norm_plus_one: bool,
    /// Gemma: norms after attention and around the MLP (`post_attention_layernorm` normalises
    /// the attention output; `pre_feedforward_layernorm`, `post_feedforward_layernorm`).
    pub sandwich_norms: bool,
    /// Gemma: embeddings multiplied by `sqrt(hidden_size)`.
    pub embed_scale: Option<f64>,
    /// Gemma: attention scores scaled by `query_pre_attn_scalar^-0.5` instead of `head_dim^-0.5`.
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 3: the RoPE base of sliding-window layers (`rope_local_base_freq`); full layers use
    /// `rope_theta` and `rope_scaling`.
    pub local_rope_theta: Option<f64>,
    /// Gemma: logits become `cap * tanh(logits / cap)`.
    pub final_logit_softcapping: Option<f64>,
    /// Sliding window per layer (`None`: full causal attention).
    pub sliding_window: Vec<Option<usize>>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The padding token: a sequence classifier reads each row at its last token that is not
    /// this one (transformers' pooling).
    pub pad_token_id: Option<u32>,
    /// A reward model: `*ForSequenceClassification` with one label, whose `score` head
    /// (`hidden -> 1`, no bias) replaces the language-model head.
    pub score_head: bool,
    pub dtype: Option<CheckpointDtype>,
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    partial_rotary_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
    #[serde(alias = "num_local_experts")]
    num_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    norm_topk_prob: Option<bool>,
    moe_intermediate_size: Option<usize>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
    router_aux_loss_coef: Option<f64>,
    output_router_logits: Option<bool>,
    router_jitter_noise: Option<f64>,
    shared_expert_intermediate_size: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    query_pre_attn_scalar: Option<f64>,
    rope_local_base_freq: Option<f64>,
    /// transformers 5 writes the old `sliding_window_pattern` as `_sliding_window_pattern`.
    #[serde(alias = "_sliding_window_pattern")]
    sliding_window_pattern: Option<usize>,
    final_logit_softcapping: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    use_bidirectional_attention: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    pad_token_id: Option<Value>,
    architectures: Option<Vec<String>>,
    num_labels: Option<usize>,
    id2label: Option<serde_json::Map<String, Value>>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

impl ModelConfig {
    /// Reads and validates a `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses `config.json` text; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            error: source,
        })?;
        raw.validate(path)
    }

    /// `config.json` as transformers writes it for this family (the transformers-4 spelling,
    /// which transformers 5, vLLM and llama.cpp's converter all read). Errors when the rope
    /// scaling came from GGUF `rope_freqs`, which config.json cannot express.
    pub fn to_hf_json(&self, dtype: CheckpointDtype) -> std::result::Result<Value, String> {
        let rope_scaling = match &self.rope_scaling {
            RopeScaling::Default => Value::Null,
            RopeScaling::Linear { factor } => serde_json::json!({"rope_type": "linear", "factor": factor}),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => serde_json::json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": *original_max_position_embeddings as u64}),
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                attention_factor,
                explicit_attention_factor,
                ..
            } => {
                let mut rope = serde_json::json!({"type": "longrope", "short_factor": short_factor,
                    "long_factor": long_factor});
                if *explicit_attention_factor {
                    rope["attention_factor"] = serde_json::json!(attention_factor);
                }
                rope
            }
            RopeScaling::FreqFactors(_) => {
                return Err(
                    "this model's rope scaling came from GGUF rope_freqs, which config.json cannot express".into(),
                );
            }
        };
        let arch = match self.score_head {
            true => self.family.classifier_architecture(),
            false => self.family.architecture(),
        };
        let model_type = self.family.model_type();
        let mut c = serde_json::json!({
            "architectures": [arch],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.activation.name(),
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": match self.eos_token_ids.as_slice() {
                [] => Value::Null,
                [one] => serde_json::json!(one),
                many => serde_json::json!(many),
            },
            "torch_dtype": dtype.torch_name(),
        });
        let obj = c.as_object_mut().expect("object");
        // Written when absent too: `Phi3Config`'s default (32000) is outside small vocabularies.
        obj.insert("pad_token_id".into(), serde_json::json!(self.pad_token_id));
        if self.score_head {
            obj.insert("id2label".into(), serde_json::json!({"0": "LABEL_0"}));
            obj.insert("label2id".into(), serde_json::json!({"LABEL_0": 0}));
        }
        match self.family {
            Family::Llama => {
                obj.insert("attention_bias".into(), Value::Bool(self.qkv_bias));
                obj.insert("mlp_bias".into(), Value::Bool(self.mlp_bias));
            }
            Family::Mistral | Family::Mixtral => {
                obj.insert(
                    "sliding_window".into(),
                    serde_json::json!(self.sliding_window.first().copied().flatten()),
                );
            }
            Family::Qwen2 | Family::Qwen3 | Family::Qwen3Moe => {
                if self.family != Family::Qwen2 {
                    obj.insert("attention_bias".into(), Value::Bool(self.qkv_bias));
                }
                let window = self.sliding_window.iter().flatten().next().copied();
                obj.insert("use_sliding_window".into(), Value::Bool(window.is_some()));
                obj.insert("sliding_window".into(), serde_json::json!(window));
                let first = self
                    .sliding_window
                    .iter()
                    .position(Option::is_some)
                    .unwrap_or(self.num_hidden_layers);
                obj.insert("max_window_layers".into(), serde_json::json!(first));
            }
            Family::Gemma3 => {
                obj.remove("hidden_act");
                obj.insert("hidden_activation".into(), self.activation.name().into());
                obj.insert("attention_bias".into(), Value::Bool(self.qkv_bias));
                // `Gemma3TextConfig` is strict: an int (every Gemma 3 has an integral one).
                let scalar = self.query_pre_attn_scalar.map(|s| match s.fract() == 0.0 {
                    true => serde_json::json!(s as i64),
                    false => serde_json::json!(s),
                });
                obj.insert("query_pre_attn_scalar".into(), serde_json::json!(scalar));
                obj.insert("rope_local_base_freq".into(), serde_json::json!(self.local_rope_theta));
                obj.insert(
                    "final_logit_softcapping".into(),
                    serde_json::json!(self.final_logit_softcapping),
                );
                obj.insert("attn_logit_softcapping".into(), Value::Null);
                let window = self.sliding_window.iter().flatten().next().copied();
                obj.insert("sliding_window".into(), serde_json::json!(window));
                let types: Vec<&str> = self
                    .sliding_window
                    .iter()
                    .map(|w| {
                        if w.is_some() {
                            "sliding_attention"
                        } else {
                            "full_attention"
                        }
                    })
                    .collect();
                obj.insert("layer_types".into(), serde_json::json!(types));
            }
            Family::Phi3 => {
                // `Phi3Config` derives the head size from hidden_size / heads.
                obj.remove("head_dim");
                obj.insert(
                    "partial_rotary_factor".into(),
                    serde_json::json!(self.rotary_dim as f64 / self.head_dim as f64),
                );
                if let RopeScaling::LongRope {
                    original_max_position_embeddings,
                    ..
                } = &self.rope_scaling
                {
                    obj.insert(
                        "original_max_position_embeddings".into(),
                        serde_json::json!(original_max_position_embeddings),
                    );
                }
                obj.insert(
                    "sliding_window".into(),
                    serde_json::json!(self.sliding_window.first().copied().flatten()),
                );
            }
        }
        if let Some(moe) = &self.moe {
            let experts_key = match self.family {
                Family::Mixtral => "num_local_experts",
                _ => "num_experts",
            };
            obj.insert(experts_key.into(), serde_json::json!(moe.num_experts));
            obj.insert("num_experts_per_tok".into(), serde_json::json!(moe.top_k));
            obj.insert("router_aux_loss_coef".into(), serde_json::json!(moe.router_aux_loss_coef));
            obj.insert("output_router_logits".into(), Value::Bool(moe.output_router_logits));
            if self.family == Family::Qwen3Moe {
                obj.insert("norm_topk_prob".into(), Value::Bool(moe.norm_topk_prob));
                obj.insert("moe_intermediate_size".into(), serde_json::json!(moe.expert_intermediate_size));
                obj.insert("decoder_sparse_step".into(), serde_json::json!(1));
                let dense: Vec<usize> = (0..self.num_hidden_layers).filter(|&i| !moe.sparse_layers[i]).collect();
                obj.insert("mlp_only_layers".into(), serde_json::json!(dense));
            }
        }
        Ok(c)
    }

    /// Number of query heads sharing one key/value head.
    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Parameters of the decoder, counting the tied head once.
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let attn = h * q + 2 * h * kv + q * h;
        let dense_mlp = 3 * h * self.intermediate_size;
        let qk_norms = if self.qk_norm { 2 * self.head_dim } else { 0 };
        let norms = if self.sandwich_norms { 4 * h } else { 2 * h };
        let per_layer = attn + norms + qk_norms;
        let mlps: usize = (0..self.num_hidden_layers)
            .map(|i| match &self.moe {
                Some(m) if m.sparse_layers[i] => m.num_experts * (3 * h * m.expert_intermediate_size + h),
                _ => dense_mlp,
            })
            .sum();
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + h + self.num_hidden_layers * per_layer + mlps
    }
}

fn config_err(path: &Path, key: &str, message: impl Into<String>) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        key: key.to_string(),
        message: message.into(),
    }
}

/// The largest layer count and other size (vocabulary, widths, heads, context) a checkpoint
/// may declare, config.json or GGUF: far above any model's (the largest have ~256k
/// vocabularies, ~30k hidden sizes, ~130 layers). A value past it is a corrupt or hand-edited
/// file, refused before anything is sized from it (tests/inputs.rs found a layer count that
/// aborted in the allocator).
pub(crate) const MAX_LAYERS: usize = 1 << 12;
/// `Qwen3Config`'s `head_dim` when config.json has none.
const QWEN3_HEAD_DIM: usize = 128;
/// `Gemma3TextConfig`'s defaults: `head_dim` (and `query_pre_attn_scalar`), the RoPE bases.
const GEMMA3_HEAD_DIM: usize = 256;
const GEMMA3_ROPE_THETA: f64 = 1_000_000.0;
const GEMMA3_LOCAL_ROPE_THETA: f64 = 10_000.0;

/// Each layer's sliding window from `layer_types`.
fn layer_windows(path: &Path, types: &[String], layers: usize, window: Option<usize>) -> Result<Vec<Option<usize>>> {
    if types.len() != layers {
        return Err(config_err(
            path,
            "layer_types",
            format!("has {} entries for {layers} layers", types.len()),
        ));
    }
    types
        .iter()
        .map(|t| match t.as_str() {
            "sliding_attention" => Ok(window),
            "full_attention" => Ok(None),
            other => Err(config_err(path, "layer_types", format!("unknown layer type {other:?}"))),
        })
        .collect()
}
pub(crate) const MAX_SIZE: usize = 1 << 24;

fn required(path: &Path, key: &str, v: Option<usize>) -> Result<usize> {
    let max = if key == "num_hidden_layers" {
        MAX_LAYERS
    } else {
        MAX_SIZE
    };
    match v {
        Some(0) => Err(config_err(path, key, "must be > 0, got 0")),
        Some(v) if v > max => Err(config_err(
            path,
            key,
            format!("{v} is larger than any model's (at most {max})"),
        )),
        Some(v) => Ok(v),
        None => Err(config_err(path, key, "missing")),
    }
}

fn token_ids(path: &Path, key: &str, v: Option<Value>) -> Result<Vec<u32>> {
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(|n| vec![n as u32])
            .ok_or_else(|| config_err(path, key, format!("not a token id: {n}"))),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_u64()
                    .map(|n| n as u32)
                    .ok_or_else(|| config_err(path, key, format!("not a token id: {v}")))
            })
            .collect(),
        Some(other) => Err(config_err(path, key, format!("expected an id or a list, got {other}"))),
    }
}

fn get_f64(path: &Path, key: &str, obj: &serde_json::Map<String, Value>, name: &str) -> Result<Option<f64>> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| config_err(path, &format!("{key}.{name}"), format!("expected a number, got {v}"))),
    }
}

/// Reads the rope section in either form: transformers-4 `rope_scaling` (with `type` or
/// `rope_type`) beside a top-level `rope_theta`, or transformers-5 `rope_parameters` which
/// also holds `rope_theta`.
/// `lengths`: config.json's top-level `original_max_position_embeddings` (Phi-3 keeps it there
/// in the transformers-4 spelling) and `max_position_embeddings`, for long-RoPE.
fn parse_rope(
    path: &Path,
    key: &str,
    section: Option<&Value>,
    theta: Option<f64>,
    lengths: (Option<usize>, usize),
) -> Result<(Option<f64>, RopeScaling)> {
    let obj = match section {
        None | Some(Value::Null) => return Ok((theta, RopeScaling::Default)),
        Some(Value::Object(obj)) => obj,
        Some(other) => return Err(config_err(path, key, format!("expected an object, got {other}"))),
    };
    let theta = get_f64(path, key, obj, "rope_theta")?.or(theta);
    let rope_type = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let factor = |name: &str| -> Result<f64> {
        get_f64(path, key, obj, name)?.ok_or_else(|| config_err(path, &format!("{key}.{name}"), "missing"))
    };
    let scaling = match rope_type {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: factor("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: factor("factor")?,
            low_freq_factor: factor("low_freq_factor")?,
            high_freq_factor: factor("high_freq_factor")?,
            original_max_position_embeddings: factor("original_max_position_embeddings")?,
        },
        // "su" is long-RoPE's first name (Phi-3-128k's early config.json).
        "longrope" | "su" => {
            let factors = |name: &str| -> Result<Vec<f32>> {
                let k = format!("{key}.{name}");
                match obj.get(name) {
                    Some(Value::Array(items)) if !items.is_empty() => items
                        .iter()
                        .map(|v| match v.as_f64() {
                            Some(f) if f > 0.0 && f.is_finite() => Ok(f as f32),
                            _ => Err(config_err(path, &k, format!("expected positive numbers, got {v}"))),
                        })
                        .collect(),
                    Some(other) => Err(config_err(path, &k, format!("expected a list of numbers, got {other}"))),
                    None => Err(config_err(path, &k, "missing")),
                }
            };
            let original = match get_f64(path, key, obj, "original_max_position_embeddings")? {
                Some(v) => v as usize,
                None => lengths.0.ok_or_else(|| {
                    config_err(path, "original_max_position_embeddings", "missing (long-RoPE needs it)")
                })?,
            };
            if original < 2 {
                return Err(config_err(path, "original_max_position_embeddings", format!("must be > 1, got {original}")));
            }
            // transformers' `_compute_longrope_parameters`: the factor defaults to the ratio of
            // the context lengths, and the attention factor to sqrt(1 + ln(factor) / ln(original)).
            let scale = get_f64(path, key, obj, "factor")?.unwrap_or(lengths.1 as f64 / original as f64);
            let explicit = get_f64(path, key, obj, "attention_factor")?;
            let attention_factor = explicit.unwrap_or(match scale <= 1.0 {
                true => 1.0,
                false => (1.0 + scale.ln() / (original as f64).ln()).sqrt(),
            });
            RopeScaling::LongRope {
                short_factor: factors("short_factor")?,
                long_factor: factors("long_factor")?,
                original_max_position_embeddings: original,
                attention_factor,
                explicit_attention_factor: explicit.is_some(),
            }
        }
        other => {
            return Err(Error::UnsupportedRope {
                path: path.to_path_buf(),
                rope_type: other.to_string(),
            });
        }
    };
    Ok((theta, scaling))
}

fn parse_dtype(path: &Path, key: &str, s: &str) -> Result<CheckpointDtype> {
    [CheckpointDtype::F32, CheckpointDtype::F16, CheckpointDtype::BF16]
        .into_iter()
        .find(|d| d.torch_name() == s)
        .ok_or_else(|| config_err(path, key, format!("unsupported dtype {s:?}")))
}

impl RawConfig {
    /// The experts of a Qwen3-MoE or Mixtral config.json, with `transformers`' defaults.
    fn moe_config(&self, path: &Path, family: Family, layers: usize, intermediate_size: usize) -> Result<MoeConfig> {
        let (experts_key, default_experts) = match family {
            Family::Mixtral => ("num_local_experts", 8),
            _ => ("num_experts", 128),
        };
        let num_experts = required(path, experts_key, Some(self.num_experts.unwrap_or(default_experts)))?;
        // `MixtralConfig`'s default is 2, `Qwen3MoeConfig`'s 8.
        let default_top_k = if family == Family::Mixtral { 2 } else { 8 };
        let top_k = required(path, "num_experts_per_tok", Some(self.num_experts_per_tok.unwrap_or(default_top_k)))?;
        if top_k > num_experts {
            return Err(config_err(
                path,
                "num_experts_per_tok",
                format!("{top_k} experts per token of {num_experts}"),
            ));
        }
        if self.router_jitter_noise.is_some_and(|n| n != 0.0) {
            return Err(config_err(
                path,
                "router_jitter_noise",
                "router jitter (noise on the router's input in training) is not supported; set it to 0",
            ));
        }
        if self.shared_expert_intermediate_size.is_some_and(|n| n > 0) {
            return Err(config_err(
                path,
                "shared_expert_intermediate_size",
                "shared experts (Qwen2-MoE) are not supported",
            ));
        }
        let sparse_layers = match family {
            Family::Mixtral => vec![true; layers],
            _ => {
                let step = required(path, "decoder_sparse_step", Some(self.decoder_sparse_step.unwrap_or(1)))?;
                let dense = self.mlp_only_layers.clone().unwrap_or_default();
                if let Some(bad) = dense.iter().find(|&&l| l >= layers) {
                    return Err(config_err(path, "mlp_only_layers", format!("layer {bad} of {layers}")));
                }
                (0..layers).map(|i| !dense.contains(&i) && (i + 1) % step == 0).collect()
            }
        };
        Ok(MoeConfig {
            num_experts,
            top_k,
            norm_topk_prob: family == Family::Mixtral || self.norm_topk_prob.unwrap_or(false),
            expert_intermediate_size: match family {
                Family::Mixtral => intermediate_size,
                _ => required(path, "moe_intermediate_size", Some(self.moe_intermediate_size.unwrap_or(768)))?,
            },
            sparse_layers,
            router_aux_loss_coef: self.router_aux_loss_coef.unwrap_or(0.001),
            output_router_logits: self.output_router_logits.unwrap_or(false),
        })
    }

    fn validate(self, path: &Path) -> Result<ModelConfig> {
        let model_type = self
            .model_type
            .clone()
            .ok_or_else(|| config_err(path, "model_type", "missing"))?;
        let family = match model_type.as_str() {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma3_text" => Family::Gemma3,
            "phi3" => Family::Phi3,
            "qwen3_moe" => Family::Qwen3Moe,
            "mixtral" => Family::Mixtral,
            "gemma3" => {
                return Err(config_err(
                    path,
                    "model_type",
                    "\"gemma3\" is Gemma 3's image-text model (Gemma3ForConditionalGeneration); Temper trains \
                     Gemma 3's text models (model_type \"gemma3_text\": gemma-3-270m, gemma-3-1b)",
                ));
            }
            _ => {
                return Err(Error::UnsupportedModelType {
                    path: path.to_path_buf(),
                    model_type,
                });
            }
        };
        let (act_key, act) = match (&self.hidden_activation, &self.hidden_act) {
            (Some(a), _) => ("hidden_activation", Some(a.as_str())),
            (None, a) => ("hidden_act", a.as_deref()),
        };
        let activation = match act {
            None if family == Family::Gemma3 => Activation::GeluTanh,
            None | Some("silu") => Activation::Silu,
            Some("gelu_pytorch_tanh") => Activation::GeluTanh,
            Some(other) => {
                return Err(config_err(
                    path,
                    act_key,
                    format!("{other:?} is not supported (\"silu\", or \"gelu_pytorch_tanh\" for Gemma)"),
                ));
            }
        };
        if self.attn_logit_softcapping.is_some() {
            return Err(config_err(
                path,
                "attn_logit_softcapping",
                "soft-capped attention scores (Gemma 2) are not supported",
            ));
        }
        if self.use_bidirectional_attention == Some(true) {
            return Err(config_err(
                path,
                "use_bidirectional_attention",
                "bidirectional attention (an embedding model) is not supported",
            ));
        }
        let hidden_size = required(path, "hidden_size", self.hidden_size)?;
        let heads = required(path, "num_attention_heads", self.num_attention_heads)?;
        let kv_heads = required(path, "num_key_value_heads", self.num_key_value_heads.or(Some(heads)))?;
        if heads % kv_heads != 0 {
            return Err(config_err(
                path,
                "num_key_value_heads",
                format!("{kv_heads} does not divide num_attention_heads = {heads}"),
            ));
        }
        let head_dim = match self.head_dim {
            Some(d) => required(path, "head_dim", Some(d))?,
            // `Qwen3Config`'s and `Gemma3TextConfig`'s defaults, whatever the hidden size.
            None if matches!(family, Family::Qwen3 | Family::Qwen3Moe) => QWEN3_HEAD_DIM,
            None if family == Family::Gemma3 => GEMMA3_HEAD_DIM,
            None => {
                if hidden_size % heads != 0 {
                    return Err(config_err(
                        path,
                        "hidden_size",
                        format!("{hidden_size} is not a multiple of num_attention_heads = {heads}"),
                    ));
                }
                hidden_size / heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(config_err(
                path,
                "head_dim",
                format!("must be even for RoPE, got {head_dim}"),
            ));
        }
        let max_position_embeddings = self.max_position_embeddings.unwrap_or(2048);
        let lengths = (self.original_max_position_embeddings, max_position_embeddings);
        let per_layer_type = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("full_attention").map(|full| (full, p.get("sliding_attention"))));
        let (theta, rope_scaling, local_rope_theta) = match (family, per_layer_type) {
            // transformers 5 writes Gemma 3's RoPE per layer type.
            (Family::Gemma3, Some((full, sliding))) => {
                let key = "rope_parameters.full_attention";
                let (theta, scaling) = parse_rope(path, key, Some(full), self.rope_theta, lengths)?;
                let key = "rope_parameters.sliding_attention";
                let (local, local_scaling) = parse_rope(path, key, sliding, None, lengths)?;
                if local_scaling != RopeScaling::Default {
                    return Err(config_err(path, key, "only the default rope type is supported here"));
                }
                (
                    theta.or(Some(GEMMA3_ROPE_THETA)),
                    scaling,
                    local.or(Some(GEMMA3_LOCAL_ROPE_THETA)),
                )
            }
            (Family::Gemma3, None) => {
                // The global layers' RoPE: flat `rope_parameters`, or `rope_theta` + `rope_scaling`.
                let (key, section) = match &self.rope_parameters {
                    Some(p) => ("rope_parameters", Some(p)),
                    None => ("rope_scaling", self.rope_scaling.as_ref()),
                };
                let (theta, scaling) = parse_rope(path, key, section, self.rope_theta, lengths)?;
                let local = self.rope_local_base_freq.unwrap_or(GEMMA3_LOCAL_ROPE_THETA);
                (theta.or(Some(GEMMA3_ROPE_THETA)), scaling, Some(local))
            }
            (_, _) if self.rope_parameters.is_some() => {
                let (theta, scaling) =
                    parse_rope(path, "rope_parameters", self.rope_parameters.as_ref(), self.rope_theta, lengths)?;
                (theta, scaling, None)
            }
            _ => {
                let (theta, scaling) =
                    parse_rope(path, "rope_scaling", self.rope_scaling.as_ref(), self.rope_theta, lengths)?;
                (theta, scaling, None)
            }
        };
        // transformers 5 keeps `partial_rotary_factor` in `rope_parameters`, 4 at the top level.
        let (factor_key, partial) = match self.rope_parameters.as_ref().and_then(|p| p.get("partial_rotary_factor")) {
            Some(v) => (
                "rope_parameters.partial_rotary_factor",
                Some(v.as_f64().ok_or_else(|| {
                    config_err(path, "rope_parameters.partial_rotary_factor", format!("expected a number, got {v}"))
                })?),
            ),
            None => ("partial_rotary_factor", self.partial_rotary_factor),
        };
        let rotary_dim = match partial {
            None => head_dim,
            Some(f) if f == 1.0 => head_dim,
            Some(f) if family != Family::Phi3 => {
                return Err(config_err(
                    path,
                    factor_key,
                    format!("{f}: partial rotary embeddings are implemented for Phi-3 only"),
                ));
            }
            Some(f) => {
                // transformers: `int(head_dim * partial_rotary_factor)`.
                let dim = (head_dim as f64 * f) as usize;
                if !(f > 0.0 && f <= 1.0) || dim == 0 || dim % 2 != 0 {
                    return Err(config_err(
                        path,
                        factor_key,
                        format!("{f} of head_dim {head_dim} is not an even number of rotated dimensions"),
                    ));
                }
                dim
            }
        };
        if let RopeScaling::LongRope {
            short_factor,
            long_factor,
            ..
        } = &rope_scaling
        {
            let key = if self.rope_parameters.is_some() { "rope_parameters" } else { "rope_scaling" };
            if family != Family::Phi3 {
                return Err(Error::UnsupportedRope {
                    path: path.to_path_buf(),
                    rope_type: format!("longrope (implemented for Phi-3, not {})", family.model_type()),
                });
            }
            for (name, f) in [("short_factor", short_factor), ("long_factor", long_factor)] {
                if f.len() != rotary_dim / 2 {
                    return Err(config_err(
                        path,
                        &format!("{key}.{name}"),
                        format!("has {} entries; the {rotary_dim} rotated dimensions need {}", f.len(), rotary_dim / 2),
                    ));
                }
            }
        }
        let layers = required(path, "num_hidden_layers", self.num_hidden_layers)?;
        let intermediate_size = required(path, "intermediate_size", self.intermediate_size)?;
        let moe = match family {
            Family::Qwen3Moe | Family::Mixtral => Some(self.moe_config(path, family, layers, intermediate_size)?),
            _ => None,
        };
        let sliding_window = match family {
            Family::Llama => vec![None; layers],
            // Phi-3 windows every layer when config.json has a window (Phi-3-mini's 2047).
            Family::Mistral | Family::Phi3 | Family::Mixtral => vec![self.sliding_window; layers],
            Family::Gemma3 => {
                // `Gemma3TextConfig`'s default window; its sliding layers use the local RoPE.
                let window = Some(self.sliding_window.unwrap_or(4096));
                match &self.layer_types {
                    Some(types) => layer_windows(path, types, layers, window)?,
                    None => {
                        let pattern = self.sliding_window_pattern.unwrap_or(6).max(1);
                        (0..layers)
                            .map(|i| if (i + 1) % pattern != 0 { window } else { None })
                            .collect()
                    }
                }
            }
            Family::Qwen2 | Family::Qwen3 | Family::Qwen3Moe => match (&self.layer_types, self.use_sliding_window.unwrap_or(false)) {
                (Some(types), _) => layer_windows(path, types, layers, self.sliding_window)?,
                (None, false) => vec![None; layers],
                (None, true) => {
                    let first = self.max_window_layers.unwrap_or(layers);
                    (0..layers)
                        .map(|i| if i >= first { self.sliding_window } else { None })
                        .collect()
                }
            },
        };
        let dtype_key = if self.dtype.is_some() { "dtype" } else { "torch_dtype" };
        let dtype = match self.dtype.or(self.torch_dtype) {
            Some(s) => Some(parse_dtype(path, dtype_key, &s)?),
            None => None,
        };
        let attention_bias = self.attention_bias.unwrap_or(false);
        let gemma = family == Family::Gemma3;
        let score_head = self
            .architectures
            .iter()
            .flatten()
            .any(|a| a.ends_with("ForSequenceClassification"));
        if score_head {
            // transformers counts the labels from `id2label`, else `num_labels`, else 2.
            let (key, labels) = match (&self.id2label, self.num_labels) {
                (Some(m), _) => ("id2label", m.len()),
                (None, Some(n)) => ("num_labels", n),
                (None, None) => ("num_labels", 2),
            };
            if labels != 1 {
                return Err(config_err(
                    path,
                    key,
                    format!(
                        "a sequence classifier with {labels} labels: Temper reads reward models, whose `score` head \
                         has one label (`num_labels: 1`)"
                    ),
                ));
            }
        }
        Ok(ModelConfig {
            family,
            vocab_size: required(path, "vocab_size", self.vocab_size)?,
            hidden_size,
            intermediate_size,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rotary_dim,
            fused_projections: family == Family::Phi3,
            moe,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: theta.unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings,
            // `Gemma3TextConfig` ties by default, and transformers 4 leaves defaults out of
            // config.json (gemma-3-1b's has no `tie_word_embeddings`).
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(family == Family::Gemma3),
            qkv_bias: family == Family::Qwen2 || attention_bias,
            // Qwen3's and Gemma's `attention_bias` cover o_proj too, as Llama's does; Qwen2's
            // o_proj has none.
            o_bias: !matches!(family, Family::Qwen2 | Family::Mistral | Family::Mixtral) && attention_bias,
            mlp_bias: family == Family::Llama && self.mlp_bias.unwrap_or(false),
            qk_norm: matches!(family, Family::Qwen3 | Family::Qwen3Moe | Family::Gemma3),
            activation,
            norm_plus_one: gemma,
            sandwich_norms: gemma,
            embed_scale: gemma.then(|| (hidden_size as f64).sqrt()),
            query_pre_attn_scalar: gemma.then(|| self.query_pre_attn_scalar.unwrap_or(GEMMA3_HEAD_DIM as f64)),
            local_rope_theta,
            final_logit_softcapping: self.final_logit_softcapping,
            sliding_window,
            bos_token_id: token_ids(path, "bos_token_id", self.bos_token_id)?.first().copied(),
            eos_token_ids: token_ids(path, "eos_token_id", self.eos_token_id)?,
            // Lenient: older conversions write -1 for "none", and only reward models read it.
            pad_token_id: self
                .pad_token_id
                .as_ref()
                .and_then(Value::as_u64)
                .and_then(|id| u32::try_from(id).ok()),
            score_head,
            dtype,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelConfig> {
        ModelConfig::from_json_str(text, Path::new("config.json"))
    }

    const BASE: &str = r#""vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2"#;

    #[test]
    fn old_and_new_rope_forms_agree() {
        let old = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
            "rope_scaling": {{"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}}}"#
        ))
        .unwrap();
        let new = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "dtype": "bfloat16",
            "rope_parameters": {{"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}}}}"#
        ))
        .unwrap();
        assert_eq!(old, new);
        assert_eq!(old.rope_theta, 500000.0);
        assert_eq!(old.dtype, Some(CheckpointDtype::BF16));
        assert_eq!(old.head_dim, 16);
        assert_eq!(old.kv_groups(), 2);
    }

    #[test]
    fn qwen2_has_qkv_bias_only() {
        let c = parse(&format!(r#"{{"model_type": "qwen2", {BASE}}}"#)).unwrap();
        assert!(c.qkv_bias && !c.o_bias && !c.mlp_bias);
    }

    #[test]
    fn qwen3_norms_heads_and_biases_all_projections_when_asked() {
        let c = parse(&format!(r#"{{"model_type": "qwen3", {BASE}}}"#)).unwrap();
        // Qwen3Config's head_dim default, not hidden_size / heads.
        assert_eq!((c.qk_norm, c.head_dim), (true, 128));
        assert!(!c.qkv_bias && !c.o_bias && !c.mlp_bias);
        let c = parse(&format!(
            r#"{{"model_type": "qwen3", {BASE}, "head_dim": 8, "attention_bias": true}}"#
        ))
        .unwrap();
        assert_eq!(c.head_dim, 8);
        assert!(c.qkv_bias && c.o_bias && !c.mlp_bias);
        let json = c.to_hf_json(CheckpointDtype::BF16).unwrap();
        assert_eq!(json["architectures"][0], "Qwen3ForCausalLM");
        assert_eq!(json["attention_bias"], true);
        let again = parse(&json.to_string()).unwrap();
        assert_eq!(
            again,
            ModelConfig {
                dtype: again.dtype,
                ..c
            }
        );
    }

    #[test]
    fn gemma3_in_the_transformers_4_spelling() {
        // As gemma-3-1b-it's config.json: no layer_types, the pattern and the local base.
        let c = parse(&format!(
            r#"{{"model_type": "gemma3_text", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 12, "num_attention_heads": 4, "num_key_value_heads": 1, "rope_theta": 1000000,
            "rope_local_base_freq": 10000, "rope_scaling": null, "sliding_window": 512,
            "sliding_window_pattern": 6, "query_pre_attn_scalar": 256, "hidden_activation": "gelu_pytorch_tanh"}}"#
        ))
        .unwrap();
        assert_eq!(c.activation, Activation::GeluTanh);
        assert_eq!((c.head_dim, c.query_pre_attn_scalar), (256, Some(256.0)));
        assert_eq!((c.rope_theta, c.local_rope_theta), (1e6, Some(1e4)));
        assert_eq!(c.embed_scale, Some(8.0));
        assert!(c.norm_plus_one && c.sandwich_norms && c.qk_norm);
        // Tied by default, as `Gemma3TextConfig` (the released config.json leaves it out).
        assert!(c.tie_word_embeddings);
        let windows: Vec<bool> = c.sliding_window.iter().map(Option::is_some).collect();
        assert_eq!(
            windows,
            [true, true, true, true, true, false, true, true, true, true, true, false]
        );
        assert_eq!(c.sliding_window[0], Some(512));
        // What Temper writes reads back the same.
        let again = parse(&c.to_hf_json(CheckpointDtype::BF16).unwrap().to_string()).unwrap();
        assert_eq!(
            again,
            ModelConfig {
                dtype: again.dtype,
                ..c
            }
        );
        let e = parse(&format!(r#"{{"model_type": "gemma3", {BASE}}}"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("gemma3_text") && e.contains("model_type"), "{e}");
        let e = parse(&format!(
            r#"{{"model_type": "gemma3_text", {BASE}, "attn_logit_softcapping": 50}}"#
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("attn_logit_softcapping"), "{e}");
    }

    #[test]
    fn sequence_classifiers_with_one_label_are_reward_models() {
        let c = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "architectures": ["LlamaForSequenceClassification"],
            "id2label": {{"0": "LABEL_0"}}, "pad_token_id": 2}}"#
        ))
        .unwrap();
        assert!(c.score_head);
        assert_eq!(c.pad_token_id, Some(2));
        let json = c.to_hf_json(CheckpointDtype::F32).unwrap();
        assert_eq!(json["architectures"][0], "LlamaForSequenceClassification");
        assert_eq!(
            (&json["id2label"]["0"], &json["pad_token_id"]),
            (&"LABEL_0".into(), &2.into())
        );
        let again = parse(&json.to_string()).unwrap();
        assert_eq!(
            again,
            ModelConfig {
                dtype: again.dtype,
                ..c.clone()
            }
        );
        // transformers' default is two labels: a classifier, not a scorer.
        let e = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "architectures": ["LlamaForSequenceClassification"]}}"#
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("num_labels") && e.contains("2 labels"), "{e}");
        assert!(
            !parse(&format!(r#"{{"model_type": "llama", {BASE}}}"#))
                .unwrap()
                .score_head
        );
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse(&format!(r#"{{"model_type": "gpt_neox", {BASE}}}"#)).unwrap_err();
        assert!(e.to_string().contains("gpt_neox"), "{e}");
        let e = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "rope_scaling": {{"type": "yarn", "factor": 4.0}}}}"#
        ))
        .unwrap_err();
        assert!(e.to_string().contains("yarn"), "{e}");
        let e = parse(r#"{"model_type": "llama", "vocab_size": 10}"#).unwrap_err();
        assert_eq!(e.to_string(), "config.json: hidden_size: missing");
        let e = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "rope_scaling": {{"rope_type": "llama3", "factor": 8.0}}}}"#
        ))
        .unwrap_err();
        assert!(e.to_string().contains("rope_scaling.low_freq_factor: missing"), "{e}");
    }

    /// Phi-4-mini's config.json (transformers 4: `rope_scaling` with `type`, the partial factor
    /// and the pretraining length at the top level) and transformers 5's spelling agree, and
    /// survive `to_hf_json`.
    #[test]
    fn phi3_longrope_in_both_spellings() {
        let factors = |f: f64| format!("[{f}, {f}, {f}, {f}, {f}, {f}]");
        let old = parse(&format!(
            r#"{{"model_type": "phi3", {BASE}, "max_position_embeddings": 131072, "tie_word_embeddings": true,
            "original_max_position_embeddings": 4096, "partial_rotary_factor": 0.75, "rope_theta": 10000.0,
            "rope_scaling": {{"type": "longrope", "short_factor": {}, "long_factor": {}}}}}"#,
            factors(1.0),
            factors(2.5)
        ))
        .unwrap();
        assert_eq!((old.family, old.head_dim, old.rotary_dim, old.fused_projections), (Family::Phi3, 16, 12, true));
        let RopeScaling::LongRope {
            attention_factor,
            original_max_position_embeddings,
            ..
        } = &old.rope_scaling
        else {
            panic!("{:?}", old.rope_scaling)
        };
        // transformers: sqrt(1 + ln(131072 / 4096) / ln(4096)).
        assert!((attention_factor - 1.1902380714238083).abs() < 1e-12, "{attention_factor}");
        assert_eq!(*original_max_position_embeddings, 4096);
        let new = parse(&format!(
            r#"{{"model_type": "phi3", {BASE}, "max_position_embeddings": 131072, "tie_word_embeddings": true,
            "original_max_position_embeddings": 4096, "rope_parameters": {{"rope_type": "longrope",
            "rope_theta": 10000.0, "partial_rotary_factor": 0.75, "short_factor": {}, "long_factor": {},
            "original_max_position_embeddings": 4096}}}}"#,
            factors(1.0),
            factors(2.5)
        ))
        .unwrap();
        assert_eq!(old, new);
        let again = parse(&old.to_hf_json(CheckpointDtype::BF16).unwrap().to_string()).unwrap();
        assert_eq!(ModelConfig { dtype: None, ..again }, ModelConfig { dtype: None, ..old });
    }

    #[test]
    fn phi3_options_are_checked_by_name() {
        let phi3 = |extra: &str| parse(&format!(r#"{{"model_type": "phi3", {BASE}, {extra}}}"#));
        let e = phi3(r#""rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}, "original_max_position_embeddings": 8"#).unwrap_err();
        assert!(e.to_string().contains("rope_scaling.short_factor: has 1 entries; the 16 rotated dimensions need 8"), "{e}");
        let e = phi3(r#""rope_scaling": {"type": "longrope", "short_factor": [1, 1, 1, 1, 1, 1, 1, 1], "long_factor": [1, 1, 1, 1, 1, 1, 1, 1]}"#).unwrap_err();
        assert!(e.to_string().contains("original_max_position_embeddings: missing"), "{e}");
        let e = phi3(r#""rope_scaling": {"type": "longrope", "short_factor": [1, 1, 1, 1, 1, 1, 1, 0], "long_factor": [1, 1, 1, 1, 1, 1, 1, 1]}, "original_max_position_embeddings": 8"#).unwrap_err();
        assert!(e.to_string().contains("rope_scaling.short_factor: expected positive numbers"), "{e}");
        let e = phi3(r#""partial_rotary_factor": 0.2"#).unwrap_err();
        assert!(e.to_string().contains("partial_rotary_factor: 0.2 of head_dim 16"), "{e}");
        let e = phi3(r#""rope_scaling": {"type": "yarn", "factor": 4.0}"#).unwrap_err();
        assert!(e.to_string().contains("yarn"), "{e}");
        // Options of Phi-3 on another family are refused, not ignored.
        let llama = |extra: &str| parse(&format!(r#"{{"model_type": "llama", {BASE}, {extra}}}"#));
        let e = llama(r#""partial_rotary_factor": 0.5"#).unwrap_err();
        assert!(e.to_string().contains("partial rotary embeddings are implemented for Phi-3 only"), "{e}");
        let e = llama(r#""rope_scaling": {"type": "longrope", "short_factor": [1, 1, 1, 1, 1, 1, 1, 1], "long_factor": [1, 1, 1, 1, 1, 1, 1, 1]}, "original_max_position_embeddings": 8"#).unwrap_err();
        assert!(e.to_string().contains("longrope (implemented for Phi-3, not llama)"), "{e}");
    }

    #[test]
    fn mixtures_of_experts_and_their_refusals() {
        let moe = |model_type: &str, extra: &str| parse(&format!(r#"{{"model_type": "{model_type}", {BASE}, {extra}}}"#));
        let q = moe("qwen3_moe", r#""num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "mlp_only_layers": [0]"#).unwrap();
        let m = q.moe.as_ref().unwrap();
        assert_eq!((m.num_experts, m.top_k, m.expert_intermediate_size, m.norm_topk_prob), (8, 2, 32, false));
        assert_eq!(m.sparse_layers, vec![false, true]);
        assert!(!m.output_router_logits && m.router_aux_loss_coef == 0.001);
        let again = parse(&q.to_hf_json(CheckpointDtype::F32).unwrap().to_string()).unwrap();
        assert_eq!(ModelConfig { dtype: None, ..again }, ModelConfig { dtype: None, ..q.clone() });
        let x = moe("mixtral", r#""num_local_experts": 4, "output_router_logits": true"#).unwrap();
        let m = x.moe.as_ref().unwrap();
        assert_eq!((m.num_experts, m.top_k, m.expert_intermediate_size, m.norm_topk_prob), (4, 2, 128, true));
        assert!(m.output_router_logits);
        let again = parse(&x.to_hf_json(CheckpointDtype::F32).unwrap().to_string()).unwrap();
        assert_eq!(ModelConfig { dtype: None, ..again }, ModelConfig { dtype: None, ..x });
        for (model_type, extra, want) in [
            ("mixtral", r#""num_local_experts": 2, "num_experts_per_tok": 3"#, "num_experts_per_tok: 3 experts per token of 2"),
            ("mixtral", r#""router_jitter_noise": 0.1"#, "router_jitter_noise: router jitter"),
            ("qwen3_moe", r#""shared_expert_intermediate_size": 64"#, "shared experts (Qwen2-MoE) are not supported"),
            ("qwen3_moe", r#""mlp_only_layers": [2]"#, "mlp_only_layers: layer 2 of 2"),
            ("qwen3_moe", r#""num_experts": 0"#, "num_experts: must be > 0"),
        ] {
            let e = moe(model_type, extra).unwrap_err().to_string();
            assert!(e.contains(want), "{extra}: {e}");
        }
    }

    #[test]
    fn eos_may_be_a_list() {
        let c = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "eos_token_id": [1, 2], "bos_token_id": 0}}"#
        ))
        .unwrap();
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        assert_eq!(c.bos_token_id, Some(0));
    }
}
