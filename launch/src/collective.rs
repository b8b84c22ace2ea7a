//! The all-reduce: burn-collective's multi-node mode, one node per worker process (one device
//! each), rank 0 hosting the global orchestrators on the master port and the two after it.
//!
//! burn-collective 0.21.0 (with burn-communication) has four bugs in this mode; Temper works
//! around each here (measurements: benches/RESULTS.md, "Data-parallel all-reduce: reliability"):
//!
//! - After the first all-reduce of a session, the next one hangs, whatever the strategy:
//!   `SyncService::sync` (global/node/sync.rs) clears a copy of its list of synced peers instead
//!   of the list itself, so the list never again equals the set of nodes. Every all-reduce here
//!   is therefore the first of its session: after it, each worker finishes the session, resets
//!   its local collective server (which drops the node and its sync service) and registers
//!   again. A step does one all-reduce (all trainable gradients and counters in one buffer), so
//!   this costs one registration per step.
//! - Lost wake-ups: `SyncService::sync` (the barrier that ends every all-reduce) and
//!   `TensorDataService::get_exposed_tensor_bytes` (burn-communication) check their condition
//!   and only then create the `Notified` future that the handler of a peer's message wakes with
//!   `notify_waiters`. burn runs them on a multi-threaded tokio runtime; when the handler runs
//!   on another worker thread between the check and the wait, the wake-up is lost and the
//!   all-reduce never returns, or a session overlaps the next and a download fails. See
//!   [`prepare_process`].
//! - The orchestrator numbers a registering node by the count of nodes it holds. When a node
//!   registers for the next session before a slower one has finished the last, two nodes get
//!   the same number and each is told it is alone: the next "all-reduce" silently returns every
//!   worker's own gradients (seen with SmolLM2-sized buffers on the second step). Sessions
//!   therefore rotate over [`ORCHESTRATORS`] orchestrators (one port each): session `k` uses
//!   orchestrator `k % 3`, and a node registers for `k + 1` only after its all-reduce `k`
//!   returned, which needs every node registered for `k`, which each did after its finish of
//!   `k - 1` was acknowledged; so the orchestrator of `k + 1` (that of `k - 2`) is idle.
//! - The orchestrator never forgets a session: each one keeps a task and a socket (about two
//!   file descriptors per node and step; a 1 024-descriptor limit is reached in a few hundred
//!   steps). Rank 0 starts the orchestrator of session `k + 2` afresh after its all-reduce `k`:
//!   it served `k - 1`, every node has finished that, and none can register for `k + 2` before
//!   rank 0 has registered for `k + 1`.
//!
//! - A buffer over 512 MiB cannot be summed: burn-communication's websocket client refuses a
//!   frame larger than that (`websocket/client.rs`: `max_frame_size(Some(MB * 512))`), and
//!   tungstenite sends each message as one frame. The central node's download then fails, it
//!   panics on a tokio thread ("Couldn't find the tensor for transfer id 0",
//!   `global/node/centralized.rs`) and the caller gets `LocalServerMissing`. Full fine-tuning of
//!   SmolLM2-135M sums 538 MB a step. Buffers therefore go in chunks of at most [`MAX_CHUNK`]
//!   values, one session each. After any failure the engine is left alone: its client would
//!   panic on the next `finish`/`reset` (`local/client.rs` unwraps sends to the dead server).
//!
//! Every all-reduce also sums a 1 per worker and checks that the count is the world size, so a
//! wrong membership is an error, never a silently wrong sum.

use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::runtime::Runtime;

use burn::backend::NdArray;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use burn_collective::{
    AllReduceStrategy, CollectiveConfig, PeerId, ReduceOperation, all_reduce, finish_collective, register,
    reset_collective,
};
use burn_communication::Address;

use temper_trainer::CollectiveError;

use crate::topology::{ORCHESTRATORS, Topology};

type Host = NdArray;

/// The most values one burn-collective all-reduce carries, its membership count included:
/// 128 MiB, a quarter of the 512 MiB frame limit of the module docs.
pub const MAX_CHUNK: usize = 1 << 25;

fn engine(operation: &'static str) -> impl Fn(String) -> CollectiveError {
    move |message| CollectiveError::Engine { operation, message }
}

