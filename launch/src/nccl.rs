//! NCCL between CUDA workers, through cudarc 0.19's `nccl` module (the build cubecl-cuda
//! already links, loading `libnccl` at run time): one communicator per worker process, made from
//! the unique id that rank 0 creates and the rendezvous hands to every rank, on a stream of
//! its own on the worker's device. The step's gradients are summed in place in the memory of
//! burn-cuda's tensors (`client.get_resource`): nothing goes through the host.
//!
//! Ordering against cubecl, whose streams are private to its server: before NCCL reads a
//! bucket, the training thread waits for its cubecl stream to finish (`client.sync()`), so the
//! bucket is written; NCCL runs on our stream, which the thread waits for before the next
//! bucket or any kernel that reads the sums. Buckets thus go one after the other, with the
//! backward pass already finished (overlap with it is not done).
//!
//! The raw `result` functions are used rather than cudarc's `Comm`: `Comm` keeps its
//! `ncclComm_t` private and takes `CudaSlice`s, and cubecl's memory is not one.

use std::any::Any;
use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use burn::tensor::{Tensor, TensorPrimitive};
use burn_cubecl::CubeBackend;
use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::CudaRuntime;
use cudarc::driver::{CudaContext, CudaStream, DevicePtrMut};
use cudarc::nccl::{result, sys};

use temper_trainer::CollectiveError;

use crate::rendezvous::{ID_BYTES, share_id};
use crate::topology::Topology;

/// The CUDA backends Temper trains with (src/backend.rs): fused (burn's default) and not.
type Unfused = CubeBackend<CudaRuntime, f32, i32, u8>;
type Fused = burn_fusion::Fusion<Unfused>;

/// Values per bucket: 64 MiB of f32, so the all-reduce of a large model needs that much more
/// memory, not a second copy of every gradient.
pub const BUCKET_VALUES: usize = 1 << 24;

fn engine(operation: &'static str, message: impl Into<String>) -> CollectiveError {
    CollectiveError::Engine {
        operation,
        message: message.into(),
    }
}

/// NCCL's own words for an error.
fn nccl_error(e: result::NcclError) -> String {
    // SAFETY: ncclGetErrorString returns a static string for every result code.
    let text = unsafe { CStr::from_ptr(sys::ncclGetErrorString(e.0)) };
    format!("{} ({:?})", text.to_string_lossy(), e.0)
}

/// What to do when `libnccl` cannot be loaded.
pub const MISSING_LIBRARY: &str = "NCCL's library (libnccl.so) is not found. Install NCCL (`pip install nvidia-nccl-cu13`, or Debian/Ubuntu's libnccl2) and start the workers with `temper launch`, which finds libnccl.so.2 there; or put a directory holding libnccl.so on LD_LIBRARY_PATH; or sum through the host instead (`--engine burn` for `temper launch`, TEMPER_COLLECTIVE=burn for workers started by torchrun, srun or mpirun)";

