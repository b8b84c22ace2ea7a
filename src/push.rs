//! `temper push`: publish a training output (or any folder) to a Hugging Face Hub repository.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use temper_hub::{HubClient, PushOptions, push_folder};

#[derive(Debug, Clone, clap::Args)]
pub struct PushArgs {
    /// The folder to push (a training output_dir: adapter, model card, config, metrics;
    /// `checkpoint-*` folders and hidden files stay behind).
    pub dir: PathBuf,
    /// The repository, OWNER/NAME; created if missing.
    #[arg(long)]
    pub repo: String,
    /// Create the repository private.
    #[arg(long)]
    pub private: bool,
    /// The branch to commit to (default main).
    #[arg(long)]
    pub revision: Option<String>,
    /// Open a pull request instead of committing to the branch.
    #[arg(long)]
    pub create_pr: bool,
    /// The commit message.
    #[arg(long)]
    pub message: Option<String>,
}

pub fn run(args: PushArgs) -> Result<()> {
    let options = PushOptions {
        repo: args.repo,
        private: args.private,
        revision: args.revision,
        create_pr: args.create_pr,
        message: args.message,
    };
    push(&args.dir, &options)
}

/// Pushes with the endpoint (`HF_ENDPOINT`) and token (`HF_TOKEN` or the login file) of the
/// environment, and says where the result is.
pub fn push(dir: &Path, options: &PushOptions) -> Result<()> {
    let client = HubClient::from_env();
    let report =
        push_folder(&client, dir, options).with_context(|| format!("pushing {} to {}", dir.display(), options.repo))?;
    eprintln!(
        "pushed {} files to {} ({} LFS objects uploaded, {} already there, {} bytes sent)",
        report.files, options.repo, report.lfs_uploaded, report.lfs_skipped, report.bytes_uploaded
    );
    println!("{}", report.pull_request_url.as_deref().unwrap_or(&report.commit_url));
    Ok(())
}
