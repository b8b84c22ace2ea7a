//! The model card (`README.md`) of a training output, as PEFT and TRL write theirs: YAML front
//! matter the Hub indexes, then what was trained, on what, how, and with what result. Every
//! field comes from the run's records; what is unknown (a base model loaded from a local file
//! without `model.base_model`) is left out, never left blank.

use std::fmt::Write as _;
use std::path::Path;

use crate::checkpoint::TrainerState;
use crate::config::{JobConfig, Objective};
use crate::error::{Error, Result};
use crate::job::{Job, ObjectiveSpec};
use crate::metrics::Row;

/// What the run did, for the card.
pub struct RunRecord<'a> {
    pub state: &'a TrainerState,
    /// The last logged training row and evaluation row.
    pub last_train: Option<&'a Row>,
    pub last_eval: Option<&'a Row>,
    /// The backend and device, e.g. `ndarray (cpu), f32`.
    pub hardware: String,
}

pub fn write(job: &Job, run: &RunRecord<'_>, dir: &Path) -> Result<()> {
    let path = dir.join("README.md");
    temper_models::atomic::write_file_atomic(&path, render(job, run).as_bytes()).map_err(|e| Error::io(&path, e))
}

fn objective_description(o: Objective) -> &'static str {
    match o {
        Objective::Sft => "supervised fine-tuning (SFT)",
        Objective::Dpo => "direct preference optimization (DPO)",
        Objective::Simpo => "SimPO (simple preference optimization)",
        Objective::Orpo => "ORPO (odds ratio preference optimization)",
        Objective::Kto => "KTO (Kahneman-Tversky optimization)",
        Objective::Reward => "reward modelling (a Bradley-Terry sequence scorer)",
        Objective::Grpo => "GRPO (group relative policy optimization) with online generation",
    }
}

/// YAML-safe scalar.
fn quoted(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

pub fn render(job: &Job, run: &RunRecord<'_>) -> String {
    let card = Card::new(job);
    let mut md = String::new();
    card.front_matter(&mut md);
    card.introduction(&mut md);
    card.how_to_use(&mut md);
    card.training_data(&mut md, run);
    card.procedure(&mut md, run);
    card.results(&mut md, run);
    md
}

/// What every section of the card reads.
struct Card<'a> {
    job: &'a Job,
    lora: bool,
    /// The base model's Hub id, when known.
    base: Option<&'a str>,
    /// The repository (or folder) name the card calls the model.
    name: String,
}

impl<'a> Card<'a> {
    fn new(job: &'a Job) -> Self {
        let config = &job.config;
        let name = config
            .hub
            .repo
            .clone()
            .or_else(|| config.output_dir.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "model".into());
        Self {
            job,
            lora: job.adapter.is_lora(),
            base: config.base_model_id(),
            name,
        }
    }

    /// The YAML the Hub indexes: base model, library, tags, datasets.
    fn front_matter(&self, md: &mut String) {
        let (lora, base, tag) = (self.lora, self.base, self.job.objective.name());
        let hub_datasets: Vec<String> = data_paths(&self.job.config)
            .into_iter()
            .filter_map(|(p, _)| hub_dataset_id(p))
            .collect();
        md.push_str("---\n");
        if let Some(b) = base {
            writeln!(md, "base_model: {}", quoted(b)).unwrap();
        }
        writeln!(md, "library_name: {}", if lora { "peft" } else { "transformers" }).unwrap();
        let reward = matches!(self.job.objective, ObjectiveSpec::Reward(_));
        let pipeline = if reward {
            "text-classification"
        } else {
            "text-generation"
        };
        writeln!(md, "pipeline_tag: {pipeline}").unwrap();
        md.push_str("tags:\n");
        if let (Some(b), true) = (base, lora) {
            writeln!(md, "- {}", quoted(&format!("base_model:adapter:{b}"))).unwrap();
        }
        for tag in [if lora { "lora" } else { "full-fine-tuning" }, tag, "temper"] {
            writeln!(md, "- {tag}").unwrap();
        }
        if !hub_datasets.is_empty() {
            md.push_str("datasets:\n");
            for d in &hub_datasets {
                writeln!(md, "- {}", quoted(d)).unwrap();
            }
        }
        md.push_str("---\n\n");
    }

    /// The title and one sentence on what the model is.
    fn introduction(&self, md: &mut String) {
        let (config, lora, base, name) = (&self.job.config, self.lora, self.base, &self.name);
        let objective = objective_description(self.job.objective.kind());
        let local_base = config.model.path.display().to_string();
        writeln!(md, "# {name}\n").unwrap();
        let base_text = match base {
            Some(b) => format!("[{b}](https://huggingface.co/{b})"),
            None => format!("`{local_base}` (a local model)"),
        };
        let what = if lora {
            format!(
                "A LoRA adapter (r = {}, alpha = {}) for {base_text}",
                config.adapter.r, config.adapter.lora_alpha
            )
        } else {
            format!("A full fine-tune of {base_text}")
        };
        writeln!(
            md,
            "{what}, trained by {objective} with [Temper](https://github.com/temper-rs/temper) {}.\n",
            env!("CARGO_PKG_VERSION")
        )
        .unwrap();
    }

