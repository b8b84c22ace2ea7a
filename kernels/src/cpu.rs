//! The kernels for burn's ndarray backend, and their place in burn's autodiff graph.
//!
//! burn has no way to add an operation to a backend from outside (no specialization), and the
//! model code is generic over `B: Backend`. So each entry point checks whether `B` is exactly
//! `NdArray<f32>` or `Autodiff<NdArray<f32>>` and, if so, moves the tensors over to that type
//! (a `TypeId`-checked downcast, no copy); any other backend, or any dtype but f32, returns
//! `None` and the caller composes the operation from burn's tensor operations.
//!
//! The kernels work on contiguous row-major f32 slices; rayon spreads rows or heads over the
//! cores; the small matrix products inside attention use `matrixmultiply` (one thread each, since
//! rayon already occupies every core).

use std::any::{Any, TypeId};
use std::sync::Arc;

use burn::tensor::ops::FloatTensor;
use burn::tensor::{Bool, DType, Tensor, TensorPrimitive, backend::Backend};
use burn_autodiff::Autodiff;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_ndarray::{NdArray, NdArrayTensor};
use ndarray::{ArcArray, IxDyn};
use rayon::prelude::*;

use crate::gemm::{Matrix, Values, bf16_to_f32};

type Nd = NdArray<f32>;
type Ad = Autodiff<Nd>;

/// Which of the two backends with kernels `B` is.
#[derive(Clone, Copy)]
enum Kind {
    Plain,
    Autodiff,
}

fn kind<B: Backend>() -> Option<Kind> {
    let id = TypeId::of::<B>();
    if id == TypeId::of::<Nd>() {
        Some(Kind::Plain)
    } else if id == TypeId::of::<Ad>() {
        Some(Kind::Autodiff)
    } else {
        None
    }
}

/// `T` as `U`, for types whose `TypeId`s the caller compared.
fn same<T: 'static, U: 'static>(x: T) -> U {
    *(Box::new(x) as Box<dyn Any>)
        .downcast::<U>()
        .unwrap_or_else(|_| unreachable!("the backend's type was checked"))
}

/// The backend's float primitive of `t`, if `B` has kernels and `t` is f32.
fn float_prim<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Option<Prim> {
    let kind = kind::<B>()?;
    if t.dtype() != DType::F32 {
        return None;
    }
    let prim = t.clone().into_primitive().tensor();
    Some(match kind {
        Kind::Plain => Prim::Plain(same::<FloatTensor<B>, NdArrayTensor>(prim)),
        Kind::Autodiff => Prim::Autodiff(same::<FloatTensor<B>, FloatTensor<Ad>>(prim)),
    })
}

enum Prim {
    Plain(NdArrayTensor),
    Autodiff(FloatTensor<Ad>),
}

impl Prim {
    /// The values, without the autodiff node.
    fn inner(&self) -> &NdArrayTensor {
        match self {
            Prim::Plain(t) => t,
            Prim::Autodiff(t) => &t.primitive,
        }
    }

    fn inner_dims(&self) -> [usize; 4] {
        let d = dims(self.inner());
        [d[0], d[1], d[2], d[3]]
    }
}

/// `out`, computed by `op` from `inputs`: on the autodiff backend, a node of the graph whose
/// backward gets `state()` (built only when some input wants a gradient); otherwise plain.
fn record<O: Backward<Nd, N>, const N: usize>(
    op: O,
    inputs: [&Prim; N],
    out: NdArrayTensor,
    state: impl FnOnce() -> O::State,
) -> Prim {
    let nodes = inputs.map(|input| match input {
        Prim::Autodiff(t) => Some(t.node.clone()),
        Prim::Plain(_) => None,
    });
    if nodes.iter().any(Option::is_none) {
        return Prim::Plain(out);
    }
    let nodes = nodes.map(|node| node.expect("checked above"));
    Prim::Autodiff(match op.prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(state(), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    })
}

fn tensor<B: Backend, const D: usize>(out: Prim) -> Tensor<B, D> {
    let prim: FloatTensor<B> = match out {
        Prim::Plain(t) => same(t),
        Prim::Autodiff(t) => same(t),
    };
    Tensor::from_primitive(TensorPrimitive::Float(prim))
}

/// Contiguous row-major values (borrowed when the tensor already is).
fn values(t: &NdArrayTensor) -> std::borrow::Cow<'_, [f32]> {
    match t {
        NdArrayTensor::F32(storage) => {
            let view = storage.view();
            match view.to_slice() {
                Some(slice) => slice.into(),
                None => view.iter().copied().collect::<Vec<_>>().into(),
            }
        }
        other => unreachable!("checked f32, got {:?}", burn::tensor::TensorMetadata::dtype(other)),
    }
}

fn dims(t: &NdArrayTensor) -> Vec<usize> {
    burn::tensor::TensorMetadata::shape(t).to_vec()
}

fn from_vec(values: Vec<f32>, shape: &[usize]) -> NdArrayTensor {
    let array = ArcArray::from_shape_vec(IxDyn(shape), values).expect("values match the shape");
    NdArrayTensor::from(array)
}

/// Registers the gradient for each parent that wants one (`(parent, || gradient)` pairs; burn's
/// node type has no public name).
macro_rules! register {
    ($grads:expr, $(($parent:expr, $grad:expr)),+) => {
        $(if let Some(node) = $parent {
            $grads.register::<Nd>(node.id, $grad());
        })+
    };
}

/// Elements per rayon task for element-wise kernels: large enough to amortize the task, small
/// enough to balance two or more cores.
const CHUNK: usize = 1 << 14;

// ---------------------------------------------------------------------------------------------
// Reshape. burn-ndarray 0.21 copies on every reshape (see matmul below), forward and backward;
// a contiguous array only needs new dimensions.

pub(crate) fn reshape<B: Backend, const D: usize, const D2: usize>(
    x: &Tensor<B, D>,
    shape: [usize; D2],
) -> Option<Tensor<B, D2>> {
    let x = float_prim(x)?;
    let from = dims(x.inner());
    let out = reshaped(x.inner().clone(), &shape);
    Some(tensor(record(ReshapeBackward, [&x], out, || from)))
}

/// `t` with new dimensions: free when it is contiguous, a copy otherwise.
fn reshaped(t: NdArrayTensor, shape: &[usize]) -> NdArrayTensor {
    let array = match t {
        NdArrayTensor::F32(storage) => storage.into_shared(),
        other => unreachable!("checked f32, got {:?}", burn::tensor::TensorMetadata::dtype(&other)),
    };
    let array = if array.is_standard_layout() {
        array.into_shape_with_order(IxDyn(shape)).expect("as many elements")
    } else {
        ArcArray::from_shape_vec(IxDyn(shape), array.iter().copied().collect()).expect("as many elements")
    };
    NdArrayTensor::from(array)
}

#[derive(Debug)]
struct ReshapeBackward;

impl Backward<Nd, 1> for ReshapeBackward {
    type State = Vec<usize>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Nd>(&ops.node);
        let [parent] = ops.parents;
        register!(grads, (parent, || reshaped(grad, &ops.state)));
    }
}

