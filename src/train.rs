//! `temper train`: run a job from its YAML file.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use burn::backend::Autodiff;
use burn::tensor::DType;
use burn::tensor::backend::Backend;
use temper_trainer::{CollectiveEngine, Job, Resume, TrainOptions};

use crate::backend::{BackendJob, DeviceSpec, dispatch};

#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// The job's YAML file (see configs/).
    pub config: PathBuf,
    /// Override a key: `--set training.learning_rate=1e-4` (repeatable; values are YAML).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Resume from the newest checkpoint in output_dir, or from the checkpoint DIR given.
    #[arg(long, value_name = "DIR", num_args = 0..=1, default_missing_value = LATEST)]
    pub resume: Option<PathBuf>,
}

/// `--resume` without a directory.
const LATEST: &str = "latest";

/// A job with what this process adds to it, run on the backend of its device.
struct TrainJob {
    job: Job,
    dtype: DType,
    options: TrainOptions,
}

impl BackendJob for TrainJob {
    type Output = Result<temper_trainer::Summary>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        Ok(temper_trainer::train::<Autodiff<B>>(
            &self.job,
            &device,
            self.dtype,
            self.options,
        )?)
    }
}

/// `data.pad_to_multiple_of` on GPU devices when the config sets none.
const GPU_PAD_MULTIPLE: usize = 64;

pub fn run(args: TrainArgs, device: Option<DeviceSpec>) -> Result<()> {
    let mut job = Job::load(&args.config, &args.set)?;
    job.resolve_hub_ids()?;
    let device = device.unwrap_or(job.config.device);
    if device != DeviceSpec::Cpu {
        // A GPU backend compiles kernels for each new shape (a minute or more for a step's
        // matmuls): rows padded to a multiple of 64 keep the shapes few. The resolved config
        // saved in output_dir shows it.
        job.config.data.pad_to_multiple_of.get_or_insert(GPU_PAD_MULTIPLE);
    }
    let dtype = job.storage_dtype(device);
    if device == DeviceSpec::Cpu && dtype != DType::F32 && cfg!(feature = "ndarray") {
        bail!(
            "{}: training.precision: f16 is not available on the CPU backend (ndarray); use `bf16`, `f32` or `auto`",
            args.config.display()
        );
    }
    // bf16 products need temper-kernels' CPU kernels (the `ndarray` backend); `flex` keeps its
    // own dtype handling.
    let (products, line) = if cfg!(feature = "ndarray") {
        (job.products(device), job.precision_line(device))
    } else {
        (Default::default(), format!("precision: {dtype:?}").to_lowercase())
    };
    eprintln!("{line}");
    let stop = crate::stop::on_ctrl_c("stopping: saving a checkpoint after this step (Ctrl-C again to quit now)");
    // `temper launch`'s request (and Slurm's `--signal=USR1`): the same, quietly.
    temper_launch::stop_on_signal(stop.clone()).context("installing the stop signal's handler")?;
    let resume = args.resume.map(|p| {
        if p.as_os_str() == LATEST && !p.is_dir() {
            Resume::Latest
        } else {
            Resume::Dir(p)
        }
    });
    if job.push.is_some() && temper_hub::token_from_env().is_none() {
        // Found before training, not after hours of it.
        bail!(
            "{}: hub.push: no Hugging Face token: set HF_TOKEN or run `huggingface-cli login`",
            args.config.display()
        );
    }
    // A worker of a data-parallel job: its rank from `temper launch`, torchrun, Slurm or Open MPI.
    let topology = temper_launch::Topology::from_env().map_err(anyhow::Error::msg)?;
    let rank = topology.as_ref().map_or(0, |t| t.rank);
    let collective = match topology {
        Some(t) => Some(join_collective(&t, device)?),
        None => None,
    };
    let push = job.push.clone();
    let job = TrainJob {
        job,
        dtype,
        options: TrainOptions {
            resume,
            stop,
            stop_after_steps: None,
            collective,
            heartbeat: std::env::var_os("TEMPER_HEARTBEAT").map(PathBuf::from),
            loss_scale: None,
            products,
        },
    };
    let summary = dispatch(device, job).map_err(anyhow::Error::msg)??;
    if rank != 0 {
        return Ok(()); // rank 0 reports and publishes
    }
    let last = summary.losses.last().map_or(f64::NAN, |l| l.1);
    if summary.interrupted {
        eprintln!(
            "stopped at step {}/{}; resume with --resume (loss {last:.4})",
            summary.steps, summary.total_steps
        );
    } else {
        eprintln!(
            "done: {} steps, final loss {last:.4}; output in {}",
            summary.steps,
            summary.output_dir.display()
        );
        if let Some(target) = push {
            let options = temper_hub::PushOptions {
                repo: target.repo,
                private: target.private,
                revision: target.revision,
                create_pr: target.create_pr,
                message: Some(format!("Temper: {} steps, final loss {last:.4}", summary.steps)),
            };
            crate::push::push(&summary.output_dir, &options)?;
        }
    }
    Ok(())
}

/// This worker's collective: the engine `temper launch` chose, or (under another launcher) the
/// one for its device.
fn join_collective(t: &temper_launch::Topology, device: DeviceSpec) -> Result<Arc<dyn temper_trainer::Collective>> {
    let engine = t
        .engine
        .unwrap_or_default()
        .resolve(device)
        .map_err(|e| anyhow::anyhow!("rank {}: {}: {e}", t.rank, temper_launch::ENGINE_VAR))?;
    let joining = |e: temper_trainer::CollectiveError| {
        anyhow::anyhow!(
            "rank {}: joining the {} collective at {}:{}: {e}",
            t.rank,
            engine.name(),
            t.master_addr,
            t.master_port
        )
    };
    match (engine, device) {
        #[cfg(feature = "cuda")]
        (CollectiveEngine::Nccl, DeviceSpec::Cuda(ordinal)) => {
            let c = temper_launch::nccl::NcclCollective::connect(t, ordinal).map_err(joining)?;
            Ok(Arc::new(c))
        }
        (CollectiveEngine::Nccl, _) => {
            bail!(
                "rank {}: the nccl engine needs a binary built with `--features cuda`",
                t.rank
            )
        }
        _ => Ok(Arc::new(
            temper_launch::BurnCollective::connect(t.clone()).map_err(joining)?,
        )),
    }
}
