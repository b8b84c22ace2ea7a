//! Data parallelism from the trainer's side: the workers' trainable gradients, weighted by each
//! worker's share of the step's normaliser (target tokens or pairs), summed through a
//! [`Collective`] in one flat buffer together with the step's counters, so every worker ends
//! the step with the gradient one worker would have computed over the whole global batch.
//! The collective engine itself lives in `temper-launch`.
//!
//! Engines that sum on the device (NCCL) get the gradients as they are, in buckets of at most
//! [`Collective::device_bucket`] values: each bucket one flat f32 tensor on the training
//! device, summed in place, then cut back into the gradients. Host engines get one flat
//! `Vec<f32>` of everything.

use std::any::Any;
use std::ops::Range;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Tensor, TensorData};

use crate::error::{Error, Result};

/// An all-reduce over the workers of a job.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// The element-wise sum of `values` over all workers (every worker passes the same length).
    fn all_reduce_sum(&self, values: Vec<f32>) -> std::result::Result<Vec<f32>, CollectiveError>;
    /// `Some(n)` when the engine sums tensors on the training device, in buckets of at most `n`
    /// values, through [`Collective::all_reduce_bucket`]; `None` (the default) when it sums host
    /// buffers only.
    fn device_bucket(&self) -> Option<usize> {
        None
    }
    /// Replaces `bucket`, a `Tensor<B, 1>` of f32 values on the training backend `B` (the inner
    /// backend of the autodiff one) behind `Any`, by its element-wise sum over all workers.
    /// Called only when [`Collective::device_bucket`] is `Some`; an engine that does not know
    /// `B` says so in an error.
    fn all_reduce_bucket(&self, bucket: &mut dyn Any) -> std::result::Result<(), CollectiveError> {
        let _ = bucket;
        Err(CollectiveError::Engine {
            operation: "all-reduce",
            message: "this engine sums host buffers only".into(),
        })
    }
}

/// Why an all-reduce failed.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// The collective engine reported an error during `operation` (register, all-reduce, ...).
    #[error("{operation}: {message}")]
    Engine { operation: &'static str, message: String },
    /// The engine summed another number of workers than the job has.
    #[error("the all-reduce summed {summed} workers' values, not {expected} (the collective's membership went wrong)")]
    Membership { summed: f32, expected: usize },
    /// The engine returned another number of values than it was given.
    #[error("the all-reduce returned {returned} values for {given}")]
    Length { given: usize, returned: usize },
    /// An earlier operation failed in a way that leaves the engine unusable in this process.
    #[error("unusable after an earlier failure ({0})")]
    Broken(String),
}

/// Sums `local` (each worker's values) over the workers.
pub(crate) fn all_reduce(c: &dyn Collective, local: Vec<f32>) -> Result<Vec<f32>> {
    let given = local.len();
    let failed = |source| Error::Collective { rank: c.rank(), source };
    let out = c.all_reduce_sum(local).map_err(failed)?;
    if out.len() != given {
        return Err(failed(CollectiveError::Length {
            given,
            returned: out.len(),
        }));
    }
    Ok(out)
}

/// The trainable gradients of `module`, in the module's (deterministic) parameter order, and
/// whether this worker has each; a trainable parameter without one (this worker's
/// micro-batches had nothing to learn from, or it takes no part in the loss) gets zeros, so
/// every worker sums the same layout. A gradient no worker has stays absent after the sum
/// (the optimizer skips it, as in a single process).
fn gradient_list<AB: AutodiffBackend, M: Module<AB>>(
    module: &M,
    grads: &GradientsParams,
) -> Vec<(ParamId, Vec<usize>, DType, Vec<f32>, bool)> {
    struct Collect<'a> {
        grads: &'a GradientsParams,
        out: Vec<(ParamId, Vec<usize>, DType, Vec<f32>, bool)>,
    }
    impl<AB: AutodiffBackend> ModuleVisitor<AB> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
            if let Some(g) = self.grads.get::<AB::InnerBackend, D>(param.id) {
                let shape = g.dims().to_vec();
                let dtype = g.dtype();
                let values = g
                    .cast(DType::F32)
                    .into_data()
                    .convert::<f32>()
                    .to_vec()
                    .expect("f32 values");
                self.out.push((param.id, shape, dtype, values, true));
            } else if param.val().is_require_grad() {
                let (shape, dtype) = (param.val().dims().to_vec(), param.val().dtype());
                let zeros = vec![0.0; shape.iter().product()];
                self.out.push((param.id, shape, dtype, zeros, false));
            }
        }
    }
    let mut c = Collect { grads, out: Vec::new() };
    module.visit::<Collect>(&mut c);
    c.out
}

