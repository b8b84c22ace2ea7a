//! A job's configuration and the loop that runs it: forward, loss (from `temper-trl`),
//! backward, accumulation, global-norm clipping, AdamW, schedule, metrics, evaluation,
//! checkpoints and exact resume.

mod blocks;
pub mod card;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod metrics;
pub mod optim;
mod preference;
pub mod sync;
pub mod train;

pub use config::{JobConfig, Precision};
pub use error::{Error, Result};
pub use sync::Collective;
pub use train::{Resume, Summary, TrainOptions, train};
