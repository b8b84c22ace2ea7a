//! `temper launch`: one worker process per local device, each a `temper train` with its rank in
//! torchrun's variables. The coordinator watches them: when one exits with an error, dies by a
//! signal or stops reporting steps for longer than the hang timeout, it stops the others and
//! reports which rank failed and why, with the end of its log; with restarts left it starts the
//! whole group again from the last complete checkpoint. Ctrl-C asks every worker to save and
//! stop, and no worker outlives the coordinator.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crate::topology::Topology;

/// What to start.
#[derive(Debug, Clone)]
pub struct LaunchPlan {
    /// The `temper` executable.
    pub exe: PathBuf,
    /// `train CONFIG --set ...`: the worker's command line, without `--resume`.
    pub train_args: Vec<String>,
    /// Device kind of the workers: `cpu`, `cuda` (worker i gets `cuda:devices[i]`) or `wgpu`.
    pub device_kind: String,
    /// One worker per entry: the local device index each drives.
    pub devices: Vec<usize>,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    pub max_restarts: u32,
    /// A worker that reports no finished step for this long is taken as hung.
    pub hang_timeout: Duration,
    /// The job's output directory: checkpoints to restart from, and `logs/rank-N.log`.
    pub output_dir: PathBuf,
    /// Variables set for every worker (the collective engine, NCCL's library path).
    pub env: Vec<(String, String)>,
}

/// Why a worker stopped the group.
#[derive(Debug, Clone)]
pub struct WorkerFailure {
    pub rank: usize,
    pub reason: String,
    /// The last lines of its log.
    pub tail: Vec<String>,
    pub log: PathBuf,
}

impl std::fmt::Display for WorkerFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "rank {} {}; the end of {}:",
            self.rank,
            self.reason,
            self.log.display()
        )?;
        for line in &self.tail {
            writeln!(f, "  | {line}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{failure}{}", if *.restarts > 0 { format!("(after {} restarts)", .restarts) } else { String::new() })]
    WorkerFailed { failure: Box<WorkerFailure>, restarts: u32 },
    #[error("interrupted: every worker was asked to save a checkpoint and stop")]
    Interrupted,
    #[error("starting worker {rank}: {source}")]
    Spawn { rank: usize, source: std::io::Error },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

struct Worker {
    rank: usize,
    child: Child,
    log: PathBuf,
    heartbeat: PathBuf,
    started: Instant,
}

const TAIL_LINES: usize = 20;

/// Runs the group until every worker succeeds, or a failure with no restart left, or `stop`.
pub fn run_workers(plan: &LaunchPlan, stop: Arc<AtomicBool>) -> Result<(), LaunchError> {
    let logs = plan.output_dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| LaunchError::Io {
        path: logs.clone(),
        source: e,
    })?;
    let mut restarts = 0;
    loop {
        let resume = has_checkpoint(&plan.output_dir);
        if restarts > 0 {
            eprintln!(
                "launch: restart {restarts}/{} {}",
                plan.max_restarts,
                if resume {
                    "from the last checkpoint"
                } else {
                    "from the start (no checkpoint yet)"
                }
            );
        }
        let mut workers = spawn_all(plan, &logs, resume, restarts)?;
        match watch(plan, &mut workers, &stop) {
            Outcome::Done => return Ok(()),
            Outcome::Interrupted => return Err(LaunchError::Interrupted),
            Outcome::Failed(failure) => {
                eprintln!("launch: {failure}");
                if restarts >= plan.max_restarts {
                    return Err(LaunchError::WorkerFailed {
                        failure: Box::new(failure),
                        restarts,
                    });
                }
                restarts += 1;
            }
        }
    }
}

/// Whether the trainer would find a complete checkpoint to resume from.
fn has_checkpoint(dir: &Path) -> bool {
    temper_trainer::checkpoint::list(dir).is_ok_and(|found| !found.is_empty())
}

fn spawn_all(plan: &LaunchPlan, logs: &Path, resume: bool, attempt: u32) -> Result<Vec<Worker>, LaunchError> {
    let local_world = plan.devices.len();
    let world = plan.nnodes * local_world;
    // A restarted group on one machine takes fresh ports: the last group's may linger.
    let port = if plan.nnodes == 1 {
        plan.master_port + attempt as u16 * Topology::port_span(world)
    } else {
        plan.master_port
    };
    let mut workers = Vec::new();
    for (local_rank, &device) in plan.devices.iter().enumerate() {
        let rank = plan.node_rank * local_world + local_rank;
        let log = logs.join(format!("rank-{rank}.log"));
        let heartbeat = logs.join(format!("rank-{rank}.heartbeat"));
        let _ = std::fs::remove_file(&heartbeat);
        let open = |path: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| LaunchError::Io {
                    path: path.to_path_buf(),
                    source: e,
                })
        };
        let file = open(&log)?;
        // burn-collective prints a line on stdout per connection (one per step); it goes to a
        // file of its own so the log (stderr: progress, errors) stays readable.
        let stdout = open(&logs.join(format!("rank-{rank}.stdout")))?;
        let mut cmd = Command::new(&plan.exe);
        cmd.args(&plan.train_args);
        if resume {
            cmd.arg("--resume");
        }
        let device_arg = match plan.device_kind.as_str() {
            "cuda" => format!("cuda:{device}"),
            other => other.to_string(),
        };
        cmd.arg("--device").arg(device_arg);
        cmd.env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local_rank.to_string())
            .env("LOCAL_WORLD_SIZE", local_world.to_string())
            .env("MASTER_ADDR", &plan.master_addr)
            .env("MASTER_PORT", port.to_string())
            .env("TEMPER_HEARTBEAT", &heartbeat)
            .envs(plan.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout);
        // Rank 0's progress also goes to the terminal.
        cmd.stderr(if rank == 0 { Stdio::piped() } else { Stdio::from(file) });
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                // Own process group: the terminal's Ctrl-C reaches the coordinator alone, which
                // then asks each worker once. Die with the coordinator: no orphans.
                libc::setpgid(0, 0);
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| LaunchError::Spawn { rank, source: e })?;
        if let Some(stderr) = child.stderr.take() {
            let log = log.clone();
            std::thread::spawn(move || tee(stderr, &log));
        }
        workers.push(Worker {
            rank,
            child,
            log,
            heartbeat,
            started: Instant::now(),
        });
    }
    Ok(workers)
}