// ---------------------------------------------------------------------------------------------
// Matmul. burn-ndarray 0.21's matmul reshapes both operands and its output to 3-D, and its
// reshape copies even a contiguous array (ndarray's `to_shape` borrows, `into_shared` then
// copies), so every product paid three copies, and the backward's transposed operands a fourth.
// Here both operands go to BLAS as views, transposes as a layout flag; the backward computes
// only the gradients that parents want (a frozen base weight gets none).

/// `a·b` in f32; `in_pieces`: the work split over rayon ([`gemm_pieces`]).
pub(crate) fn matmul<B: Backend>(a: &Tensor<B, 2>, b: &Tensor<B, 2>, in_pieces: bool) -> Option<Tensor<B, 2>> {
    let a = float_prim(a)?;
    let b = float_prim(b)?;
    let product = if in_pieces { Product::F32InPieces } else { Product::F32 };
    let out = product.run(a.inner(), false, b.inner(), false);
    Some(tensor(record(MatmulBackward(product), [&a, &b], out, || {
        (a.inner().clone(), b.inner().clone())
    })))
}

/// How a matmul and its backward compute their products.
#[derive(Debug, Clone, Copy)]
enum Product {
    /// BLAS, as it threads itself.
    F32,
    /// BLAS in pieces over rayon ([`gemm_pieces`]).
    F32InPieces,
    /// bf16 inputs, f32 sums ([`gemm_bf16`]).
    Bf16,
}

impl Product {
    /// `op(a)·op(b)` for 2-D f32 tensors, `op` transposing when asked.
    fn run(self, a: &NdArrayTensor, transpose_a: bool, b: &NdArrayTensor, transpose_b: bool) -> NdArrayTensor {
        if let Product::Bf16 = self {
            return gemm_bf16(a, transpose_a, b, transpose_b);
        }
        with_view2(a, |a| {
            with_view2(b, |b| {
                let a = if transpose_a { a.t() } else { a };
                let b = if transpose_b { b.t() } else { b };
                let mut out = ndarray::Array2::<f32>::zeros((a.nrows(), b.ncols()));
                let big = a.nrows() * a.ncols() * b.ncols() >= 1 << 20;
                let pieces = if let (Product::F32InPieces, true) = (self, big) { rayon::current_num_threads() } else { 1 };
                gemm_pieces(a, b, out.view_mut(), pieces);
                NdArrayTensor::from(out.into_dyn().into_shared())
            })
        })
    }
}

/// `out = a·b` by BLAS, in `pieces` parts along the longer side of `out`, run in parallel: once
/// OpenBLAS is kept to one thread ([`quiet_blas`], under bf16 products), the cores share the
/// LoRA products this way. (Only where asked: the pieces' sums may be ordered differently from
/// one call's, and f32 runs keep OpenBLAS's.)
fn gemm_pieces(a: ndarray::ArrayView2<'_, f32>, b: ndarray::ArrayView2<'_, f32>, mut out: ndarray::ArrayViewMut2<'_, f32>, pieces: usize) {
    use ndarray::Axis;
    let (rows, cols) = out.dim();
    if pieces <= 1 || rows.max(cols) < 2 {
        ndarray::linalg::general_mat_mul(1.0, &a, &b, 0.0, &mut out);
        return;
    }
    let half = pieces / 2;
    if rows >= cols {
        let mid = rows * half / pieces;
        let ((a1, a2), (o1, o2)) = (a.split_at(Axis(0), mid), out.split_at(Axis(0), mid));
        rayon::join(|| gemm_pieces(a1, b, o1, half), || gemm_pieces(a2, b, o2, pieces - half));
    } else {
        let mid = cols * half / pieces;
        let ((b1, b2), (o1, o2)) = (b.split_at(Axis(1), mid), out.split_at(Axis(1), mid));
        rayon::join(|| gemm_pieces(a, b1, o1, half), || gemm_pieces(a, b2, o2, pieces - half));
    }
}

/// Runs `f` on a 2-D view of `t`.
fn with_view2<R>(t: &NdArrayTensor, f: impl FnOnce(ndarray::ArrayView2<'_, f32>) -> R) -> R {
    match t {
        NdArrayTensor::F32(storage) => f(storage.view().into_dimensionality().expect("a matrix")),
        other => unreachable!("checked f32, got {:?}", burn::tensor::TensorMetadata::dtype(other)),
    }
}

/// The backward of `a·b`, whose gradients are products of the same kind as the forward's.
#[derive(Debug)]
struct MatmulBackward(Product);

impl Backward<Nd, 2> for MatmulBackward {
    type State = (NdArrayTensor, NdArrayTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Nd>(&ops.node);
        let (a, b) = ops.state;
        let [pa, pb] = ops.parents;
        register!(
            grads,
            (pa, || self.0.run(&grad, false, &b, true)),
            (pb, || self.0.run(&a, true, &grad, false))
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Products with bf16 inputs and f32 sums (gemm.rs): a frozen weight held as bf16 bits, or two
// f32 operands rounded as they are packed (PyTorch's autocast).

/// Runs `f` on `t` (a matrix, f32 or bf16 bits in U16) as a gemm operand: read in place through
/// its strides when its memory is one block (a transpose is), copied otherwise.
fn with_matrix<R>(t: &NdArrayTensor, f: impl FnOnce(Matrix<'_>) -> R) -> R {
    fn run<'a, T: Copy, R>(
        view: ndarray::ArrayViewD<'a, T>,
        values: impl for<'b> Fn(&'b [T]) -> Values<'b>,
        f: impl FnOnce(Matrix<'_>) -> R,
    ) -> R {
        let (rows, cols) = (view.shape()[0], view.shape()[1]);
        let strides = view.strides();
        if let (true, Some(memory)) = (strides.iter().all(|&s| s >= 0), view.as_slice_memory_order()) {
            return f(Matrix {
                values: values(memory),
                rows,
                cols,
                row_stride: strides[0] as usize,
                col_stride: strides[1] as usize,
            });
        }
        let copy: Vec<T> = view.iter().copied().collect();
        f(Matrix::row_major(values(&copy), rows, cols))
    }
    match t {
        NdArrayTensor::F32(storage) => run(storage.view(), |v| Values::F32(v), f),
        NdArrayTensor::U16(storage) => run(storage.view(), |v| Values::Bf16(v), f),
        other => unreachable!("checked f32 or u16, got {:?}", burn::tensor::TensorMetadata::dtype(other)),
    }
}

/// Sets OpenBLAS, when the binary links it, to one thread, once. Its idle workers spin on
/// `sched_yield` for a while after every call; under bf16 products only the small LoRA products
/// still go to BLAS while our GEMM's rayon threads run the rest, and a spinning worker takes a
/// core from them (20% of a SmolLM2 step's samples on 2 cores; the step 9% faster with one
/// thread, benches/RESULTS.md). Looked up at run time so that builds without OpenBLAS (this
/// crate's own tests) need not link it.
fn quiet_blas() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(unix)]
        // SAFETY: dlsym with a NUL-terminated name; the symbol, when present, is OpenBLAS's
        // `void openblas_set_num_threads(int)`.
        unsafe {
            let f = libc::dlsym(libc::RTLD_DEFAULT, c"openblas_set_num_threads".as_ptr());
            if !f.is_null() {
                let set: extern "C" fn(libc::c_int) = std::mem::transmute(f);
                set(1);
            }
        }
    });
}

