//! `temper score`: a reward model's score of each row of a dataset, as JSON lines.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use burn::tensor::DType;
use burn::tensor::backend::Backend;
use temper_data::{Batch, Cursor, DataConfig, LoaderOptions, Pipeline};

use crate::backend::BackendJob;

#[derive(Debug, Clone, clap::Args)]
pub struct ScoreArgs {
    /// A reward model: a `*ForSequenceClassification` directory (as `objective: reward` with
    /// full fine-tuning writes it), or the base model with `--adapter`.
    #[arg(long)]
    pub model: PathBuf,
    /// A reward adapter (PEFT SEQ_CLS, with its `score` head), as `objective: reward` writes it.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The rows to score, in any format the trainer reads: preference pairs (each side scored),
    /// prompt/completion, messages or text. File, directory or glob.
    #[arg(long)]
    pub data: String,
    /// Rows per forward pass (a pair is two sequences).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
}

impl BackendJob for ScoreArgs {
    type Output = Result<()>;

    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        let data: DataConfig = serde_json::from_value(serde_json::json!({
            "path": self.data, "shuffle": false, "max_length": null, "packing": false,
        }))
        .context("--data")?;
        let mut loaded = temper_models::load_pretrained::<B>(&self.model, &device, DType::F32)?;
        if let Some(dir) = &self.adapter {
            loaded.model = temper_peft::load_adapter(loaded.model, dir)?.0;
        }
        if loaded.model.score.is_none() {
            bail!(
                "{}: this model has no reward head (`score`): give a reward model (a `*ForSequenceClassification` \
                 directory), or its base with --adapter and an adapter trained with `objective: reward`",
                match &self.adapter {
                    Some(a) => format!("{} with {}", self.model.display(), a.display()),
                    None => self.model.display().to_string(),
                }
            );
        }
        let options = LoaderOptions::one_pass(self.batch_size);
        let pipeline = Arc::new(Pipeline::new(&data, Arc::new(loaded.tokenizer), options)?);
        if pipeline.prompts {
            bail!(
                "{}: the rows have a prompt and nothing to score: give `prompt` + `completion`, `chosen` + `rejected`, \
                 or conversations",
                self.data
            );
        }
        // A classifier's own config names the token its scores skip (transformers reads it); a
        // reward adapter pools as it was trained, at the tokenizer's pad (or EOS) token.
        let pad = match loaded.config.pad_token_id {
            Some(id) if loaded.config.score_head => id,
            _ => pipeline.pad_id(),
        };
        let vocab = loaded.model.vocab_size();
        let (mut row, mut right, mut pairs) = (0usize, 0usize, 0usize);
        let mut out = std::io::stdout().lock();
        for batch in pipeline.clone().spawn(Cursor::default()) {
            let batch = batch?.batch;
            if let Some(id) = batch.max_token_id().filter(|&id| id as usize >= vocab) {
                bail!(
                    "{}: token id {id} is outside the model's vocabulary ({vocab} tokens)",
                    self.data
                );
            }
            let scores = temper_trainer::reward::batch_scores(&loaded.model, &batch, pad, &device);
            let lines: Vec<serde_json::Value> = match &batch {
                Batch::Preference(b) => {
                    let (chosen, rejected) = scores.split_at(b.pairs);
                    chosen
                        .iter()
                        .zip(rejected)
                        .map(|(&c, &r)| {
                            pairs += 1;
                            right += (c > r) as usize;
                            serde_json::json!({"row": row, "chosen": c, "rejected": r})
                        })
                        .collect()
                }
                Batch::Unpaired(b) => scores
                    .iter()
                    .zip(&b.desirable)
                    .map(|(&s, &label)| serde_json::json!({"row": row, "score": s, "label": label}))
                    .collect(),
                Batch::Sft(_) => scores
                    .iter()
                    .map(|&s| serde_json::json!({"row": row, "score": s}))
                    .collect(),
                Batch::Prompts(_) | Batch::Rollout(_) => unreachable!("scored rows are never prompts alone"),
            };
            for mut line in lines {
                line["row"] = row.into();
                row += 1;
                match writeln!(out, "{line}") {
                    // The reader stopped (`| head`): so do we.
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                    other => other?,
                }
            }
        }
        if pairs > 0 {
            eprintln!(
                "{right} of {pairs} pairs scored chosen above rejected ({:.1}%)",
                100.0 * right as f64 / pairs as f64
            );
        }
        Ok(())
    }
}
