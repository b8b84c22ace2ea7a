//! The adapter configuration, with PEFT's `adapter_config.json` as its file format and PEFT's
//! matching rules (`check_target_module_exists`, `get_pattern_key` in PEFT 0.21).

use std::path::Path;

use regex::Regex;
use serde_json::{Map, Value, json};

use crate::error::{Error, Result};

/// Which linear layers get an adapter.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    /// Exact module names or name suffixes (`q_proj` matches `model.layers.0.self_attn.q_proj`).
    Names(Vec<String>),
    /// A regular expression that must match the whole module name.
    Regex(String),
    /// Every linear layer except the output head.
    AllLinear,
}

/// How a new adapter's matrices start (PEFT's `init_lora_weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitLoraWeights {
    /// `true`: A Kaiming-uniform, B zero, so training starts at the base model.
    KaimingZero,
    /// `"gaussian"`: A ~ N(0, 1/r), B zero.
    Gaussian,
    /// `false`: both random (the adapter changes the model from the start; for tests).
    Random,
    /// `"pissa"`: A and B from the top `r` singular vectors of W, and the base replaced by the
    /// residual `W - scaling·B·A`, so the model starts where it was.
    Pissa,
}

/// A module trained in full and saved with the adapter (PEFT's `modules_to_save`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SavedModule {
    /// The output head (`lm_head`; untied models only).
    LmHead,
    /// The token embedding (`embed_tokens`).
    EmbedTokens,
    /// A reward model's head (`score`; PEFT adds it, and `classifier`, for `task_type: SEQ_CLS`).
    Score,
}

impl SavedModule {
    /// The module's full name in the model (`lm_head`, `model.embed_tokens`).
    pub fn path(self) -> &'static str {
        match self {
            Self::LmHead => "lm_head",
            Self::EmbedTokens => "model.embed_tokens",
            Self::Score => "score",
        }
    }

    /// The name `adapter_config.json` lists (PEFT matches it as a suffix).
    pub fn name(self) -> &'static str {
        match self {
            Self::LmHead => "lm_head",
            Self::EmbedTokens => "embed_tokens",
            Self::Score => "score",
        }
    }
}

impl std::str::FromStr for SavedModule {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "lm_head" => Ok(Self::LmHead),
            "embed_tokens" | "model.embed_tokens" => Ok(Self::EmbedTokens),
            // PEFT lists both for SEQ_CLS; Temper's classifiers name their head `score`.
            "score" | "classifier" => Ok(Self::Score),
            other => Err(format!(
                "{other:?} is not a module Temper can train in full with an adapter (supported: lm_head, embed_tokens, \
                 score)"
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    pub exclude_modules: Option<TargetModules>,
    pub layers_to_transform: Option<Vec<usize>>,
    pub layers_pattern: Option<Vec<String>>,
    /// Ordered as written: the first pattern that matches a module wins.
    pub rank_pattern: Vec<(String, usize)>,
    pub alpha_pattern: Vec<(String, f64)>,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub modules_to_save: Vec<SavedModule>,
    pub init_lora_weights: InitLoraWeights,
    pub base_model_name_or_path: Option<String>,
    pub revision: Option<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
            exclude_modules: None,
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: vec![],
            alpha_pattern: vec![],
            use_rslora: false,
            use_dora: false,
            modules_to_save: vec![],
            init_lora_weights: InitLoraWeights::KaimingZero,
            base_model_name_or_path: None,
            revision: None,
        }
    }
}

/// `re.fullmatch(pattern, key)`.
fn full_match(pattern: &str, key: &str) -> bool {
    Regex::new(&format!("^(?:{pattern})$")).is_ok_and(|re| re.is_match(key))
}

fn names_match(names: &[String], key: &str) -> bool {
    names.iter().any(|n| key == n || key.ends_with(&format!(".{n}")))
}

/// PEFT's layer index: the first numbered segment (`model.layers.3.mlp...` -> 3).
fn layer_index(key: &str, patterns: Option<&[String]>) -> Option<usize> {
    let parts: Vec<&str> = key.split('.').collect();
    for i in 1..parts.len().saturating_sub(1) {
        let allowed = patterns.is_none_or(|p| p.is_empty() || p.iter().any(|p| p == parts[i - 1]));
        if allowed && let Ok(n) = parts[i].parse() {
            return Some(n);
        }
    }
    None
}

/// The largest LoRA rank a config may give (a layer's smaller side is the real limit).
pub const MAX_RANK: usize = 1 << 16;