/// `a·b` with bf16 inputs, as an f32 tensor.
fn gemm_bf16(a: &NdArrayTensor, transpose_a: bool, b: &NdArrayTensor, transpose_b: bool) -> NdArrayTensor {
    quiet_blas();
    with_matrix(a, |a| {
        with_matrix(b, |b| {
            let a = if transpose_a { a.t() } else { a };
            let b = if transpose_b { b.t() } else { b };
            let shape = [a.rows, b.cols];
            from_vec(crate::gemm::gemm(a, b), &shape)
        })
    })
}

/// The ndarray U16 primitive of `bits`, if `B` has kernels.
fn bits_prim<B: Backend>(bits: &Tensor<B, 2, burn::tensor::Int>) -> Option<NdArrayTensor> {
    kind::<B>()?;
    if bits.dtype() != DType::U16 {
        return None;
    }
    // Autodiff's int tensors are its inner backend's.
    Some(same::<burn::tensor::ops::IntTensor<B>, NdArrayTensor>(bits.clone().into_primitive()))
}

pub(crate) fn linear_bf16_frozen<B: Backend>(
    x: &Tensor<B, 2>,
    bits: &Tensor<B, 2, burn::tensor::Int>,
) -> Option<Tensor<B, 2>> {
    let x = float_prim(x)?;
    let w = bits_prim(bits)?;
    let out = gemm_bf16(x.inner(), false, &w, false);
    Some(tensor(record(FrozenBf16Backward, [&x], out, || w)))
}

#[derive(Debug)]
struct FrozenBf16Backward;

impl Backward<Nd, 1> for FrozenBf16Backward {
    type State = NdArrayTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Nd>(&ops.node);
        let [px] = ops.parents;
        // dx = dy · Wᵀ
        register!(grads, (px, || gemm_bf16(&grad, false, &ops.state, true)));
    }
}

/// `w` rounded to bf16, as bits in a row-major U16 tensor; a strided `w` (a transposed weight,
/// at load time) is read through its strides.
pub(crate) fn to_bf16_bits<B: Backend>(w: &Tensor<B, 2>) -> Option<Tensor<B, 2, burn::tensor::Int>> {
    let w = float_prim(w)?;
    let NdArrayTensor::F32(storage) = w.inner() else {
        unreachable!("checked f32")
    };
    let view = storage.view().into_dimensionality::<ndarray::Ix2>().expect("a matrix");
    let (rows, cols) = view.dim();
    let bits = match view.as_slice() {
        Some(values) => bf16_vec(values),
        None => {
            let mut bits = vec![0u16; rows * cols];
            bits.par_chunks_mut(cols.max(1)).enumerate().for_each(|(i, out)| {
                for (o, &x) in out.iter_mut().zip(view.row(i)) {
                    *o = crate::gemm::round_bf16(x);
                }
            });
            bits
        }
    };
    let array = ArcArray::from_shape_vec(IxDyn(&[rows, cols]), bits).expect("values match the shape");
    let bits = NdArrayTensor::from(array);
    Some(Tensor::from_primitive(same::<NdArrayTensor, burn::tensor::ops::IntTensor<B>>(bits)))
}

pub(crate) fn matmul_bf16<B: Backend>(a: &Tensor<B, 2>, b: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    let a = float_prim(a)?;
    let b = float_prim(b)?;
    let out = gemm_bf16(a.inner(), false, b.inner(), false);
    Some(tensor(record(MatmulBackward(Product::Bf16), [&a, &b], out, || {
        (a.inner().clone(), b.inner().clone())
    })))
}

// ---------------------------------------------------------------------------------------------
// Softmax statistics of the output head's logits, per row: max, argmax, mean and the target's
// logit in one pass; the probabilities in a second.

pub(crate) fn softmax_rows<B: Backend>(
    logits: &Tensor<B, 2>,
    targets: &Tensor<B, 1, burn::tensor::Int>,
) -> Option<crate::SoftmaxRows<B>> {
    let logits = float_prim(logits)?;
    let [rows, vocab] = {
        let d = dims(logits.inner());
        [d[0], d[1]]
    };
    let targets: Vec<i64> = targets.to_data().convert::<i64>().into_vec().expect("i64 targets");
    let x = values(logits.inner());
    let mut probs = vec![0.0f32; rows * vocab];
    let stats: Vec<[f32; 3]> = probs
        .par_chunks_mut(vocab)
        .enumerate()
        .map(|(r, p)| {
            let x = &x[r * vocab..][..vocab];
            let (mut max, mut argmax, mut total) = (f32::NEG_INFINITY, 0, 0.0f64);
            for (j, &v) in x.iter().enumerate() {
                if v > max {
                    (max, argmax) = (v, j);
                }
                total += v as f64;
            }
            // Sums over a vocabulary in f64: a running f32 sum of 50 000 terms drifts.
            let mut sum = 0.0f64;
            for (p, &v) in p.iter_mut().zip(x) {
                *p = (v - max).exp();
                sum += *p as f64;
            }
            let inv = (1.0 / sum) as f32;
            p.iter_mut().for_each(|p| *p *= inv);
            let target = targets[r] as usize;
            let hit = if argmax == target { 1.0 } else { 0.0 };
            [x[target] - max - sum.ln() as f32, (total / vocab as f64) as f32, hit]
        })
        .collect();
    let column = |i: usize| untracked::<B, 1>(from_vec(stats.iter().map(|s| s[i]).collect(), &[rows]));
    Some(crate::SoftmaxRows {
        logps: column(0),
        mean_logits: column(1),
        hits: column(2),
        probs: untracked(from_vec(probs, &[rows, vocab])),
    })
}

