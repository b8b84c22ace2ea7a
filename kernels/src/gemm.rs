//! Matrix products with bf16 inputs and f32 sums, on the CPU: what PyTorch's bf16 weights and
//! autocast compute, at the speed of the processor's bf16 dot-product instructions.
//!
//! `c = a·b` where each input is f32 (rounded to bf16, to nearest even, as it is packed) or
//! already bf16 bits, read through any strides, so a transpose is free. The layout follows
//! BLIS/GotoBLAS: `a` is packed once into panels of [`MR`] rows, `b` a block of `KC` k-pairs at a
//! time into panels of [`NR`] columns, and a micro-kernel keeps an `MR × NR` tile of `c` in
//! registers. Both panels hold k in pairs (two bf16 in one u32), the operand of AVX512-BF16's
//! `vdpbf16ps`, which adds two bf16 products into each f32 lane.
//!
//! Processors without AVX512-BF16 run the same packing with a portable micro-kernel (the products
//! of the same bf16 values, in f32): slower, the same numbers up to the order of the sums.
//!
//! Why our own: OpenBLAS as Debian ships it (0.3.21) has no `sbgemm`, and burn's CPU backends
//! hold no bf16 tensors. On this project's 2-core AMD EPYCs it runs the SmolLM2 step's products
//! at 2-3× OpenBLAS's f32 `sgemm` on Zen 5 (600-800 GFLOP/s) and about 1.8× on Zen 4 (300-380
//! GFLOP/s, the double-pumped `vdpbf16ps`'s peak there).

use std::sync::OnceLock;

use rayon::prelude::*;

/// Rows of a micro-tile.
pub(crate) const MR: usize = 8;
/// Columns of a micro-tile: three 16-lane registers.
pub(crate) const NR: usize = 48;
/// The most k-pairs per packed block of `b`: a `KC × NR` panel (48 KiB) stays in L1 or L2.
/// Fewer blocks mean fewer passes over `c`, which for the output head's logits is 64 MiB.
const KC: usize = 256;
/// The most rows of `a` per task: their packed block of KC pairs (256 KiB) stays in L2.
const MC_MAX: usize = 64 * MR;

/// The values of a matrix operand.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Values<'a> {
    F32(&'a [f32]),
    /// bf16 bit patterns.
    Bf16(&'a [u16]),
}

/// A matrix operand: element `(i, j)` is `values[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Matrix<'a> {
    pub values: Values<'a>,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> Matrix<'a> {
    pub fn row_major(values: Values<'a>, rows: usize, cols: usize) -> Self {
        Self {
            values,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose, without moving anything.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// The bf16 bits of element `(i, j)`.
    #[inline(always)]
    fn bits(&self, i: usize, j: usize) -> u16 {
        let at = i * self.row_stride + j * self.col_stride;
        match self.values {
            Values::F32(v) => round_bf16(v[at]),
            Values::Bf16(v) => v[at],
        }
    }

    /// Elements `(i, 2p)` and `(i, 2p + 1)` as one pair (the second 0 past the last column).
    #[inline(always)]
    fn pair(&self, i: usize, p: usize) -> u32 {
        let lo = self.bits(i, 2 * p) as u32;
        let hi = if 2 * p + 1 < self.cols { self.bits(i, 2 * p + 1) as u32 } else { 0 };
        lo | hi << 16
    }

    fn check(&self) {
        let len = match self.values {
            Values::F32(v) => v.len(),
            Values::Bf16(v) => v.len(),
        };
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
            assert!(last < len, "a {}x{} operand reads past its {len} values", self.rows, self.cols);
        }
    }
}

/// f32 to bf16, rounded to nearest even; NaN stays NaN.
#[inline(always)]
pub(crate) fn round_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        return ((bits >> 16) | 0x40) as u16;
    }
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

#[inline(always)]
pub(crate) fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// The micro-kernel a product runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// `vdpbf16ps` on 512-bit registers.
    Avx512Bf16,
    /// f32 products of the bf16 values, vectorized by the compiler.
    Portable,
}

/// The processor's best micro-kernel.
pub(crate) fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16") {
            return Isa::Avx512Bf16;
        }
        Isa::Portable
    })
}

