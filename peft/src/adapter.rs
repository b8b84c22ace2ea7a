//! Placing adapters on a model, and PEFT's on-disk format for them.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr_free::normal;
use safetensors::{Dtype as StDtype, SafeTensors};
use temper_models::LlamaForCausalLM;
use temper_models::atomic::{write_atomic, write_file_atomic};
use temper_models::lora::{Lora, adapted_weight};
use temper_models::weights::transpose_2d;

use crate::config::{InitLoraWeights, LoraConfig, SavedModule, TargetModules};
use crate::error::{Error, Result};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// PEFT's prefix: the `PeftModel` wrapper (`base_model`) around `LoraModel` (`model`).
const PREFIX: &str = "base_model.model.";

/// Box-Muller on our own seeded generator, so initialisation is identical on every backend.
mod rand_distr_free {
    use rand::Rng;
    pub fn normal(rng: &mut impl Rng) -> f32 {
        let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
        let u2: f32 = rng.random();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
    }
}

fn uniform(rng: &mut StdRng, n: usize, bound: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-bound..bound)).collect()
}

fn upload<B: Backend, const D: usize>(data: TensorData, device: &B::Device) -> Tensor<B, D> {
    Tensor::from_data(data.convert_dtype(DType::F32), (device, DType::F32))
}

fn trainable<B: Backend, const D: usize>(t: Tensor<B, D>) -> Param<Tensor<B, D>> {
    Param::from_tensor(t).set_require_grad(true)
}

/// PiSSA (PEFT's `pissa_init`): with `W = U·S·Vᵀ` (`W` as PEFT sees it, `[out, in]`),
/// `A = sqrt(S_r/scaling)·V_rᵀ` (`[r, in]`), `B = U_r·sqrt(S_r/scaling)` (`[out, r]`), and the
/// base becomes `W - scaling·B·A`. `w` is our `[in, out]` layout; the residual comes back in it.
/// The signs of singular vectors are arbitrary, but `B·A` and the residual are not, so an
/// adapter trained from here and saved loads in PEFT (which re-runs this on its base) exactly.
fn pissa(w: &[f32], in_f: usize, out_f: usize, r: usize, scaling: f64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    // nalgebra's from_row_slice reads [out, in] row-major: element (o, i) = w[i * out + o].
    let m = nalgebra::DMatrix::<f64>::from_fn(out_f, in_f, |o, i| w[i * out_f + o] as f64);
    let svd = m.svd(true, true);
    let (u, vt) = (svd.u.expect("asked for U"), svd.v_t.expect("asked for Vᵀ"));
    let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
    order.sort_by(|&x, &y| svd.singular_values[y].total_cmp(&svd.singular_values[x]));
    let r = r.min(order.len());
    let mut a = vec![0f32; r * in_f];
    let mut b = vec![0f32; out_f * r];
    let mut residual = w.to_vec();
    for (k, &idx) in order.iter().take(r).enumerate() {
        let root = (svd.singular_values[idx] / scaling).sqrt();
        for i in 0..in_f {
            a[k * in_f + i] = (root * vt[(idx, i)]) as f32;
        }
        for o in 0..out_f {
            b[o * r + k] = (u[(o, idx)] * root) as f32;
        }
    }
    // residual[i, o] -= scaling * sum_k B[o, k] A[k, i]
    for i in 0..in_f {
        for o in 0..out_f {
            let dot: f64 = (0..r).map(|k| b[o * r + k] as f64 * a[k * in_f + i] as f64).sum();
            residual[i * out_f + o] -= (scaling * dot) as f32;
        }
    }
    (a, b, residual)
}

/// What [`inject`] did.
#[derive(Debug, Clone)]
pub struct Injected {
    /// Module names that got an adapter, in model order.
    pub targets: Vec<String>,
    /// Parameters that will be trained (adapters and modules_to_save).
    pub trainable_parameters: usize,
    pub total_parameters: usize,
}