/// A tensor of `B` outside the autodiff graph.
fn untracked<B: Backend, const D: usize>(t: NdArrayTensor) -> Tensor<B, D> {
    match kind::<B>().expect("checked by the caller") {
        Kind::Plain => tensor(Prim::Plain(t)),
        Kind::Autodiff => tensor(Prim::Autodiff(
            <Ad as burn::tensor::backend::AutodiffBackend>::from_inner(t),
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

/// An activation kept for a backward pass: as it is, or rounded to bf16 (`Products::Bf16`).
#[derive(Debug, Clone)]
enum Saved {
    F32(NdArrayTensor),
    Bf16(Arc<Vec<u16>>),
}

impl Saved {
    fn new(t: &NdArrayTensor, products: crate::Products) -> Self {
        match products {
            crate::Products::F32 => Saved::F32(t.clone()),
            crate::Products::Bf16 => Saved::Bf16(Arc::new(bf16_vec(&values(t)))),
        }
    }

    fn values(&self) -> std::borrow::Cow<'_, [f32]> {
        match self {
            Saved::F32(t) => values(t),
            Saved::Bf16(bits) => bits.par_iter().with_min_len(CHUNK).map(|&b| bf16_to_f32(b)).collect::<Vec<_>>().into(),
        }
    }

    /// `len` values from `at` (of the flattened tensor), as f32: in place, or converted into
    /// `buffer`.
    fn read<'a>(&'a self, at: usize, len: usize, buffer: &'a mut Vec<f32>) -> &'a [f32] {
        match self {
            Saved::F32(t) => match values(t) {
                std::borrow::Cow::Borrowed(v) => &v[at..][..len],
                std::borrow::Cow::Owned(v) => {
                    *buffer = v[at..][..len].to_vec();
                    buffer
                }
            },
            Saved::Bf16(bits) => {
                buffer.clear();
                buffer.extend(bits[at..][..len].iter().map(|&b| bf16_to_f32(b)));
                buffer
            }
        }
    }
}

pub(crate) fn swiglu<B: Backend, const D: usize>(
    gate: &Tensor<B, D>,
    up: &Tensor<B, D>,
    saved: crate::Products,
) -> Option<Tensor<B, D>> {
    let gate = float_prim(gate)?;
    let up = float_prim(up)?;
    let shape = dims(gate.inner());
    let out = {
        let (g, u) = (values(gate.inner()), values(up.inner()));
        let mut out = vec![0.0f32; g.len()];
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
            let at = c * CHUNK;
            for (i, o) in out.iter_mut().enumerate() {
                let g = g[at + i];
                *o = g / (1.0 + (-g).exp()) * u[at + i];
            }
        });
        from_vec(out, &shape)
    };
    Some(tensor(record(SwigluBackward, [&gate, &up], out, || {
        (Saved::new(gate.inner(), saved), Saved::new(up.inner(), saved), shape.clone())
    })))
}

#[derive(Debug)]
struct SwigluBackward;

impl Backward<Nd, 2> for SwigluBackward {
    type State = (Saved, Saved, Vec<usize>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Nd>(&ops.node);
        let (gate, up, shape) = ops.state;
        let dy = values(&grad);
        let (dg, du) = match (&gate, &up) {
            // Read in place, bf16 converted as it is read.
            (Saved::Bf16(g), Saved::Bf16(u)) => swiglu_backward(&dy, |i| bf16_to_f32(g[i]), |i| bf16_to_f32(u[i])),
            _ => {
                let (g, u) = (gate.values(), up.values());
                swiglu_backward(&dy, |i| g[i], |i| u[i])
            }
        };
        let [pg, pu] = ops.parents;
        register!(grads, (pg, || from_vec(dg, &shape)), (pu, || from_vec(du, &shape)));
    }
}

/// `values` rounded to bf16, on all cores.
fn bf16_vec(values: &[f32]) -> Vec<u16> {
    values.par_iter().with_min_len(CHUNK).map(|&x| crate::gemm::round_bf16(x)).collect()
}

/// The gradients of `silu(g) * u` given the upstream `dy`.
fn swiglu_backward(
    dy: &[f32],
    g: impl Fn(usize) -> f32 + Sync,
    u: impl Fn(usize) -> f32 + Sync,
) -> (Vec<f32>, Vec<f32>) {
    let mut dg = vec![0.0f32; dy.len()];
    let mut du = vec![0.0f32; dy.len()];
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(c, (dg, du))| {
            let at = c * CHUNK;
            for i in 0..dg.len() {
                let (g, u, dy) = (g(at + i), u(at + i), dy[at + i]);
                let sig = 1.0 / (1.0 + (-g).exp());
                let silu = g * sig;
                dg[i] = dy * u * sig * (1.0 + g * (1.0 - sig));
                du[i] = dy * silu;
            }
        });
    (dg, du)
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: y = n ⊙ w with n = x·r, r = 1/sqrt(mean(x²) + eps) per row. Backward:
// dx = r·(dn − n·mean(dn ⊙ n)) with dn = dy ⊙ w; dw = Σ_rows dy ⊙ n.

pub(crate) fn rms_norm<B: Backend>(x: &Tensor<B, 3>, weight: &Tensor<B, 1>, eps: f64) -> Option<Tensor<B, 3>> {
    let x = float_prim(x)?;
    let weight = float_prim(weight)?;
    let shape = dims(x.inner());
    let out = {
        let (xs, w) = (values(x.inner()), values(weight.inner()));
        let h = w.len();
        let mut out = vec![0.0f32; xs.len()];
        let rows_per_task = (CHUNK / h).max(1);
        out.par_chunks_mut(rows_per_task * h).enumerate().for_each(|(c, out)| {
            for (r, y) in out.chunks_mut(h).enumerate() {
                let x = &xs[(c * rows_per_task + r) * h..][..h];
                let inv = inv_rms(x, eps);
                for ((y, x), w) in y.iter_mut().zip(x).zip(w.iter()) {
                    *y = x * inv * w;
                }
            }
        });
        from_vec(out, &shape)
    };
    Some(tensor(record(RmsNormBackward, [&x, &weight], out, || {
        (x.inner().clone(), weight.inner().clone(), eps)
    })))
}

/// `1 / sqrt(mean(x²) + eps)`, summed in f64 (rows are hidden-size long).
fn inv_rms(x: &[f32], eps: f64) -> f32 {
    let sum: f64 = x.iter().map(|v| (*v as f64) * (*v as f64)).sum();
    (1.0 / (sum / x.len() as f64 + eps).sqrt()) as f32
}

#[derive(Debug)]
struct RmsNormBackward;

impl Backward<Nd, 2> for RmsNormBackward {
    type State = (NdArrayTensor, NdArrayTensor, f64);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Nd>(&ops.node);
        let (x, weight, eps) = ops.state;
        let shape = dims(&x);
        let (dy, xs, w) = (values(&grad), values(&x), values(&weight));
        let h = w.len();
        let rows_per_task = (CHUNK / h).max(1);
        let mut dx = vec![0.0f32; xs.len()];
        // Each task's share of dw, summed after.
        let dw_parts: Vec<Vec<f32>> = dx
            .par_chunks_mut(rows_per_task * h)
            .enumerate()
            .map(|(c, dx)| {
                let mut dw = vec![0.0f32; h];
                for (r, dx) in dx.chunks_mut(h).enumerate() {
                    let at = (c * rows_per_task + r) * h;
                    let (x, dy) = (&xs[at..][..h], &dy[at..][..h]);
                    let inv = inv_rms(x, eps);
                    // mean(dn ⊙ n) = inv · mean(dy ⊙ w ⊙ x)
                    let dot: f32 = (0..h).map(|j| dy[j] * w[j] * x[j]).sum::<f32>() * inv / h as f32;
                    for j in 0..h {
                        let n = x[j] * inv;
                        dx[j] = inv * (dy[j] * w[j] - n * dot);
                        dw[j] += dy[j] * n;
                    }
                }
                dw
            })
            .collect();
        let [px, pw] = ops.parents;
        register!(
            grads,
            (px, || from_vec(dx, &shape)),
            (pw, || {
                let mut dw = vec![0.0f32; h];
                for part in &dw_parts {
                    dw.iter_mut().zip(part).for_each(|(a, b)| *a += b);
                }
                from_vec(dw, &[h])
            })
        );
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE: y_lo = x_lo·cos_lo − x_hi·sin_lo, y_hi = x_hi·cos_hi + x_lo·sin_hi (halves of each
// head). Its transpose, the backward: dx_lo = dy_lo·cos_lo + dy_hi·sin_hi,
// dx_hi = dy_hi·cos_hi − dy_lo·sin_lo.

pub(crate) fn rope<B: Backend>(x: &Tensor<B, 4>, cos: &Tensor<B, 3>, sin: &Tensor<B, 3>) -> Option<Tensor<B, 4>> {
    let x = float_prim(x)?;
    let cos = float_prim(cos)?;
    let sin = float_prim(sin)?;
    let shape = dims(x.inner());
    let (cos, sin) = (cos.inner().clone(), sin.inner().clone());
    let out = from_vec(
        rotate(&values(x.inner()), &values(&cos), &values(&sin), &shape, false),
        &shape,
    );
    Some(tensor(record(RopeBackward, [&x], out, || (cos, sin))))
}

/// RoPE (`inverse`: its transpose) of `x` `[b, s, h, d]` with `cos`/`sin` `[b, s, d]`.
fn rotate(x: &[f32], cos: &[f32], sin: &[f32], shape: &[usize], inverse: bool) -> Vec<f32> {
    let (h, d) = (shape[2], shape[3]);
    let half = d / 2;
    let mut out = vec![0.0f32; x.len()];
    let rows_per_task = (CHUNK / (h * d)).max(1);
    out.par_chunks_mut(rows_per_task * h * d)
        .enumerate()
        .for_each(|(c, out)| {
            for (r, out) in out.chunks_mut(h * d).enumerate() {
                let row = c * rows_per_task + r; // b·s + s
                let (cos, sin) = (&cos[row * d..][..d], &sin[row * d..][..d]);
                for (head, y) in out.chunks_mut(d).enumerate() {
                    let x = &x[(row * h + head) * d..][..d];
                    for j in 0..half {
                        let (lo, hi) = (x[j], x[j + half]);
                        if inverse {
                            y[j] = lo * cos[j] + hi * sin[j + half];
                            y[j + half] = hi * cos[j + half] - lo * sin[j];
                        } else {
                            y[j] = lo * cos[j] - hi * sin[j];
                            y[j + half] = hi * cos[j + half] + lo * sin[j + half];
                        }
                    }
                }
            }
        });
    out
}

#[derive(Debug)]
struct RopeBackward;

impl Backward<Nd, 1> for RopeBackward {
    type State = (NdArrayTensor, NdArrayTensor);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Nd>(&ops.node);
        let (cos, sin) = ops.state;
        let shape = dims(&grad);
        let [parent] = ops.parents;
        register!(
            grads,
            (parent, || {
                from_vec(
                    rotate(&values(&grad), &values(&cos), &values(&sin), &shape, true),
                    &shape,
                )
            })
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Attention. Forward, per (batch, head): S = scale·Q·Kᵀ, P = softmax(S) over the keys the query
// may see, O = P·V, in blocks of query rows so that a causal block multiplies only the keys up
// to its last row. P is kept for the backward pass, per (batch, kv head), so that the heads
// sharing a key/value head accumulate its gradient without races:
//   dP = dO·Vᵀ, dS = P ⊙ (dP − rowsum(dO ⊙ O)), dQ = scale·dS·K, dK += scale·dSᵀ·Q, dV += Pᵀ·dO.

/// Query rows per block.
const ROWS: usize = 64;

#[derive(Debug, Clone, Copy)]
struct Dims {
    batch: usize,
    seq: usize,
    keys: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Dims {
    /// Keys row block `rows` of batch row `b` needs: up to the last one any of its rows sees.
    fn key_end(&self, b: usize, rows: std::ops::Range<usize>, mask: Option<&[bool]>) -> usize {
        match mask {
            None => (rows.end + self.keys - self.seq).min(self.keys),
            Some(mask) => rows
                .map(|i| {
                    let row = &mask[(b * self.seq + i) * self.keys..][..self.keys];
                    row.iter().rposition(|blocked| !blocked).map_or(0, |j| j + 1)
                })
                .max()
                .unwrap_or(0),
        }
    }

    fn sees(&self, b: usize, i: usize, j: usize, mask: Option<&[bool]>) -> bool {
        match mask {
            None => j <= i + self.keys - self.seq,
            Some(mask) => !mask[(b * self.seq + i) * self.keys + j],
        }
    }
}

/// A raw pointer that rayon tasks may share: each writes its own rows of the buffer.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The element at `offset`. (A method, so that closures capture the whole `Shared`.)
    fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: callers stay inside the buffer.
        unsafe { self.0.add(offset) }
    }
}

/// `c[m×n] = alpha·a[m×k]·b[k×n] + beta·c`, each matrix given by its row and column strides.
#[allow(clippy::too_many_arguments)]
fn gemm(
    (m, k, n): (usize, usize, usize),
    alpha: f32,
    a: (*const f32, usize, usize),
    b: (*const f32, usize, usize),
    beta: f32,
    c: (*mut f32, usize, usize),
) {
    // SAFETY: every caller passes pointers into live buffers whose strides cover m×k, k×n and
    // m×n elements, and no other task writes the rows of `c` at the same time.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.0,
            a.1 as isize,
            a.2 as isize,
            b.0,
            b.1 as isize,
            b.2 as isize,
            beta,
            c.0,
            c.1 as isize,
            c.2 as isize,
        )
    }
}

#[derive(Debug, Clone)]
struct AttentionState {
    q: NdArrayTensor,
    k: NdArrayTensor,
    v: NdArrayTensor,
    out: NdArrayTensor,
    /// `[batch, heads, seq, keys]`, zero where a query may not see a key.
    probs: Saved,
    mask: Option<Arc<Vec<bool>>>,
    dims: Dims,
}

pub(crate) fn attention<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    mask: Option<&Tensor<B, 4, Bool>>,
    saved: crate::Products,
) -> Option<Tensor<B, 4>> {
    let q = float_prim(q)?;
    let k = float_prim(k)?;
    let v = float_prim(v)?;
    let [batch, seq, heads, head_dim] = q.inner_dims();
    let [_, keys, kv_heads, _] = k.inner_dims();
    if heads % kv_heads != 0 || keys < seq {
        return None;
    }
    let dims = Dims {
        batch,
        seq,
        keys,
        heads,
        kv_heads,
        head_dim,
    };
    let mask = mask.map(|m| Arc::new(bools(m)));
    let (out, probs) = attention_forward(
        &values(q.inner()),
        &values(k.inner()),
        &values(v.inner()),
        mask.as_deref().map(|m| m.as_slice()),
        dims,
    );
    let out = from_vec(out, &[batch, seq, heads, head_dim]);
    let state = || AttentionState {
        q: q.inner().clone(),
        k: k.inner().clone(),
        v: v.inner().clone(),
        out: out.clone(),
        probs: Saved::new(&from_vec(probs, &[dims.batch * heads * seq * dims.keys]), saved),
        mask,
        dims,
    };
    Some(tensor(record(AttentionBackward, [&q, &k, &v], out.clone(), state)))
}

/// The mask `[batch, 1, seq, keys]` as a contiguous `[batch, seq, keys]`.
fn bools<B: Backend>(mask: &Tensor<B, 4, Bool>) -> Vec<bool> {
    // Bool tensors are the same type with or without autodiff: the ndarray backend's.
    let prim: NdArrayTensor = same(mask.clone().into_primitive());
    match prim {
        NdArrayTensor::Bool(storage) => storage.view().iter().copied().collect(),
        other => unreachable!("a bool tensor holds {:?}", burn::tensor::TensorMetadata::dtype(&other)),
    }
}

fn attention_forward(q: &[f32], k: &[f32], v: &[f32], mask: Option<&[bool]>, dims: Dims) -> (Vec<f32>, Vec<f32>) {
    let Dims {
        seq,
        keys,
        heads: h,
        kv_heads: kvh,
        head_dim: d,
        ..
    } = dims;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0.0f32; dims.batch * seq * h * d];
    let mut probs = vec![0.0f32; dims.batch * h * seq * keys];
    let out_ptr = Shared(out.as_mut_ptr());
    probs.par_chunks_mut(seq * keys).enumerate().for_each(|(unit, p)| {
        let (b, head) = (unit / h, unit % h);
        let g = head / (h / kvh);
        let q_at = |i: usize| q[((b * seq + i) * h + head) * d..].as_ptr();
        let k0 = k[(b * keys * kvh + g) * d..].as_ptr();
        let v0 = v[(b * keys * kvh + g) * d..].as_ptr();
        for r0 in (0..seq).step_by(ROWS) {
            let r1 = (r0 + ROWS).min(seq);
            let end = dims.key_end(b, r0..r1, mask);
            if end == 0 {
                continue; // every row of the block sees nothing: zeros
            }
            let block = &mut p[r0 * keys..r1 * keys];
            gemm(
                (r1 - r0, d, end),
                scale,
                (q_at(r0), h * d, 1),
                (k0, 1, kvh * d),
                0.0,
                (block.as_mut_ptr(), keys, 1),
            );
            for (i, row) in (r0..r1).zip(block.chunks_mut(keys)) {
                let row = &mut row[..end];
                let mut max = f32::NEG_INFINITY;
                for (j, s) in row.iter().enumerate() {
                    if dims.sees(b, i, j, mask) {
                        max = max.max(*s);
                    }
                }
                if max == f32::NEG_INFINITY {
                    row.fill(0.0);
                    continue;
                }
                let mut sum = 0.0f32;
                for (j, s) in row.iter_mut().enumerate() {
                    *s = if dims.sees(b, i, j, mask) {
                        (*s - max).exp()
                    } else {
                        0.0
                    };
                    sum += *s;
                }
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|s| *s *= inv);
            }
            let o = out_ptr.at(((b * seq + r0) * h + head) * d);
            gemm(
                (r1 - r0, end, d),
                1.0,
                (block.as_ptr(), keys, 1),
                (v0, kvh * d, 1),
                0.0,
                (o, h * d, 1),
            );
        }
    });
    (out, probs)
}

