//! AdamW with decoupled weight decay, global-norm clipping and learning-rate schedules.
//!
//! Written here rather than taken from `burn::optim` for three things users expect from
//! PyTorch: clipping by the norm of *all* gradients together (burn clips each tensor on its
//! own), parameter groups (no decay on biases and norms; LoRA+'s faster B matrices), and state
//! keyed by parameter name, so a checkpoint is readable and survives a rebuilt model.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::config::{Schedule, TrainingSection};

/// The learning rate for optimizer step `step` (0-based), as transformers' schedulers give it:
/// linear warmup from 0, then constant, linear decay to 0, or a half cosine to 0.
pub fn learning_rate(schedule: Schedule, peak: f64, step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    match schedule {
        Schedule::Constant => peak,
        Schedule::Linear => peak * (1.0 - progress).max(0.0),
        Schedule::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos()),
    }
}

/// AdamW's hyper-parameters.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// LoRA+: learning-rate multiplier of `lora_b` matrices.
    pub loraplus_lr_ratio: Option<f64>,
}

impl AdamWConfig {
    pub fn from_training(t: &TrainingSection, loraplus_lr_ratio: Option<f64>) -> Self {
        Self {
            beta1: t.adam_beta1,
            beta2: t.adam_beta2,
            eps: t.adam_epsilon,
            weight_decay: t.weight_decay,
            loraplus_lr_ratio,
        }
    }
}

/// First and second moments of one parameter, flattened, in f32.
#[derive(Debug, Clone)]
pub struct Moments<B: Backend> {
    pub m: Tensor<B, 1>,
    pub v: Tensor<B, 1>,
}

/// AdamW state: the moments by parameter name and the number of steps taken.
pub struct AdamW<B: Backend> {
    pub config: AdamWConfig,
    pub moments: HashMap<String, Moments<B>>,
    pub steps: u64,
}

impl<B: Backend> AdamW<B> {
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            moments: HashMap::new(),
            steps: 0,
        }
    }

    /// Applies one update to every trainable parameter of `module` that has a gradient, with
    /// gradients multiplied by `grad_scale` (the clipping factor).
    pub fn step<AB, M>(&mut self, module: M, grads: &mut GradientsParams, lr: f64, grad_scale: f64) -> M
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: Module<AB>,
    {
        self.steps += 1;
        let mut mapper = StepMapper::<AB> {
            path: Vec::new(),
            grads,
            optim: self,
            lr,
            grad_scale,
        };
        module.map(&mut mapper)
    }

    fn update(&mut self, name: &str, param: Tensor<B, 1>, grad: Tensor<B, 1>, lr: f64, decay: bool) -> Tensor<B, 1> {
        let c = self.config;
        let moments = self.moments.entry(name.to_string()).or_insert_with(|| Moments {
            m: param.zeros_like(),
            v: param.zeros_like(),
        });
        let m = moments.m.clone() * c.beta1 + grad.clone() * (1.0 - c.beta1);
        let v = moments.v.clone() * c.beta2 + grad.powi_scalar(2) * (1.0 - c.beta2);
        moments.m = m.clone();
        moments.v = v.clone();
        // torch.optim.AdamW: decay first (p *= 1 - lr·wd), then the bias-corrected step.
        let t = self.steps as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        let param = if decay && c.weight_decay > 0.0 {
            param * (1.0 - lr * c.weight_decay)
        } else {
            param
        };
        let denom = (v / bc2).sqrt() + c.eps;
        param - (m / denom) * (lr / bc1)
    }

    /// The moments as named f32 arrays (for a checkpoint).
    pub fn state_tensors(&self) -> Vec<(String, Vec<f32>)> {
        let mut out = Vec::new();
        let mut names: Vec<&String> = self.moments.keys().collect();
        names.sort();
        for name in names {
            let m = &self.moments[name];
            out.push((
                format!("{name}.exp_avg"),
                m.m.clone().into_data().to_vec().expect("f32"),
            ));
            out.push((
                format!("{name}.exp_avg_sq"),
                m.v.clone().into_data().to_vec().expect("f32"),
            ));
        }
        out
    }

    /// Restores moments written by [`Self::state_tensors`], for the trainable parameters
    /// `trainable` (their module paths). A checkpoint written before q/k/v and gate/up became
    /// lists (`self_attn.q_proj` -> `self_attn.qkv.0`, `mlp.gate_proj` -> `mlp.gate_up.0`) is
    /// read under the new names. Returns the moments no parameter takes (empty when the
    /// checkpoint fits): their parameters would restart from fresh moments at the resumed step
    /// count, a step of about `lr` times the gradient's sign. (A parameter without moments is
    /// normal: an expert no token was routed to has had no gradient yet.)
    pub fn load_state(
        &mut self,
        tensors: HashMap<String, Vec<f32>>,
        steps: u64,
        trainable: &[String],
        device: &B::Device,
    ) -> Vec<String> {
        self.steps = steps;
        self.moments.clear();
        let renamed = |name: &str| {
            [
                ("self_attn.q_proj.", "self_attn.qkv.0."),
                ("self_attn.k_proj.", "self_attn.qkv.1."),
                ("self_attn.v_proj.", "self_attn.qkv.2."),
                ("mlp.gate_proj.", "mlp.gate_up.0."),
                ("mlp.up_proj.", "mlp.gate_up.1."),
            ]
            .iter()
            .fold(name.to_string(), |n, (old, new)| n.replace(old, new))
        };
        let mut unused = Vec::new();
        for (key, values) in &tensors {
            if let Some(name) = key.strip_suffix(".exp_avg") {
                let Some(v) = tensors.get(&format!("{name}.exp_avg_sq")) else {
                    unused.push(name.to_string());
                    continue;
                };
                let name = match trainable.iter().any(|t| t == name) {
                    true => name.to_string(),
                    false => renamed(name),
                };
                if !trainable.contains(&name) {
                    unused.push(name);
                    continue;
                }
                let t = |x: &Vec<f32>| Tensor::<B, 1>::from_data(TensorData::new(x.clone(), [x.len()]), device);
                self.moments.insert(name, Moments { m: t(values), v: t(v) });
            }
        }
        unused.sort();
        unused
    }
}

