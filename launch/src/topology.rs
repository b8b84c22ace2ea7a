//! Where a worker stands in its job: rank, world size, local rank, the rendezvous address. Read
//! from the variables `temper launch` and torchrun set, or Slurm's, or Open MPI's, so that
//! `srun temper train job.yaml` and `mpirun temper train job.yaml` work without `temper launch`.

use temper_trainer::CollectiveEngine;

/// The default rendezvous port (torchrun's).
pub const DEFAULT_PORT: u16 = 29500;

/// How many burn-collective orchestrators rank 0 runs, on the master port and the ones after
/// it (collective.rs says why).
pub const ORCHESTRATORS: u16 = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub local_world_size: usize,
    /// Where rank 0 hosts the collective's orchestrator.
    pub master_addr: String,
    pub master_port: u16,
    /// Which launcher set the variables (for messages).
    pub source: &'static str,
    /// The engine `temper launch` chose (`TEMPER_COLLECTIVE`); other launchers leave it to
    /// the worker's device.
    pub engine: Option<CollectiveEngine>,
}

/// The variable through which `temper launch` tells its workers the collective engine.
pub const ENGINE_VAR: &str = "TEMPER_COLLECTIVE";

impl Topology {
    /// From the process environment; `None` when no launcher set a world size above 1.
    pub fn from_env() -> Result<Option<Self>, String> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// From `var` (the environment, or a map in tests). torchrun's names first (`temper launch`
    /// sets them too), then Slurm's, then Open MPI's. A single worker has no topology, except
    /// under `temper launch` with the nccl engine (so that one GPU runs the NCCL path).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, String> {
        let engine = var(ENGINE_VAR)
            .map(|v| v.parse::<CollectiveEngine>().map_err(|e| format!("{ENGINE_VAR}: {e}")))
            .transpose()?;
        let num = |k: &str| -> Result<Option<usize>, String> {
            var(k)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .map_err(|_| format!("{k}={v} is not a number"))
                })
                .transpose()
        };
        let schemes: [(&str, [&str; 4]); 3] = [
            ("torchrun", ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"]),
            (
                "slurm",
                ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"],
            ),
            (
                "openmpi",
                [
                    "OMPI_COMM_WORLD_RANK",
                    "OMPI_COMM_WORLD_SIZE",
                    "OMPI_COMM_WORLD_LOCAL_RANK",
                    "OMPI_COMM_WORLD_LOCAL_SIZE",
                ],
            ),
        ];
        for (source, [rank_k, world_k, local_k, local_world_k]) in schemes {
            let (Some(rank), Some(world)) = (num(rank_k)?, num(world_k)?) else {
                continue;
            };
            if world == 0 || (world == 1 && engine != Some(CollectiveEngine::Nccl)) {
                return Ok(None);
            }
            if rank >= world {
                return Err(format!("{rank_k}={rank} is not below {world_k}={world}"));
            }
            let local_rank = num(local_k)?.unwrap_or(0);
            // Slurm writes SLURM_NTASKS_PER_NODE as e.g. "4" or "4(x2)".
            let local_world = var(local_world_k)
                .and_then(|v| v.split('(').next().and_then(|n| n.trim().parse().ok()))
                .unwrap_or(1);
            let master_addr = var("MASTER_ADDR")
                .or_else(|| (source == "slurm").then(|| var("SLURM_LAUNCH_NODE_IPADDR")).flatten())
                .ok_or_else(|| format!("{world_k}={world} but MASTER_ADDR (rank 0's host) is not set"))?;
            let master_port = match var("MASTER_PORT") {
                Some(p) => p.trim().parse().map_err(|_| format!("MASTER_PORT={p} is not a port"))?,
                None => DEFAULT_PORT,
            };
            return Ok(Some(Topology {
                rank,
                world_size: world,
                local_rank,
                local_world_size: local_world,
                master_addr,
                master_port,
                source,
                engine,
            }));
        }
        Ok(None)
    }

    /// The address other workers reach this one at: `TEMPER_NODE_ADDR`, or the loopback
    /// address when the job runs on one machine (the master is local), or the host name.
    pub fn node_host(&self) -> String {
        if let Ok(addr) = std::env::var("TEMPER_NODE_ADDR") {
            return addr;
        }
        if matches!(self.master_addr.as_str(), "127.0.0.1" | "localhost" | "::1") {
            return "127.0.0.1".into();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "127.0.0.1".into())
    }

    /// The port of rank 0's orchestrator number `slot` (collective.rs): the master port and
    /// the ones after it.
    pub fn orchestrator_port(&self, slot: usize) -> u16 {
        self.master_port + slot as u16
    }

    /// The port this worker serves tensors on: above the orchestrators', one per rank (so two
    /// nodes on one host, as in tests, do not collide).
    pub fn data_port(&self) -> u16 {
        self.master_port + ORCHESTRATORS + self.rank as u16
    }

    /// How many ports from the master port a job of `world_size` workers uses.
    pub fn port_span(world_size: usize) -> u16 {
        ORCHESTRATORS + world_size as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn topo(vars: &[(&str, &str)]) -> Result<Option<Topology>, String> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Topology::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn reads_torchrun_slurm_and_open_mpi() {
        let t = topo(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((t.rank, t.world_size, t.local_rank, t.local_world_size), (3, 4, 1, 2));
        assert_eq!(
            (t.master_addr.as_str(), t.master_port, t.data_port()),
            ("node0", 1234, 1240)
        );

        let t = topo(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NTASKS_PER_NODE", "4(x2)"),
            ("SLURM_LAUNCH_NODE_IPADDR", "10.0.0.1"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((t.rank, t.world_size, t.local_world_size, t.source), (5, 8, 4, "slurm"));
        assert_eq!((t.master_addr.as_str(), t.master_port), ("10.0.0.1", DEFAULT_PORT));

        let t = topo(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (t.rank, t.world_size, t.source, t.node_host().as_str()),
            (1, 2, "openmpi", "127.0.0.1")
        );

        assert_eq!(topo(&[("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap(), None);
        // One GPU through NCCL, as `temper launch --nproc-per-node 1` runs it.
        let one = [("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")];
        let t = topo(&[one.as_slice(), &[(ENGINE_VAR, "nccl")]].concat())
            .unwrap()
            .unwrap();
        assert_eq!((t.world_size, t.engine), (1, Some(CollectiveEngine::Nccl)));
        assert_eq!(topo(&[one.as_slice(), &[(ENGINE_VAR, "burn")]].concat()).unwrap(), None);
        let err = topo(&[one.as_slice(), &[(ENGINE_VAR, "gloo")]].concat()).unwrap_err();
        assert!(err.contains("TEMPER_COLLECTIVE") && err.contains("\"gloo\""), "{err}");
        assert_eq!(topo(&[]).unwrap(), None);
        let err = topo(&[("RANK", "0"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert!(err.contains("MASTER_ADDR"), "{err}");
        let err = topo(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "a")]).unwrap_err();
        assert!(err.contains("RANK=2"), "{err}");
    }
}