/// `a·b` (`[a.rows, b.cols]`, row-major), inputs rounded to bf16, sums in f32.
pub(crate) fn gemm(a: Matrix<'_>, b: Matrix<'_>) -> Vec<f32> {
    let len = a.rows * b.cols;
    // Not zeroed first: every element is written (the tests fill the output with NaN to check),
    // and zeroing the outputs (each output-head chunk's 64 MiB of logits among them) was 2-3% of
    // a step's samples, on one core.
    let mut c = Vec::with_capacity(len);
    gemm_into(isa(), a, b, c.spare_capacity_mut());
    // SAFETY: `gemm_into` wrote all `len` values.
    unsafe { c.set_len(len) };
    c
}

struct Out(*mut f32);
// SAFETY: tasks write disjoint tiles of `c`, which outlives them (the parallel loop joins).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

#[cfg(test)]
fn gemm_with(isa: Isa, a: Matrix<'_>, b: Matrix<'_>, c: &mut [f32]) {
    // SAFETY: f32 and MaybeUninit<f32> have one layout; `gemm_into` only writes.
    gemm_into(isa, a, b, unsafe { &mut *(c as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) })
}

/// `c = a·b`, writing every element of `c`.
fn gemm_into(isa: Isa, a: Matrix<'_>, b: Matrix<'_>, c: &mut [std::mem::MaybeUninit<f32>]) {
    assert_eq!(a.cols, b.rows, "inner dimensions");
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(c.len(), m * n, "output size");
    a.check();
    b.check();
    let kp = k.div_ceil(2);
    if m == 0 || n == 0 {
        return;
    }
    if kp == 0 {
        c.fill(std::mem::MaybeUninit::new(0.0));
        return;
    }
    let packed_a = pack_a(isa, a, kp);
    // Tasks: blocks of rows × groups of column panels. A task walks k in blocks of KC pairs; for
    // each it packs its panels of `b` in turn and runs each over its rows, whose packed block
    // (at most MC_MAX × KC pairs, 256 KiB) stays in L2 across the panels. Rows are split further
    // only when there are too few panels to keep every core busy, since each row block packs
    // `b` again.
    let threads = rayon::current_num_threads().max(1);
    let panels_n = n.div_ceil(NR);
    let blocks_m = m.div_ceil(MC_MAX).max((2 * threads).div_ceil(panels_n)).min(m.div_ceil(MR));
    let rows_per_block = m.div_ceil(MR).div_ceil(blocks_m) * MR;
    let blocks_m = m.div_ceil(rows_per_block);
    // Several tasks per core balance them (this machine's cores are shared with other work);
    // but when `a` is long (the output head's gradient, k = the vocabulary), each group streams
    // all of it from memory, so then as few groups as keep the cores busy.
    let per_thread = if kp > 4 * KC { 1 } else { 4 };
    let groups = panels_n.min((per_thread * threads).div_ceil(blocks_m));
    let panels_per_group = panels_n.div_ceil(groups);
    let groups = panels_n.div_ceil(panels_per_group);
    let kc = kp.div_ceil(kp.div_ceil(KC)); // equal blocks
    let out = Out(c.as_mut_ptr().cast::<f32>());
    let out = &out;
    (0..blocks_m * groups)
        .into_par_iter()
        .for_each_init(|| vec![0u32; kc * NR], |panel, task| {
            let (block, group) = (task / groups, task % groups);
            let row_panels = block * rows_per_block / MR..((block + 1) * rows_per_block).min(m).div_ceil(MR);
            let col_panels = group * panels_per_group..((group + 1) * panels_per_group).min(panels_n);
            let mut p0 = 0;
            while p0 < kp {
                let np = kc.min(kp - p0);
                for jp in col_panels.clone() {
                    let j0 = jp * NR;
                    let cols = NR.min(n - j0);
                    pack_b(isa, b, j0, cols, p0, np, &mut panel[..np * NR]);
                    for ip in row_panels.clone() {
                        let rows = MR.min(m - ip * MR);
                        let a_panel = &packed_a[ip * kp * MR + p0 * MR..][..np * MR];
                        // SAFETY: the tile (rows ip*MR.., columns j0..j0+cols) is inside `c`
                        // and this task's alone.
                        unsafe {
                            kernel(isa, np, a_panel, &panel[..np * NR], out.0.add(ip * MR * n + j0), n, rows, cols, p0 == 0)
                        };
                    }
                }
                p0 += np;
            }
        });
}

