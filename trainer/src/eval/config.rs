//! `temper eval`'s YAML file, and the scorers it shares with `training.eval_generation`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use temper_data::DataConfig;

use crate::config::{DeviceSpec, expand_home, read_file_or_flags};
use crate::error::{Error, Result};

/// An evaluation: a model, the adapters compared with it, the rows, and what is measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// A Hugging Face model directory or a GGUF file.
    pub model: PathBuf,
    /// Adapters (PEFT format), each evaluated on the same rows as the base.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adapters: Vec<PathBuf>,
    /// Evaluate the base model alone too (the column each adapter is compared with).
    #[serde(default = "yes")]
    pub base: bool,
    /// The rows, in any format the trainer reads (prompt/completion, messages, preference
    /// pairs with a prompt, prompt-only); read in order, never shuffled.
    pub data: DataConfig,
    /// Evaluate at most this many rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rows: Option<usize>,
    #[serde(default)]
    pub generation: GenerationSection,
    /// What is scored on each generated answer (and `choice`, which generates nothing).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scorers: Vec<Scorer>,
    /// Held-out loss and perplexity over the rows' answers, with the trainer's masks.
    /// Default: on when the rows have answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<bool>,
    /// A JSON Lines file of fixed cases, each a `prompt` with what its answer must (`regex`,
    /// `refuse: true`) or must not (`not_regex`, `refuse: false`) do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regression: Option<PathBuf>,
    /// Where `eval.json`, `eval.md` and `eval_samples.jsonl` go. Default: the first adapter's
    /// directory (whose model card then gets the evaluation), else required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_dir: Option<PathBuf>,
    #[serde(default)]
    pub device: DeviceSpec,
    #[serde(skip)]
    pub file: PathBuf,
}

fn yes() -> bool {
    true
}

/// Decoding of the answers: greedy by default, or sampled with a seed (row `i` draws with
/// `seed + i`, whatever the batch and whichever model).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationSection {
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// 0: greedy.
    #[serde(default)]
    pub temperature: f32,
    #[serde(default = "default_top_p")]
    pub top_p: f32,
    #[serde(default)]
    pub top_k: usize,
    #[serde(default)]
    pub seed: u64,
    /// Prompts generated together.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
}

fn default_max_new_tokens() -> usize {
    256
}
fn default_top_p() -> f32 {
    1.0
}
fn default_batch_size() -> usize {
    8
}

impl Default for GenerationSection {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("defaults deserialize")
    }
}

