use std::path::PathBuf;

/// Everything that can go wrong between a file on disk and a runnable model.
///
/// Every variant names the file and, where there is one, the tensor or key involved, so a
/// user can tell a truncated download from an unsupported checkpoint without a debugger.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: invalid JSON: {error}")]
    Json { path: PathBuf, error: serde_json::Error },
    #[error("{path}: {key}: {message}")]
    Config {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("{path}: unsupported model_type {model_type:?} (supported: llama, mistral, qwen2, qwen3, gemma3_text)")]
    UnsupportedModelType { path: PathBuf, model_type: String },
    #[error("{path}: unsupported rope type {rope_type:?} (supported: default, linear, llama3)")]
    UnsupportedRope { path: PathBuf, rope_type: String },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{path}: tensor {tensor}: {message}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        message: String,
    },
    #[error("{path}: tensor {tensor} not found in the checkpoint")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: tensor {tensor}: expected shape {expected:?}, found {found:?}")]
    Shape {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tensor {tensor}: unsupported GGUF tensor type {ggml_type}")]
    UnsupportedQuant {
        path: PathBuf,
        tensor: String,
        ggml_type: String,
    },
    #[error("tokenizer ({origin}): {message}")]
    Tokenizer { origin: String, message: String },
    #[error("chat template ({origin}): {message}")]
    Template { origin: String, message: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("generate: {0}")]
    Generate(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error: source,
        }
    }
    pub(crate) fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            message: message.into(),
        }
    }
    pub(crate) fn tensor(path: impl Into<PathBuf>, tensor: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Tensor {
            path: path.into(),
            tensor: tensor.into(),
            message: message.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
