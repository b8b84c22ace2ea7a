//! Writing a model as a Hugging Face directory: `config.json`, safetensors (sharded with an
//! index past `max_shard_bytes`, as `save_pretrained` does) and the tokenizer files.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::DType;
use burn::tensor::backend::Backend;
use serde_json::json;

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

/// Writes `path` through a temporary file beside it (`.NAME.tmp`), renamed into place once
/// `write` has finished, so a crash or a full disk never leaves a truncated file under the
/// final name (a reader sees the old file or the new one). The temporary is removed on error.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> std::io::Result<()>) -> std::io::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let result = write(&tmp).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// [`write_atomic`] of bytes already in memory.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic(path, |tmp| std::fs::write(tmp, bytes))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A write that fails half-way (a full disk) leaves the old file whole and no temporary.
    #[test]
    fn a_failed_write_keeps_the_old_file() {
        let dir = std::env::temp_dir().join(format!("temper-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("adapter_model.safetensors");
        write_file_atomic(&path, b"old, complete").unwrap();
        let err = write_atomic(&path, |tmp| {
            std::fs::write(tmp, b"new, trunc")?;
            Err(std::io::Error::other("No space left on device"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("No space left"));
        assert_eq!(std::fs::read(&path).unwrap(), b"old, complete");
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, [std::ffi::OsString::from("adapter_model.safetensors")]);
        write_file_atomic(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
