use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a bad value was found: the file, and the row (counted from 0 within that file) or, for
/// Parquet, the row group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub path: Arc<Path>,
    pub row: Option<u64>,
    pub row_group: Option<usize>,
}

impl Location {
    pub fn file(path: &Arc<Path>) -> Self {
        Self {
            path: path.clone(),
            row: None,
            row_group: None,
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(g) = self.row_group {
            write!(f, ", row group {g}")?;
        }
        if let Some(r) = self.row {
            write!(f, ", row {r}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{key}: {message}")]
    Config { key: String, message: String },
    #[error("{path}: {message}")]
    Source { path: String, message: String },
    #[error("{at}: {message}")]
    File { at: Location, message: String },
    #[error("{at}: column {column:?}: {message}")]
    BadRow {
        at: Location,
        column: String,
        message: String,
    },
    #[error("{at}: column {column:?} is missing (columns: {available})")]
    MissingColumn {
        at: Location,
        column: String,
        available: String,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] temper_models::Error),
    #[error("the data loader thread stopped: {0}")]
    Loader(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Config {
            key: key.into(),
            message: message.into(),
        }
    }

    /// Whether this error is about one row's content, which `skip_bad_rows` may skip; errors
    /// about whole files (unreadable, corrupt, missing columns) never are.
    pub fn is_row_error(&self) -> bool {
        matches!(self, Self::BadRow { .. })
    }
}

pub type Result<T> = std::result::Result<T, Error>;
