//! `config.json` of a Hugging Face checkpoint, read in two stages: the raw serde form (which
//! accepts both the transformers-4 and transformers-5 spellings and ignores keys we do not use,
//! as transformers does), then a validated [`ModelConfig`] that the model is built from.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// The architecture families Temper implements. All are Llama-shaped decoders; they differ in
/// which projections carry a bias and in sliding-window attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
}

impl Family {
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
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
    /// Sliding window per layer (`None`: full causal attention).
    pub sliding_window: Vec<Option<usize>>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
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
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
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
            RopeScaling::FreqFactors(_) => {
                return Err(
                    "this model's rope scaling came from GGUF rope_freqs, which config.json cannot express".into(),
                );
            }
        };
        let (arch, model_type) = match self.family {
            Family::Llama => ("LlamaForCausalLM", "llama"),
            Family::Mistral => ("MistralForCausalLM", "mistral"),
            Family::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        };
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
            "hidden_act": "silu",
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
        match self.family {
            Family::Llama => {
                obj.insert("attention_bias".into(), Value::Bool(self.qkv_bias));
                obj.insert("mlp_bias".into(), Value::Bool(self.mlp_bias));
            }
            Family::Mistral => {
                obj.insert(
                    "sliding_window".into(),
                    serde_json::json!(self.sliding_window.first().copied().flatten()),
                );
            }
            Family::Qwen2 => {
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
        let mlp = 3 * h * self.intermediate_size;
        let per_layer = attn + mlp + 2 * h;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + h + self.num_hidden_layers * per_layer
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
fn parse_rope(
    path: &Path,
    key: &str,
    section: Option<&Value>,
    theta: Option<f64>,
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
    fn validate(self, path: &Path) -> Result<ModelConfig> {
        let model_type = self
            .model_type
            .ok_or_else(|| config_err(path, "model_type", "missing"))?;
        let family = match model_type.as_str() {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            _ => {
                return Err(Error::UnsupportedModelType {
                    path: path.to_path_buf(),
                    model_type,
                });
            }
        };
        if let Some(act) = &self.hidden_act
            && act != "silu"
        {
            return Err(config_err(
                path,
                "hidden_act",
                format!("only \"silu\" is supported, got {act:?}"),
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
        let (theta, rope_scaling) = if self.rope_parameters.is_some() {
            parse_rope(path, "rope_parameters", self.rope_parameters.as_ref(), self.rope_theta)?
        } else {
            parse_rope(path, "rope_scaling", self.rope_scaling.as_ref(), self.rope_theta)?
        };
        let layers = required(path, "num_hidden_layers", self.num_hidden_layers)?;
        let sliding_window = match family {
            Family::Llama => vec![None; layers],
            Family::Mistral => vec![self.sliding_window; layers],
            Family::Qwen2 => match (&self.layer_types, self.use_sliding_window.unwrap_or(false)) {
                (Some(types), _) => {
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
                            "sliding_attention" => Ok(self.sliding_window),
                            "full_attention" => Ok(None),
                            other => Err(config_err(path, "layer_types", format!("unknown layer type {other:?}"))),
                        })
                        .collect::<Result<_>>()?
                }
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
        Ok(ModelConfig {
            family,
            vocab_size: required(path, "vocab_size", self.vocab_size)?,
            hidden_size,
            intermediate_size: required(path, "intermediate_size", self.intermediate_size)?,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: theta.unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            qkv_bias: family == Family::Qwen2 || attention_bias,
            o_bias: family == Family::Llama && attention_bias,
            mlp_bias: family == Family::Llama && self.mlp_bias.unwrap_or(false),
            sliding_window,
            bos_token_id: token_ids(path, "bos_token_id", self.bos_token_id)?.first().copied(),
            eos_token_ids: token_ids(path, "eos_token_id", self.eos_token_id)?,
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
