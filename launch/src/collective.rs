//! The all-reduce: burn-collective's multi-node mode, one node per worker process (one device
//! each), rank 0 hosting the global orchestrator on the master port.
//!
//! Works around a burn-collective 0.21.0 bug: after the first all-reduce of a session, the next
//! one hangs, whatever the strategy, because `SyncService::sync` (global/node/sync.rs) clears a
//! copy of its list of synced peers instead of the list itself, so the list never again equals
//! the set of nodes. Every all-reduce here is therefore the first of its session: after it, each
//! worker finishes the session, resets its local collective server (which drops the node and
//! its sync service) and registers again. A step does one all-reduce (all trainable gradients
//! and counters in one buffer), so this costs one registration per step.

use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use burn::backend::NdArray;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use burn_collective::{
    AllReduceStrategy, CollectiveConfig, PeerId, ReduceOperation, all_reduce, finish_collective, register,
    reset_collective,
};
use burn_communication::Address;

use crate::topology::Topology;

type Host = NdArray;

pub struct BurnCollective {
    topology: Topology,
    /// One collective operation at a time (burn-collective's client is per process).
    lock: Mutex<()>,
}

impl BurnCollective {
    /// Joins the job's collective; rank 0 first starts the orchestrator on the master port.
    pub fn connect(topology: Topology) -> Result<Self, String> {
        // burn-communication installs a global tracing subscriber that prints INFO lines for
        // every connection (each step, with the workaround above), burying a worker's own log.
        // A silent one installed first keeps the logs readable; burn tolerates that its own
        // then fails to install.
        let _ = tracing_core::dispatcher::set_global_default(tracing_core::Dispatch::new(
            tracing_core::subscriber::NoSubscriber::default(),
        ));
        if topology.rank == 0 {
            let port = topology.master_port;
            std::thread::Builder::new()
                .name("collective-orchestrator".into())
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(1)
                        .enable_all()
                        .build()
                        .expect("a tokio runtime");
                    runtime.block_on(burn_collective::start_global_orchestrator(port));
                })
                .map_err(|e| e.to_string())?;
            // Let it bind before anyone registers (registration retries anyway).
            std::thread::sleep(Duration::from_millis(200));
        }
        let c = BurnCollective {
            topology,
            lock: Mutex::new(()),
        };
        c.register()?;
        Ok(c)
    }

    fn config(&self) -> Result<CollectiveConfig, String> {
        let t = &self.topology;
        let global = Address::from_str(&format!("ws://{}:{}", t.master_addr, t.master_port))
            .map_err(|e| format!("master address: {e:?}"))?;
        let node = Address::from_str(&format!("ws://{}:{}", t.node_host(), t.data_port()))
            .map_err(|e| format!("node address: {e:?}"))?;
        Ok(CollectiveConfig::default()
            .with_num_devices(1)
            .with_num_nodes(t.world_size as u32)
            .with_global_address(global)
            .with_node_address(node)
            .with_data_service_port(t.data_port())
            .with_global_all_reduce_strategy(AllReduceStrategy::Centralized))
    }

    fn register(&self) -> Result<(), String> {
        register::<Host>(self.peer(), Default::default(), self.config()?).map_err(|e| format!("register: {e:?}"))
    }

    fn peer(&self) -> PeerId {
        PeerId::from(self.topology.rank)
    }
}

impl temper_trainer::Collective for BurnCollective {
    fn rank(&self) -> usize {
        self.topology.rank
    }

    fn world_size(&self) -> usize {
        self.topology.world_size
    }

    fn all_reduce_sum(&self, values: Vec<f32>) -> Result<Vec<f32>, String> {
        let _guard = self
            .lock
            .lock()
            .map_err(|_| "a previous all-reduce panicked".to_string())?;
        let n = values.len();
        let t = Tensor::<Host, 1>::from_data(TensorData::new(values, [n]), &Default::default());
        let out = all_reduce::<Host>(self.peer(), t.into_primitive().tensor(), ReduceOperation::Sum)
            .map_err(|e| format!("all-reduce: {e:?}"))?;
        let out = Tensor::<Host, 1>::from_primitive(TensorPrimitive::Float(out));
        let values = out.into_data().to_vec::<f32>().map_err(|e| format!("{e:?}"))?;
        // The workaround above: a fresh session for the next all-reduce.
        finish_collective::<Host>(self.peer()).map_err(|e| format!("finish: {e:?}"))?;
        reset_collective::<Host>();
        self.register()?;
        Ok(values)
    }
}

impl Drop for BurnCollective {
    fn drop(&mut self) {
        let _ = finish_collective::<Host>(self.peer());
    }
}
