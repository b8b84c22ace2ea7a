//! Frozen base weights kept compact in memory: block-quantized (QLoRA-style), dequantized per
//! matmul, or bf16 on CPU backends that hold no bf16 tensors (`precision: bf16` there), multiplied
//! as bf16 by temper-kernels.
//!
//! The block formats are llama.cpp's Q8_0 and Q4_0: blocks of 32 input rows per output column, one
//! f16-rounded scale per block; 8-bit values, or 4-bit values offset by 8 and packed two per
//! byte. They are built from plain burn ops on integer tensors (I8/U8), so they work on every
//! backend and under autodiff (burn-autodiff 0.21 has no quantized tensors of its own: its
//! `quantize`/`dequantize` are `todo!()`).

use burn::module::{Module, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, ElementConversion, Int, Tensor, TensorData};
use half::f16;

pub const BLOCK: usize = 32;

#[derive(Module, Debug)]
pub struct QuantizedWeight<B: Backend> {
    /// 8 bits: `[in, out]` i8. 4 bits: `[in / 2, out]` u8; within each block of 32 input rows
    /// the low nibbles hold rows 0..16 and the high nibbles rows 16..32 (Q4_0's order).
    /// 16 bits: `[in, out]` u16, the bf16 bit patterns.
    pub qs: Param<Tensor<B, 2, Int>>,
    /// `[in / 32, out]`, in the dtype the weight is dequantized to; `[1, 1]` and unused for bf16.
    pub scales: Param<Tensor<B, 2>>,
    pub bits: usize,
}

impl<B: Backend> QuantizedWeight<B> {
    /// Quantizes a `[in, out]` weight (`in` a multiple of 32) to 8 or 4 bits.
    pub fn quantize(weight: Tensor<B, 2>, bits: usize) -> Self {
        assert!(bits == 8 || bits == 4, "8 or 4 bits");
        let [in_f, out_f] = weight.dims();
        assert!(in_f.is_multiple_of(BLOCK), "in_features must be a multiple of {BLOCK}");
        let dtype = weight.dtype();
        let device = weight.device();
        let w: Vec<f32> = weight.cast(DType::F32).into_data().to_vec().expect("f32");
        let blocks = in_f / BLOCK;
        let mut scales = vec![0f32; blocks * out_f];
        let mut q8 = vec![0i8; if bits == 8 { in_f * out_f } else { 0 }];
        let mut q4 = vec![0u8; if bits == 4 { in_f / 2 * out_f } else { 0 }];
        for b in 0..blocks {
            for o in 0..out_f {
                let at = |k: usize| w[(b * BLOCK + k) * out_f + o];
                if bits == 8 {
                    // Q8_0: d = max|x| / 127, q = round(x / d)
                    let amax = (0..BLOCK).map(|k| at(k).abs()).fold(0f32, f32::max);
                    // llama.cpp divides by the f32 scale and stores it rounded to f16.
                    let d = amax / 127.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    let d = f16::from_f32(d).to_f32();
                    for k in 0..BLOCK {
                        q8[(b * BLOCK + k) * out_f + o] = (at(k) * id).round() as i8;
                    }
                    scales[b * out_f + o] = d;
                } else {
                    // Q4_0: d = (the value of largest magnitude) / -8, q = min(15, x / d + 8.5)
                    let max = (0..BLOCK)
                        .map(at)
                        .fold(0f32, |m, x| if x.abs() > m.abs() { x } else { m });
                    let d = max / -8.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    let d = f16::from_f32(d).to_f32();
                    // (int8_t)(x * id + 8.5) truncates toward zero, then min(15, ...)
                    let q = |k: usize| ((at(k) * id + 8.5) as i8).clamp(0, 15) as u8;
                    for k in 0..BLOCK / 2 {
                        q4[(b * BLOCK / 2 + k) * out_f + o] = q(k) | (q(k + BLOCK / 2) << 4);
                    }
                    scales[b * out_f + o] = d;
                }
            }
        }
        let qs = if bits == 8 {
            Tensor::from_data(TensorData::new(q8, [in_f, out_f]), (&device, DType::I8))
        } else {
            Tensor::from_data(TensorData::new(q4, [in_f / 2, out_f]), (&device, DType::U8))
        };
        let scales =
            Tensor::<B, 2>::from_data(TensorData::new(scales, [blocks, out_f]), (&device, DType::F32)).cast(dtype);
        Self {
            qs: Param::initialized(ParamId::new(), qs),
            scales: Param::from_tensor(scales).set_require_grad(false),
            bits,
        }
    }

    /// Keeps a `[in, out]` weight as bf16 (rounded to nearest even).
    pub fn bf16(weight: Tensor<B, 2>) -> Self {
        let device = weight.device();
        Self {
            qs: Param::initialized(ParamId::new(), temper_kernels::to_bf16_bits(weight)),
            scales: Param::from_tensor(Tensor::zeros([1, 1], (&device, DType::F32))).set_require_grad(false),
            bits: 16,
        }
    }

    /// bf16 rather than block-quantized.
    pub fn is_bf16(&self) -> bool {
        self.bits == 16
    }

    /// `[in, out]`.
    pub fn dims(&self) -> [usize; 2] {
        if self.is_bf16() {
            return self.qs.dims();
        }
        let [blocks, out] = self.scales.dims();
        [blocks * BLOCK, out]
    }

    /// The `[in, out]` weight, in the scales' dtype (f32 for bf16).
    pub fn dequantize(&self) -> Tensor<B, 2> {
        if self.is_bf16() {
            return temper_kernels::from_bf16_bits(self.qs.val(), DType::F32);
        }
        let scales = self.scales.val();
        let dtype = scales.dtype();
        let [blocks, out_f] = scales.dims();
        let in_f = blocks * BLOCK;
        let q = match self.bits {
            8 => self.qs.val().float().cast(dtype), // [in, out]
            _ => {
                let packed = self.qs.val(); // [in / 2, out]
                let lo = packed
                    .clone()
                    .bitwise_and_scalar(15.elem::<B::IntElem>())
                    .reshape([blocks, BLOCK / 2, out_f]);
                let hi = packed
                    .bitwise_right_shift_scalar(4.elem::<B::IntElem>())
                    .reshape([blocks, BLOCK / 2, out_f]);
                Tensor::cat(vec![lo, hi], 1).reshape([in_f, out_f]).float().cast(dtype) - 8.0
            }
        };
        (q.reshape([blocks, BLOCK, out_f]) * scales.unsqueeze_dim::<3>(1)).reshape([in_f, out_f])
    }

    /// Bytes held: the packed values plus the scales.
    pub fn bytes(&self) -> usize {
        let value_bytes = if self.is_bf16() { 2 } else { 1 };
        let scale_bytes = if self.is_bf16() { 0 } else { self.scales.val().dtype().size() };
        self.qs.shape().num_elements() * value_bytes + self.scales.shape().num_elements() * scale_bytes
    }
}