/// Call first thing in `main`, before the process starts any thread (it sets an environment
/// variable).
///
/// Makes burn-collective's runtime single-threaded (the second bug in the module docs): on one
/// worker thread, tasks switch only at `.await`s, and there is none between the check and the
/// creation of the `Notified` future, so no wake-up can be lost. burn builds its runtime with
/// tokio's default worker count, which tokio reads from `TOKIO_WORKER_THREADS`. Nothing else in
/// Temper uses a default-sized tokio runtime. One thread is enough: burn's local server blocks
/// it in a channel `recv` between two operations, but every all-reduce ends with the barrier,
/// after which no peer needs this node until the next operation. Measured with 3 pairs of
/// processes at once on 2 cores: with burn's default runtime, 1 or 2 pairs of 3 hang or fail
/// within 2 000 all-reduces; with one thread, none.
pub fn prepare_process() {
    // SAFETY: called before any other thread exists, so nothing reads the environment while it
    // changes. Overrides a user's value on purpose: more threads bring the hang back.
    unsafe { std::env::set_var("TOKIO_WORKER_THREADS", "1") };
}

pub struct BurnCollective {
    topology: Topology,
    /// One collective operation at a time (burn-collective's client is per process).
    sessions: Mutex<Sessions>,
    /// The most values per session ([`MAX_CHUNK`]; less in tests).
    max_chunk: usize,
}

struct Sessions {
    /// The number of the current session.
    current: usize,
    /// Why the engine is unusable, after a failure.
    broken: Option<String>,
    /// Rank 0: the orchestrators, one tokio runtime each (dropping one frees all it holds).
    orchestrators: Vec<Option<Runtime>>,
}

impl BurnCollective {
    /// Joins the job's collective; rank 0 first starts the orchestrators.
    pub fn connect(topology: Topology) -> Result<Self, CollectiveError> {
        // burn-communication installs a global tracing subscriber that prints INFO lines for
        // every connection (each step, with the workaround above), burying a worker's own log.
        // A silent one installed first keeps the logs readable; burn tolerates that its own
        // then fails to install.
        let _ = tracing_core::dispatcher::set_global_default(tracing_core::Dispatch::new(
            tracing_core::subscriber::NoSubscriber::default(),
        ));
        let mut sessions = Sessions {
            current: 0,
            broken: None,
            orchestrators: (0..ORCHESTRATORS).map(|_| None).collect(),
        };
        if topology.rank == 0 {
            for slot in 0..ORCHESTRATORS as usize {
                sessions.restart_orchestrator(slot, topology.orchestrator_port(slot))?;
            }
            // Let them bind before anyone registers (registration retries anyway).
            std::thread::sleep(Duration::from_millis(200));
        }
        let c = BurnCollective {
            topology,
            sessions: Mutex::new(sessions),
            max_chunk: MAX_CHUNK,
        };
        if let Err(e) = c.register(0) {
            // Dropping `c` must not call burn's `finish` on a client that failed (module docs).
            if let Ok(mut s) = c.sessions.lock() {
                s.broken = Some(e.to_string());
            }
            return Err(e);
        }
        Ok(c)
    }

    /// Sums at most `values` values per session (tests use chunks smaller than [`MAX_CHUNK`]).
    pub fn with_max_chunk(mut self, values: usize) -> Self {
        assert!(values >= 2, "a chunk holds a value and the membership count");
        self.max_chunk = values;
        self
    }

    fn config(&self, session: usize) -> Result<CollectiveConfig, CollectiveError> {
        let t = &self.topology;
        let port = t.orchestrator_port(session % ORCHESTRATORS as usize);
        let global = Address::from_str(&format!("ws://{}:{port}", t.master_addr))
            .map_err(|e| engine("master address")(format!("{e:?}")))?;
        let node = Address::from_str(&format!("ws://{}:{}", t.node_host(), t.data_port()))
            .map_err(|e| engine("node address")(format!("{e:?}")))?;
        Ok(CollectiveConfig::default()
            .with_num_devices(1)
            .with_num_nodes(t.world_size as u32)
            .with_global_address(global)
            .with_node_address(node)
            .with_data_service_port(t.data_port())
            .with_global_all_reduce_strategy(AllReduceStrategy::Centralized))
    }

    fn register(&self, session: usize) -> Result<(), CollectiveError> {
        register::<Host>(self.peer(), Default::default(), self.config(session)?)
            .map_err(|e| engine("register")(format!("{e:?}")))
    }

