//! `temper export`: an adapter in another tool's format (llama.cpp's GGUF LoRA for now).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use temper_models::ModelConfig;
use temper_models::gguf::{Gguf, config_from_gguf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// llama.cpp's LoRA adapter (`llama-cli -m BASE.gguf --lora FILE`).
    Gguf,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    /// The LoRA adapter directory (PEFT format).
    #[arg(long)]
    pub adapter: PathBuf,
    /// The base model (Hugging Face directory or GGUF file); only its configuration is read.
    /// Defaults to the adapter's base_model_name_or_path when that is a local path.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: ExportArgs) -> Result<()> {
    let base = match &args.model {
        Some(p) => p.clone(),
        None => {
            let config = temper_peft::LoraConfig::from_file(&args.adapter.join("adapter_config.json"))?;
            match config.base_model_name_or_path {
                Some(p) if Path::new(&p).exists() => PathBuf::from(p),
                // A Hub id: found in the Hugging Face cache, or downloaded there.
                Some(id) if temper_hub::is_repo_id(&id) => temper_hub::resolve(temper_hub::RepoType::Model, &id, None)
                    .map_err(|e| anyhow::anyhow!("--model is needed, or the adapter's base {id} from the Hub: {e}"))?,
                other => bail!(
                    "--model is needed: the adapter's base_model_name_or_path ({}) is not a local path",
                    other.unwrap_or_else(|| "unset".into())
                ),
            }
        }
    };
    let config = if base.is_dir() {
        ModelConfig::from_file(base.join("config.json"))?
    } else {
        config_from_gguf(&Gguf::open(&base)?)?
    };
    match args.format {
        ExportFormat::Gguf => {
            // Errors name the adapter file and key already.
            let n = temper_peft::export_gguf(&args.adapter, &config, &args.out)?;
            eprintln!("wrote {} ({n} LoRA pairs)", args.out.display());
        }
    }
    Ok(())
}