/// Replaces each worker's gradients (of `Σ loss / local_denominator`) by the global ones (of
/// `Σ loss / global_denominator` over every worker's micro-batches), and sums `counters`
/// (whose first entry must be the local denominator) over the workers. Returns the summed
/// counters and the bytes each worker sent.
pub(crate) fn sync_gradients<AB: AutodiffBackend, M: Module<AB>>(
    c: &dyn Collective,
    module: &M,
    grads: &mut GradientsParams,
    counters: Vec<f32>,
    device: &AB::Device,
) -> Result<(Vec<f32>, usize)> {
    match c.device_bucket() {
        Some(bucket) => sync_on_device::<AB, M>(c, module, grads, counters, bucket),
        None => sync_on_host::<AB, M>(c, module, grads, counters, device),
    }
}

/// Everything through the host in one buffer: the counters ride with the gradients.
fn sync_on_host<AB: AutodiffBackend, M: Module<AB>>(
    c: &dyn Collective,
    module: &M,
    grads: &mut GradientsParams,
    counters: Vec<f32>,
    device: &AB::Device,
) -> Result<(Vec<f32>, usize)> {
    let local_denominator = counters[0];
    let list = gradient_list::<AB, M>(module, grads);
    let mut flat: Vec<f32> = Vec::with_capacity(list.iter().map(|g| g.3.len() + 1).sum::<usize>() + counters.len());
    for (_, _, _, values, _) in &list {
        flat.extend(values.iter().map(|v| v * local_denominator));
    }
    let offset = flat.len();
    flat.extend_from_slice(&counters);
    flat.extend(list.iter().map(|g| g.4 as u8 as f32));
    let bytes = flat.len() * 4;
    let summed = all_reduce(c, flat)?;
    let totals = summed[offset..offset + counters.len()].to_vec();
    let present = &summed[offset + counters.len()..];
    let scale = 1.0 / totals[0].max(1.0);
    let mut at = 0;
    for (i, (id, shape, dtype, values, _)) in list.into_iter().enumerate() {
        let n = values.len();
        let data: Vec<f32> = summed[at..at + n].iter().map(|v| v * scale).collect();
        at += n;
        if present[i] > 0.0 {
            let flat = Tensor::from_data(TensorData::new(data, [n]), device);
            register_tensor::<AB>(grads, id, flat, &shape, dtype);
        }
    }
    Ok((totals, bytes))
}

/// The gradients summed on the device, bucket by bucket. The counters go first (a few values,
/// through the host): with the global denominator known, each worker weighs its gradients by
/// `local / global` before the sum, so the summed buckets are the final gradients.
fn sync_on_device<AB: AutodiffBackend, M: Module<AB>>(
    c: &dyn Collective,
    module: &M,
    grads: &mut GradientsParams,
    counters: Vec<f32>,
    bucket_values: usize,
) -> Result<(Vec<f32>, usize)> {
    let local_denominator = counters[0];
    let list = device_gradients::<AB, M>(module, grads);
    // Which gradients any worker has travels with the counters: one nobody has is left out
    // of every worker's buckets alike.
    let n_counters = counters.len();
    let mut counters = counters;
    counters.extend(list.iter().map(|g| g.present as u8 as f32));
    let mut bytes = counters.len() * 4;
    let mut totals = all_reduce(c, counters)?;
    let present = totals.split_off(n_counters);
    let list: Vec<DeviceGradient<AB::InnerBackend>> = list
        .into_iter()
        .zip(present)
        .filter_map(|(g, p)| (p > 0.0).then_some(g))
        .collect();
    let weight = local_denominator / totals[0].max(1.0);
    let sizes: Vec<usize> = list.iter().map(|g| g.shape.iter().product()).collect();
    for range in buckets(&sizes, bucket_values) {
        let parts: Vec<Tensor<AB::InnerBackend, 1>> = list[range.clone()]
            .iter()
            .map(|g| g.flat.clone().mul_scalar(weight))
            .collect();
        let mut bucket = Tensor::cat(parts, 0);
        bytes += bucket.dims()[0] * 4;
        c.all_reduce_bucket(&mut bucket as &mut dyn Any)
            .map_err(|source| Error::Collective { rank: c.rank(), source })?;
        let mut at = 0;
        for g in &list[range] {
            let n: usize = g.shape.iter().product();
            let values = bucket.clone().slice(at..at + n);
            at += n;
            register_tensor::<AB>(grads, g.id, values, &g.shape, g.dtype);
        }
    }
    Ok((totals, bytes))
}