/// Copies a worker's stderr to ours and to its log.
fn tee(stderr: impl std::io::Read, log: &Path) {
    let Ok(mut file) = std::fs::OpenOptions::new().append(true).open(log) else {
        return;
    };
    let mut reader = BufReader::new(stderr);
    let mut buf = Vec::new();
    while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
        let _ = std::io::stderr().write_all(&buf);
        let _ = file.write_all(&buf);
        buf.clear();
    }
}

enum Outcome {
    Done,
    Interrupted,
    Failed(WorkerFailure),
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}{}", signal_name(sig)),
        _ => "ended".into(),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => " (SIGKILL: out of memory, or killed)",
        libc::SIGSEGV => " (SIGSEGV)",
        libc::SIGTERM => " (SIGTERM)",
        libc::SIGABRT => " (SIGABRT)",
        libc::SIGINT => " (SIGINT)",
        _ => "",
    }
}

fn tail(log: &Path) -> Vec<String> {
    let text = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let mut last: VecDeque<String> = VecDeque::with_capacity(TAIL_LINES);
    // Progress lines redraw with \r: keep the last state of each line.
    for line in text.lines() {
        let line = line.rsplit('\r').next().unwrap_or(line).to_string();
        if last.len() == TAIL_LINES {
            last.pop_front();
        }
        last.push_back(line);
    }
    last.into()
}

fn last_activity(w: &Worker) -> Instant {
    let beat = std::fs::metadata(&w.heartbeat)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .and_then(|ago| Instant::now().checked_sub(ago));
    beat.map_or(w.started, |b| b.max(w.started))
}

fn watch(plan: &LaunchPlan, workers: &mut [Worker], stop: &AtomicBool) -> Outcome {
    loop {
        if stop.load(Ordering::SeqCst) {
            // Each worker saves (rank 0) and stops at the same step, agreed in the all-reduce.
            signal_all(workers, STOP_SIGNAL);
            wait_or_kill(workers, Duration::from_secs(120));
            return Outcome::Interrupted;
        }
        let mut running = 0;
        for i in 0..workers.len() {
            let w = &mut workers[i];
            match w.child.try_wait() {
                Ok(Some(status)) if status.success() => {}
                Ok(Some(status)) => {
                    let failure = WorkerFailure {
                        rank: w.rank,
                        reason: describe(status),
                        tail: tail(&w.log),
                        log: w.log.clone(),
                    };
                    stop_group(workers);
                    return Outcome::Failed(failure);
                }
                Ok(None) => {
                    running += 1;
                    let idle = last_activity(w).elapsed();
                    if idle > plan.hang_timeout {
                        let failure = WorkerFailure {
                            rank: w.rank,
                            reason: format!("finished no step for {} s (hung)", idle.as_secs()),
                            tail: tail(&w.log),
                            log: w.log.clone(),
                        };
                        stop_group(workers);
                        return Outcome::Failed(failure);
                    }
                }
                Err(_) => {}
            }
        }
        if running == 0 {
            return Outcome::Done;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How `temper launch` asks a worker to save a checkpoint after its step and stop. Not SIGTERM:
/// burn-collective's orchestrator (in rank 0) shuts down at SIGINT or SIGTERM, closing the
/// session the workers need to agree on the step to stop at (its connections break and rank
/// 0 cannot save). Slurm users can send it too (`#SBATCH --signal=USR1@120`).
pub const STOP_SIGNAL: i32 = libc::SIGUSR1;

/// Sets `stop` when [`STOP_SIGNAL`] arrives (a worker's side of the launcher's request).
pub fn stop_on_signal(stop: Arc<AtomicBool>) -> std::io::Result<()> {
    // SAFETY: the action only stores to an atomic, which is async-signal-safe.
    unsafe { signal_hook_registry::register(STOP_SIGNAL, move || stop.store(true, Ordering::SeqCst)) }.map(|_| ())
}

fn signal_all(workers: &[Worker], sig: i32) {
    for w in workers {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(w.child.id() as i32, sig);
        }
    }
}

/// Stops the rest of the group after a failure: SIGTERM, then SIGKILL after a grace period.
fn stop_group(workers: &mut [Worker]) {
    signal_all(workers, libc::SIGTERM);
    wait_or_kill(workers, Duration::from_secs(5));
}

fn wait_or_kill(workers: &mut [Worker], grace: Duration) {
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && workers.iter_mut().any(|w| matches!(w.child.try_wait(), Ok(None))) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for w in workers.iter_mut() {
        if matches!(w.child.try_wait(), Ok(None)) {
            let _ = w.child.kill();
        }
        let _ = w.child.wait();
    }
}