/// `a` as panels of `MR` rows: `[panel][pair][row]`, zero past the last row.
fn pack_a(isa: Isa, a: Matrix<'_>, kp: usize) -> Vec<u32> {
    let m = a.rows;
    let mut packed = vec![0u32; m.div_ceil(MR) * kp * MR];
    packed.par_chunks_mut(kp * MR).enumerate().for_each(|(ip, panel)| {
        for r in 0..MR.min(m - ip * MR) {
            let i = ip * MR + r;
            match a.values {
                Values::F32(v) if a.col_stride == 1 => {
                    let row = &v[i * a.row_stride..][..a.cols];
                    pairs_of_row(isa, row, panel, r, MR);
                }
                _ => {
                    for p in 0..kp {
                        panel[p * MR + r] = a.pair(i, p);
                    }
                }
            }
        }
    });
    packed
}

/// `dst[p * stride + r]` = the pair `(row[2p], row[2p + 1])` of contiguous f32 values, rounded.
fn pairs_of_row(isa: Isa, row: &[f32], dst: &mut [u32], r: usize, stride: usize) {
    let mut done = 0; // pairs
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Bf16 {
        // SAFETY: the processor has these instructions (`isa`).
        done = unsafe { avx512::pairs_of_row(row, dst, r, stride) };
    }
    let _ = isa;
    let kp = row.len().div_ceil(2);
    for p in done..kp {
        let lo = round_bf16(row[2 * p]) as u32;
        let hi = row.get(2 * p + 1).map_or(0, |&x| round_bf16(x) as u32);
        dst[p * stride + r] = lo | hi << 16;
    }
}

/// Columns `j0..j0 + cols` and pairs `p0..p0 + np` of `b` as one panel: `[pair][column]`, zero
/// past the last column.
fn pack_b(isa: Isa, b: Matrix<'_>, j0: usize, cols: usize, p0: usize, np: usize, dst: &mut [u32]) {
    match b.values {
        Values::Bf16(v) => pack_b_from(isa, v, b, j0, cols, p0, np, dst),
        Values::F32(v) => pack_b_from(isa, v, b, j0, cols, p0, np, dst),
    }
}

/// A value as bf16 bits: bf16 as it is, f32 rounded.
trait Bf16Bits: Copy {
    fn bf16_bits(self) -> u32;

    /// `dst[p * stride + r]` = the pair `(values[2p], values[2p + 1])` (the second 0 past the end).
    fn pairs(isa: Isa, values: &[Self], dst: &mut [u32], r: usize, stride: usize);

    /// `dst[j]` = the pair `(r0[j], r1[j])`.
    fn interleave(isa: Isa, r0: &[Self], r1: &[Self], dst: &mut [u32]) {
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512Bf16 {
            let n = r0.len().min(r1.len()).min(dst.len()) / 16 * 16;
            for j in (0..n).step_by(16) {
                // SAFETY: 16 values from j in each slice; the processor has the instructions.
                unsafe { Self::interleave16(&r0[j..j + 16], &r1[j..j + 16], &mut dst[j..j + 16]) };
            }
            done = n;
        }
        let _ = isa;
        for ((d, &x), &y) in dst[done..].iter_mut().zip(&r0[done..]).zip(&r1[done..]) {
            *d = x.bf16_bits() | y.bf16_bits() << 16;
        }
    }

    /// [`Bf16Bits::interleave`] of 16 values, with AVX512-BF16.
    ///
    /// # Safety
    /// Each slice holds at least 16 values; the processor has AVX512-BF16.
    #[cfg(target_arch = "x86_64")]
    unsafe fn interleave16(r0: &[Self], r1: &[Self], dst: &mut [u32]);
}

