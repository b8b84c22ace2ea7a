//! `temper eval`: a model and its adapters on held-out rows, side by side.

use std::path::PathBuf;

use anyhow::Result;
use burn::tensor::backend::Backend;
use temper_trainer::eval::{self, EvalConfig};

use crate::backend::{BackendJob, DeviceSpec, dispatch};
use crate::set;

#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// An evaluation's YAML file (see configs/eval-arith.yaml); or give everything as flags.
    pub config: Option<PathBuf>,
    /// Override a key: `--set generation.max_new_tokens=64` (repeatable; values are YAML).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// A Hugging Face model directory or a GGUF file (`model`).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// An adapter compared with the base (repeatable; `adapters`).
    #[arg(long = "adapter")]
    pub adapters: Vec<PathBuf>,
    /// The rows: a file, directory or glob (`data.path`).
    #[arg(long)]
    pub data: Option<String>,
    /// A scorer: exact_match, contains, rouge, bleu, chrf, refusal, choice, or regex=PATTERN
    /// (repeatable; `scorers`).
    #[arg(long = "scorer")]
    pub scorers: Vec<String>,
    /// A regression set (`regression`).
    #[arg(long)]
    pub regression: Option<PathBuf>,
    #[arg(long)]
    pub max_rows: Option<usize>,
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Where eval.json, eval.md and eval_samples.jsonl go (default: the first adapter's).
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
}

impl EvalArgs {
    /// The flags as `--set` overrides (after the file's and `--set`'s, so they win).
    fn overrides(&self) -> Result<Vec<String>> {
        let mut o = self.set.clone();
        if let Some(m) = &self.model {
            set(&mut o, "model", m.display().to_string());
        }
        if !self.adapters.is_empty() {
            let list: Vec<String> = self.adapters.iter().map(|a| a.display().to_string()).collect();
            set(&mut o, "adapters", list);
        }
        if let Some(d) = &self.data {
            set(&mut o, "data.path", d.as_str());
        }
        if !self.scorers.is_empty() {
            let list = self
                .scorers
                .iter()
                .map(|s| match s.split_once('=') {
                    Some(("regex", pattern)) => Ok(serde_json::json!({"type": "regex", "pattern": pattern})),
                    Some((other, _)) => anyhow::bail!("--scorer {s}: only `regex=PATTERN` takes a value, not `{other}`"),
                    None => Ok(serde_json::json!({"type": s})),
                })
                .collect::<Result<Vec<_>>>()?;
            set(&mut o, "scorers", list);
        }
        if let Some(r) = &self.regression {
            set(&mut o, "regression", r.display().to_string());
        }
        if let Some(n) = self.max_rows {
            set(&mut o, "max_rows", n);
        }
        if let Some(n) = self.max_new_tokens {
            set(&mut o, "generation.max_new_tokens", n);
        }
        if let Some(d) = &self.output_dir {
            set(&mut o, "output_dir", d.display().to_string());
        }
        Ok(o)
    }
}

struct EvalJob(EvalConfig);

impl BackendJob for EvalJob {
    type Output = Result<eval::Report>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let report = eval::run::<B>(&self.0, &device, &|what| eprintln!("eval: {what}"))?;
        Ok(report)
    }
}

pub fn run(args: EvalArgs, device: Option<DeviceSpec>) -> Result<()> {
    let overrides = args.overrides()?;
    let config = EvalConfig::load(args.config.as_deref(), &overrides)?;
    let out = config.output_dir().to_path_buf();
    let device = device.unwrap_or(config.device);
    let report = dispatch(device, EvalJob(config)).map_err(anyhow::Error::msg)??;
    print!("{}", eval::markdown(&report));
    eprintln!(
        "eval: wrote {0}/eval.json, {0}/eval.md and {0}/eval_samples.jsonl",
        out.display()
    );
    Ok(())
}