/// The module paths of `module`'s trainable parameters, as [`AdamW`] names their moments.
pub fn trainable_names<AB: AutodiffBackend, M: Module<AB>>(module: &M) -> Vec<String> {
    struct Names {
        path: Vec<String>,
        out: Vec<String>,
    }
    impl<AB: AutodiffBackend> ModuleVisitor<AB> for Names {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
            if param.is_require_grad() {
                self.out.push(self.path.join("."));
            }
        }
    }
    let mut names = Names {
        path: Vec::new(),
        out: Vec::new(),
    };
    module.visit(&mut names);
    names.out
}

/// Walks the module, updating trainable parameters in place; tracks the path for names.
struct StepMapper<'a, AB: AutodiffBackend> {
    path: Vec<String>,
    grads: &'a mut GradientsParams,
    optim: &'a mut AdamW<AB::InnerBackend>,
    lr: f64,
    grad_scale: f64,
}

impl<AB: AutodiffBackend> ModuleMapper<AB> for StepMapper<'_, AB> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        if !param.is_require_grad() {
            return param;
        }
        let Some(grad) = self.grads.remove::<AB::InnerBackend, D>(param.id) else {
            return param;
        };
        let name = self.path.join(".");
        let (id, tensor, mapper) = param.consume();
        let inner = tensor.inner();
        let dims = inner.dims();
        let dtype = inner.dtype();
        let n: usize = dims.iter().product();
        // No decay on biases, norms and other vectors (transformers' default groups).
        let decay = D >= 2 && !name.ends_with("bias");
        let lr = match self.optim.config.loraplus_lr_ratio {
            Some(ratio) if name.contains("lora_b") => self.lr * ratio,
            _ => self.lr,
        };
        let p = inner.cast(DType::F32).reshape([n]);
        let g = grad.cast(DType::F32).reshape([n]) * self.grad_scale;
        let updated = self.optim.update(&name, p, g, lr, decay).reshape(dims).cast(dtype);
        Param::from_mapped_value(id, Tensor::from_inner(updated).require_grad(), mapper)
    }
}

/// The L2 norm of all gradients of trainable parameters together (`[1]`, f32), for gradients
/// that come multiplied by `loss_scale`: the norm of the true gradients, infinite or NaN only
/// when a gradient is (the squares of scaled gradients could overflow f32 on their own).
pub fn global_grad_norm<AB: AutodiffBackend, M: Module<AB>>(
    module: &M,
    grads: &GradientsParams,
    loss_scale: f64,
    device: &AB::Device,
) -> Tensor<AB::InnerBackend, 1> {
    struct Norm<'a, AB: AutodiffBackend> {
        grads: &'a GradientsParams,
        loss_scale: f64,
        sum: Tensor<AB::InnerBackend, 1>,
    }
    impl<AB: AutodiffBackend> ModuleVisitor<AB> for Norm<'_, AB> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
            if let Some(g) = self.grads.get::<AB::InnerBackend, D>(param.id) {
                let mut g = g.cast(DType::F32);
                if self.loss_scale != 1.0 {
                    g = g / self.loss_scale;
                }
                let s = g.powi_scalar(2).sum();
                self.sum = self.sum.clone() + s;
            }
        }
    }
    let mut v = Norm::<AB> {
        grads,
        loss_scale,
        sum: Tensor::zeros([1], device),
    };
    module.visit(&mut v);
    v.sum.sqrt()
}