impl Bf16Bits for u16 {
    #[inline(always)]
    fn bf16_bits(self) -> u32 {
        self as u32
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn interleave16(r0: &[u16], r1: &[u16], dst: &mut [u32]) {
        // SAFETY: as the caller promised.
        unsafe { avx512::interleave16_u16(r0.as_ptr(), r1.as_ptr(), dst.as_mut_ptr()) }
    }

    fn pairs(_: Isa, values: &[u16], dst: &mut [u32], r: usize, stride: usize) {
        let whole = values.chunks_exact(2);
        let last = whole.remainder().first().map(|&x| x as u32);
        let mut p = 0;
        for pair in whole {
            dst[p * stride + r] = pair[0] as u32 | (pair[1] as u32) << 16;
            p += 1;
        }
        if let Some(x) = last {
            dst[p * stride + r] = x;
        }
    }
}

impl Bf16Bits for f32 {
    #[inline(always)]
    fn bf16_bits(self) -> u32 {
        round_bf16(self) as u32
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn interleave16(r0: &[f32], r1: &[f32], dst: &mut [u32]) {
        // SAFETY: as the caller promised.
        unsafe { avx512::interleave16_f32(r0.as_ptr(), r1.as_ptr(), dst.as_mut_ptr()) }
    }

    fn pairs(isa: Isa, values: &[f32], dst: &mut [u32], r: usize, stride: usize) {
        pairs_of_row(isa, values, dst, r, stride)
    }
}

/// [`pack_b`] for `b`'s values `v`.
#[allow(clippy::too_many_arguments)]
fn pack_b_from<T: Bf16Bits>(isa: Isa, v: &[T], b: Matrix<'_>, j0: usize, cols: usize, p0: usize, np: usize, dst: &mut [u32]) {
    let (k, row_stride, col_stride) = (b.rows, b.row_stride, b.col_stride);
    if row_stride == 1 && col_stride != 1 {
        // Columns contiguous (`b` is a transposed row-major matrix: the output head's
        // embedding, `Wᵀ` in the input gradient): a column's pairs are adjacent values.
        let len = (k - 2 * p0).min(2 * np);
        for j in 0..NR {
            if j < cols {
                T::pairs(isa, &v[(j0 + j) * col_stride + 2 * p0..][..len], dst, j, NR);
            } else {
                for p in 0..np {
                    dst[p * NR + j] = 0;
                }
            }
        }
    } else if col_stride == 1 {
        // Rows contiguous: interleave rows 2p and 2p + 1.
        for (p, d) in dst.chunks_exact_mut(NR).enumerate() {
            let i = 2 * (p0 + p);
            let r0 = &v[i * row_stride + j0..][..cols];
            if i + 1 < k {
                let r1 = &v[(i + 1) * row_stride + j0..][..cols];
                T::interleave(isa, r0, r1, d);
            } else {
                for (d, &x) in d.iter_mut().zip(r0) {
                    *d = x.bf16_bits();
                }
            }
            d[cols..].fill(0);
        }
    } else {
        // One column at a time, along k: the pairs are contiguous when `b` is a transposed
        // row-major matrix (row stride 1).
        for j in 0..NR {
            if j >= cols {
                for p in 0..np {
                    dst[p * NR + j] = 0;
                }
                continue;
            }
            let column = &v[(j0 + j) * col_stride..];
            for p in 0..np {
                let i = 2 * (p0 + p);
                let hi = if i + 1 < k { column[(i + 1) * row_stride].bf16_bits() } else { 0 };
                dst[p * NR + j] = column[i * row_stride].bf16_bits() | hi << 16;
            }
        }
    }
}

/// `c[tile] (+)= a_panel · b_panel` over `np` pairs: `=` when `first`, else `+=`.
///
/// # Safety
/// `c` must point at a `rows × cols` tile with row stride `ldc`, valid for writes.
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(isa: Isa, np: usize, a: &[u32], b: &[u32], c: *mut f32, ldc: usize, rows: usize, cols: usize, first: bool) {
    debug_assert!(a.len() >= np * MR && b.len() >= np * NR);
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Bf16 {
        // SAFETY: as the caller promised; the processor has the instructions (`isa`).
        return unsafe { avx512::kernel(np, a.as_ptr(), b.as_ptr(), c, ldc, rows, cols, first) };
    }
    let _ = isa;
    let mut acc = [[0f32; NR]; MR];
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: checked just above.
        unsafe { portable_avx2(np, a, b, &mut acc) };
    } else {
        portable(np, a, b, &mut acc);
    }
    #[cfg(not(target_arch = "x86_64"))]
    portable(np, a, b, &mut acc);
    for (r, acc) in acc.iter().enumerate().take(rows) {
        // SAFETY: row r of the tile, `cols` values.
        let row = unsafe { std::slice::from_raw_parts_mut(c.add(r * ldc), cols) };
        for (c, &v) in row.iter_mut().zip(acc) {
            *c = if first { v } else { *c + v };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn portable_avx2(np: usize, a: &[u32], b: &[u32], acc: &mut [[f32; NR]; MR]) {
    portable(np, a, b, acc)
}

#[inline(always)]
fn portable(np: usize, a: &[u32], b: &[u32], acc: &mut [[f32; NR]; MR]) {
    for p in 0..np {
        let bp = &b[p * NR..][..NR];
        let mut lo = [0f32; NR];
        let mut hi = [0f32; NR];
        for j in 0..NR {
            lo[j] = f32::from_bits(bp[j] << 16);
            hi[j] = f32::from_bits(bp[j] & 0xffff_0000);
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let pair = a[p * MR + r];
            let (alo, ahi) = (f32::from_bits(pair << 16), f32::from_bits(pair & 0xffff_0000));
            for j in 0..NR {
                acc[j] = acc[j] + ahi * hi[j] + alo * lo[j];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{MR, NR};

    /// The SIMD part of [`super::pairs_of_row`]: 16 pairs at a time; returns how many it did.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn pairs_of_row(row: &[f32], dst: &mut [u32], r: usize, stride: usize) -> usize {
        let chunks = row.len() / 32;
        let mut pairs = [0u32; 16];
        for c in 0..chunks {
            // SAFETY: 32 values from c * 32, inside `row`.
            let (lo, hi) = unsafe { (_mm512_loadu_ps(row.as_ptr().add(c * 32)), _mm512_loadu_ps(row.as_ptr().add(c * 32 + 16))) };
            // The low half of the result comes from the second operand: values 0..32 in order.
            let packed = _mm512_cvtne2ps_pbh(hi, lo);
            // SAFETY: 64 bytes into a 64-byte array.
            unsafe { _mm512_storeu_si512(pairs.as_mut_ptr().cast(), std::mem::transmute::<__m512bh, __m512i>(packed)) };
            for (q, &pair) in pairs.iter().enumerate() {
                dst[(c * 16 + q) * stride + r] = pair;
            }
        }
        chunks * 16
    }

    /// `dst[j] = r0[j] | r1[j] << 16` for 16 bf16 values each.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn interleave16_u16(r0: *const u16, r1: *const u16, dst: *mut u32) {
        unsafe {
            let lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(r0.cast()));
            let hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256(r1.cast()));
            _mm512_storeu_si512(dst.cast(), _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi)));
        }
    }