    /// One session: sums `values` (at most `max_chunk - 1` of them) with the membership count,
    /// then starts the next session (the workarounds of the module docs).
    fn session_all_reduce(&self, sessions: &mut Sessions, mut values: Vec<f32>) -> Result<Vec<f32>, CollectiveError> {
        // The membership check of the module docs.
        values.push(1.0);
        let n = values.len();
        let t = Tensor::<Host, 1>::from_data(TensorData::new(values, [n]), &Default::default());
        let out = all_reduce::<Host>(self.peer(), t.into_primitive().tensor(), ReduceOperation::Sum)
            .map_err(|e| engine("all-reduce")(format!("{e:?}")))?;
        let out = Tensor::<Host, 1>::from_primitive(TensorPrimitive::Float(out));
        let mut values = out
            .into_data()
            .to_vec::<f32>()
            .map_err(|e| engine("all-reduce")(format!("{e:?}")))?;
        let workers = values.pop().unwrap_or_default();
        if workers != self.topology.world_size as f32 {
            return Err(CollectiveError::Membership {
                summed: workers,
                expected: self.topology.world_size,
            });
        }
        // The workarounds of the module docs: a fresh session on the next orchestrator.
        finish_collective::<Host>(self.peer()).map_err(|e| engine("finish")(format!("{e:?}")))?;
        reset_collective::<Host>();
        if self.topology.rank == 0 {
            let slot = (sessions.current + 2) % ORCHESTRATORS as usize;
            sessions.restart_orchestrator(slot, self.topology.orchestrator_port(slot))?;
        }
        sessions.current += 1;
        self.register(sessions.current)?;
        Ok(values)
    }

    fn peer(&self) -> PeerId {
        PeerId::from(self.topology.rank)
    }
}

