//! `temper launch`: data-parallel training, one worker per device (see temper-launch).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use temper_launch::{LaunchPlan, run_workers, topology::DEFAULT_PORT};
use temper_trainer::{CollectiveEngine, Job};

use crate::backend::DeviceSpec;

#[derive(Debug, Clone, clap::Args)]
pub struct LaunchArgs {
    /// Workers on this machine (default: one per `--devices` entry, or the job's `launch`).
    #[arg(long)]
    pub nproc_per_node: Option<usize>,
    /// Local device indices, one worker each: `--devices 0,1,2,3`.
    #[arg(long, value_delimiter = ',')]
    pub devices: Option<Vec<usize>>,
    /// Machines in the job.
    #[arg(long)]
    pub nnodes: Option<usize>,
    /// This machine's index among them (0 hosts the rendezvous).
    #[arg(long)]
    pub node_rank: Option<usize>,
    /// Node 0's address, reachable from every machine.
    #[arg(long)]
    pub master_addr: Option<String>,
    #[arg(long)]
    pub master_port: Option<u16>,
    /// Restart the group from its last checkpoint this many times after a failure.
    #[arg(long)]
    pub max_restarts: Option<u32>,
    /// Seconds without a finished step before a worker counts as hung (default 1800).
    #[arg(long)]
    pub hang_timeout: Option<u64>,
    /// The collective engine: `auto` (nccl for CUDA workers, burn otherwise), `nccl`, `burn`.
    #[arg(long)]
    pub engine: Option<CollectiveEngine>,
    /// The job's YAML file.
    pub config: PathBuf,
    /// Override a key, as for `temper train`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

pub fn run(args: LaunchArgs, device: Option<DeviceSpec>) -> Result<()> {
    // The config is checked here, before any worker starts.
    let job = Job::load(&args.config, &args.set)?.config;
    let l = &job.launch;
    let device = device.unwrap_or(job.device);
    let device_kind = match device {
        DeviceSpec::Cpu => "cpu",
        DeviceSpec::Cuda(_) => "cuda",
        DeviceSpec::Wgpu => "wgpu",
    };
    let devices = match (
        args.devices.or(l.devices.clone()),
        args.nproc_per_node.or(l.nproc_per_node),
    ) {
        (Some(d), Some(n)) if d.len() != n => bail!("--devices lists {} devices but --nproc-per-node is {n}", d.len()),
        (Some(d), _) => d,
        (None, Some(n)) => (0..n).collect(),
        (None, None) => vec![0],
    };
    if devices.is_empty() {
        bail!("no worker to start: --nproc-per-node must be at least 1");
    }
    let nnodes = args.nnodes.or(l.nnodes).unwrap_or(1);
    let node_rank = args.node_rank.or(l.node_rank).unwrap_or(0);
    if nnodes == 0 || node_rank >= nnodes {
        bail!("--node-rank {node_rank} must be below --nnodes {nnodes}");
    }
    let master_addr = match args.master_addr.or(l.master_addr.clone()) {
        Some(a) => a,
        None if nnodes == 1 => "127.0.0.1".into(),
        None => bail!("--master-addr (node 0's address) is needed with --nnodes {nnodes}"),
    };
    let (engine, why) = match args.engine.or(l.engine) {
        Some(e) if e != CollectiveEngine::Auto => (
            e,
            if args.engine.is_some() {
                "--engine"
            } else {
                "launch.engine"
            },
        ),
        _ => (CollectiveEngine::Auto, "the device"),
    };
    let mut engine = engine
        .resolve(device)
        .map_err(|e| anyhow::anyhow!("{}: {why}: {e}", args.config.display()))?;
    if devices.len() * nnodes == 1 && why == "the device" {
        // One worker sums nothing: it trains as `temper train` would, needing no NCCL (an
        // explicit `--engine nccl` still runs the NCCL path, as the GPU check does).
        engine = CollectiveEngine::Burn;
    }
    let mut env = vec![(temper_launch::ENGINE_VAR.to_string(), engine.name().to_string())];
    if engine == CollectiveEngine::Nccl {
        env.extend(nccl_library()?);
    }
    let mut train_args = vec!["train".to_string(), args.config.display().to_string()];
    for s in &args.set {
        train_args.extend(["--set".to_string(), s.clone()]);
    }
    let plan = LaunchPlan {
        exe: std::env::current_exe()?,
        train_args,
        device_kind: device_kind.into(),
        devices,
        nnodes,
        node_rank,
        master_addr,
        master_port: args.master_port.or(l.master_port).unwrap_or(DEFAULT_PORT),
        max_restarts: args.max_restarts.or(l.max_restarts).unwrap_or(0),
        hang_timeout: Duration::from_secs(args.hang_timeout.or(l.hang_timeout).unwrap_or(1800)),
        output_dir: job.output_dir.clone(),
        env,
    };
    eprintln!(
        "launch: {} workers on this node ({} in all), engine {} (from {why}), logs in {}",
        plan.devices.len(),
        plan.devices.len() * nnodes,
        engine.name(),
        plan.output_dir.join("logs").display()
    );
    let stop = crate::stop::on_ctrl_c("launch: stopping every worker after this step (Ctrl-C again to quit now)");
    run_workers(&plan, stop)?;
    eprintln!("launch: every worker finished; output in {}", plan.output_dir.display());
    Ok(())
}

/// `LD_LIBRARY_PATH` for workers that load NCCL (nccl_lib.rs says why the launcher sets it).
fn nccl_library() -> Result<Option<(String, String)>> {
    let var = |k: &str| std::env::var(k).ok();
    let Some(library) = temper_launch::nccl_lib::find(var) else {
        bail!(
            "the nccl engine needs NCCL's library (libnccl.so.2), found neither on LD_LIBRARY_PATH, in a Python environment's nvidia/nccl/lib nor in the system's library directories: `pip install nvidia-nccl-cu13` (or install Debian/Ubuntu's libnccl2), set TEMPER_NCCL_LIB=/path/to/libnccl.so.2, or use `--engine burn`"
        );
    };
    let cache = match var("XDG_CACHE_HOME").or_else(|| var("HOME").map(|h| format!("{h}/.cache"))) {
        Some(c) => PathBuf::from(c).join("temper"),
        None => std::env::temp_dir().join("temper"),
    };
    let dir = temper_launch::nccl_lib::link_dir(&library, &cache)
        .map_err(|e| anyhow::anyhow!("NCCL's library {}: {e}", library.display()))?;
    Ok(Some((
        "LD_LIBRARY_PATH".into(),
        temper_launch::nccl_lib::library_path(&dir, var("LD_LIBRARY_PATH")),
    )))
}
