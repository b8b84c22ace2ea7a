//! A job's configuration and the loop that runs it: forward, loss (from `temper-trl`),
//! backward, accumulation, global-norm clipping, AdamW, schedule, metrics, evaluation,
//! checkpoints and exact resume.

mod blocks;
pub mod card;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod eval;
mod forward;
mod grpo;
pub mod job;
mod kto;
pub mod metrics;
mod objective;
pub mod optim;
mod preference;
pub mod reward;
mod step;
pub mod sync;
pub mod train;

pub use config::{CollectiveEngine, JobConfig, Precision};
pub use error::{Error, Result};
pub use job::{AdapterSpec, Job, ObjectiveSpec, PushTarget};
pub use sync::{Collective, CollectiveError};
pub use train::{Resume, Summary, TrainOptions, train};
