//! The low-rank adapter that a [`Linear`](crate::llama::Linear) may carry.
//!
//! Only the forward math lives here, because it has to run inside the model's forward; how
//! adapters are configured, placed, initialised, saved and merged is `temper-peft`'s job.

use burn::module::{Module, Param};
use burn::nn::DropoutConfig;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use temper_kernels::Products;

/// `y = x·W + b + scaling · dropout(x)·A·B`, or its DoRA form when `lora_magnitude_vector`
/// is set. Matrices are stored `[in, r]` and `[r, out]` (the transposes of PEFT's `lora_A`
/// `[r, in]` and `lora_B` `[out, r]`), like the base weight, so every product is a plain GEMM.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    pub lora_a: Param<Tensor<B, 2>>, // [in, r]
    pub lora_b: Param<Tensor<B, 2>>, // [r, out]
    /// DoRA's per-output magnitude `m` (`[out]`).
    pub lora_magnitude_vector: Option<Param<Tensor<B, 1>>>,
    pub scaling: f64,
    pub dropout: f64,
    /// The switch that turns the layer back into its base, for DPO's reference pass.
    pub enabled: bool,
}

impl<B: Backend> Lora<B> {
    pub fn rank(&self) -> usize {
        self.lora_a.dims()[1]
    }

    /// Adds the adapter's contribution to `base` (`x·W + b`, already computed). `weight` gives
    /// the base weight `[in, out]`, which only DoRA needs (it may be dequantized on demand).
    ///
    /// Mixed precision: the adapter computes in its own dtype (f32 master weights) whatever the
    /// base computes in; its contribution is cast back to the base's dtype once, at the end.
    ///
    /// # Shapes
    /// `x: [rows, in]`, `base: [rows, out]` -> `[rows, out]`
    pub fn apply(
        &self,
        x: Tensor<B, 2>,
        base: Tensor<B, 2>,
        weight: impl FnOnce() -> Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
        products: Products,
    ) -> Tensor<B, 2> {
        // The adapter's products stay f32; beside bf16 base products (which keep OpenBLAS to one
        // thread) they are split over the cores by us.
        let matmul = |a, b| match products {
            Products::F32 => temper_kernels::matmul(a, b),
            Products::Bf16 => temper_kernels::matmul_in_pieces(a, b),
        };
        let base_dtype = base.dtype();
        let dtype = self.lora_a.val().dtype();
        let x = x.cast(dtype);
        // burn's Dropout is a no-op unless autodiff is on, i.e. only while training.
        let dropped = self.dropout > 0.0 && B::ad_enabled(&x.device());
        let x = if dropped {
            DropoutConfig::new(self.dropout).init().forward(x)
        } else {
            x
        };
        let xa = matmul(x.clone(), self.lora_a.val()); // [rows, r]
        let delta = match &self.lora_magnitude_vector {
            // Scaled while it is `r` wide rather than `out` wide: the same product, a pass over
            // 16 columns instead of thousands, forward and backward.
            None => matmul(xa * self.scaling, self.lora_b.val()),
            Some(magnitude) => {
                let lora = matmul(xa, self.lora_b.val()); // [rows, out]
                // DoRA, as PEFT computes it (`tuners/lora/dora.py`): the column norm of the
                // adapted weight is treated as a constant (detached), as the DoRA paper advises.
                let weight = weight().cast(dtype);
                let (_, norm) = adapted_weight(weight.clone(), self.lora_a.val(), self.lora_b.val(), self.scaling);
                let norm = norm.detach(); // [1, out]
                let scale = magnitude.val().unsqueeze::<2>() / norm; // [1, out]
                // PEFT uses the base output minus its bias when x was not dropped, x'·W otherwise.
                let base_no_bias = if dropped {
                    x.matmul(weight)
                } else {
                    match bias {
                        Some(b) => base.clone().cast(dtype) - b.cast(dtype).unsqueeze::<2>(),
                        None => base.clone().cast(dtype),
                    }
                };
                base_no_bias * (scale.clone() - 1.0) + lora * scale * self.scaling
            }
        };
        base + delta.cast(base_dtype)
    }

    /// The merged weight (`[in, out]`): `W + scaling·A·B`, and for DoRA each output column
    /// rescaled to its magnitude. What merging folds into the base.
    pub fn merged_weight(&self, weight: Tensor<B, 2>) -> Tensor<B, 2> {
        let (adapted, norm) = adapted_weight(weight, self.lora_a.val(), self.lora_b.val(), self.scaling);
        match &self.lora_magnitude_vector {
            None => adapted,
            Some(m) => adapted * (m.val().unsqueeze::<2>() / norm),
        }
    }
}

/// `W + scaling·A·B` (`[in, out]`) and its column norms (`[1, out]`): DoRA's direction and
/// the norm its magnitude vector divides by (and starts at).
pub fn adapted_weight<B: Backend>(
    weight: Tensor<B, 2>,
    lora_a: Tensor<B, 2>,
    lora_b: Tensor<B, 2>,
    scaling: f64,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let adapted = weight + lora_a.matmul(lora_b) * scaling;
    let norm = adapted.clone().powi_scalar(2).sum_dim(0).sqrt();
    (adapted, norm)
}