/// Freezes the model and adds an adapter to every linear layer `config` targets; marks
/// `modules_to_save` trainable. Errors if nothing matches.
pub fn inject<B: Backend>(
    model: LlamaForCausalLM<B>,
    config: &LoraConfig,
    seed: u64,
) -> Result<(LlamaForCausalLM<B>, Injected)> {
    let mut model = model.no_grad();
    let layers = model.num_layers();
    if let Some(&bad) = config.layers_to_transform.iter().flatten().find(|&&l| l >= layers) {
        return Err(Error::Invalid {
            key: "layers_to_transform".into(),
            message: format!(
                "layer {bad} does not exist: the model has {layers} layers (0 to {})",
                layers - 1
            ),
        });
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut targets = Vec::new();
    let mut example = String::new();
    let experts = crate::experts::ExpertTargets::of(&model);
    for (name, linear) in model.linears_mut() {
        if example.is_empty() {
            example = name.clone();
        }
        if !experts.targets(config, &name)? {
            continue;
        }
        // PEFT adapts transformers 5's experts and routers as parameters (`ParamWrapper`),
        // which refuses DoRA and dropout: what it could not load is refused here too.
        if experts.is_stacked(&name) && (config.use_dora || config.lora_dropout != 0.0) {
            let key = if config.use_dora { "use_dora" } else { "lora_dropout" };
            return Err(Error::Invalid {
                key: key.into(),
                message: format!(
                    "{name} is a mixture of experts' expert or router, which PEFT 0.21 adapts without DoRA or \
                     dropout (set lora_dropout: 0, or leave experts and routers out of target_modules)"
                ),
            });
        }
        let device = linear.weight.device();
        let [in_f, out_f] = linear.dims();
        let (r, scaling) = experts.rank_and_scaling(config, &name);
        if r > in_f.min(out_f) {
            // B·A cannot have a rank above the smaller side: the extra rows are memory (an
            // absurd rank would abort in the allocator) and nothing else.
            let key = if config.rank_for(&name) == config.r {
                "r"
            } else {
                "rank_pattern"
            };
            return Err(Error::Invalid {
                key: key.into(),
                message: format!(
                    "rank {r} is larger than {name}'s smaller dimension ({}, of [{out_f}, {in_f}]): \
                     a LoRA product cannot have a rank above it",
                    in_f.min(out_f)
                ),
            });
        }
        let bound = 1.0 / (in_f as f32).sqrt(); // kaiming_uniform_(a=sqrt(5)) on [r, in]
        let (a, b): (Vec<f32>, Vec<f32>) = match config.init_lora_weights {
            InitLoraWeights::KaimingZero => (uniform(&mut rng, in_f * r, bound), vec![0.0; r * out_f]),
            InitLoraWeights::Gaussian => (
                (0..in_f * r).map(|_| normal(&mut rng) / r as f32).collect(),
                vec![0.0; r * out_f],
            ),
            // nn.Linear's own init for both: kaiming_uniform(a=sqrt(5)), fan_in = in / r.
            InitLoraWeights::Random => (
                uniform(&mut rng, in_f * r, bound),
                uniform(&mut rng, r * out_f, 1.0 / (r as f32).sqrt()),
            ),
            InitLoraWeights::Pissa => {
                let dense = linear.weight();
                let dtype = dense.dtype();
                let w: Vec<f32> = dense.cast(DType::F32).into_data().to_vec().expect("f32");
                let (a, b, residual) = pissa(&w, in_f, out_f, r, scaling);
                // The residual is a new dense base (a quantized base would be quantized again).
                linear.quantized = None;
                linear.weight =
                    Param::from_tensor(upload::<B, 2>(TensorData::new(residual, [in_f, out_f]), &device).cast(dtype))
                        .set_require_grad(false);
                (a, b)
            }
        };
        // Drawn as PEFT's [r, in] / [out, r], stored transposed.
        let a = transpose_2d(TensorData::new(a, [r, in_f]));
        let b = transpose_2d(TensorData::new(b, [out_f, r]));
        let lora_a = upload::<B, 2>(a, &device);
        let lora_b = upload::<B, 2>(b, &device);
        let magnitude = config.use_dora.then(|| {
            // m starts at the column norms of the adapted weight, so DoRA starts at the base.
            let weight = linear.weight().cast(DType::F32);
            let (_, norm) = adapted_weight(weight, lora_a.clone(), lora_b.clone(), scaling);
            trainable(norm.reshape([out_f]))
        });
        linear.adapter = Some(Lora {
            lora_a: trainable(lora_a),
            lora_b: trainable(lora_b),
            lora_magnitude_vector: magnitude,
            scaling,
            dropout: config.lora_dropout,
            enabled: true,
        });
        targets.push(name);
    }
    crate::experts::check_whole_layers(&model)?;
    if targets.is_empty() {
        let targets = match &config.target_modules {
            TargetModules::Names(n) => format!("{n:?}"),
            TargetModules::Regex(r) => format!("{r:?}"),
            TargetModules::AllLinear => "\"all-linear\"".into(),
        };
        return Err(Error::NoTarget { targets, example });
    }
    for m in &config.modules_to_save {
        match m {
            SavedModule::LmHead => match model.lm_head.as_mut() {
                Some(head) => head.weight = head.weight.clone().set_require_grad(true),
                None => {
                    return Err(Error::Unsupported(
                        "modules_to_save: lm_head on a model with tied embeddings is not supported yet".into(),
                    ));
                }
            },
            SavedModule::EmbedTokens => {
                let e = &mut model.model.embed_tokens;
                *e = e.clone().set_require_grad(true);
            }
            SavedModule::Score => match model.score.as_mut() {
                Some(score) => score.weight = score.weight.clone().set_require_grad(true),
                None => {
                    return Err(Error::Unsupported(
                        "modules_to_save: score is a reward model's head, and this model has none (a reward \
                         adapter is trained with `objective: reward`, which adds it)"
                            .into(),
                    ));
                }
            },
        }
    }
    let (trainable_parameters, total_parameters) = count_parameters(&model);
    Ok((
        model,
        Injected {
            targets,
            trainable_parameters,
            total_parameters,
        },
    ))
}

/// (trainable, total) parameter counts.
pub fn count_parameters<B: Backend>(model: &LlamaForCausalLM<B>) -> (usize, usize) {
    let (mut trainable, mut total) = (0, 0);
    let mut add = |n: usize, t: bool| {
        total += n;
        if t {
            trainable += n;
        }
    };
    let e = &model.model.embed_tokens;
    add(e.shape().num_elements(), e.is_require_grad());
    for (_, n) in model.norms() {
        add(n.weight.shape().num_elements(), n.weight.is_require_grad());
    }
    for (_, l) in model.linears() {
        let [i, o] = l.dims();
        add(i * o, l.quantized.is_none() && l.weight.is_require_grad());
        if let Some(b) = &l.bias {
            add(b.shape().num_elements(), b.is_require_grad());
        }
        if let Some(a) = &l.adapter {
            add(a.lora_a.shape().num_elements(), true);
            add(a.lora_b.shape().num_elements(), true);
            if let Some(m) = &a.lora_magnitude_vector {
                add(m.shape().num_elements(), true);
            }
        }
    }
    (trainable, total)
}

fn to_bytes<B: Backend, const D: usize>(t: Tensor<B, D>) -> (Vec<usize>, Vec<u8>) {
    let data = t.into_data().convert_dtype(DType::F32);
    (data.shape.to_vec(), data.into_bytes().to_vec())
}

/// The adapter's tensors under PEFT's names and layouts.
pub fn adapter_tensors<B: Backend>(
    model: &LlamaForCausalLM<B>,
    config: &LoraConfig,
) -> BTreeMap<String, (Vec<usize>, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let experts = crate::experts::ExpertTargets::of(model);
    for (name, linear) in model.linears() {
        if config.modules_to_save.iter().any(|m| m.path() == name) {
            out.insert(format!("{PREFIX}{name}.weight"), to_bytes(linear.weight().transpose()));
        }
        if experts.is_stacked(&name) {
            continue;
        }
        let Some(lora) = &linear.adapter else { continue };
        out.insert(
            format!("{PREFIX}{name}.lora_A.weight"),
            to_bytes(lora.lora_a.val().transpose()),
        );
        out.insert(
            format!("{PREFIX}{name}.lora_B.weight"),
            to_bytes(lora.lora_b.val().transpose()),
        );
        if let Some(m) = &lora.lora_magnitude_vector {
            out.insert(format!("{PREFIX}{name}.lora_magnitude_vector"), to_bytes(m.val()));
        }
    }
    if config.modules_to_save.contains(&SavedModule::EmbedTokens) {
        out.insert(
            format!("{PREFIX}model.embed_tokens.weight"),
            to_bytes(model.model.embed_tokens.val()),
        );
    }
    // Mixtures of experts: the experts and routers as PEFT 0.21 stacks them (transformers 5).
    for (key, shape, values) in crate::experts::stacked(model, PREFIX) {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        out.insert(key, (shape, bytes));
    }
    out
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` as PEFT's `save_pretrained`.
pub fn save_adapter<B: Backend>(model: &LlamaForCausalLM<B>, config: &LoraConfig, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        error: source,
    })?;
    let targets: Vec<String> = model
        .linears()
        .into_iter()
        .filter(|(_, l)| l.adapter.is_some())
        .map(|(n, _)| n)
        .collect();
    let tensors = adapter_tensors(model, config);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, (shape, bytes))| {
            let view =
                safetensors::tensor::TensorView::new(StDtype::F32, shape.clone(), bytes).expect("consistent sizes");
            (k.clone(), view)
        })
        .collect();
    let metadata = Some([("format".to_string(), "pt".to_string())].into_iter().collect());
    // Final outputs are written as checkpoints are: a temporary name, then a rename, so a full
    // disk never leaves a truncated adapter that looks complete. The config goes last: weights
    // that failed to write leave no config claiming them.
    let path = dir.join(WEIGHTS_FILE);
    write_atomic(&path, |tmp| {
        safetensors::serialize_to_file(views, metadata, tmp).map_err(std::io::Error::other)
    })
    .map_err(|e| Error::Format {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let config_path = dir.join(CONFIG_FILE);
    let mut json = config.to_json(&targets);
    let stacked = crate::experts::stacked_targets(model);
    crate::experts::ExpertTargets::of(model).peft_config(config, &mut json, &targets, &stacked);
    let text = serde_json::to_string_pretty(&json).expect("JSON values serialize");
    write_file_atomic(&config_path, (text + "\n").as_bytes()).map_err(|source| Error::Io {
        path: config_path,
        error: source,
    })
}

pub(crate) fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|error| Error::Io {
        path: path.to_path_buf(),
        error,
    })
}

pub(crate) fn parse_weights<'a>(bytes: &'a [u8], path: &Path) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        message: format!("not a valid safetensors file: {e}"),
    })
}

/// A float tensor of an adapter file, in its stored dtype.
pub(crate) fn float_data(view: &safetensors::tensor::TensorView<'_>, key: &str, path: &Path) -> Result<TensorData> {
    let dtype = match view.dtype() {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        other => {
            return Err(Error::Tensor {
                path: path.to_path_buf(),
                key: key.to_string(),
                message: format!("unsupported dtype {other:?}"),
            });
        }
    };
    Ok(TensorData::from_bytes_vec(
        view.data().to_vec(),
        view.shape().to_vec(),
        dtype,
    ))
}

/// Loads a PEFT LoRA adapter directory onto `model`: every tensor in the file must belong to
/// an adapter this config places, with the shape it implies, and every adapter must be filled.
pub fn load_adapter<B: Backend>(model: LlamaForCausalLM<B>, dir: &Path) -> Result<(LlamaForCausalLM<B>, LoraConfig)> {
    let config_path = dir.join(CONFIG_FILE);
    let mut json = LoraConfig::read_json(&config_path)?;
    let stacked = crate::experts::take_target_parameters(&mut json, &config_path)?;
    let mut config = LoraConfig::from_json(&json, &config_path)?;
    let path = dir.join(WEIGHTS_FILE);
    let bytes = read_bytes(&path)?;
    let st = parse_weights(&bytes, &path)?;
    // A transformers-5 mixture of experts' stacked expert adapters, as per-expert ones.
    let (converted, mut used) = match stacked {
        Some(targets) => {
            let read = |key: &str| -> Result<(Vec<usize>, Vec<f32>)> {
                let view = st.tensor(key).map_err(|_| Error::Tensor {
                    path: path.clone(),
                    key: key.to_string(),
                    message: "missing from the adapter file".into(),
                })?;
                let data = float_data(&view, key, &path)?.convert_dtype(DType::F32);
                Ok((view.shape().to_vec(), data.to_vec().expect("f32 after conversion")))
            };
            crate::experts::per_expert(&model, &mut config, targets, &read, PREFIX, &path)?
        }
        None => Default::default(),
    };
    let mut model = model;
    if config.modules_to_save.contains(&SavedModule::Score) {
        // A reward adapter on a causal-LM base brings its head (read from the file below).
        model.add_score_head(0.02, 0);
    }
    let (mut model, _) = inject(model, &config, 0).map_err(|e| match e {
        Error::Invalid { key, message } => Error::Config {
            path: config_path.clone(),
            key,
            message,
        },
        other => other,
    })?;
    let tensor_err = |key: &str, message: String| Error::Tensor {
        path: path.clone(),
        key: key.to_string(),
        message,
    };
    let read = |key: &str, expected: &[usize]| -> Result<TensorData> {
        if let Some(data) = converted.get(key) {
            if data.shape != burn::tensor::Shape::from(expected.to_vec()) {
                return Err(tensor_err(
                    key,
                    format!("shape {:?} does not fit the model, which needs {expected:?}", data.shape),
                ));
            }
            return Ok(data.clone());
        }
        let view = st
            .tensor(key)
            .map_err(|_| tensor_err(key, "missing from the adapter file".into()))?;
        if view.shape() != expected {
            return Err(tensor_err(
                key,
                format!(
                    "shape {:?} does not fit the model, which needs {expected:?}",
                    view.shape()
                ),
            ));
        }
        float_data(&view, key, &path)
    };
    for (name, linear) in model.linears_mut() {
        let device = linear.weight.device();
        let [in_f, out_f] = linear.dims();
        if config.modules_to_save.iter().any(|m| m.path() == name) {
            let key = format!("{PREFIX}{name}.weight");
            let w = read(&key, &[out_f, in_f])?;
            linear.weight = trainable(upload::<B, 2>(transpose_2d(w), &device).cast(linear.weight.val().dtype()));
            used.insert(key);
        }
        let Some(lora) = linear.adapter.as_mut() else { continue };
        let r = lora.rank();
        let key = format!("{PREFIX}{name}.lora_A.weight");
        lora.lora_a = trainable(upload(transpose_2d(read(&key, &[r, in_f])?), &device));
        used.insert(key);
        let key = format!("{PREFIX}{name}.lora_B.weight");
        lora.lora_b = trainable(upload(transpose_2d(read(&key, &[out_f, r])?), &device));
        used.insert(key);
        if lora.lora_magnitude_vector.is_some() {
            let key = format!("{PREFIX}{name}.lora_magnitude_vector");
            lora.lora_magnitude_vector = Some(trainable(upload(read(&key, &[out_f])?, &device)));
            used.insert(key);
        }
    }
    if config.modules_to_save.contains(&SavedModule::EmbedTokens) {
        let key = format!("{PREFIX}model.embed_tokens.weight");
        let e = &model.model.embed_tokens;
        let [v, h] = e.dims();
        let dtype = e.val().dtype();
        let device = e.device();
        model.model.embed_tokens = trainable(upload::<B, 2>(read(&key, &[v, h])?, &device).cast(dtype));
        used.insert(key);
    }
    let mut extra: Vec<String> = st
        .names()
        .into_iter()
        .filter(|k| !used.contains(*k))
        .map(str::to_string)
        .collect();
    if !extra.is_empty() {
        extra.sort();
        return Err(tensor_err(
            &extra[0],
            format!(
                "{} tensor(s) in the file belong to no adapter this adapter_config.json places on the model{}",
                extra.len(),
                if extra.len() > 1 {
                    format!(" (also {})", extra[1..].join(", "))
                } else {
                    String::new()
                }
            ),
        ));
    }
    Ok((model, config))
}

/// Folds every adapter into its base weight (`W + scaling·A·B`, or DoRA's rescaled form) and
/// removes it: the model then computes what the adapted model computed, with no extra cost.
pub fn merge_adapters<B: Backend>(mut model: LlamaForCausalLM<B>) -> LlamaForCausalLM<B> {
    for (_, linear) in model.linears_mut() {
        let Some(lora) = linear.adapter.take() else { continue };
        let w = linear.weight();
        let dtype = w.dtype();
        let merged = lora.merged_weight(w.cast(lora.lora_a.val().dtype())).cast(dtype);
        // A quantized base comes out dense: the merged weight is a new matrix.
        linear.quantized = None;
        linear.weight = Param::from_tensor(merged.detach()).set_require_grad(false);
    }
    model
}

/// Keeps the frozen linear weights in bf16 (`precision: bf16` on CPU backends, whose tensors stay
/// f32): half their f32 memory, multiplied by temper-kernels' bf16 products. Weights that train
/// (full fine-tuning, `modules_to_save`) and the output head (which the trainer's chunked head
/// reads as a dense matrix) stay as they are.
pub fn keep_base_bf16<B: Backend>(model: LlamaForCausalLM<B>) -> (LlamaForCausalLM<B>, QuantReport) {
    compact_base(
        model,
        |name, linear| temper_models::llama::is_output_head(name) || linear.weight.is_require_grad(),
        temper_models::quant::QuantizedWeight::bf16,
    )
}

/// Moves each linear's dense weight to the compact form `compact` makes of it, but those that
/// `stays_dense` or that are compact already; reports the bytes before and after.
fn compact_base<B: Backend>(
    mut model: LlamaForCausalLM<B>,
    stays_dense: impl Fn(&str, &temper_models::llama::Linear<B>) -> bool,
    compact: impl Fn(Tensor<B, 2>) -> temper_models::quant::QuantizedWeight<B>,
) -> (LlamaForCausalLM<B>, QuantReport) {
    let mut report = QuantReport {
        quantized_layers: 0,
        dense_layers: vec![],
        bytes_before: 0,
        bytes_after: 0,
    };
    for (name, linear) in model.linears_mut() {
        if let Some(q) = &linear.quantized {
            report.bytes_before += q.bytes();
            report.bytes_after += q.bytes();
            continue;
        }
        let [in_f, out_f] = linear.dims();
        let dense_bytes = in_f * out_f * linear.weight.val().dtype().size();
        report.bytes_before += dense_bytes;
        if stays_dense(&name, linear) {
            report.bytes_after += dense_bytes;
            report.dense_layers.push(name);
            continue;
        }
        let q = compact(linear.weight.val());
        report.bytes_after += q.bytes();
        drop_dense_weight(linear, q);
        report.quantized_layers += 1;
    }
    (model, report)
}

/// Moves `linear`'s frozen weight to its compact form `q`; a 1x1 placeholder keeps the dense
/// field's type.
fn drop_dense_weight<B: Backend>(
    linear: &mut temper_models::llama::Linear<B>,
    q: temper_models::quant::QuantizedWeight<B>,
) {
    let device = linear.weight.device();
    let dtype = linear.weight.val().dtype();
    linear.quantized = Some(q);
    linear.weight = Param::from_tensor(Tensor::<B, 2>::zeros([1, 1], (&device, dtype))).set_require_grad(false);
}

/// What [`quantize_base`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantReport {
    pub quantized_layers: usize,
    /// Layers left dense: the output head, and any whose input size is not a multiple of 32.
    pub dense_layers: Vec<String>,
    /// Bytes of the linear weights before and after.
    pub bytes_before: usize,
    pub bytes_after: usize,
}

/// How a frozen base is kept block-quantized (`adapter.quantize_base`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BaseQuantization {
    /// 8-bit blocks (llama.cpp Q8_0).
    Q8_0,
    /// 4-bit blocks (llama.cpp Q4_0): QLoRA-style.
    Q4_0,
}

impl BaseQuantization {
    fn bits(self) -> usize {
        match self {
            BaseQuantization::Q8_0 => 8,
            BaseQuantization::Q4_0 => 4,
        }
    }
}

/// Keeps the frozen linear weights block-quantized (llama.cpp's Q8_0/Q4_0), to be dequantized
/// per matmul: QLoRA's memory saving with adapters trained in their own dtype. The output
/// head stays dense, as bitsandbytes leaves it.
pub fn quantize_base<B: Backend>(
    model: LlamaForCausalLM<B>,
    quantization: BaseQuantization,
) -> Result<(LlamaForCausalLM<B>, QuantReport)> {
    let bits = quantization.bits();
    let experts = crate::experts::ExpertTargets::of(&model);
    Ok(compact_base(
        model,
        // Routers stay dense too: they choose the experts (bitsandbytes leaves transformers 5's
        // routers, which are not `nn.Linear`, unquantized).
        |name, linear| {
            temper_models::llama::is_output_head(name)
                || experts.is_router(name)
                || !linear.dims()[0].is_multiple_of(temper_models::quant::BLOCK)
        },
        |weight| temper_models::quant::QuantizedWeight::quantize(weight, bits),
    ))
}
