use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {key}: {message}", file.display())]
    Config {
        file: PathBuf,
        key: String,
        message: String,
    },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Model(#[from] temper_models::Error),
    #[error(transparent)]
    Peft(#[from] temper_peft::Error),
    #[error(transparent)]
    Data(#[from] temper_data::Error),
    #[error("checkpoint {}: {message}", path.display())]
    Checkpoint { path: PathBuf, message: String },
    #[error("rank {rank}: collective: {source}")]
    Collective {
        rank: usize,
        source: crate::sync::CollectiveError,
    },
    #[error(
        "{during}: token id {id} is outside the model's vocabulary ({vocab} tokens); \
         pre-tokenized `input_ids` and `labels` must come from this model's tokenizer"
    )]
    TokenOutOfVocab { during: String, id: u32, vocab: usize },
    #[error("step {step}: the loss is {value}; training stopped (the last good checkpoint is kept)")]
    NonFiniteLoss { step: u64, value: f32 },
    /// A GRPO reward function failed (a command that exited, hung or printed garbage, a row
    /// without the column it reads).
    #[error("reward `{name}` (training.grpo.rewards[{index}]): {message}")]
    Reward { name: String, index: usize, message: String },
}

impl Error {
    /// A config error whose file is filled in by [`crate::Job::load`].
    pub(crate) fn config(key: &str, message: impl Into<String>) -> Self {
        Self::Config {
            file: PathBuf::new(),
            key: key.to_string(),
            message: message.into(),
        }
    }

    /// Names `file` in a config error that was found without it (against the model or data).
    pub(crate) fn in_file(self, file: &std::path::Path) -> Self {
        match self {
            Self::Config { file: f, key, message } if f.as_os_str().is_empty() => Self::Config {
                file: file.to_path_buf(),
                key,
                message,
            },
            Self::Data(temper_data::Error::Config { key, message }) => Self::Config {
                file: file.to_path_buf(),
                key,
                message,
            },
            other => other,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
