use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no Hugging Face token: set HF_TOKEN, or run `huggingface-cli login` (which writes {path})")]
    NoToken { path: PathBuf },
    #[error("{method} {url}: the Hub refused the token ({status}): {message}")]
    Unauthorized {
        method: &'static str,
        url: String,
        status: u16,
        message: String,
    },
    #[error("{method} {url}: {status}: {message}")]
    Http {
        method: &'static str,
        url: String,
        status: u16,
        message: String,
    },
    #[error("{method} {url}: {message} (after {attempts} attempts)")]
    Network {
        method: &'static str,
        url: String,
        message: String,
        attempts: u32,
    },
    #[error("{url}: unexpected answer: {message}")]
    Protocol { url: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Path { path: PathBuf, message: String },
    #[error("`{0}` is not a Hub repository id (expected OWNER/NAME)")]
    BadRepoId(String),
    #[error("{repo} at revision {revision} is not in the cache ({cache}) and HF_HUB_OFFLINE is set")]
    Offline {
        repo: String,
        revision: String,
        cache: PathBuf,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
