//! Writing a model as a Hugging Face directory: `config.json`, safetensors (sharded with an
//! index past `max_shard_bytes`, as `save_pretrained` does) and the tokenizer files.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::DType;
use burn::tensor::backend::Backend;
use serde_json::json;

use crate::atomic::{write_atomic, write_file_atomic};
use crate::config::{CheckpointDtype, ModelConfig};
use crate::error::{Error, Result};
use crate::llama::LlamaForCausalLM;
use crate::tokenizer::Tokenizer;

/// transformers' default `max_shard_size` ("5GB").
pub const DEFAULT_SHARD_BYTES: usize = 5_000_000_000;

fn st_dtype(d: CheckpointDtype) -> (DType, safetensors::Dtype) {
    match d {
        CheckpointDtype::F32 => (DType::F32, safetensors::Dtype::F32),
        CheckpointDtype::F16 => (DType::F16, safetensors::Dtype::F16),
        CheckpointDtype::BF16 => (DType::BF16, safetensors::Dtype::BF16),
    }
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialize") + "\n";
    write_file_atomic(path, text.as_bytes()).map_err(|e| Error::io(path, e))
}

/// Writes `config.json` and the weights. Adapters must have been merged (they are not saved).
pub fn save_pretrained<B: Backend>(
    model: &LlamaForCausalLM<B>,
    config: &ModelConfig,
    dir: &Path,
    dtype: CheckpointDtype,
    max_shard_bytes: usize,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let config_json = config
        .to_hf_json(dtype)
        .map_err(|m| Error::format(dir.join("config.json"), m))?;
    write_json(&dir.join("config.json"), &config_json)?;
    let (burn_dtype, st) = st_dtype(dtype);
    // Tensors come off the device one group at a time only as far as the shard needs them;
    // for the models Temper merges on one machine, holding the list is fine.
    let tensors = model.checkpoint_tensors(burn_dtype);
    let mut shards: Vec<Vec<(String, burn::tensor::TensorData)>> = vec![vec![]];
    let mut size = 0;
    for (name, data) in tensors {
        let bytes = data.as_bytes().len();
        if size > 0 && size + bytes > max_shard_bytes {
            shards.push(vec![]);
            size = 0;
        }
        size += bytes;
        shards.last_mut().expect("one shard").push((name, data));
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut total = 0usize;
    for (i, shard) in shards.iter().enumerate() {
        let file = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        };
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = shard
            .iter()
            .map(|(name, data)| {
                total += data.as_bytes().len();
                weight_map.insert(name.clone(), file.clone());
                let view = safetensors::tensor::TensorView::new(st, data.shape.to_vec(), data.as_bytes())
                    .expect("shape and bytes agree");
                (name.clone(), view)
            })
            .collect();
        let metadata = Some([("format".to_string(), "pt".to_string())].into_iter().collect());
        let path = dir.join(&file);
        write_atomic(&path, |tmp| {
            safetensors::serialize_to_file(views, metadata, tmp).map_err(std::io::Error::other)
        })
        .map_err(|e| Error::format(&path, e.to_string()))?;
    }
    if n > 1 {
        write_json(
            &dir.join("model.safetensors.index.json"),
            &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
        )?;
    }
    Ok(())
}

impl Tokenizer {
    /// Writes `tokenizer.json` and a `tokenizer_config.json` carrying the special tokens and
    /// the chat template, which `AutoTokenizer.from_pretrained` reads.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        let path = dir.join("tokenizer.json");
        write_atomic(&path, |tmp| {
            self.inner_tokenizer().save(tmp, false).map_err(std::io::Error::other)
        })
        .map_err(|e| Error::Tokenizer {
            origin: path.display().to_string(),
            message: e.to_string(),
        })?;
        write_json(
            &dir.join("tokenizer_config.json"),
            &json!({
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": self.bos_token,
                "eos_token": self.eos_token,
                "pad_token": self.pad_token,
                "add_bos_token": self.add_bos_token,
                "chat_template": self.chat_template,
                "clean_up_tokenization_spaces": false,
            }),
        )
    }
}