    fn how_to_use(&self, md: &mut String) {
        let (lora, base, name) = (self.lora, self.base, &self.name);
        md.push_str("## How to use\n\n");
        // A reward model loads with its classification head; PEFT restores `score` from the
        // adapter.
        let (class, extra) = match self.job.objective {
            ObjectiveSpec::Reward(_) => ("AutoModelForSequenceClassification", ", num_labels=1"),
            _ => ("AutoModelForCausalLM", ""),
        };
        match (lora, base) {
            (true, Some(b)) => writeln!(
                md,
                "```python\nfrom peft import PeftModel\nfrom transformers import {class}, AutoTokenizer\n\n\
             base = {class}.from_pretrained({b:?}{extra})\n\
             model = PeftModel.from_pretrained(base, {name:?})\n\
             tokenizer = AutoTokenizer.from_pretrained({b:?})\n```\n"
            )
            .unwrap(),
            (true, None) => md.push_str(
                "The base was loaded from a local file, so its Hub id is not recorded here (set `model.base_model` in \
             the job to record it); load the base as you have it, then `PeftModel.from_pretrained(base, DIR)`.\n\n",
            ),
            (false, _) => writeln!(
                md,
                "```python\nfrom transformers import {class}, AutoTokenizer\n\n\
             model = {class}.from_pretrained({name:?})\n\
             tokenizer = AutoTokenizer.from_pretrained({name:?})\n```\n"
            )
            .unwrap(),
        }
        if matches!(self.job.objective, ObjectiveSpec::Reward(_)) && lora {
            md.push_str(
                "Scores are read at each sequence's last token that is not the pad token: set \
                 `model.config.pad_token_id` to the tokenizer's pad token (or EOS) id, as training did. With \
                 Temper: `temper score --model BASE --adapter DIR --data FILE` prints each row's score; `temper \
                 merge` folds the adapter into a `*ForSequenceClassification` directory.\n\n",
            );
        } else if matches!(self.job.objective, ObjectiveSpec::Reward(_)) {
            md.push_str(
                "Scores are read at each sequence's last token that is not the pad token (`pad_token_id` in \
                 `config.json`). With Temper: `temper score --model DIR --data FILE` prints each row's score.\n\n",
            );
        } else if lora {
            md.push_str(
                "With Temper: `temper generate --model BASE --adapter DIR \"prompt\"`; `temper merge` folds it into \
             the base, and `temper export --format gguf` writes a llama.cpp adapter.\n\n",
            );
        }
        md.push_str(
            "Intended use: the task of the training data below. The card records how the model was trained; it \
         was not evaluated for safety or bias beyond the metrics listed.\n\n",
        );
    }

    fn training_data(&self, md: &mut String, run: &RunRecord<'_>) {
        md.push_str("## Training data\n\n| source | weight |\n|---|---|\n");
        for (p, w) in data_paths(&self.job.config) {
            let shown = hub_dataset_id(p).map_or_else(
                || format!("`{p}`"),
                |id| format!("[{id}](https://huggingface.co/datasets/{id})"),
            );
            writeln!(md, "| {shown} | {} |", w.map_or("—".into(), |w| format!("{w}"))).unwrap();
        }
        let unit = if self.job.objective.is_unpaired() {
            "completions"
        } else if self.job.objective.is_preference() {
            "pairs"
        } else {
            "examples"
        };
        writeln!(
            md,
            "\nSeen in training: {} {unit}, {} tokens (padding excluded), over {} optimizer steps.\n",
            run.state.num_examples, run.state.num_tokens, run.state.step
        )
        .unwrap();
    }

