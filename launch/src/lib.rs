//! Data-parallel training across processes and machines.
//!
//! Every worker is one process driving one device. Its rank comes from `temper launch` or from
//! the environment an outer launcher sets (torchrun, Slurm, Open MPI). The trainable gradients
//! are summed each step through burn-collective's multi-node mode (rank 0 hosts its
//! orchestrator); `temper launch` starts the workers, watches them, stops the group when one
//! fails or hangs, and restarts it from the last checkpoint.

pub mod collective;
pub mod coordinator;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod nccl_lib;
pub mod rendezvous;
pub mod topology;

pub use collective::{BurnCollective, prepare_process};
pub use coordinator::{LaunchError, LaunchPlan, STOP_SIGNAL, WorkerFailure, run_workers, stop_on_signal};
pub use topology::{ENGINE_VAR, Topology};
