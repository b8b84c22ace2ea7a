//! Datasets into training batches: sources (Arrow IPC, Parquet, JSON Lines), TRL's formats,
//! chat rendering and tokenization with TRL's label masks, packing, batching, and a loader
//! thread with a seeded shuffle, rank sharding and a resumable cursor.

pub mod config;
pub mod error;
pub mod eval;
pub mod format;
mod guard;
pub mod loader;
pub mod pack;
pub mod rollout;
pub mod source;
pub mod tokenize;

pub use config::{DataConfig, EvalDataConfig, SourceConfig, Stopping};
pub use error::{Error, Location, Result};
pub use eval::{EvalRow, read_rows};
pub use format::{Content, Format, RowFormat, Sample};
pub use loader::{Batch, Cursor, DataLoader, LoadedBatch, LoaderOptions, Pipeline, Stats, Unpaired};
pub use pack::{PackedRow, PackingStrategy, PreferenceBatch, SftBatch, UnpairedBatch, last_tokens, pack_bfd};
pub use rollout::{PromptBatch, RolloutBatch};
pub use source::{DataFile, FileKind, Record, resolve};
pub use tokenize::{
    EncodeOptions, Encoded, Encoder, IGNORE_INDEX, PreferenceExample, PromptExample, SftExample, Truncation, UnpairedExample,
};