    /// The hyperparameters, and the resolved job config.
    fn procedure(&self, md: &mut String, run: &RunRecord<'_>) {
        let (job, config, lora) = (self.job, &self.job.config, self.lora);
        let t = &config.training;
        let tag = job.objective.name();
        md.push_str("## Training procedure\n\n| hyperparameter | value |\n|---|---|\n");
        let mut row = |k: &str, v: String| writeln!(md, "| {k} | {v} |").unwrap();
        row("objective", tag.into());
        match &job.objective {
            ObjectiveSpec::Dpo(d) => {
                let losses: Vec<String> = d
                    .params()
                    .losses
                    .iter()
                    .map(|(l, w)| format!("{}×{w}", serde_json::to_string(l).unwrap_or_default().trim_matches('"')))
                    .collect();
                row("dpo beta", d.beta.to_string());
                row("dpo losses", losses.join(" + "));
                row(
                    "reference",
                    if d.reference_free {
                        "none (reference-free)".into()
                    } else {
                        "the base with the adapter off".into()
                    },
                );
            }
            ObjectiveSpec::Simpo(s) => {
                row(
                    "simpo beta, gamma, cpo_alpha",
                    format!("{}, {}, {}", s.beta, s.gamma, s.cpo_alpha),
                );
            }
            ObjectiveSpec::Orpo(o) => row("orpo beta", o.beta.to_string()),
            ObjectiveSpec::Kto(k) => {
                row(
                    "kto beta, desirable / undesirable weight",
                    format!("{}, {} / {}", k.beta, k.desirable_weight, k.undesirable_weight),
                );
                row(
                    "kto loss",
                    serde_json::to_string(&k.loss_type)
                        .unwrap_or_default()
                        .trim_matches('"')
                        .into(),
                );
                row("reference", "the base with the adapter off".into());
            }
            ObjectiveSpec::Reward(r) => {
                row(
                    "head",
                    "`score` (hidden -> 1, no bias), read at each sequence's last token".into(),
                );
                if let Some(c) = r.center_rewards_coefficient {
                    row("center_rewards_coefficient", c.to_string());
                }
            }
            ObjectiveSpec::Grpo(g) => {
                let name = |v: serde_json::Result<String>| v.unwrap_or_default().trim_matches('"').to_string();
                row(
                    "grpo generations, max completion length, temperature",
                    format!("{}, {}, {}", g.num_generations, g.max_completion_length, g.temperature),
                );
                row(
                    "grpo loss, scale_rewards, beta, epsilon",
                    format!(
                        "{}, {}, {}, {}",
                        name(serde_json::to_string(&g.loss_type)),
                        name(serde_json::to_string(&g.scale_rewards)),
                        g.beta,
                        g.epsilon
                    ),
                );
                let rewards: Vec<&str> = g.rewards.iter().map(|r| r.name()).collect();
                row("rewards", rewards.join(", "));
            }
            ObjectiveSpec::Sft => {}
        }
        if lora {
            let targets = serde_yaml::to_string(&config.adapter.target_modules).unwrap_or_default();
            row(
                "adapter",
                format!(
                    "LoRA r={} alpha={} dropout={}{}{}",
                    config.adapter.r,
                    config.adapter.lora_alpha,
                    config.adapter.lora_dropout,
                    if config.adapter.use_rslora { ", rsLoRA" } else { "" },
                    if config.adapter.use_dora { ", DoRA" } else { "" },
                ),
            );
            row("target modules", targets.trim().replace('\n', " "));
            if let Some(q) = config.adapter.quantize_base {
                row("base weights", format!("{q:?} (QLoRA-style)").to_lowercase());
            }
        }
        row(
            "learning rate",
            format!("{} ({:?} schedule)", t.learning_rate, t.lr_scheduler).to_lowercase(),
        );
        row(
            "warmup",
            if t.warmup_steps > 0 {
                format!("{} steps", t.warmup_steps)
            } else {
                format!("ratio {}", t.warmup_ratio)
            },
        );
        row(
            "batch",
            format!(
                "{} per micro-batch × {} accumulation steps",
                t.micro_batch_size, t.gradient_accumulation_steps
            ),
        );
        row("steps", format!("{} of {}", run.state.step, run.state.total_steps));
        row(
            "optimizer",
            format!(
                "AdamW (betas {}, {}; eps {}; weight decay {})",
                t.adam_beta1, t.adam_beta2, t.adam_epsilon, t.weight_decay
            ),
        );
        row("max grad norm", t.max_grad_norm.to_string());
        row(
            "max length",
            config.data.max_length.map_or("none".into(), |m| m.to_string()),
        );
        row("packing", config.data.packing.to_string());
        row("backend, precision", run.hardware.clone());
        row("seed", t.seed.to_string());
        md.push_str("\n<details><summary>The resolved job config</summary>\n\n```yaml\n");
        md.push_str(&config.to_yaml());
        md.push_str("```\n\n</details>\n\n");
    }

    /// The last logged training and evaluation rows, and the versions.
    fn results(&self, md: &mut String, run: &RunRecord<'_>) {
        md.push_str("## Results\n\n");
        for (title, r) in [
            ("Last training step", run.last_train),
            ("Last evaluation", run.last_eval),
        ] {
            let Some(r) = r else { continue };
            writeln!(md, "{title} (step {}):\n\n| metric | value |\n|---|---|", r.step).unwrap();
            for (k, v) in &r.values {
                writeln!(md, "| {k} | {v:.6} |").unwrap();
            }
            md.push('\n');
        }
        md.push_str("Every logged step is in `metrics.jsonl` and the TensorBoard files under `runs/`.\n\n");

        md.push_str("## Framework versions\n\n");
        writeln!(md, "- Temper {}", env!("CARGO_PKG_VERSION")).unwrap();
        md.push_str("- burn 0.21.0\n");
        writeln!(md, "- backend: {}", run.hardware).unwrap();
    }
}

/// Every data source's path (as resolved) and its mixing weight.
fn data_paths(job: &JobConfig) -> Vec<(&str, Option<f64>)> {
    let d = &job.data;
    let mut out: Vec<(&str, Option<f64>)> = d.path.iter().map(|p| (p.as_str(), None)).collect();
    out.extend(d.sources.iter().map(|s| (s.path.as_str(), s.weight)));
    out
}

/// `OWNER/NAME` of a dataset resolved from the Hub cache.
fn hub_dataset_id(path: &str) -> Option<String> {
    match temper_hub::repo_of_snapshot(Path::new(path))? {
        (temper_hub::RepoType::Dataset, id) => Some(id),
        _ => None,
    }
}