impl LoraConfig {
    /// Whether the linear layer `key` gets an adapter. `is_output` marks the output head,
    /// which `all-linear` leaves alone.
    pub fn targets(&self, key: &str, is_output: bool) -> bool {
        match &self.exclude_modules {
            Some(TargetModules::Regex(p)) if full_match(p, key) => return false,
            Some(TargetModules::Names(n)) if names_match(n, key) => return false,
            _ => {}
        }
        // A module trained in full is never also adapted.
        if self.modules_to_save.iter().any(|m| key == m.path()) {
            return false;
        }
        match &self.target_modules {
            TargetModules::AllLinear => !is_output && self.layer_allowed(key),
            TargetModules::Regex(p) => full_match(p, key),
            TargetModules::Names(names) => {
                if names.iter().any(|n| n == key) {
                    return true;
                }
                names_match(names, key) && self.layer_allowed(key)
            }
        }
    }

    fn layer_allowed(&self, key: &str) -> bool {
        match &self.layers_to_transform {
            None => true,
            Some(layers) if layers.is_empty() => true,
            Some(layers) => layer_index(key, self.layers_pattern.as_deref()).is_some_and(|i| layers.contains(&i)),
        }
    }

    /// `get_pattern_key`: the first pattern `p` with `re.match(rf"(.*\.)?({p})$", key)`.
    fn pattern<'a, T>(patterns: &'a [(String, T)], key: &str) -> Option<&'a T> {
        patterns
            .iter()
            .find(|(p, _)| Regex::new(&format!(r"^(?:.*\.)?(?:{p})$")).is_ok_and(|re| re.is_match(key)))
            .map(|(_, v)| v)
    }

    /// Whether a rank or alpha pattern names `key`.
    pub fn has_pattern_for(&self, key: &str) -> bool {
        Self::pattern(&self.rank_pattern, key).is_some() || Self::pattern(&self.alpha_pattern, key).is_some()
    }

    pub fn rank_for(&self, key: &str) -> usize {
        Self::pattern(&self.rank_pattern, key).copied().unwrap_or(self.r)
    }

    pub fn alpha_for(&self, key: &str) -> f64 {
        Self::pattern(&self.alpha_pattern, key)
            .copied()
            .unwrap_or(self.lora_alpha)
    }

    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scaling_for(&self, key: &str) -> f64 {
        let (r, alpha) = (self.rank_for(key) as f64, self.alpha_for(key));
        if self.use_rslora { alpha / r.sqrt() } else { alpha / r }
    }

    /// Checks what PEFT would also reject, the regular expressions, and ranks no model has.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let err = |key: &str, message: String| Error::Config {
            path: path.to_path_buf(),
            key: key.into(),
            message,
        };
        if self.r == 0 {
            return Err(err("r", "must be > 0, got 0".into()));
        }
        // Any rank past a layer's smaller side is refused where adapters are placed; this bound
        // is for ranks no model has, so the refusal comes before any model loads.
        if self.r > MAX_RANK || self.rank_pattern.iter().any(|(_, r)| *r > MAX_RANK) {
            return Err(err(
                "r",
                format!("a LoRA rank must be at most {MAX_RANK} (and at most a layer's smaller dimension)"),
            ));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(err(
                "lora_dropout",
                format!("must be in [0, 1), got {}", self.lora_dropout),
            ));
        }
        for (key, t) in [
            ("target_modules", Some(&self.target_modules)),
            ("exclude_modules", self.exclude_modules.as_ref()),
        ] {
            if let Some(TargetModules::Regex(p)) = t {
                Regex::new(p).map_err(|e| err(key, format!("invalid regular expression: {e}")))?;
            }
        }
        for (p, r) in &self.rank_pattern {
            Regex::new(p).map_err(|e| err("rank_pattern", format!("{p:?}: {e}")))?;
            if *r == 0 {
                return Err(err("rank_pattern", format!("{p:?}: rank must be > 0")));
            }
        }
        for (p, _) in &self.alpha_pattern {
            Regex::new(p).map_err(|e| err("alpha_pattern", format!("{p:?}: {e}")))?;
        }
        Ok(())
    }

    /// Reads PEFT's `adapter_config.json`. Unknown keys are ignored, as PEFT does; keys that
    /// would change the math in ways Temper does not implement are errors.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_json(&Self::read_json(path)?, path)
    }

    /// `adapter_config.json` as JSON, before [`Self::from_json`] reads it.
    pub(crate) fn read_json(path: &Path) -> Result<Value> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            error: source,
        })?;
        serde_json::from_str(&text).map_err(|e| Error::Format {
            path: path.to_path_buf(),
            message: format!("invalid JSON: {e}"),
        })
    }

    pub fn from_json(json: &Value, path: &Path) -> Result<Self> {
        let err = |key: &str, message: String| Error::Config {
            path: path.to_path_buf(),
            key: key.into(),
            message,
        };
        let obj = json
            .as_object()
            .ok_or_else(|| err("", "expected a JSON object".into()))?;
        let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
        let peft_type = get("peft_type").and_then(Value::as_str).unwrap_or("LORA");
        if peft_type != "LORA" {
            return Err(Error::UnsupportedPeftType {
                path: path.to_path_buf(),
                peft_type: peft_type.into(),
            });
        }
        // Settings that change the computation and that Temper does not implement.
        for (key, ok) in [
            (
                "fan_in_fan_out",
                get("fan_in_fan_out").is_none_or(|v| v == &json!(false)),
            ),
            ("lora_bias", get("lora_bias").is_none_or(|v| v == &json!(false))),
            ("bias", get("bias").is_none_or(|v| v == &json!("none"))),
            ("layer_replication", get("layer_replication").is_none()),
            (
                "target_parameters",
                get("target_parameters").is_none_or(|v| v == &json!([])),
            ),
            ("trainable_token_indices", get("trainable_token_indices").is_none()),
            ("use_qalora", get("use_qalora").is_none_or(|v| v == &json!(false))),
        ] {
            if !ok {
                if key == "target_parameters" {
                    // `load_adapter` reads them with the model it places them on.
                    return Err(err(
                        key,
                        format!(
                            "{}: a mixture of experts' stacked experts, read only with their model; llama.cpp \
                             adapters cannot name experts (`temper merge` the adapter, then convert the model)",
                            obj[key]
                        ),
                    ));
                }
                return Err(err(key, format!("{} is not supported", obj[key])));
            }
        }
        let uint = |key: &str, v: &Value| -> Result<usize> {
            v.as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| err(key, format!("expected a positive integer, got {v}")))
        };
        let float = |key: &str, v: &Value| -> Result<f64> {
            v.as_f64()
                .ok_or_else(|| err(key, format!("expected a number, got {v}")))
        };
        let boolean = |key: &str| -> Result<bool> {
            match get(key) {
                None => Ok(false),
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| err(key, format!("expected true or false, got {v}"))),
            }
        };
        let strings = |key: &str, v: &Value| -> Result<Vec<String>> {
            v.as_array()
                .ok_or_else(|| err(key, format!("expected a list of strings, got {v}")))?
                .iter()
                .map(|s| {
                    s.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| err(key, format!("expected a string, got {s}")))
                })
                .collect()
        };
        let targets = |key: &str, v: &Value| -> Result<TargetModules> {
            match v {
                Value::String(s) if s == "all-linear" => Ok(TargetModules::AllLinear),
                Value::String(s) => Ok(TargetModules::Regex(s.clone())),
                _ => Ok(TargetModules::Names(strings(key, v)?)),
            }
        };
        let pattern = |key: &str| -> Result<Map<String, Value>> {
            match get(key) {
                None => Ok(Map::new()),
                Some(Value::Object(m)) => Ok(m.clone()),
                Some(v) => Err(err(key, format!("expected an object, got {v}"))),
            }
        };
        let init = match get("init_lora_weights") {
            None => InitLoraWeights::KaimingZero,
            Some(Value::Bool(true)) => InitLoraWeights::KaimingZero,
            Some(Value::Bool(false)) => InitLoraWeights::Random,
            Some(Value::String(s)) if s == "gaussian" => InitLoraWeights::Gaussian,
            Some(Value::String(s)) if s == "pissa" => InitLoraWeights::Pissa,
            Some(v) => {
                return Err(err(
                    "init_lora_weights",
                    format!("{v} is not supported (true, false, \"gaussian\" or \"pissa\")"),
                ));
            }
        };
        let config = LoraConfig {
            r: get("r").map(|v| uint("r", v)).transpose()?.unwrap_or(8),
            lora_alpha: get("lora_alpha")
                .map(|v| float("lora_alpha", v))
                .transpose()?
                .unwrap_or(8.0),
            lora_dropout: get("lora_dropout")
                .map(|v| float("lora_dropout", v))
                .transpose()?
                .unwrap_or(0.0),
            target_modules: match get("target_modules") {
                Some(v) => targets("target_modules", v)?,
                None => return Err(err("target_modules", "missing".into())),
            },
            exclude_modules: get("exclude_modules")
                .map(|v| targets("exclude_modules", v))
                .transpose()?,
            layers_to_transform: match get("layers_to_transform") {
                None => None,
                Some(Value::Number(n)) => Some(vec![uint("layers_to_transform", &Value::Number(n.clone()))?]),
                Some(v) => Some(
                    v.as_array()
                        .ok_or_else(|| err("layers_to_transform", format!("expected a list, got {v}")))?
                        .iter()
                        .map(|i| uint("layers_to_transform", i))
                        .collect::<Result<_>>()?,
                ),
            },
            layers_pattern: match get("layers_pattern") {
                None => None,
                Some(Value::String(s)) => Some(vec![s.clone()]),
                Some(v) => Some(strings("layers_pattern", v)?),
            },
            rank_pattern: pattern("rank_pattern")?
                .iter()
                .map(|(k, v)| Ok((k.clone(), uint("rank_pattern", v)?)))
                .collect::<Result<_>>()?,
            alpha_pattern: pattern("alpha_pattern")?
                .iter()
                .map(|(k, v)| Ok((k.clone(), float("alpha_pattern", v)?)))
                .collect::<Result<_>>()?,
            use_rslora: boolean("use_rslora")?,
            use_dora: boolean("use_dora")?,
            modules_to_save: {
                let mut saved: Vec<SavedModule> = Vec::new();
                let listed = get("modules_to_save")
                    .map(|v| strings("modules_to_save", v))
                    .transpose()?
                    .unwrap_or_default();
                for m in &listed {
                    saved.push(m.parse().map_err(|message| err("modules_to_save", message))?);
                }
                // PEFT trains a SEQ_CLS model's head in full whether listed or not (and lists
                // it twice when it was).
                if get("task_type").and_then(Value::as_str) == Some("SEQ_CLS") {
                    saved.push(SavedModule::Score);
                }
                let mut seen = Vec::new();
                saved.retain(|m| {
                    !seen.contains(m) && {
                        seen.push(*m);
                        true
                    }
                });
                saved
            },
            init_lora_weights: init,
            base_model_name_or_path: get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(str::to_string),
            revision: get("revision").and_then(Value::as_str).map(str::to_string),
        };
        config.validate(path)?;
        Ok(config)
    }

    /// PEFT's `adapter_config.json`. `resolved_targets` are the module names that got an
    /// adapter, written for `all-linear` as PEFT 0.21 does.
    pub fn to_json(&self, resolved_targets: &[String]) -> Value {
        let targets = |t: &TargetModules| match t {
            TargetModules::Names(n) => json!(n),
            TargetModules::Regex(r) => json!(r),
            TargetModules::AllLinear => json!(resolved_targets),
        };
        let map = |p: &[(String, Value)]| Value::Object(p.iter().cloned().collect());
        let rank: Vec<(String, Value)> = self.rank_pattern.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        let alpha: Vec<(String, Value)> = self.alpha_pattern.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        let alpha_value = if self.lora_alpha.fract() == 0.0 {
            json!(self.lora_alpha as i64)
        } else {
            json!(self.lora_alpha)
        };
        json!({
            "alpha_pattern": map(&alpha),
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": "none",
            "exclude_modules": self.exclude_modules.as_ref().map(targets),
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": match self.init_lora_weights {
                InitLoraWeights::KaimingZero => json!(true),
                InitLoraWeights::Gaussian => json!("gaussian"),
                InitLoraWeights::Random => json!(false),
                InitLoraWeights::Pissa => json!("pissa"),
            },
            "layer_replication": null,
            "layers_pattern": self.layers_pattern,
            "layers_to_transform": self.layers_to_transform,
            "lora_alpha": alpha_value,
            "lora_bias": false,
            "lora_dropout": self.lora_dropout,
            "modules_to_save": if self.modules_to_save.is_empty() {
                json!(null)
            } else {
                json!(self.modules_to_save.iter().map(|m| m.name()).collect::<Vec<_>>())
            },
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": map(&rank),
            "revision": self.revision,
            "target_modules": targets(&self.target_modules),
            "task_type": if self.modules_to_save.contains(&SavedModule::Score) {
                "SEQ_CLS"
            } else {
                "CAUSAL_LM"
            },
            "use_dora": self.use_dora,
            "use_rslora": self.use_rslora,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(targets: TargetModules) -> LoraConfig {
        LoraConfig {
            target_modules: targets,
            ..LoraConfig::default()
        }
    }

    #[test]
    fn list_targets_are_names_or_suffixes() {
        let c = cfg(TargetModules::Names(vec![
            "q_proj".into(),
            "model.layers.1.mlp.up_proj".into(),
        ]));
        assert!(c.targets("model.layers.0.self_attn.q_proj", false));
        assert!(!c.targets("model.layers.0.self_attn.k_proj", false));
        assert!(c.targets("model.layers.1.mlp.up_proj", false));
        assert!(!c.targets("model.layers.0.mlp.up_proj", false));
        // a suffix must be a whole segment
        assert!(!cfg(TargetModules::Names(vec!["proj".into()])).targets("model.layers.0.self_attn.q_proj", false));
    }

    #[test]
    fn seq_cls_adapters_save_their_head_once() {
        // As PEFT 0.21 writes a SEQ_CLS config: the head listed, then PEFT's two names again.
        let json = json!({"peft_type": "LORA", "task_type": "SEQ_CLS", "r": 4, "lora_alpha": 8,
            "target_modules": ["q_proj"], "modules_to_save": ["score", "classifier", "score"]});
        let c = LoraConfig::from_json(&json, Path::new("adapter_config.json")).unwrap();
        assert_eq!(c.modules_to_save, [SavedModule::Score]);
        assert_eq!(c.to_json(&[])["task_type"], "SEQ_CLS");
        assert_eq!(c.to_json(&[])["modules_to_save"], json!(["score"]));
        // PEFT trains a SEQ_CLS model's head even when the config does not list it.
        let bare = json!({"peft_type": "LORA", "task_type": "SEQ_CLS", "r": 4, "target_modules": ["q_proj"]});
        let c = LoraConfig::from_json(&bare, Path::new("adapter_config.json")).unwrap();
        assert_eq!(c.modules_to_save, [SavedModule::Score]);
        assert!(!c.targets("score", true));
    }

    #[test]
    fn regex_must_match_the_whole_name() {
        let c = cfg(TargetModules::Regex(r".*\.(q|v)_proj".into()));
        assert!(c.targets("model.layers.3.self_attn.v_proj", false));
        assert!(!cfg(TargetModules::Regex("q_proj".into())).targets("model.layers.3.self_attn.q_proj", false));
    }

    #[test]
    fn all_linear_skips_the_head_and_exclusions_win() {
        let mut c = cfg(TargetModules::AllLinear);
        assert!(c.targets("model.layers.0.mlp.down_proj", false));
        assert!(!c.targets("lm_head", true));
        c.exclude_modules = Some(TargetModules::Names(vec!["down_proj".into()]));
        assert!(!c.targets("model.layers.0.mlp.down_proj", false));
        c.layers_to_transform = Some(vec![1]);
        assert!(!c.targets("model.layers.0.mlp.up_proj", false));
        assert!(c.targets("model.layers.1.mlp.up_proj", false));
    }

    #[test]
    fn patterns_follow_get_pattern_key() {
        let c = LoraConfig {
            r: 8,
            lora_alpha: 16.0,
            rank_pattern: vec![(r"layers\.1\.mlp\.gate_proj".into(), 6), ("v_proj".into(), 2)],
            alpha_pattern: vec![("q_proj".into(), 3.0)],
            ..LoraConfig::default()
        };
        assert_eq!(c.rank_for("model.layers.1.mlp.gate_proj"), 6);
        assert_eq!(c.rank_for("model.layers.0.mlp.gate_proj"), 8);
        assert_eq!(c.rank_for("model.layers.0.self_attn.v_proj"), 2);
        assert_eq!(c.scaling_for("model.layers.0.self_attn.q_proj"), 3.0 / 8.0);
        let rs = LoraConfig { use_rslora: true, ..c };
        assert_eq!(rs.scaling_for("model.layers.0.self_attn.k_proj"), 16.0 / 8f64.sqrt());
    }

    #[test]
    fn unsupported_settings_are_named() {
        let e = LoraConfig::from_json(
            &json!({"peft_type": "IA3", "target_modules": ["q_proj"]}),
            Path::new("a.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("IA3"), "{e}");
        let e = LoraConfig::from_json(
            &json!({"target_modules": ["q_proj"], "fan_in_fan_out": true}),
            Path::new("a.json"),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(e, "a.json: fan_in_fan_out: true is not supported");
        let e = LoraConfig::from_json(&json!({"target_modules": "(", "r": 4}), Path::new("a.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("target_modules: invalid regular expression"), "{e}");
    }
}
