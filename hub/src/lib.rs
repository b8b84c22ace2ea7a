//! The Hugging Face Hub, spoken as `huggingface_hub` speaks it: the token and endpoint from the
//! same environment variables and files, repositories created and folders pushed through the
//! HTTP API (preupload, LFS batch upload, one NDJSON commit), and Hub ids resolved to snapshot
//! folders in the same cache layout, so files Python tools downloaded are reused offline.

pub mod cache;
pub mod client;
pub mod error;
pub mod push;

pub use cache::{RepoType, cache_dir, repo_of_snapshot, resolve};
pub use client::{HubClient, is_repo_id, token_from_env};
pub use error::{Error, Result};
pub use push::{PushOptions, PushReport, push_folder};