impl Sessions {
    /// Rank 0: stops the orchestrator in `slot` (if any) and starts a fresh one on `port`.
    fn restart_orchestrator(&mut self, slot: usize, port: u16) -> Result<(), CollectiveError> {
        // Dropping the runtime waits for its worker thread, dropping every task and socket, so
        // the port is free for the next one.
        drop(self.orchestrators[slot].take());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("collective-orchestrator")
            .enable_all()
            .build()
            .map_err(|e| engine("starting the orchestrator")(e.to_string()))?;
        runtime.spawn(async move {
            // burn's orchestrator stops serving at SIGINT or SIGTERM (`os_shutdown_signal`;
            // hence `temper launch` asks workers to stop with SIGUSR1). When such a signal
            // reaches rank 0 anyway, serve again: registrations then find an orchestrator
            // instead of retrying to connect forever.
            loop {
                burn_collective::start_global_orchestrator(port).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        self.orchestrators[slot] = Some(runtime);
        Ok(())
    }
}

impl temper_trainer::Collective for BurnCollective {
    fn rank(&self) -> usize {
        self.topology.rank
    }

    fn world_size(&self) -> usize {
        self.topology.world_size
    }

    fn all_reduce_sum(&self, values: Vec<f32>) -> Result<Vec<f32>, CollectiveError> {
        let mut sessions = self
            .sessions
            .lock()
            .map_err(|_| CollectiveError::Broken("a previous all-reduce panicked".into()))?;
        if let Some(why) = &sessions.broken {
            return Err(CollectiveError::Broken(why.clone()));
        }
        // Every worker passes the same length, so every worker cuts the same chunks.
        let mut out = Vec::with_capacity(values.len());
        for chunk in values.chunks(self.max_chunk - 1) {
            match self.session_all_reduce(&mut sessions, chunk.to_vec()) {
                Ok(sum) => out.extend(sum),
                Err(e) => {
                    sessions.broken = Some(e.to_string());
                    return Err(e);
                }
            }
        }
        Ok(out)
    }
}

impl Drop for BurnCollective {
    fn drop(&mut self) {
        // After a failure burn's client would panic here (module docs).
        if self.sessions.get_mut().is_ok_and(|s| s.broken.is_none()) {
            let _ = finish_collective::<Host>(self.peer());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use temper_trainer::Collective;

    const ROUNDS: usize = 300;
    const VALUES: usize = 8000;
    /// The first rounds carry SmolLM2's LoRA gradients' size (19.5 MB), in chunks of
    /// `CHUNK` values (three sessions a round), as a full fine-tuning's buffer goes in chunks of
    /// `MAX_CHUNK`.
    const BIG_ROUNDS: usize = 3;
    const BIG_VALUES: usize = 4_884_492;
    const CHUNK: usize = 1 << 21;

    /// Two processes (this test binary again, as the worker below) do many all-reduces in a row,
    /// as a training run's steps do, and check every sum, and rank 0 checks that it does not
    /// accumulate file descriptors: the workarounds in the module docs must hold. Without them,
    /// big buffers summed wrong from the second round, about one pair of processes in two hung
    /// or failed within 1 000 small rounds, and rank 0 gained two descriptors a round.
    #[test]
    fn many_all_reduces_between_two_processes() {
        let port = loop {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let p = l.local_addr().unwrap().port();
            drop(l);
            if p < 60000
                && (1..Topology::port_span(2)).all(|i| std::net::TcpListener::bind(("127.0.0.1", p + i)).is_ok())
            {
                break p;
            }
        };
        let exe = std::env::current_exe().unwrap();
        let mut workers: Vec<_> = (0..2)
            .map(|rank| {
                std::process::Command::new(&exe)
                    .args([
                        "--exact",
                        "collective::tests::all_reduce_worker",
                        "--ignored",
                        "--nocapture",
                    ])
                    .env("RANK", rank.to_string())
                    .env("WORLD_SIZE", "2")
                    .env("MASTER_ADDR", "127.0.0.1")
                    .env("MASTER_PORT", port.to_string())
                    // What `prepare_process` does in `temper` (the test harness has threads).
                    .env("TOKIO_WORKER_THREADS", "1")
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let started = std::time::Instant::now();
        while workers.iter_mut().any(|w| w.try_wait().unwrap().is_none()) {
            if started.elapsed() > Duration::from_secs(180) {
                for w in &mut workers {
                    let _ = w.kill();
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for (rank, w) in workers.into_iter().enumerate() {
            let out = w.wait_with_output().unwrap();
            let log = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
            let done = format!("rank {rank}: {ROUNDS} all-reduces right");
            assert!(
                out.status.success() && log.contains(&done),
                "rank {rank} ({:?}):\n{log}",
                out.status
            );
        }
    }

    #[test]
    #[ignore = "a worker process of many_all_reduces_between_two_processes"]
    fn all_reduce_worker() {
        let topology = Topology::from_env().unwrap().expect("RANK and WORLD_SIZE");
        let rank = topology.rank;
        // Overrides for stress runs by hand (benches/stress-collective.sh, benches/RESULTS.md):
        // more rounds, bigger big rounds (SmolLM2's full gradient: 134 515 008 values), more of
        // them, the chunk size, or big rounds only until some seconds have passed.
        let var = |k: &str, default: usize| std::env::var(k).map_or(default, |v| v.parse().unwrap());
        let rounds = var("TEMPER_TEST_ROUNDS", ROUNDS);
        let big_values = var("TEMPER_TEST_BIG_VALUES", BIG_VALUES);
        let big_rounds = var("TEMPER_TEST_BIG_ROUNDS", BIG_ROUNDS);
        let seconds = var("TEMPER_TEST_SECONDS", 0);
        let chunk = var("TEMPER_TEST_CHUNK", CHUNK);
        let c = BurnCollective::connect(topology).unwrap().with_max_chunk(chunk);
        let open_files = || std::fs::read_dir("/proc/self/fd").unwrap().count();
        let mut files_before = 0;
        let started = std::time::Instant::now();
        let mut big_times = Vec::new();
        let mut round = 0;
        // With a duration, big rounds go on until it has passed; rank 0 decides, and tells
        // rank 1 through the sum (a last value of 1 means "stop after this round").
        loop {
            let big = round < big_rounds || seconds > 0;
            let n = if big { big_values } else { VALUES };
            // Exact in f32: sums stay below 2^24.
            let value = |i: usize, r: usize| ((r + 1) * ((i + round) % 4096)) as f32;
            let mut mine: Vec<f32> = (0..n).map(|i| value(i, rank)).collect();
            let stop = seconds > 0 && rank == 0 && started.elapsed().as_secs() as usize >= seconds;
            mine.push(if stop { 1.0 } else { 0.0 });
            let t = std::time::Instant::now();
            let sum = c.all_reduce_sum(mine).unwrap();
            if big {
                big_times.push(t.elapsed().as_secs_f64());
            }
            let wrong = (0..n).find(|&i| sum[i] != value(i, 0) + value(i, 1));
            assert_eq!(wrong, None, "rank {rank}, round {round}");
            if round == 10 {
                files_before = open_files();
            }
            round += 1;
            let done = match seconds {
                0 => round >= rounds,
                _ => sum[n] > 0.0,
            };
            if done {
                break;
            }
        }
        let gained = open_files() as i64 - files_before as i64;
        assert!(round <= 10 || gained < 20, "rank {rank} gained {gained} open files");
        big_times.sort_by(f64::total_cmp);
        let median = big_times.get(big_times.len() / 2).copied().unwrap_or(0.0);
        println!(
            "rank {rank}: {round} all-reduces right ({} of {big_values} values, median {median:.2} s) in {:.0} s",
            big_times.len(),
            started.elapsed().as_secs_f64()
        );
    }
}