/// One measurement of the answers. `reference` names the column compared with; by default
/// the row's own answer (its completion, last assistant turn, or chosen answer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Scorer {
    /// The final answer (`#### N`, `\boxed{}`, else the last number) equals the reference's,
    /// numbers compared by value.
    ExactMatch {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        /// Read the answer with this regular expression instead: its first capture group (or
        /// the whole match) at the first match; no match is a wrong answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pattern: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// The regular expression matches the answer (format adherence).
    Regex {
        pattern: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// The answer contains the reference (case ignored).
    Contains {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// ROUGE-1, ROUGE-2 and ROUGE-L F-measures against the reference (`rouge1`, `rouge2`,
    /// `rougeL`, or `NAME_rouge1`… with a name).
    Rouge {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// Corpus BLEU (sacreBLEU's) against the reference.
    Bleu {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// Corpus chrF (sacreBLEU's) against the reference.
    Chrf {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// The share of answers that refuse.
    Refusal {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// Multiple choice by log-likelihood, as lm-evaluation-harness scores ARC or HellaSwag:
    /// each option of column `options` is scored as the prompt's continuation; the row is
    /// right when the most likely option is `answer` (an index, or the option's text).
    /// Reports `choice` (summed log-likelihood) and `choice_norm` (per character). Generates
    /// nothing.
    Choice {
        #[serde(default = "default_options")]
        options: String,
        #[serde(default = "default_answer")]
        answer: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
}

fn default_options() -> String {
    "choices".into()
}
fn default_answer() -> String {
    "answer".into()
}

impl Scorer {
    /// The name its metric is reported under.
    pub fn name(&self) -> &str {
        let (given, default) = match self {
            Self::ExactMatch { name, .. } => (name, "exact_match"),
            Self::Regex { name, .. } => (name, "regex"),
            Self::Contains { name, .. } => (name, "contains"),
            Self::Rouge { name, .. } => (name, "rouge"),
            Self::Bleu { name, .. } => (name, "bleu"),
            Self::Chrf { name, .. } => (name, "chrf"),
            Self::Refusal { name } => (name, "refusal"),
            Self::Choice { name, .. } => (name, "choice"),
        };
        given.as_deref().unwrap_or(default)
    }

    /// The metrics it reports: its name, ROUGE's three (`rouge1`, `rouge2`, `rougeL`, after
    /// `NAME_` when named), `choice` and `choice_norm`.
    pub fn metric_names(&self) -> Vec<String> {
        match self {
            Self::Rouge { name, .. } => ["rouge1", "rouge2", "rougeL"]
                .iter()
                .map(|m| name.as_ref().map_or_else(|| m.to_string(), |g| format!("{g}_{m}")))
                .collect(),
            Self::Choice { .. } => vec![self.name().to_string(), format!("{}_norm", self.name())],
            _ => vec![self.name().to_string()],
        }
    }

    /// Whether it reads generated answers (all but `choice`).
    pub fn generates(&self) -> bool {
        !matches!(self, Self::Choice { .. })
    }

    /// The reference column it names, if any.
    pub fn reference_column(&self) -> Option<&str> {
        match self {
            Self::ExactMatch { reference, .. }
            | Self::Contains { reference, .. }
            | Self::Rouge { reference, .. }
            | Self::Bleu { reference, .. }
            | Self::Chrf { reference, .. } => reference.as_deref(),
            Self::Regex { .. } | Self::Refusal { .. } | Self::Choice { .. } => None,
        }
    }

    /// Whether it compares with a reference (its column, or the row's answer).
    pub fn needs_reference(&self) -> bool {
        matches!(
            self,
            Self::ExactMatch { .. } | Self::Contains { .. } | Self::Rouge { .. } | Self::Bleu { .. } | Self::Chrf { .. }
        )
    }
}

/// Metrics every evaluation may report beside the scorers'.
const RESERVED_METRICS: [&str; 3] = ["loss", "perplexity", "regression"];

/// Checks a list of scorers (at config key `key`): patterns compile, the metrics they report
/// are distinct (from each other and from `loss`, `perplexity`, `regression`), one `choice`.
pub(crate) fn check_scorers(scorers: &[Scorer], key: &str) -> Result<()> {
    let mut names: std::collections::BTreeSet<String> = RESERVED_METRICS.iter().map(|n| n.to_string()).collect();
    if scorers.iter().filter(|s| !s.generates()).count() > 1 {
        return Err(Error::config(key, "one `choice` scorer at most (it reads the rows' options and answer)"));
    }
    for (i, s) in scorers.iter().enumerate() {
        if let Scorer::Regex { pattern, .. } | Scorer::ExactMatch { pattern: Some(pattern), .. } = s {
            regex::Regex::new(pattern)
                .map_err(|e| Error::config(&format!("{key}[{i}].pattern"), format!("not a valid regular expression: {e}")))?;
        }
        for metric in s.metric_names() {
            if !names.insert(metric.clone()) {
                return Err(Error::config(
                    &format!("{key}[{i}]"),
                    format!("a second metric named `{metric}`: give each scorer a distinct `name`"),
                ));
            }
        }
    }
    Ok(())
}

impl EvalConfig {
    /// Reads `file` (or, without one, the overrides alone: `temper eval` given as flags) with
    /// `key.path=value` overrides, then checks it; errors name the file and the key.
    pub fn load(file: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let (mut config, origin): (Self, PathBuf) = read_file_or_flags(file, overrides)?;
        config.expand_home();
        config.validate().map_err(|e| e.in_file(&origin))?;
        config.file = origin;
        Ok(config)
    }

    fn expand_home(&mut self) {
        let expand = |p: &Path| PathBuf::from(expand_home(&p.display().to_string()));
        self.model = expand(&self.model);
        self.adapters.iter_mut().for_each(|a| *a = expand(a));
        self.regression = self.regression.as_deref().map(expand);
        self.output_dir = self.output_dir.as_deref().map(expand);
        self.data.path = self.data.path.as_deref().map(expand_home);
        self.data.sources.iter_mut().for_each(|s| s.path = expand_home(&s.path));
    }

    pub fn validate(&self) -> Result<()> {
        let check = |ok: bool, key: &str, message: String| if ok { Ok(()) } else { Err(Error::config(key, message)) };
        check(
            self.model.exists(),
            "model",
            format!("{} does not exist", self.model.display()),
        )?;
        for (i, a) in self.adapters.iter().enumerate() {
            // Models are named by their paths in the report, the base `base`.
            check(
                a.as_os_str() != "base" && !self.adapters[..i].contains(a),
                &format!("adapters[{i}]"),
                format!("`{}` is listed twice or reads as the base model's name: write it as ./{0}", a.display()),
            )?;
            check(
                a.join("adapter_config.json").is_file(),
                &format!("adapters[{i}]"),
                format!("{}: no adapter_config.json there (a PEFT adapter directory)", a.display()),
            )?;
        }
        check(
            self.base || !self.adapters.is_empty(),
            "base",
            "`base: false` with no adapters leaves nothing to evaluate".into(),
        )?;
        if let Some(r) = &self.regression {
            check(r.is_file(), "regression", format!("{} does not exist", r.display()))?;
        }
        check(
            self.output_dir.is_some() || !self.adapters.is_empty(),
            "output_dir",
            "required when no adapter is evaluated (it defaults to the first adapter's directory)".into(),
        )?;
        check(self.max_rows != Some(0), "max_rows", "must be > 0".into())?;
        let g = &self.generation;
        check(g.batch_size > 0, "generation.batch_size", "must be > 0".into())?;
        check(g.max_new_tokens > 0, "generation.max_new_tokens", "must be > 0".into())?;
        check(
            g.temperature.is_finite() && g.temperature >= 0.0,
            "generation.temperature",
            format!("must be a number >= 0, got {}", g.temperature),
        )?;
        check(
            g.top_p > 0.0 && g.top_p <= 1.0,
            "generation.top_p",
            format!("must be in (0, 1], got {}", g.top_p),
        )?;
        check_scorers(&self.scorers, "scorers")?;
        check(
            !self.scorers.is_empty() || self.loss != Some(false) || self.regression.is_some(),
            "scorers",
            "nothing to measure: give scorers, a regression set, or leave `loss` on".into(),
        )?;
        self.data.validate("data").map_err(Error::from)
    }

    /// Where the report goes.
    pub fn output_dir(&self) -> &Path {
        self.output_dir
            .as_deref()
            .or(self.adapters.first().map(PathBuf::as_path))
            .expect("validated: output_dir or an adapter")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(yaml: &str) -> Result<EvalConfig> {
        let dir = std::env::temp_dir().join(format!("temper-eval-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let model = dir.join("model.gguf");
        std::fs::write(&model, b"").unwrap();
        let file = dir.join(format!("eval-{}.yaml", yaml.len()));
        std::fs::write(&file, yaml.replace("MODEL", &model.display().to_string())).unwrap();
        EvalConfig::load(Some(&file), &[])
    }

    #[test]
    fn a_full_config_reads() {
        let c = load(
            "model: MODEL\ndata: {path: x.jsonl}\noutput_dir: out\nscorers:\n  - type: exact_match\n  - type: regex\n    \
             pattern: '#### \\d+$'\n    name: format\n  - {type: rouge, reference: summary}\n  - {type: choice}\n",
        )
        .unwrap();
        assert_eq!(c.scorers.len(), 4);
        assert_eq!(c.scorers[1].name(), "format");
        assert_eq!(c.scorers[2].reference_column(), Some("summary"));
        assert!(!c.scorers[3].generates());
        assert_eq!(c.generation.max_new_tokens, 256);
        assert_eq!(c.output_dir(), Path::new("out"));
    }

    #[test]
    fn bad_configs_name_the_key() {
        let cases = [
            ("model: MODEL\ndata: {path: x}\noutput_dir: o\nscorer: []\n", "unknown field `scorer`"),
            ("model: /nope\ndata: {path: x}\noutput_dir: o\n", "model: /nope does not exist"),
            ("model: MODEL\ndata: {path: x}\n", "output_dir: required"),
            ("model: MODEL\ndata: {path: x}\noutput_dir: o\nadapters: [/nope]\n", "adapters[0]: /nope: no adapter_config.json"),
            (
                "model: MODEL\ndata: {path: x}\noutput_dir: o\nscorers: [{type: regex, pattern: '('}]\n",
                "scorers[0].pattern: not a valid regular expression",
            ),
            (
                "model: MODEL\ndata: {path: x}\noutput_dir: o\nscorers: [{type: rouge}, {type: rouge}]\n",
                "scorers[1]: a second metric named `rouge1`",
            ),
            ("model: MODEL\ndata: {path: x}\noutput_dir: o\nscorers: [{type: bleu2}]\n", "scorers[0].type: unknown variant `bleu2`"),
            (
                "model: MODEL\ndata: {path: x}\noutput_dir: o\nscorers: [{type: regex, pattern: x, name: loss}]\n",
                "scorers[0]: a second metric named `loss`",
            ),
            (
                "model: MODEL\ndata: {path: x}\noutput_dir: o\nscorers: [{type: choice}, {type: contains, name: choice_norm}]\n",
                "scorers[1]: a second metric named `choice_norm`",
            ),
            ("model: MODEL\ndata: {path: x}\noutput_dir: o\nscorers: [{type: choice}, {type: choice, name: c2}]\n", "one `choice`"),
            ("model: MODEL\ndata: {path: x}\nadapters: [base]\n", "adapters[0]: `base` is listed twice or reads as"),
            ("model: MODEL\ndata: {path: x}\noutput_dir: o\ngeneration: {batch_size: 0}\n", "generation.batch_size"),
            ("model: MODEL\ndata: {path: x}\noutput_dir: o\ngeneration: {top_p: 0}\n", "generation.top_p"),
            ("model: MODEL\ndata: {path: x}\noutput_dir: o\nloss: false\n", "scorers: nothing to measure"),
            ("model: MODEL\ndata: {path: x}\noutput_dir: o\nbase: false\n", "base: `base: false`"),
            ("model: MODEL\ndata: {}\noutput_dir: o\n", "data: give `path`"),
        ];
        for (yaml, want) in cases {
            let e = load(yaml).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("eval-"), "{yaml}\n  got: {e}\n  want: {want}");
        }
    }
}