/// Dynamic loss scaling for f16 training, with PyTorch's `GradScaler` defaults: the loss is
/// multiplied by `scale` before the backward, so that small gradients survive f16's range,
/// and the gradients divided by it before clipping and the update. A step whose gradients
/// overflowed is skipped (no update) and the scale halved; after 2 000 steps in a row without
/// overflow, the scale doubles.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    /// Steps in a row since the last overflow or growth.
    pub good_steps: u64,
    /// Steps skipped so far (the optimizer's own step count is the trainer's minus these).
    pub skipped: u64,
}

impl LossScaler {
    pub const INITIAL_SCALE: f64 = 65536.0;
    pub const GROWTH_INTERVAL: u64 = 2000;

    pub fn new(scale: f64) -> Self {
        Self {
            scale,
            good_steps: 0,
            skipped: 0,
        }
    }

    /// Records a step whose (scaled) gradients were `finite` or not; returns whether to apply
    /// it.
    pub fn update(&mut self, finite: bool) -> bool {
        if finite {
            self.good_steps += 1;
            if self.good_steps == Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale /= 2.0;
            self.good_steps = 0;
            self.skipped += 1;
        }
        finite
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint written before q/k/v and gate/up became lists resumes under the new names;
    /// moments for no parameter at all are reported.
    #[test]
    fn moments_of_earlier_names_follow_their_parameters() {
        type B = burn::backend::NdArray;
        let mut optim = AdamW::<B>::new(AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            loraplus_lr_ratio: None,
        });
        let old = |name: &str| [(format!("{name}.exp_avg"), vec![1.0]), (format!("{name}.exp_avg_sq"), vec![2.0])];
        let tensors: HashMap<String, Vec<f32>> = old("model.layers.0.self_attn.k_proj.adapter.lora_a")
            .into_iter()
            .chain(old("model.layers.0.mlp.up_proj.adapter.lora_b"))
            .chain(old("model.layers.0.self_attn.o_proj.adapter.lora_a"))
            .chain(old("model.layers.9.self_attn.o_proj.adapter.lora_a"))
            .collect();
        let trainable = [
            "model.layers.0.self_attn.qkv.1.adapter.lora_a",
            "model.layers.0.mlp.gate_up.1.adapter.lora_b",
            "model.layers.0.self_attn.o_proj.adapter.lora_a",
        ]
        .map(String::from);
        let unused = optim.load_state(tensors, 3, &trainable, &Default::default());
        assert_eq!(unused, ["model.layers.9.self_attn.o_proj.adapter.lora_a"]);
        let mut names: Vec<&String> = optim.moments.keys().collect();
        names.sort();
        let mut want: Vec<&String> = trainable.iter().collect();
        want.sort();
        assert_eq!(names, want);
    }

    #[test]
    fn schedules_match_transformers() {
        // transformers.get_linear_schedule_with_warmup(opt, 2, 10) lambdas for steps 0..10:
        // [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
        let lin: Vec<f64> = (0..10)
            .map(|s| learning_rate(Schedule::Linear, 1.0, s, 2, 10))
            .collect();
        let want = [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125];
        assert!(lin.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12), "{lin:?}");
        // get_cosine_schedule_with_warmup(opt, 2, 10) at step 6: 0.5 * (1 + cos(pi * 0.5)) = 0.5
        assert!((learning_rate(Schedule::Cosine, 1.0, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert_eq!(learning_rate(Schedule::Constant, 3.0, 7, 2, 10), 3.0);
    }

    #[test]
    fn loss_scale_halves_on_overflow_and_grows_after_a_clean_run() {
        let mut s = LossScaler::new(LossScaler::INITIAL_SCALE);
        assert!(!s.update(false));
        assert_eq!((s.scale, s.skipped), (32768.0, 1));
        for _ in 0..LossScaler::GROWTH_INTERVAL - 1 {
            assert!(s.update(true));
        }
        assert_eq!(s.scale, 32768.0);
        assert!(s.update(true));
        assert_eq!((s.scale, s.good_steps, s.skipped), (65536.0, 0, 1));
    }
}