    /// `dst[j] = bf16(r0[j]) | bf16(r1[j]) << 16` for 16 f32 values each, rounded to nearest even.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn interleave16_f32(r0: *const f32, r1: *const f32, dst: *mut u32) {
        unsafe {
            let lo: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(r0)));
            let hi: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(r1)));
            let (lo, hi) = (_mm512_cvtepu16_epi32(lo), _mm512_cvtepu16_epi32(hi));
            _mm512_storeu_si512(dst.cast(), _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi)));
        }
    }

    /// The `MR × NR` micro-kernel: 24 accumulators, three `b` registers, `a` broadcast.
    ///
    /// # Safety
    /// `a` holds `np * MR` pairs, `b` `np * NR`; `c` as in [`super::kernel`].
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn kernel(
        np: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        first: bool,
    ) {
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 3]; MR];
            for p in 0..np {
                let bp = b.add(p * NR);
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.cast()));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(16).cast()));
                let b2: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(32).cast()));
                let ap = a.add(p * MR);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let pair: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(r) as i32));
                    acc[0] = _mm512_dpbf16_ps(acc[0], pair, b0);
                    acc[1] = _mm512_dpbf16_ps(acc[1], pair, b1);
                    acc[2] = _mm512_dpbf16_ps(acc[2], pair, b2);
                }
            }
            for (r, acc) in acc.iter().enumerate().take(rows) {
                let row = c.add(r * ldc);
                for (v, &value) in acc.iter().enumerate() {
                    let left = cols.saturating_sub(v * 16).min(16);
                    if left == 0 {
                        break;
                    }
                    let mask: __mmask16 = if left == 16 { 0xffff } else { (1u16 << left) - 1 };
                    let at = row.add(v * 16);
                    let value = if first { value } else { _mm512_add_ps(value, _mm512_maskz_loadu_ps(mask, at)) };
                    _mm512_mask_storeu_ps(at, mask, value);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The product of the bf16-rounded inputs, summed in f64.
    fn reference(a: Matrix<'_>, b: Matrix<'_>) -> Vec<f64> {
        let mut c = vec![0f64; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                c[i * b.cols + j] = (0..a.cols)
                    .map(|l| bf16_to_f32(a.bits(i, l)) as f64 * bf16_to_f32(b.bits(l, j)) as f64)
                    .sum();
            }
        }
        c
    }

    fn check(isa: Isa, a: Matrix<'_>, b: Matrix<'_>) {
        let want = reference(a, b);
        let mut got = vec![f32::NAN; a.rows * b.cols];
        gemm_with(isa, a, b, &mut got);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // f32 sums of k terms of magnitude <= 1.
            let tol = 1e-6 * (a.cols as f64).max(1.0);
            assert!((*g as f64 - w).abs() <= tol, "{isa:?} {}x{}x{} [{i}]: {g} vs {w}", a.rows, a.cols, b.cols);
        }
    }

    fn isas() -> Vec<Isa> {
        let mut out = vec![Isa::Portable];
        if isa() == Isa::Avx512Bf16 {
            out.push(Isa::Avx512Bf16);
        }
        out
    }

    #[test]
    fn products_equal_the_rounded_inputs_products_on_odd_shapes_and_layouts() {
        // Rows not a multiple of MR or MC, columns not a multiple of NR, k odd and past KC
        // pairs, and one of everything.
        for &(m, k, n) in &[(1, 1, 1), (3, 5, 7), (9, 33, 49), (17, 300, 50), (260, 257, 97), (8, 2, 48), (5, 0, 3)] {
            let av = values(m * k, 1);
            let bv = values(k * n, 2);
            let bits: Vec<u16> = bv.iter().map(|&x| round_bf16(x)).collect();
            for isa in isas() {
                let a = Matrix::row_major(Values::F32(&av), m, k);
                // b as f32 and as bf16, stored [k, n] and transposed ([n, k]).
                check(isa, a, Matrix::row_major(Values::F32(&bv), k, n));
                check(isa, a, Matrix::row_major(Values::Bf16(&bits), k, n));
                check(isa, a, Matrix::row_major(Values::Bf16(&bits), n, k).t());
                check(isa, a, Matrix::row_major(Values::F32(&bv), n, k).t());
                // a transposed (a weight gradient's xᵀ·dy).
                check(isa, Matrix::row_major(Values::F32(&av), k, m).t(), Matrix::row_major(Values::F32(&bv), k, n));
            }
        }
    }

    #[test]
    fn both_kernels_agree_and_the_output_is_overwritten() {
        let (m, k, n) = (37, 290, 101);
        let av = values(m * k, 3);
        let bv: Vec<u16> = values(k * n, 4).iter().map(|&x| round_bf16(x)).collect();
        let a = Matrix::row_major(Values::F32(&av), m, k);
        let b = Matrix::row_major(Values::Bf16(&bv), k, n);
        let mut first = vec![7.0; m * n];
        gemm_with(Isa::Portable, a, b, &mut first);
        let second = gemm(a, b);
        for (x, y) in first.iter().zip(&second) {
            assert!((x - y).abs() <= 1e-4, "{x} vs {y}");
        }
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(round_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: to the even one, 1.
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: up.
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(round_bf16(-2.5), 0xc020);
        assert!(bf16_to_f32(round_bf16(f32::NAN)).is_nan());
        assert_eq!(round_bf16(f32::INFINITY), 0x7f80);
        assert_eq!(round_bf16(f32::MAX), 0x7f80, "past bf16's largest finite: infinity");
    }
}
