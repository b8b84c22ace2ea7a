//! Backends are cargo features; the device is chosen at run time among the compiled ones.
//!
//! `ndarray` (with OpenBLAS) is the default CPU backend: see `benches/RESULTS.md` for the
//! measurements against `flex`.

use std::fmt;
use std::str::FromStr;

use burn::tensor::backend::Backend;

#[cfg(feature = "ndarray")]
pub type CpuBackend = burn::backend::NdArray<f32>;
#[cfg(all(feature = "flex", not(feature = "ndarray")))]
pub type CpuBackend = burn::backend::Flex;

#[cfg(feature = "cuda")]
pub type CudaBackend = burn::backend::Cuda<f32, i32>;
#[cfg(feature = "wgpu")]
pub type WgpuBackend = burn::backend::Wgpu<f32, i32>;

/// A device named on the command line or in a config: `cpu`, `cuda`, `cuda:N`, `wgpu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    Wgpu,
}

impl DeviceSpec {
    /// The `--device` given on the command line, else the job's `device` key.
    pub fn for_job(
        cli: Option<DeviceSpec>,
        job: &temper_trainer::JobConfig,
        file: &std::path::Path,
    ) -> anyhow::Result<Self> {
        match cli {
            Some(d) => Ok(d),
            None => job
                .device
                .parse()
                .map_err(|e: String| anyhow::anyhow!("{}: device: {e}", file.display())),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "wgpu" => Ok(Self::Wgpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(i)) => Ok(Self::Cuda(i)),
                _ => Err(format!("unknown device {s:?} (expected cpu, cuda, cuda:N or wgpu)")),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
            Self::Wgpu => write!(f, "wgpu"),
        }
    }
}

/// Work generic over the backend, run on whichever backend the device selects.
pub trait BackendJob {
    type Output;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output;
}

/// Runs `job` on the backend behind `spec`, or explains which cargo feature is missing.
pub fn dispatch<J: BackendJob>(spec: DeviceSpec, job: J) -> Result<J::Output, String> {
    match spec {
        #[cfg(any(feature = "ndarray", feature = "flex"))]
        DeviceSpec::Cpu => Ok(job.run::<CpuBackend>(Default::default())),
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(i) => Ok(job.run::<CudaBackend>(burn::backend::cuda::CudaDevice::new(i))),
        #[cfg(feature = "wgpu")]
        DeviceSpec::Wgpu => Ok(job.run::<WgpuBackend>(Default::default())),
        #[allow(unreachable_patterns)]
        other => Err(format!(
            "device {other} is not compiled into this binary; rebuild with `--features {}`",
            match other {
                DeviceSpec::Cpu => "ndarray",
                DeviceSpec::Cuda(_) => "cuda",
                DeviceSpec::Wgpu => "wgpu",
            }
        )),
    }
}
