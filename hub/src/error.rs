use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use regex::Regex;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no Hugging Face token: set HF_TOKEN, or run `huggingface-cli login` (which writes {path})")]
    NoToken { path: PathBuf },
    #[error(
        "{method} {}: the Hub refused the token ({status}): {}",
        redact(url),
        redact(message)
    )]
    Unauthorized {
        method: &'static str,
        url: String,
        status: u16,
        message: String,
    },
    #[error("{method} {}: {status}: {}", redact(url), redact(message))]
    Http {
        method: &'static str,
        url: String,
        status: u16,
        message: String,
    },
    #[error("{method} {}: {} (after {attempts} attempts)", redact(url), redact(message))]
    Network {
        method: &'static str,
        url: String,
        message: String,
        attempts: u32,
    },
    #[error("{}: unexpected answer: {}", redact(url), redact(message))]
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

/// Tokens this process holds (every [`crate::HubClient`]'s), never to be printed.
static SECRETS: Mutex<Vec<String>> = Mutex::new(Vec::new());

pub(crate) fn register_secret(secret: &str) {
    let mut secrets = SECRETS.lock().unwrap_or_else(|e| e.into_inner());
    if !secret.is_empty() && !secrets.iter().any(|s| s == secret) {
        secrets.push(secret.to_string());
    }
}

/// What every error that carries text from the network goes through before it is shown: a
/// server may echo the request back (the `Authorization` header with it), and `HF_ENDPOINT`
/// may hold credentials in its URL. Removes the process's tokens, `Bearer`/`Basic` values,
/// anything shaped like a Hugging Face token (`hf_…`), and a URL's `user:password@`.
pub fn redact(text: &str) -> String {
    static PATTERNS: OnceLock<[(Regex, &str); 5]> = OnceLock::new();
    let patterns = PATTERNS.get_or_init(|| {
        let re = |p: &str| Regex::new(p).expect("a valid pattern");
        [
            // An echoed header, to the end of its line or JSON string.
            (
                re(r#"(?i)\b(authorization)(["']?\s*[:=]\s*["']?)[^\r\n"',}]+"#),
                "$1$2***",
            ),
            (re(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), "$1 ***"),
            (
                re(r#"(?i)\b(token|password|secret)(["']?\s*[:=]\s*["']?)[^\s"',}]+"#),
                "$1$2***",
            ),
            (re(r"\bhf_[A-Za-z0-9]{6,}"), "hf_***"),
            (re(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@"), "$1***@"),
        ]
    });
    let mut out = text.to_string();
    for secret in SECRETS.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        out = out.replace(secret.as_str(), "***");
    }
    for (re, with) in patterns {
        out = re.replace_all(&out, *with).into_owned();
    }
    out
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
