//! Backends are cargo features; the device is chosen at run time among the compiled ones.
//!
//! `ndarray` (with OpenBLAS) is the default CPU backend: see `benches/RESULTS.md` for the
//! measurements against `flex`.

use burn::tensor::backend::Backend;
pub use temper_trainer::config::DeviceSpec;

#[cfg(feature = "ndarray")]
pub type CpuBackend = burn::backend::NdArray<f32>;
#[cfg(all(feature = "flex", not(feature = "ndarray")))]
pub type CpuBackend = burn::backend::Flex;

#[cfg(feature = "cuda")]
pub type CudaBackend = burn::backend::Cuda<f32, i32>;
/// CUDA without burn's kernel fusion (`TEMPER_KERNEL_FUSION=0`): more, smaller kernel launches
/// per step, but far fewer distinct kernels to compile the first time a step runs.
#[cfg(feature = "cuda")]
pub type CudaUnfusedBackend = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;
#[cfg(feature = "wgpu")]
pub type WgpuBackend = burn::backend::Wgpu<f32, i32>;

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
        DeviceSpec::Cuda(i) => {
            gpu::configure_kernels();
            let device = burn::backend::cuda::CudaDevice::new(i);
            Ok(match gpu::fusion() {
                true => job.run::<CudaBackend>(device),
                false => job.run::<CudaUnfusedBackend>(device),
            })
        }
        #[cfg(feature = "wgpu")]
        DeviceSpec::Wgpu => {
            gpu::configure_kernels();
            Ok(job.run::<WgpuBackend>(Default::default()))
        }
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

/// Settings of cubecl, the kernel compiler under burn's GPU backends.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod gpu {
    use cubecl_runtime::config::cache::CacheConfig;
    use cubecl_runtime::config::compilation::CompilationLogLevel;
    use cubecl_runtime::config::{CubeClRuntimeConfig, RuntimeConfig};

    /// Before the first kernel: cubecl's settings as it would read them (a `cubecl.toml` or
    /// `burn.toml` above the working directory, then `CUBECL_*` variables), plus two of ours.
    ///
    /// - Compiled kernels are cached on disk (cubecl leaves this off): a training step of a
    ///   fused model compiles hundreds of kernels through NVRTC on first use, minutes that
    ///   every later run of the same shapes then skips. The cache goes where cubecl keeps its
    ///   autotune results (the enclosing Cargo project's `target/`, else `~/.cache/cubecl`);
    ///   `TEMPER_KERNEL_CACHE=DIR` puts it elsewhere, `TEMPER_KERNEL_CACHE=off` disables it.
    /// - `TEMPER_KERNEL_LOG=FILE` appends one line per kernel compiled (name only).
    pub(super) fn configure_kernels() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            if CubeClRuntimeConfig::storage().lock().is_some() {
                return; // already read by cubecl: too late to change
            }
            let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
            match std::env::var("TEMPER_KERNEL_CACHE").ok().as_deref() {
                Some("off") => config.compilation.cache = None,
                Some(dir) if !dir.is_empty() => config.compilation.cache = Some(CacheConfig::File(dir.into())),
                _ => {
                    if config.compilation.cache.is_none() {
                        config.compilation.cache = Some(config.autotune.cache.clone());
                    }
                }
            }
            if let Some(file) = std::env::var_os("TEMPER_KERNEL_LOG") {
                config.compilation.logger.level = CompilationLogLevel::Basic;
                config.compilation.logger.file = Some(file.into());
                config.compilation.logger.append = true;
            }
            CubeClRuntimeConfig::set(config);
        });
    }

    /// burn's kernel fusion, on unless `TEMPER_KERNEL_FUSION=0`.
    #[cfg(feature = "cuda")]
    pub(super) fn fusion() -> bool {
        !matches!(
            std::env::var("TEMPER_KERNEL_FUSION").as_deref(),
            Ok("0" | "off" | "false")
        )
    }
}
