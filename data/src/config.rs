//! The `data:` section of a job's YAML file.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::Format;
use crate::pack::PackingStrategy;
use crate::tokenize::Truncation;

fn default_split() -> String {
    "train".into()
}
fn default_max_length() -> Option<usize> {
    Some(1024)
}
fn default_true() -> bool {
    true
}
fn default_shuffle_buffer() -> usize {
    10_000
}
fn default_packing_window() -> usize {
    2048
}
fn default_prefetch() -> usize {
    8
}

/// Where the rows come from and how they become batches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// One source: a file, directory or glob (the shorthand for a one-entry `sources`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceConfig>,
    /// The split read from `save_to_disk` dictionaries and split-named files.
    #[serde(default = "default_split")]
    pub split: String,
    #[serde(default)]
    pub format: Format,
    /// Column renaming: canonical name (`prompt`, `messages`, …) to the dataset's column.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub columns: BTreeMap<String, String>,
    /// Longest sequence in tokens (TRL's `max_length`); `null` for no limit.
    #[serde(default = "default_max_length")]
    pub max_length: Option<usize>,
    #[serde(default)]
    pub truncation: Truncation,
    #[serde(default)]
    pub packing: bool,
    #[serde(default)]
    pub packing_strategy: PackingStrategy,
    /// Examples packed together at a time; a larger window packs tighter.
    #[serde(default = "default_packing_window")]
    pub packing_window: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_to_multiple_of: Option<usize>,
    /// Loss only on completions; default: on for prompt/completion data (TRL's rule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_only_loss: Option<bool>,
    /// Loss only on assistant turns of conversations.
    #[serde(default)]
    pub assistant_only_loss: bool,
    /// A chat template (Jinja source) that replaces the tokenizer's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    #[serde(default = "default_true")]
    pub shuffle: bool,
    /// Rows held for the streaming shuffle; at least the dataset's size for a full shuffle.
    #[serde(default = "default_shuffle_buffer")]
    pub shuffle_buffer: usize,
    /// With weighted sources: stop an epoch when the first source runs out, or when all have
    /// (restarting the ones that ran out, as `datasets.interleave_datasets` does).
    #[serde(default)]
    pub stopping: Stopping,
    /// Skip rows that cannot be read (counted and reported) instead of stopping.
    #[serde(default)]
    pub skip_bad_rows: bool,
    /// Batches prepared ahead of the trainer.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// Held-out data for evaluation, read with the same format settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalDataConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub path: String,
    /// Sampling weight; when any source has one, sources are interleaved at random.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<Format>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub columns: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalDataConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceConfig>,
    /// Defaults to the training data with this split (e.g. `test`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
    /// Evaluate on at most this many rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rows: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Stopping {
    #[default]
    AllExhausted,
    FirstExhausted,
}

impl DataConfig {
    /// The sources, with the shorthand expanded and per-source settings filled in.
    pub fn resolved_sources(&self) -> Vec<SourceConfig> {
        let mut sources = self.sources.clone();
        if let Some(path) = &self.path {
            sources.insert(
                0,
                SourceConfig {
                    path: path.clone(),
                    weight: None,
                    split: None,
                    format: None,
                    columns: BTreeMap::new(),
                },
            );
        }
        for s in &mut sources {
            s.split.get_or_insert_with(|| self.split.clone());
            s.format.get_or_insert(self.format);
            for (k, v) in &self.columns {
                s.columns.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        sources
    }

    /// The evaluation data as a config of its own, if any.
    pub fn eval_config(&self) -> Option<DataConfig> {
        let eval = self.eval.as_ref()?;
        let mut cfg = self.clone();
        cfg.eval = None;
        if eval.path.is_some() || !eval.sources.is_empty() {
            cfg.path = eval.path.clone();
            cfg.sources = eval.sources.clone();
        }
        if let Some(split) = &eval.split {
            cfg.split = split.clone();
            for s in &mut cfg.sources {
                s.split = Some(split.clone());
            }
        }
        cfg.shuffle = false;
        Some(cfg)
    }

    /// How rows are tokenized under this config; `unpair` and `drop_long_pairs` are the
    /// objective's (KTO's, reward models').
    pub fn encode_options(&self, unpair: bool, drop_long_pairs: bool) -> crate::tokenize::EncodeOptions {
        crate::tokenize::EncodeOptions {
            max_length: self.max_length,
            truncation: self.truncation,
            completion_only_loss: self.completion_only_loss,
            assistant_only_loss: self.assistant_only_loss,
            packing: self.packing,
            chat_template: self.chat_template.clone(),
            unpair,
            drop_long_pairs,
        }
    }

    /// Checks values that are wrong whatever the data; `key` is this section's path (`data`).
    pub fn validate(&self, key: &str) -> Result<()> {
        if self.path.is_none() && self.sources.is_empty() {
            return Err(Error::config(key, "give `path` or a list of `sources`"));
        }
        for (i, s) in self.sources.iter().enumerate() {
            if let Some(w) = s.weight
                && !(w.is_finite() && w > 0.0)
            {
                return Err(Error::config(
                    format!("{key}.sources[{i}].weight"),
                    format!("must be > 0, got {w}"),
                ));
            }
        }
        if self.max_length == Some(0) {
            return Err(Error::config(format!("{key}.max_length"), "must be > 0"));
        }
        if self.packing && self.max_length.is_none() {
            return Err(Error::config(format!("{key}.packing"), "packing needs `max_length`"));
        }
        if self.packing_window == 0 {
            return Err(Error::config(format!("{key}.packing_window"), "must be > 0"));
        }
        if self.shuffle_buffer == 0 {
            return Err(Error::config(format!("{key}.shuffle_buffer"), "must be > 0"));
        }
        // Upper bounds: each sizes a buffer allocated up front, so a typo would abort in the
        // allocator instead of naming the key.
        for (name, value, max) in [
            ("packing_window", self.packing_window, 1usize << 20),
            ("prefetch", self.prefetch, 1 << 12),
            ("max_length", self.max_length.unwrap_or(1), 1 << 24),
        ] {
            if value > max {
                return Err(Error::config(
                    format!("{key}.{name}"),
                    format!("must be at most {max}, got {value}"),
                ));
            }
        }
        if self.prefetch == 0 {
            return Err(Error::config(format!("{key}.prefetch"), "must be > 0"));
        }
        if let Some(eval) = &self.eval
            && eval.max_rows == Some(0)
        {
            return Err(Error::config(format!("{key}.eval.max_rows"), "must be > 0"));
        }
        Ok(())
    }
}
