//! `temper merge`: fold a LoRA adapter into its base and write a Hugging Face model directory.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use burn::tensor::DType;
use burn::tensor::backend::Backend;
use temper_models::config::CheckpointDtype;
use temper_models::save::{DEFAULT_SHARD_BYTES, save_pretrained};

use crate::backend::BackendJob;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MergeDtype {
    F32,
    F16,
    Bf16,
}

#[derive(Debug, Clone, clap::Args)]
pub struct MergeArgs {
    /// The base model: a Hugging Face directory or a GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    /// The LoRA adapter directory (PEFT format).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output directory (config.json, safetensors, tokenizer files).
    #[arg(long)]
    pub out: PathBuf,
    /// Storage dtype of the merged weights.
    #[arg(long, value_enum, default_value_t = MergeDtype::Bf16)]
    pub dtype: MergeDtype,
}

/// Tokenizer and generation files copied as they are from a Hugging Face base directory.
const COPIED: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "tokenizer.model",
];

impl BackendJob for MergeArgs {
    type Output = Result<()>;

    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let dtype = match self.dtype {
            MergeDtype::F32 => CheckpointDtype::F32,
            MergeDtype::F16 => CheckpointDtype::F16,
            MergeDtype::Bf16 => CheckpointDtype::BF16,
        };
        // Merge in f32 whatever the output dtype, so rounding happens once.
        let loaded = temper_models::load_pretrained::<B>(&self.model, &device, DType::F32)?;
        let (model, _) = temper_peft::load_adapter(loaded.model, &self.adapter)?;
        let mut model = temper_peft::merge_adapters(model);
        let mut config = loaded.config.clone();
        if model.score.is_some() && !config.score_head {
            // A reward adapter (its `score` head saved with it) merges into a classifier.
            config.score_head = true;
            // Training pooled at the tokenizer's pad (or EOS) token: so must the classifier.
            config.pad_token_id = loaded.tokenizer.pad_token_id().or(config.pad_token_id);
            model.lm_head = None;
        }
        save_pretrained(&model, &config, &self.out, dtype, DEFAULT_SHARD_BYTES)?;
        if self.model.is_dir() {
            copy_tokenizer_files(&self.model, &self.out, dtype, &config)?;
        } else {
            loaded.tokenizer.save_pretrained(&self.out)?;
        }
        eprintln!(
            "merged {} into {} -> {}",
            self.adapter.display(),
            self.model.display(),
            self.out.display()
        );
        Ok(())
    }
}

fn copy_tokenizer_files(
    from: &Path,
    to: &Path,
    dtype: CheckpointDtype,
    merged: &temper_models::ModelConfig,
) -> Result<()> {
    for name in COPIED {
        let src = from.join(name);
        if src.exists() {
            std::fs::copy(&src, to.join(name)).with_context(|| format!("copying {}", src.display()))?;
        }
    }
    // Keep the base's own config.json (every key transformers wrote), with the new dtype.
    let src = from.join("config.json");
    let text = std::fs::read_to_string(&src).with_context(|| format!("reading {}", src.display()))?;
    let mut config: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", src.display()))?;
    let key = if config.get("dtype").is_some() {
        "dtype"
    } else {
        "torch_dtype"
    };
    config[key] = serde_json::json!(dtype.torch_name());
    if merged.score_head {
        // What the written config says of the classifier head, over the base's causal-LM keys.
        let ours = merged.to_hf_json(dtype).map_err(anyhow::Error::msg)?;
        for k in ["architectures", "id2label", "label2id", "pad_token_id"] {
            config[k] = ours[k].clone();
        }
    }
    std::fs::write(to.join("config.json"), serde_json::to_string_pretty(&config)? + "\n")?;
    Ok(())
}
