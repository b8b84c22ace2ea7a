//! Data parallelism from the trainer's side: the workers' trainable gradients, weighted by each
//! worker's share of the step's normaliser (target tokens or pairs), summed through a
//! [`Collective`] in one flat buffer together with the step's counters, so every worker ends
//! the step with the gradient one worker would have computed over the whole global batch.
//! The collective engine itself lives in `temper-launch`.

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

/// The trainable gradients of `module`, in the module's (deterministic) parameter order.
fn gradient_list<AB: AutodiffBackend, M: Module<AB>>(
    module: &M,
    grads: &GradientsParams,
) -> Vec<(ParamId, Vec<usize>, Vec<f32>)> {
    struct Collect<'a> {
        grads: &'a GradientsParams,
        out: Vec<(ParamId, Vec<usize>, Vec<f32>)>,
    }
    impl<AB: AutodiffBackend> ModuleVisitor<AB> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
            if let Some(g) = self.grads.get::<AB::InnerBackend, D>(param.id) {
                let shape = g.dims().to_vec();
                let values = g
                    .cast(DType::F32)
                    .into_data()
                    .convert::<f32>()
                    .to_vec()
                    .expect("f32 values");
                self.out.push((param.id, shape, values));
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
    let local_denominator = counters[0];
    let list = gradient_list::<AB, M>(module, grads);
    let mut flat: Vec<f32> = Vec::with_capacity(list.iter().map(|g| g.2.len()).sum::<usize>() + counters.len());
    for (_, _, values) in &list {
        flat.extend(values.iter().map(|v| v * local_denominator));
    }
    let offset = flat.len();
    flat.extend_from_slice(&counters);
    let bytes = flat.len() * 4;
    let summed = all_reduce(c, flat)?;
    let totals = summed[offset..].to_vec();
    let scale = 1.0 / totals[0].max(1.0);
    let mut at = 0;
    for (id, shape, values) in list {
        let n = values.len();
        let data: Vec<f32> = summed[at..at + n].iter().map(|v| v * scale).collect();
        at += n;
        register::<AB>(grads, id, data, shape, device);
    }
    Ok((totals, bytes))
}

fn register<AB: AutodiffBackend>(
    grads: &mut GradientsParams,
    id: ParamId,
    data: Vec<f32>,
    shape: Vec<usize>,
    device: &AB::Device,
) {
    let data = TensorData::new(data, shape.clone());
    macro_rules! put {
        ($d:literal) => {{
            let old = grads.remove::<AB::InnerBackend, $d>(id).expect("listed above");
            let t = Tensor::<AB::InnerBackend, $d>::from_data(data, device).cast(old.dtype());
            grads.register::<AB::InnerBackend, $d>(id, t);
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
