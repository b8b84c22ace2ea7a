use std::path::PathBuf;

/// Errors name the adapter file and the module or key involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: {key}: {message}")]
    Config {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("{path}: peft_type {peft_type:?} is not supported (Temper reads and writes \"LORA\")")]
    UnsupportedPeftType { path: PathBuf, peft_type: String },
    #[error("target_modules {targets} match no linear layer of this model (its layers are named like {example})")]
    NoTarget { targets: String, example: String },
    #[error("{path}: {key}: {message}")]
    Tensor {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{0}")]
    Unsupported(String),
    /// A setting that does not fit the model it is applied to (a layer it does not have, a
    /// rank larger than a layer); `key` is the `LoraConfig` key.
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