/// An `ncclComm_t`, used under the engine's lock only.
struct Comm(sys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not
// overlap; every use is under `NcclCollective::comm`'s lock.
unsafe impl Send for Comm {}

pub struct NcclCollective {
    rank: usize,
    world_size: usize,
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// `None` once a failure left the communicator unusable (it is then aborted).
    comm: Mutex<Result<Comm, String>>,
}

impl NcclCollective {
    /// Joins the job's communicator on CUDA device `ordinal` (blocks until every rank has).
    pub fn connect(topology: &Topology, ordinal: usize) -> Result<Self, CollectiveError> {
        // SAFETY: only tries to open the library.
        if !unsafe { sys::is_culib_present() } {
            return Err(engine("loading NCCL", MISSING_LIBRARY));
        }
        let id = match topology.rank {
            0 => {
                let id = result::get_uniqueid().map_err(|e| engine("creating NCCL's id", nccl_error(e)))?;
                Some(id.internal.map(|c| c as u8))
            }
            _ => None,
        };
        let timeout = std::env::var("TEMPER_RENDEZVOUS_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(crate::rendezvous::DEFAULT_TIMEOUT, Duration::from_secs);
        let bytes: [u8; ID_BYTES] = share_id(topology, id, timeout)?;
        let context = CudaContext::new(ordinal)
            .map_err(|e| engine("opening the CUDA device", format!("cuda:{ordinal}: {e:?}")))?;
        let stream = context
            .new_stream()
            .map_err(|e| engine("creating a CUDA stream", format!("{e:?}")))?;
        let unique = sys::ncclUniqueId {
            internal: bytes.map(|b| b as std::ffi::c_char),
        };
        let mut comm = MaybeUninit::uninit();
        // SAFETY: `comm` is written by NCCL on success; the id is the job's, the same on every
        // rank; the CUDA context of `ordinal` is current on this thread (CudaContext::new).
        let comm = unsafe {
            result::comm_init_rank(
                comm.as_mut_ptr(),
                topology.world_size as i32,
                unique,
                topology.rank as i32,
            )
            .map_err(|e| engine("joining the NCCL communicator", nccl_error(e)))?;
            comm.assume_init()
        };
        Ok(NcclCollective {
            rank: topology.rank,
            world_size: topology.world_size,
            context,
            stream,
            comm: Mutex::new(Ok(Comm(comm))),
        })
    }

    /// Sums `count` f32 values at device address `ptr` in place over the workers, and waits.
    fn sum_in_place(&self, ptr: u64, count: usize) -> Result<(), CollectiveError> {
        let mut guard = self
            .comm
            .lock()
            .map_err(|_| CollectiveError::Broken("poisoned lock".into()))?;
        let comm = match &*guard {
            Ok(c) => c.0,
            Err(why) => return Err(CollectiveError::Broken(why.clone())),
        };
        self.context
            .bind_to_thread()
            .map_err(|e| engine("all-reduce", format!("binding the CUDA context: {e:?}")))?;
        // SAFETY: `ptr` addresses `count` f32 values on this device that nothing else touches
        // until the stream is synchronised below; `comm` is alive under the lock.
        let done = unsafe {
            result::all_reduce(
                ptr as *const _,
                ptr as *mut _,
                count,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                comm,
                self.stream.cu_stream() as _,
            )
        }
        .map_err(nccl_error)
        .and_then(|_| self.wait(comm));
        if let Err(message) = done {
            // A failed collective leaves the communicator in an unknown state: abort it, so
            // that the peers' calls fail too instead of waiting for this rank forever.
            // SAFETY: `comm` is not used again (the state says broken from here).
            unsafe {
                let _ = result::comm_abort(comm);
            }
            *guard = Err(message.clone());
            return Err(engine("all-reduce", message));
        }
        Ok(())
    }

    /// Waits for this engine's stream, watching the communicator: when a peer dies, NCCL
    /// reports it as an asynchronous error while the collective would never finish.
    fn wait(&self, comm: sys::ncclComm_t) -> Result<(), String> {
        use cudarc::driver::sys::{CUresult, cuStreamQuery};
        loop {
            // SAFETY: the stream is alive (owned by self).
            match unsafe { cuStreamQuery(self.stream.cu_stream()) } {
                CUresult::CUDA_SUCCESS => return Ok(()),
                CUresult::CUDA_ERROR_NOT_READY => {}
                other => return Err(format!("waiting for the all-reduce: {other:?}")),
            }
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: `comm` is alive (under the engine's lock); NCCL writes `state`.
            let asked = unsafe { sys::ncclCommGetAsyncError(comm, &mut state) };
            if asked != sys::ncclResult_t::ncclSuccess {
                return Err(nccl_error(result::NcclError(asked)));
            }
            if !matches!(
                state,
                sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
            ) {
                return Err(format!("a peer failed: {}", nccl_error(result::NcclError(state))));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// The device address and value count of a contiguous f32 CubeCL tensor, once every kernel
    /// that writes it has finished.
    fn address(&self, tensor: CubeTensor<CudaRuntime>) -> Result<(u64, usize), CollectiveError> {
        if !tensor.is_contiguous() || tensor.dtype != burn::tensor::DType::F32 {
            // The trainer builds buckets with `cat` (fresh, contiguous, f32): a programmer error.
            return Err(engine("all-reduce", "a bucket must be one contiguous f32 tensor"));
        }
        let count = tensor.meta.shape().num_elements();
        let resource = tensor
            .client
            .get_resource(tensor.handle.clone())
            .map_err(|e| engine("all-reduce", format!("locating the bucket: {e:?}")))?;
        cubecl::future::block_on(tensor.client.sync())
            .map_err(|e| engine("all-reduce", format!("waiting for the backward pass: {e:?}")))?;
        let ptr = resource.resource().ptr;
        if (resource.resource().size as usize) < count * 4 {
            return Err(engine("all-reduce", "the bucket's memory is smaller than its shape"));
        }
        Ok((ptr, count))
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        if let Ok(guard) = self.comm.lock()
            && let Ok(comm) = &*guard
        {
            // Abort, not destroy: destroy finalizes, which waits for the peers, and a worker
            // dropping its engine on an error path must not hang on peers still in a collective.
            // SAFETY: the communicator is alive and used by nothing else any more.
            unsafe {
                let _ = result::comm_abort(comm.0);
            }
        }
    }
}

impl temper_trainer::Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    /// Small host buffers (the step's counters): copied to the device, summed, copied back.
    fn all_reduce_sum(&self, values: Vec<f32>) -> Result<Vec<f32>, CollectiveError> {
        if values.is_empty() {
            return Ok(values);
        }
        let copy = |e: cudarc::driver::DriverError| engine("all-reduce", format!("copying the counters: {e:?}"));
        let mut slice = self.stream.clone_htod(&values).map_err(copy)?;
        {
            let (ptr, _record) = slice.device_ptr_mut(&self.stream);
            self.sum_in_place(ptr, values.len())?;
        }
        self.stream.clone_dtoh(&slice).map_err(copy)
    }

    fn device_bucket(&self) -> Option<usize> {
        Some(BUCKET_VALUES)
    }

    fn all_reduce_bucket(&self, bucket: &mut dyn Any) -> Result<(), CollectiveError> {
        // The tensor stays alive (and its memory its own) while NCCL writes into it.
        let cube = if let Some(t) = bucket.downcast_ref::<Tensor<Fused, 1>>() {
            match t.clone().into_primitive() {
                TensorPrimitive::Float(f) => f.client.clone().resolve_tensor_float::<Unfused>(f),
                TensorPrimitive::QFloat(_) => return Err(engine("all-reduce", "a quantized bucket")),
            }
        } else if let Some(t) = bucket.downcast_ref::<Tensor<Unfused, 1>>() {
            t.clone().into_primitive().tensor()
        } else {
            return Err(engine(
                "all-reduce",
                "the nccl engine sums tensors of the CUDA backend, and this job trains on another",
            ));
        };
        let (ptr, count) = self.address(cube)?;
        self.sum_in_place(ptr, count)
    }
}
