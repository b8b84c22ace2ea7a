//! One entry point for "a model path a user typed": a Hugging Face directory or a GGUF file.

use std::path::{Path, PathBuf};

use burn::tensor::DType;
use burn::tensor::backend::Backend;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gguf::{Gguf, GgufSource, config_from_gguf};
use crate::llama::LlamaForCausalLM;
use crate::tokenizer::Tokenizer;
use crate::weights::SafetensorsSource;

/// A loaded model with what is needed to talk to it.
pub struct Loaded<B: Backend> {
    pub model: LlamaForCausalLM<B>,
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub path: PathBuf,
}

impl<B: Backend> Loaded<B> {
    /// Token ids that end a generation: the config's and the tokenizer's EOS.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        stop_token_ids(&self.config, &self.tokenizer)
    }
}

/// Token ids that end a generation: the config's EOS ids, and the tokenizer's EOS.
pub fn stop_token_ids(config: &ModelConfig, tokenizer: &Tokenizer) -> Vec<u32> {
    let mut ids = config.eos_token_ids.clone();
    if let Some(id) = tokenizer.eos_token_id()
        && !ids.contains(&id)
    {
        ids.push(id);
    }
    ids
}

/// Whether `path` names a GGUF file (by content, not by extension).
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    path.is_file()
        && std::fs::File::open(path)
            .and_then(|mut f| {
                let mut magic = [0u8; 4];
                f.read_exact(&mut magic).map(|_| magic == *b"GGUF")
            })
            .unwrap_or(false)
}

/// Loads a model from a Hugging Face directory (`config.json`, safetensors, `tokenizer.json`)
/// or a GGUF file, storing weights in `dtype`.
pub fn load_pretrained<B: Backend>(path: &Path, device: &B::Device, dtype: DType) -> Result<Loaded<B>> {
    let opened = Opened::new(path)?;
    let (config, tokenizer) = opened.config_and_tokenizer(path)?;
    let model = opened.weights(path, &config, device, dtype)?;
    Ok(Loaded {
        model,
        config,
        tokenizer,
        path: path.to_path_buf(),
    })
}

/// The config and tokenizer of a model directory or GGUF file, without its weights: what a
/// job checks before it spends time loading the model.
pub fn load_config_and_tokenizer(path: &Path) -> Result<(ModelConfig, Tokenizer)> {
    Opened::new(path)?.config_and_tokenizer(path)
}

/// The weights of a model directory or GGUF file, for a `config` already read from it.
pub fn load_weights<B: Backend>(
    path: &Path,
    config: &ModelConfig,
    device: &B::Device,
    dtype: DType,
) -> Result<LlamaForCausalLM<B>> {
    Opened::new(path)?.weights(path, config, device, dtype)
}

/// A model path, checked and (for GGUF) parsed once.
enum Opened {
    Dir,
    Gguf(Gguf),
}

impl Opened {
    fn new(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ));
        }
        if path.is_dir() {
            Ok(Self::Dir)
        } else if is_gguf(path) {
            Ok(Self::Gguf(Gguf::open(path)?))
        } else {
            Err(Error::format(
                path,
                "expected a Hugging Face model directory (config.json + safetensors) or a GGUF file",
            ))
        }
    }

    fn config_and_tokenizer(&self, path: &Path) -> Result<(ModelConfig, Tokenizer)> {
        match self {
            Self::Dir => Ok((
                ModelConfig::from_file(path.join("config.json"))?,
                Tokenizer::from_hf_dir(path)?,
            )),
            Self::Gguf(gguf) => Ok((config_from_gguf(gguf)?, Tokenizer::from_gguf(gguf)?)),
        }
    }

    fn weights<B: Backend>(
        &self,
        path: &Path,
        config: &ModelConfig,
        device: &B::Device,
        dtype: DType,
    ) -> Result<LlamaForCausalLM<B>> {
        match self {
            Self::Dir => LlamaForCausalLM::load(config, &SafetensorsSource::open_dir(path)?, device, dtype),
            Self::Gguf(gguf) => LlamaForCausalLM::load(config, &GgufSource::new(gguf, config)?, device, dtype),
        }
    }
}