#[derive(Debug)]
struct AttentionBackward;

impl Backward<Nd, 3> for AttentionBackward {
    type State = AttentionState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Nd>(&ops.node);
        let s = ops.state;
        let (dq, dk, dv) = attention_backward(
            &values(&grad),
            &values(&s.q),
            &values(&s.k),
            &values(&s.v),
            &values(&s.out),
            &s.probs,
            s.mask.as_deref().map(|m| m.as_slice()),
            s.dims,
        );
        let Dims {
            batch,
            seq,
            keys,
            heads,
            kv_heads,
            head_dim,
        } = s.dims;
        let [pq, pk, pv] = ops.parents;
        register!(
            grads,
            (pq, || from_vec(dq, &[batch, seq, heads, head_dim])),
            (pk, || from_vec(dk, &[batch, keys, kv_heads, head_dim])),
            (pv, || from_vec(dv, &[batch, keys, kv_heads, head_dim]))
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn attention_backward(
    d_out: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    probs: &Saved,
    mask: Option<&[bool]>,
    dims: Dims,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims {
        batch,
        seq,
        keys,
        heads: h,
        kv_heads: kvh,
        head_dim: d,
    } = dims;
    let scale = 1.0 / (d as f32).sqrt();
    let groups = h / kvh;
    let mut dq = vec![0.0f32; q.len()];
    let mut dk = vec![0.0f32; k.len()];
    let mut dv = vec![0.0f32; v.len()];
    let (dq_ptr, dk_ptr, dv_ptr) = (
        Shared(dq.as_mut_ptr()),
        Shared(dk.as_mut_ptr()),
        Shared(dv.as_mut_ptr()),
    );
    (0..batch * kvh).into_par_iter().for_each(|unit| {
        let (b, g) = (unit / kvh, unit % kvh);
        let kv_at = (b * keys * kvh + g) * d;
        let (k0, v0) = (k[kv_at..].as_ptr(), v[kv_at..].as_ptr());
        // SAFETY: unit (b, g) alone writes key/value head g of batch row b, and the query heads
        // of group g.
        let (dk0, dv0) = (dk_ptr.at(kv_at), dv_ptr.at(kv_at));
        let mut ds = vec![0.0f32; ROWS * keys];
        let mut buffer = Vec::new();
        for head in g * groups..(g + 1) * groups {
            let p = probs.read((b * h + head) * seq * keys, seq * keys, &mut buffer);
            let row_at = |i: usize| ((b * seq + i) * h + head) * d;
            for r0 in (0..seq).step_by(ROWS) {
                let r1 = (r0 + ROWS).min(seq);
                let rows = r1 - r0;
                let end = dims.key_end(b, r0..r1, mask);
                if end == 0 {
                    continue;
                }
                let ds = &mut ds[..rows * end];
                let dy = d_out[row_at(r0)..].as_ptr();
                gemm(
                    (rows, d, end),
                    1.0,
                    (dy, h * d, 1),
                    (v0, 1, kvh * d),
                    0.0,
                    (ds.as_mut_ptr(), end, 1),
                );
                for (i, ds) in (r0..r1).zip(ds.chunks_mut(end)) {
                    let (dy, o) = (&d_out[row_at(i)..][..d], &out[row_at(i)..][..d]);
                    let delta: f32 = dy.iter().zip(o).map(|(a, b)| a * b).sum();
                    let p = &p[i * keys..][..end];
                    for (x, p) in ds.iter_mut().zip(p) {
                        *x = p * (*x - delta);
                    }
                }
                let dq_rows = dq_ptr.at(row_at(r0));
                gemm(
                    (rows, end, d),
                    scale,
                    (ds.as_ptr(), end, 1),
                    (k0, kvh * d, 1),
                    0.0,
                    (dq_rows, h * d, 1),
                );
                let q_rows = q[row_at(r0)..].as_ptr();
                gemm(
                    (end, rows, d),
                    scale,
                    (ds.as_ptr(), 1, end),
                    (q_rows, h * d, 1),
                    1.0,
                    (dk0, kvh * d, 1),
                );
                let p_rows = p[r0 * keys..].as_ptr();
                gemm(
                    (end, rows, d),
                    1.0,
                    (p_rows, 1, keys),
                    (dy, h * d, 1),
                    1.0,
                    (dv0, kvh * d, 1),
                );
            }
        }
    });
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Distribution, Tensor, TensorData, Tolerance};

    use super::{Ad, Nd};
    use crate::composed;

    fn random<const D: usize>(shape: [usize; D], seed: u64) -> Tensor<Ad, D> {
        <Ad as burn::tensor::backend::Backend>::seed(&Default::default(), seed);
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
    }

    fn close<const D: usize>(got: Tensor<Ad, D>, want: Tensor<Ad, D>) {
        got.into_data()
            .assert_approx_eq::<f32>(&want.into_data(), Tolerance::absolute(2e-5).set_relative(1e-4));
    }

    /// Values and gradients of `op` (kernel) against `reference` (composed) for the same inputs,
    /// through a random linear loss so that every output element has its own upstream gradient.
    fn check<const D: usize, const O: usize>(
        inputs: Vec<Tensor<Ad, D>>,
        op: impl Fn(Vec<Tensor<Ad, D>>) -> Tensor<Ad, O>,
        reference: impl Fn(Vec<Tensor<Ad, D>>) -> Tensor<Ad, O>,
    ) {
        // Drawn once: tests run in parallel and reseed the backend's generator.
        let weights = random(reference(inputs.clone()).dims(), 99);
        let run = |f: &dyn Fn(Vec<Tensor<Ad, D>>) -> Tensor<Ad, O>| {
            let inputs: Vec<_> = inputs.iter().map(|t| t.clone().detach().require_grad()).collect();
            let out = f(inputs.clone());
            let weights = weights.clone();
            let grads = (out.clone() * weights).sum().backward();
            let grads: Vec<_> = inputs.iter().map(|t| t.grad(&grads).expect("a gradient")).collect();
            (out, grads)
        };
        let (out, grads) = run(&op);
        let (want, want_grads) = run(&reference);
        close(out, want);
        for (got, want) in grads.into_iter().zip(want_grads) {
            got.into_data()
                .assert_approx_eq::<f32>(&want.into_data(), Tolerance::absolute(2e-5).set_relative(1e-4));
        }
    }

    #[test]
    fn reshape_matches_burns() {
        // Contiguous (no copy), and a transposed view (copied).
        check(
            vec![random([6, 35], 14)],
            |t| {
                let r = super::reshape(&t[0], [3, 2, 35]).expect("the kernel runs");
                let r = super::reshape(&r.swap_dims(0, 2), [35, 6]).expect("the kernel runs");
                r * 2.0
            },
            |t| t[0].clone().reshape([3, 2, 35]).swap_dims(0, 2).reshape([35, 6]) * 2.0,
        );
    }

    #[test]
    fn matmul_matches_burns() {
        // Contiguous, and a transposed (column-major) operand; in pieces, a product large
        // enough to be split.
        for ([m, k, n], in_pieces) in [([70, 33, 21], false), ([300, 70, 60], true)] {
            let a = random([m, k], 12);
            let b = random([n, k], 13);
            check(
                vec![a.clone(), b.clone()],
                |t| super::matmul(&t[0], &t[1].clone().transpose(), in_pieces).expect("the kernel runs"),
                |t| t[0].clone().matmul(t[1].clone().transpose()),
            );
        }
    }

    /// `t`'s values rounded to bf16.
    fn bf16_round(t: Tensor<Ad, 2>) -> Tensor<Ad, 2> {
        crate::from_bf16_bits(crate::to_bf16_bits(t.detach()), burn::tensor::DType::F32)
    }

    #[test]
    fn products_in_pieces_equal_one_product() {
        // Split by rows (tall output), by columns (wide), unevenly, and through a transpose.
        for (m, k, n, pieces) in [(7, 5, 4, 3), (3, 5, 9, 2), (2, 6, 11, 5), (1, 4, 1, 4)] {
            let a = ndarray::Array2::from_shape_fn((m, k), |(i, j)| (i * 7 + j * 3) as f32 * 0.25 - 2.0);
            let b = ndarray::Array2::from_shape_fn((n, k), |(i, j)| (i * 5 + j) as f32 * 0.5 - 3.0);
            let want = a.dot(&b.t());
            let mut got = ndarray::Array2::<f32>::zeros((m, n));
            super::gemm_pieces(a.view(), b.t(), got.view_mut(), pieces);
            assert_eq!(got, want, "{m}x{k}x{n} in {pieces}");
        }
    }

    #[test]
    fn bf16_bits_round_to_nearest_even_contiguous_or_transposed() {
        let t = random([37, 21], 19) * 100.0;
        for t in [t.clone(), t.transpose()] {
            let want: Vec<u16> = t.to_data().to_vec::<f32>().unwrap().iter().map(|&x| burn::tensor::bf16::from_f32(x).to_bits()).collect();
            let got = crate::to_bf16_bits(t.clone());
            assert_eq!(got.dims(), t.dims());
            assert_eq!(got.into_data().to_vec::<u16>().unwrap(), want);
        }
    }

    #[test]
    fn bf16_products_equal_f32_products_of_the_rounded_inputs() {
        // Odd sizes (k odd, tiles cut at both edges); the loss's upstream gradient exactly bf16,
        // so the backward's rounding of it changes nothing and only the order of sums differs.
        let (m, k, n) = (70, 33, 50);
        let (a, b) = (random([m, k], 16), random([k, n], 17));
        let upstream = bf16_round(random([m, n], 18));
        // Values rounded, gradients passed straight through (what the kernel computes).
        let ste = |t: Tensor<Ad, 2>| t.clone() + (bf16_round(t.clone()) - t).detach();
        let run = |f: &dyn Fn(Tensor<Ad, 2>, Tensor<Ad, 2>) -> Tensor<Ad, 2>| {
            let (a, b) = (a.clone().detach().require_grad(), b.clone().detach().require_grad());
            let out = f(a.clone(), b.clone());
            let grads = (out.clone() * upstream.clone()).sum().backward();
            (out, a.grad(&grads), b.grad(&grads))
        };
        let (out, da, db) = run(&|a, b| super::matmul_bf16(&a, &b).expect("the kernel runs"));
        let (want, want_da, want_db) = run(&|a, b| ste(a).matmul(ste(b)));
        close(out, want);
        close(Tensor::from_inner(da.unwrap()), Tensor::from_inner(want_da.unwrap()));
        close(Tensor::from_inner(db.unwrap()), Tensor::from_inner(want_db.unwrap()));
        // A frozen bf16 weight: the same values, a gradient for x only.
        let bits = crate::to_bf16_bits(b.clone());
        let weight = crate::from_bf16_bits(bits.clone(), burn::tensor::DType::F32);
        let (out, da, db) = run(&|a, _| super::linear_bf16_frozen(&a, &bits).expect("the kernel runs"));
        let (want, want_da, _) = run(&|a, _| ste(a).matmul(weight.clone()));
        assert!(db.is_none(), "no gradient flows to a frozen weight");
        close(out, want.clone());
        close(Tensor::from_inner(da.unwrap()), Tensor::from_inner(want_da.unwrap()));
        // Plain ndarray (no autodiff) takes the same path.
        let plain = super::linear_bf16_frozen::<Nd>(&a.clone().inner(), &bits.inner()).expect("the kernel runs");
        close(Tensor::from_inner(plain), want.detach());
    }

    #[test]
    fn softmax_rows_match_the_composed_form() {
        let logits = random([7, 3000], 15) * 4.0;
        // Targets at the argmax of rows 0 and 1, elsewhere in the others.
        let argmax: Vec<i64> = logits
            .clone()
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .into_vec()
            .unwrap();
        let targets: Vec<i64> = (0..7)
            .map(|r| if r < 2 { argmax[r] } else { (r as i64) * 400 })
            .collect();
        let targets = Tensor::<Ad, 1, burn::tensor::Int>::from_data(TensorData::new(targets, [7]), &Default::default());
        let got = super::softmax_rows(&logits, &targets).expect("the kernel runs");
        let want = composed::softmax_rows(logits, targets);
        assert_eq!(got.hits.to_data().to_vec::<f32>().unwrap()[..3], [1.0, 1.0, 0.0]);
        close(got.logps, want.logps);
        close(got.mean_logits, want.mean_logits);
        close(got.hits, want.hits);
        close(got.probs, want.probs);
    }

    #[test]
    fn swiglu_matches_the_composed_form() {
        let inputs = vec![random([3, 5, 40_000], 1), random([3, 5, 40_000], 2)];
        check(
            inputs,
            |t| super::swiglu(&t[0], &t[1], crate::Products::F32).expect("the kernel runs"),
            |t| composed::swiglu(t[0].clone(), t[1].clone()),
        );
    }

    #[test]
    fn rms_norm_matches_the_composed_form() {
        let x = random([2, 70, 576], 10);
        let w = random([576], 11);
        let op =
            |w: Tensor<Ad, 1>| move |t: Vec<Tensor<Ad, 3>>| super::rms_norm(&t[0], &w, 1e-5).expect("the kernel runs");
        let reference =
            |w: Tensor<Ad, 1>| move |t: Vec<Tensor<Ad, 3>>| composed::rms_norm(t[0].clone(), w.clone(), 1e-5);
        // The input's gradient, then the weight's (full fine-tuning trains norms).
        check(vec![x.clone()], op(w.clone()), reference(w.clone()));
        let xs = x.detach();
        check(
            vec![w.unsqueeze::<3>()],
            |t| super::rms_norm(&xs, &t[0].clone().reshape([576]), 1e-5).expect("the kernel runs"),
            |t| composed::rms_norm(xs.clone(), t[0].clone().reshape([576]), 1e-5),
        );
    }

    #[test]
    fn rope_matches_the_composed_form() {
        let (b, s, h, d) = (2, 300, 3, 8);
        let angles = random([b, s, d / 2], 3);
        let angles = Tensor::cat(vec![angles.clone(), angles], 2);
        let (cos, sin) = (angles.clone().cos(), angles.sin());
        check(
            vec![random([b, s, h, d], 4)],
            |t| super::rope(&t[0], &cos, &sin).expect("the kernel runs"),
            |t| composed::rope(t[0].clone(), cos.clone(), sin.clone()),
        );
    }

    fn attention_case(batch: usize, seq: usize, keys: usize, heads: usize, kv_heads: usize, mask: Option<Vec<bool>>) {
        let d = 16;
        let mask = mask.map(|m| {
            Tensor::<Ad, 4, burn::tensor::Bool>::from_data(
                TensorData::new(m, [batch, 1, seq, keys]),
                &Default::default(),
            )
        });
        let inputs = vec![
            random([batch, seq, heads, d], 5),
            random([batch, keys, kv_heads, d], 6),
            random([batch, keys, kv_heads, d], 7),
        ];
        check(
            inputs,
            |t| super::attention(&t[0], &t[1], &t[2], mask.as_ref(), crate::Products::F32).expect("the kernel runs"),
            |t| composed::attention(t[0].clone(), t[1].clone(), t[2].clone(), mask.clone()),
        );
    }

    #[test]
    fn causal_attention_matches_the_composed_form() {
        // Several row blocks, grouped-query heads, and fewer queries than keys (a KV cache).
        attention_case(2, 150, 150, 6, 2, None);
        attention_case(1, 70, 100, 4, 4, None);
        attention_case(1, 1, 9, 3, 1, None);
    }

    /// `run(saved)` gives the same output with activations saved in f32 or bf16, and gradients
    /// within bf16's precision of each other.
    fn same_forward_gradients_within_bf16<const D: usize, const N: usize>(
        run: impl Fn(crate::Products) -> (Tensor<Ad, D>, [Tensor<Nd, D>; N]),
    ) {
        let (out, grads) = run(crate::Products::F32);
        let (out_bf16, grads_bf16) = run(crate::Products::Bf16);
        out_bf16.into_data().assert_eq(&out.into_data(), true);
        for (got, want) in grads_bf16.into_iter().zip(grads) {
            got.into_data()
                .assert_approx_eq::<f32>(&want.into_data(), Tolerance::absolute(2e-2).set_relative(1e-2));
        }
    }

    #[test]
    fn swiglu_with_bf16_saved_inputs_is_within_bf16_of_f32() {
        let (gate, up) = (random([3, 5, 4000], 1), random([3, 5, 4000], 2));
        let upstream = random([3, 5, 4000], 3);
        let run = |saved| {
            let (g, u) = (gate.clone().detach().require_grad(), up.clone().detach().require_grad());
            let out = super::swiglu(&g, &u, saved).expect("the kernel runs");
            let grads = (out.clone() * upstream.clone()).sum().backward();
            (out, [g.grad(&grads).unwrap(), u.grad(&grads).unwrap()])
        };
        same_forward_gradients_within_bf16(run);
    }

    #[test]
    fn attention_with_bf16_saved_probabilities_is_within_bf16_of_f32() {
        // The same forward; gradients from probabilities rounded to bf16 (relative error 2^-9).
        let (q, k, v) = (random([2, 70, 4, 16], 5), random([2, 70, 2, 16], 6), random([2, 70, 2, 16], 7));
        let upstream = random([2, 70, 4, 16], 8);
        let run = |saved| {
            let inputs = [&q, &k, &v].map(|t| t.clone().detach().require_grad());
            let out = super::attention(&inputs[0], &inputs[1], &inputs[2], None, saved).expect("the kernel runs");
            let grads = (out.clone() * upstream.clone()).sum().backward();
            (out, inputs.map(|t| t.grad(&grads).expect("a gradient")))
        };
        same_forward_gradients_within_bf16(run);
    }

    #[test]
    fn masked_attention_matches_the_composed_form() {
        // Causal, plus left padding in row 0 (its first three queries see nothing: zeros) and two
        // packed segments in row 1.
        let (batch, seq) = (2, 90);
        let mut mask = Vec::new();
        for b in 0..batch {
            for i in 0..seq {
                for j in 0..seq {
                    let blocked = j > i || if b == 0 { j < 3 } else { (i < 40) != (j < 40) };
                    mask.push(blocked);
                }
            }
        }
        attention_case(batch, seq, seq, 4, 2, Some(mask));
    }

    #[test]
    fn plain_ndarray_runs_the_kernels_too() {
        let x = random([2, 4, 6], 8).inner();
        let y = random([2, 4, 6], 9).inner();
        let got = super::swiglu::<Nd, 3>(&x, &y, crate::Products::F32).expect("the kernel runs");
        got.into_data()
            .assert_approx_eq::<f32>(&composed::swiglu(x, y).into_data(), Tolerance::absolute(1e-6));
    }
}