/// One trainable gradient, flattened to f32 on its device.
struct DeviceGradient<B: burn::tensor::backend::Backend> {
    id: ParamId,
    shape: Vec<usize>,
    dtype: DType,
    flat: Tensor<B, 1>,
    /// This worker has it (not zeros standing in).
    present: bool,
}

/// The trainable gradients of `module` in its parameter order, still on the device (zeros for
/// a trainable parameter without one, as [`gradient_list`]).
fn device_gradients<AB: AutodiffBackend, M: Module<AB>>(
    module: &M,
    grads: &GradientsParams,
) -> Vec<DeviceGradient<AB::InnerBackend>> {
    struct Collect<'a, B: burn::tensor::backend::Backend> {
        grads: &'a GradientsParams,
        out: Vec<DeviceGradient<B>>,
    }
    impl<AB: AutodiffBackend> ModuleVisitor<AB> for Collect<'_, AB::InnerBackend> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
            let (g, present) = match self.grads.get::<AB::InnerBackend, D>(param.id) {
                Some(g) => (g, true),
                None if param.val().is_require_grad() => {
                    let p = param.val().inner();
                    (Tensor::zeros(p.shape(), &p.device()), false)
                }
                None => return,
            };
            let shape = g.dims().to_vec();
            let dtype = g.dtype();
            let n = shape.iter().product::<usize>();
            self.out.push(DeviceGradient {
                id: param.id,
                shape,
                dtype,
                flat: g.cast(DType::F32).reshape([n]),
                present,
            });
        }
    }
    let mut c = Collect::<AB::InnerBackend> { grads, out: Vec::new() };
    module.visit::<Collect<AB::InnerBackend>>(&mut c);
    c.out
}

/// Consecutive groups of `sizes` (in order) of at most `max` values each; an entry larger than
/// `max` is a group of its own (it is never split: a gradient is summed whole).
pub(crate) fn buckets(sizes: &[usize], max: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut filled) = (0, 0);
    for (i, &n) in sizes.iter().enumerate() {
        if i > start && filled + n > max {
            out.push(start..i);
            (start, filled) = (i, 0);
        }
        filled += n;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

/// Puts `flat` (f32) back as the gradient of `id`, in its shape and dtype.
fn register_tensor<AB: AutodiffBackend>(
    grads: &mut GradientsParams,
    id: ParamId,
    flat: Tensor<AB::InnerBackend, 1>,
    shape: &[usize],
    dtype: DType,
) {
    macro_rules! put {
        ($d:literal) => {{
            let dims: [usize; $d] = shape.try_into().expect("checked by the match");
            grads.remove::<AB::InnerBackend, $d>(id);
            grads.register::<AB::InnerBackend, $d>(id, flat.reshape(dims).cast(dtype));
        }};
    }
    match shape.len() {
        1 => put!(1),
        2 => put!(2),
        3 => put!(3),
        4 => put!(4),
        d => unreachable!("parameters have 1 to 4 dimensions, not {d}"),
    }
}

/// `values` in this worker's slot of a buffer with one slot per worker, zeros elsewhere: summed
/// over the workers, it holds every worker's values.
pub(crate) fn in_own_slot(c: &dyn Collective, values: &[f32]) -> Vec<f32> {
    let k = values.len();
    let mut slots = vec![0.0; k * c.world_size()];
    slots[c.rank() * k..(c.rank() + 1) * k].copy_from_slice(values);
    slots
}

/// Every worker's `values` (same length everywhere), by rank.
pub(crate) fn all_gather(c: &dyn Collective, values: &[f32]) -> Result<Vec<Vec<f32>>> {
    let summed = all_reduce(c, in_own_slot(c, values))?;
    Ok(summed.chunks(values.len()).map(|s| s.to_vec()).collect())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier, Mutex};

    use burn::backend::{Autodiff, NdArray};
    use burn::module::Param;

    use super::*;

    type B = Autodiff<NdArray>;

    #[derive(burn::module::Module, Debug)]
    struct Tiny<B: burn::tensor::backend::Backend> {
        bias: Param<Tensor<B, 1>>,
        weight: Param<Tensor<B, 2>>,
        experts: Param<Tensor<B, 3>>,
        frozen: Param<Tensor<B, 2>>,
    }

    /// The same weights on every worker (seeded), a worker-specific loss.
    fn tiny_and_grads(rank: usize, f64_weight: bool) -> (Tiny<B>, GradientsParams) {
        let device = Default::default();
        let random = |n: usize| {
            let values: Vec<f32> = (0..n).map(|i| ((i * 7 + n) % 11) as f32 / 10.0 - 0.5).collect();
            Tensor::<B, 1>::from_data(TensorData::new(values, [n]), &device)
        };
        let mut weight = random(12).reshape([3, 4]);
        if f64_weight {
            weight = weight.cast(DType::F64);
        }
        let tiny = Tiny {
            bias: Param::from_tensor(random(4)),
            weight: Param::from_tensor(weight),
            experts: Param::from_tensor(random(24).reshape([2, 3, 4])),
            frozen: Param::from_tensor(random(4).reshape([2, 2])).set_require_grad(false),
        };
        let x = Tensor::<B, 1>::from_floats([1.0 + rank as f32, -2.0, 0.5], &device);
        let h = x
            .clone()
            .reshape([1, 3])
            .matmul(tiny.weight.val().cast(DType::F32))
            .reshape([4])
            + tiny.bias.val();
        let e = tiny.experts.val().sum_dim(0).reshape([3, 4]);
        let loss =
            (h.clone() * h).sum() + x.reshape([1, 3]).matmul(e).sum() * (rank as f32 + 2.0) + tiny.frozen.val().sum();
        let grads = GradientsParams::from_grads(loss.backward(), &tiny);
        (tiny, grads)
    }

    fn grads_of(tiny: &Tiny<B>, grads: &GradientsParams) -> Vec<(DType, Vec<f32>)> {
        gradient_list::<B, Tiny<B>>(tiny, grads)
            .into_iter()
            .map(|(_, _, dtype, values, _)| (dtype, values))
            .collect()
    }

    /// Workers that sum through shared memory; with `bucket`, also device tensors (ndarray's).
    struct Mock {
        rank: usize,
        shared: Arc<(Barrier, Mutex<Vec<Vec<f32>>>)>,
        bucket: Option<usize>,
        bucket_lengths: Mutex<Vec<usize>>,
    }

    impl Collective for Mock {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            2
        }
        fn all_reduce_sum(&self, values: Vec<f32>) -> std::result::Result<Vec<f32>, CollectiveError> {
            let (barrier, slots) = &*self.shared;
            slots.lock().unwrap()[self.rank] = values;
            barrier.wait();
            let sum = {
                let slots = slots.lock().unwrap();
                (0..slots[0].len()).map(|i| slots.iter().map(|s| s[i]).sum()).collect()
            };
            barrier.wait();
            Ok(sum)
        }
        fn device_bucket(&self) -> Option<usize> {
            self.bucket
        }
        fn all_reduce_bucket(&self, bucket: &mut dyn Any) -> std::result::Result<(), CollectiveError> {
            let t = bucket
                .downcast_mut::<Tensor<NdArray, 1>>()
                .expect("the trainer hands the inner backend's tensor");
            let values = t.clone().into_data().convert::<f32>().to_vec().unwrap();
            self.bucket_lengths.lock().unwrap().push(values.len());
            let sum = self.all_reduce_sum(values)?;
            *t = Tensor::from_data(TensorData::new(sum, [t.dims()[0]]), &t.device());
            Ok(())
        }
    }

    /// Both workers' synced gradients (dtype, values) and bucket lengths, and the counters.
    fn sync_two(bucket: Option<usize>, f64_weight: bool) -> Vec<(Vec<(DType, Vec<f32>)>, Vec<usize>, Vec<f32>)> {
        let shared = Arc::new((Barrier::new(2), Mutex::new(vec![Vec::new(), Vec::new()])));
        let workers: Vec<_> = (0..2)
            .map(|rank| {
                let shared = shared.clone();
                std::thread::spawn(move || {
                    let mock = Mock {
                        rank,
                        shared,
                        bucket,
                        bucket_lengths: Mutex::new(Vec::new()),
                    };
                    let (tiny, mut grads) = tiny_and_grads(rank, f64_weight);
                    let counters = vec![1.0 + 2.0 * rank as f32, 10.0];
                    let (totals, _) =
                        sync_gradients::<B, Tiny<B>>(&mock, &tiny, &mut grads, counters, &Default::default()).unwrap();
                    (
                        grads_of(&tiny, &grads),
                        mock.bucket_lengths.into_inner().unwrap(),
                        totals,
                    )
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    }

    #[test]
    fn buckets_keep_order_and_never_split_a_gradient() {
        assert_eq!(buckets(&[4, 12, 24], 16), vec![0..2, 2..3]);
        assert_eq!(buckets(&[4, 12, 24], 100), vec![0..3]);
        assert_eq!(buckets(&[30, 1, 1], 16), vec![0..1, 1..3]);
        assert_eq!(buckets(&[16, 16], 16), vec![0..1, 1..2]);
        assert_eq!(buckets(&[], 16), Vec::<Range<usize>>::new());
    }

    #[test]
    fn device_buckets_give_the_host_sum() {
        // Worker 0's denominator 1, worker 1's 3: each worker's gradients weigh 1/4 and 3/4.
        let expected: Vec<Vec<f32>> = {
            let g: Vec<_> = (0..2)
                .map(|r| {
                    let (tiny, grads) = tiny_and_grads(r, false);
                    grads_of(&tiny, &grads)
                })
                .collect();
            (0..g[0].len())
                .map(|p| {
                    g[0][p]
                        .1
                        .iter()
                        .zip(&g[1][p].1)
                        .map(|(a, b)| 0.25 * a + 0.75 * b)
                        .collect()
                })
                .collect()
        };
        let host = sync_two(None, false);
        for bucket in [Some(16), Some(1), Some(1000)] {
            let device = sync_two(bucket, false);
            for rank in 0..2 {
                assert_eq!(device[rank].2, vec![4.0, 20.0], "counters summed");
                for (p, (_, values)) in device[rank].0.iter().enumerate() {
                    for (i, v) in values.iter().enumerate() {
                        assert!(
                            (v - expected[p][i]).abs() < 1e-5,
                            "{bucket:?} rank {rank} param {p}[{i}]"
                        );
                        assert!((v - host[rank].0[p].1[i]).abs() < 1e-5);
                    }
                }
            }
            // Bias (4) + weight (12), then experts (24); every gradient alone; all in one.
            let lengths = &device[0].1;
            match bucket {
                Some(16) => assert_eq!(lengths, &[16, 24]),
                Some(1) => assert_eq!(lengths, &[4, 12, 24]),
                _ => assert_eq!(lengths, &[40]),
            }
        }
        assert!(host[0].1.is_empty(), "the host engine gets no bucket");
    }

    #[test]
    fn device_buckets_return_each_gradient_in_its_dtype() {
        let host = sync_two(None, true);
        let device = sync_two(Some(16), true);
        assert_eq!(device[0].0[1].0, DType::F64, "the f64 weight's gradient stays f64");
        for p in 0..3 {
            assert_eq!(device[1].0[p].0, host[1].0[p].0);
            for (a, b) in device[1].0[p].1.iter().zip(&host[1].0[p].1) {
                assert!((a - b).abs() < 1e-5);
            }
        }
    }
}
