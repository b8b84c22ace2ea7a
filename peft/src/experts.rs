//! Adapters that PEFT 0.21 saved for a transformers-5 mixture of experts, read as the
//! per-expert adapters Temper's model has.
//!
//! transformers 5 stacks each layer's experts into two parameters, `mlp.experts.gate_up_proj`
//! (`[experts, 2·inter, hidden]`, gate rows first) and `mlp.experts.down_proj`, and PEFT adapts
//! them through `target_parameters`: one `lora_A` of `[experts·R, in]` (expert `e`'s rows
//! `e·R..(e+1)·R`) and one `lora_B` of `[out, experts·R]` (expert `e`'s columns `k·experts + e`),
//! with its gate and up halves sharing expert `e`'s A. The router (`mlp.gate`) gets a plain
//! LoRA. When both expert parameters are adapted, gate_up's tensors sit under `base_layer`.
//! Temper's experts hold the same layers one expert at a time (`experts.E.gate_up_proj`, and the
//! checkpoint's `down_proj` / Mixtral's `w2`): each gets its slice, which computes and trains
//! exactly what PEFT does.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use burn::tensor::TensorData;
use burn::tensor::backend::Backend;
use serde_json::Value;
use temper_models::LlamaForCausalLM;
use temper_models::llama::{EXPERT_GATE_UP, SparseMoe};
use temper_models::lora::Lora;

use crate::config::{LoraConfig, TargetModules};
use crate::error::{Error, Result};

/// How PEFT 0.21 adapts a transformers-5 mixture of experts, whose experts' gate and up
/// projections are one stacked parameter: each expert's fused `gate_up_proj` layer is adapted
/// when both its gate and up names are targeted (or `gate_up_proj` itself), at twice the rank
/// and alpha unless a pattern names `gate_up_proj` (PEFT's conversion writes `.*\.gate_up_proj`
/// patterns); `all-linear` means attention, routers and experts, not the dense MLPs of
/// `mlp_only_layers` (which PEFT's resolution leaves out).
pub(crate) struct ExpertTargets {
    /// Fused gate-up layer -> its gate's and up's checkpoint names.
    fused: HashMap<String, [String; 2]>,
    /// Dense MLP layers of a mixture of experts (`all-linear` leaves them out).
    dense_mlps: HashSet<String>,
    /// Every expert layer (fused gate-up and down).
    experts: HashSet<String>,
    /// Every router (`mlp.gate`, Mixtral's `block_sparse_moe.gate`).
    routers: HashSet<String>,
}

impl ExpertTargets {
    pub(crate) fn of<B: Backend>(model: &LlamaForCausalLM<B>) -> Self {
        let fused = model.fused_expert_names();
        let moe = model.model.layers.iter().any(|l| l.moe.is_some());
        let mut dense_mlps = HashSet::new();
        let mut experts = HashSet::new();
        let mut routers = HashSet::new();
        for (name, _) in model.linears() {
            if name.contains(".experts.") {
                experts.insert(name);
            } else if moe && name.ends_with(".gate") {
                routers.insert(name);
            } else if moe && name.contains(".mlp.") && !name.ends_with(".mlp.gate") {
                dense_mlps.insert(name);
            }
        }
        Self {
            fused,
            dense_mlps,
            experts,
            routers,
        }
    }

    pub(crate) fn is_router(&self, name: &str) -> bool {
        self.routers.contains(name)
    }

    /// Whether `name` is saved in [`stacked`]'s form (an expert or a router).
    pub(crate) fn is_stacked(&self, name: &str) -> bool {
        self.experts.contains(name) || self.routers.contains(name)
    }

    /// `adapter_config.json` as PEFT 0.21 writes it for a transformers-5 mixture of experts:
    /// `target_modules` the other adapted layers' names, `target_parameters` the stacked ones,
    /// and the experts' gate-up rank and alpha as its `.*\.gate_up_proj` patterns.
    pub(crate) fn peft_config(&self, config: &LoraConfig, json: &mut Value, adapted: &[String], stacked: &[&str]) {
        if self.experts.is_empty() && self.routers.is_empty() {
            return;
        }
        let mut modules: Vec<&str> = adapted
            .iter()
            .filter(|n| !self.is_stacked(n))
            .map(|n| n.rsplit('.').next().unwrap_or(n))
            .collect();
        modules.sort();
        modules.dedup();
        json["target_modules"] = serde_json::json!(modules);
        json["target_parameters"] = serde_json::json!(stacked);
        if let Some(fused) = adapted.iter().find(|n| self.fused.contains_key(*n))
            && !config.has_pattern_for(fused)
        {
            let (r, alpha) = self.rank_and_alpha(config, fused);
            json["rank_pattern"][r".*\.gate_up_proj"] = serde_json::json!(r);
            json["alpha_pattern"][r".*\.gate_up_proj"] = serde_json::json!(alpha);
        }
    }

    pub(crate) fn targets(&self, config: &LoraConfig, name: &str) -> Result<bool> {
        let head = temper_models::llama::is_output_head(name);
        if self.dense_mlps.contains(name) && config.target_modules == TargetModules::AllLinear {
            return Ok(false);
        }
        let Some([gate, up]) = self.fused.get(name) else {
            return Ok(config.targets(name, head));
        };
        if config.targets(name, head) {
            return Ok(true);
        }
        match (config.targets(gate, false), config.targets(up, false)) {
            (true, true) => Ok(true),
            (false, false) => Ok(false),
            _ => Err(Error::Invalid {
                key: "target_modules".into(),
                message: format!(
                    "targets one of {gate} and {up}, not both: an expert's gate and up projections are one stacked \
                     parameter (transformers 5), adapted together or not at all (PEFT refuses this too)"
                ),
            }),
        }
    }

    /// The rank and alpha of `name`'s adapter.
    pub(crate) fn rank_and_alpha(&self, config: &LoraConfig, name: &str) -> (usize, f64) {
        let (r, alpha) = (config.rank_for(name), config.alpha_for(name));
        match self.fused.contains_key(name) && !config.has_pattern_for(name) {
            true => (2 * r, 2.0 * alpha),
            false => (r, alpha),
        }
    }

    /// The rank and scaling of `name`'s adapter.
    pub(crate) fn rank_and_scaling(&self, config: &LoraConfig, name: &str) -> (usize, f64) {
        let (r, alpha) = self.rank_and_alpha(config, name);
        let scaling = if config.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        (r, scaling)
    }
}

/// PEFT stacks a layer's expert adapters into one: every expert of a layer adapted, or none,
/// at one rank and scaling (the targets or patterns that would pick some experts, or give them
/// different ranks, have no stacked form).
pub(crate) fn check_whole_layers<B: Backend>(model: &LlamaForCausalLM<B>) -> Result<()> {
    for (i, layer) in model.model.layers.iter().enumerate() {
        let Some(moe) = &layer.moe else { continue };
        let kinds: [(&str, Vec<Option<(usize, f64)>>); 2] = [
            (
                EXPERT_GATE_UP,
                moe.experts.iter().map(|m| m.gate_up[0].adapter.as_ref().map(|a| (a.rank(), a.scaling))).collect(),
            ),
            (
                moe.names[3],
                moe.experts.iter().map(|m| m.down_proj.adapter.as_ref().map(|a| (a.rank(), a.scaling))).collect(),
            ),
        ];
        for (kind, adapters) in kinds {
            if adapters.iter().any(|a| a != &adapters[0]) {
                return Err(Error::Invalid {
                    key: "target_modules".into(),
                    message: format!(
                        "layer {i}'s experts' {kind} layers would get adapters of different ranks or scalings, or \
                         only some of them one: PEFT stacks a layer's experts into one parameter, adapted alike"
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Which stacked parameters an adapter's `target_parameters` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct StackedTargets {
    gate_up: bool,
    down: bool,
    router: bool,
}

/// Takes `target_parameters` out of `adapter_config.json` (PEFT's names, e.g.
/// `["down_proj", "gate_up_proj", "gate.weight"]`), or `None` without one.
pub(crate) fn take_target_parameters(json: &mut Value, path: &Path) -> Result<Option<StackedTargets>> {
    let err = |message: String| Error::Config {
        path: path.to_path_buf(),
        key: "target_parameters".into(),
        message,
    };
    let Some(v) = json.as_object_mut().and_then(|o| o.remove("target_parameters")) else {
        return Ok(None);
    };
    let names = match v {
        Value::Null => return Ok(None),
        Value::Array(items) if items.is_empty() => return Ok(None),
        Value::Array(items) => items,
        other => return Err(err(format!("expected a list of parameter names, got {other}"))),
    };
    let mut t = StackedTargets::default();
    for name in names {
        let name = name.as_str().ok_or_else(|| err(format!("expected a string, got {name}")))?;
        let leaf = name.rsplit('.').next().unwrap_or(name);
        match leaf {
            "gate_up_proj" => t.gate_up = true,
            "down_proj" => t.down = true,
            "weight" if name == "gate.weight" || name.ends_with(".gate.weight") => t.router = true,
            _ => {
                return Err(err(format!(
                    "{name:?} is not supported (Temper reads PEFT's mixture-of-experts parameters gate_up_proj, \
                     down_proj and gate.weight)"
                )));
            }
        }
    }
    Ok(Some(t))
}

/// Rewrites `config` (targets, per-layer rank and alpha patterns) and the tensors of a stacked
/// adapter into per-expert ones. `read` gives a file tensor's shape and f32 values by key (PEFT's
/// `prefix` included); `path` is the file, for errors. Returns the converted tensors by Temper's
/// key, and the file's keys they came from.
pub(crate) fn per_expert<B: Backend>(
    model: &LlamaForCausalLM<B>,
    config: &mut LoraConfig,
    targets: StackedTargets,
    read: &dyn Fn(&str) -> Result<(Vec<usize>, Vec<f32>)>,
    prefix: &str,
    path: &Path,
) -> Result<(HashMap<String, TensorData>, HashSet<String>)> {
    let tensor_err = |key: &str, message: String| Error::Tensor {
        path: path.to_path_buf(),
        key: key.to_string(),
        message,
    };
    if !matches!(config.target_modules, TargetModules::Names(_)) {
        return Err(Error::Config {
            path: path.to_path_buf(),
            key: "target_modules".into(),
            message: "PEFT writes a list beside target_parameters; got a pattern".into(),
        });
    }
    let mut names: Vec<String> = Vec::new();
    let names_of = ExpertTargets::of(model);
    let mut out = HashMap::new();
    let mut used = HashSet::new();
    let mut moe_layers = 0;
    let mut rank_patterns = Vec::new();
    let mut alpha_patterns = Vec::new();
    for (i, layer) in model.model.layers.iter().enumerate() {
        let Some(moe) = &layer.moe else { continue };
        moe_layers += 1;
        let [block, _, _, down] = moe.names;
        let experts = moe.experts.len();
        let [inter, hidden] = moe.experts[0].down_proj.dims();
        let ours = |module: &str| format!("{prefix}model.layers.{i}.{block}.{module}");
        // PEFT 0.21 names Mixtral's block `mlp`, as transformers 5 does.
        let stacked = format!("{prefix}model.layers.{i}.mlp.experts");
        let mut convert = |kind: &str, at: &str, rows: usize, cols: usize, outputs: &[(&str, usize)]| -> Result<()> {
            let (key_a, key_b) = (format!("{at}.lora_A.weight"), format!("{at}.lora_B.weight"));
            let (a_shape, a) = read(&key_a)?;
            let (b_shape, b) = read(&key_b)?;
            let total = a_shape.first().copied().unwrap_or(0);
            if a_shape.len() != 2 || a_shape[1] != cols || total == 0 || !total.is_multiple_of(experts) {
                return Err(tensor_err(
                    &key_a,
                    format!("shape {a_shape:?} is not [{experts} experts x rank, {cols}] ({kind})"),
                ));
            }
            if b_shape != [rows, total] {
                return Err(tensor_err(&key_b, format!("shape {b_shape:?}, expected [{rows}, {total}] ({kind})")));
            }
            let r = total / experts;
            for e in 0..experts {
                let a_e = a[e * r * cols..(e + 1) * r * cols].to_vec();
                let mut start = 0;
                for &(name, n) in outputs {
                    // Rows start..start + n of B, columns k·experts + e.
                    let b_e: Vec<f32> = (start..start + n)
                        .flat_map(|row| (0..r).map(move |k| (row, k)))
                        .map(|(row, k)| b[row * total + k * experts + e])
                        .collect();
                    let module = ours(&format!("experts.{e}.{name}"));
                    out.insert(format!("{module}.lora_A.weight"), TensorData::new(a_e.clone(), [r, cols]));
                    out.insert(format!("{module}.lora_B.weight"), TensorData::new(b_e, [n, r]));
                    start += n;
                }
            }
            // The file's rank and alpha for these layers, as PEFT reads them; a pattern of ours
            // only where Temper would read another for its per-expert names.
            let alpha = config.alpha_for(&format!("model.layers.{i}.mlp.experts.{kind}"));
            let name = outputs[0].0;
            let ours = format!("model.layers.{i}.{block}.experts.0.{name}");
            if names_of.rank_and_alpha(config, &ours) != (r, alpha) {
                let pattern = format!(r"layers\.{i}\.{block}\.experts\.\d+\.{name}");
                rank_patterns.push((pattern.clone(), r));
                alpha_patterns.push((pattern, alpha));
            }
            used.insert(key_a);
            used.insert(key_b);
            Ok(())
        };
        if targets.gate_up {
            let at = match targets.down {
                true => format!("{stacked}.base_layer"),
                false => stacked.clone(),
            };
            convert("gate_up_proj", &at, 2 * inter, hidden, &[(EXPERT_GATE_UP, 2 * inter)])?;
        }
        if targets.down {
            convert("down_proj", &stacked, hidden, inter, &[(down, hidden)])?;
        }
        if targets.router {
            for ab in ["lora_A", "lora_B"] {
                let key = format!("{prefix}model.layers.{i}.mlp.gate.{ab}.weight");
                let (shape, values) = read(&key)?;
                out.insert(format!("{}.{ab}.weight", ours("gate")), TensorData::new(values, shape));
                used.insert(key);
            }
        }
        for e in 0..experts {
            let listed = [(targets.gate_up, EXPERT_GATE_UP), (targets.down, down)];
            for (on, name) in listed {
                let target = format!("{block}.experts.{e}.{name}");
                if on && !names.contains(&target) {
                    names.push(target);
                }
            }
        }
        if targets.router && !names.iter().any(|n| n == "gate") {
            names.push("gate".into());
        }
    }
    if moe_layers == 0 {
        return Err(Error::Config {
            path: path.to_path_buf(),
            key: "target_parameters".into(),
            message: "adapts a mixture of experts' parameters, and this model has no experts".into(),
        });
    }
    if let TargetModules::Names(listed) = &mut config.target_modules {
        for name in names {
            if !listed.contains(&name) {
                listed.push(name);
            }
        }
    }
    // Ahead of the file's own patterns (the first match wins).
    config.rank_pattern.splice(0..0, rank_patterns);
    config.alpha_pattern.splice(0..0, alpha_patterns);
    Ok((out, used))
}

/// One MoE layer's adapters as PEFT stacks them: the router's, and every expert's gate-up and
/// down when every expert of the layer has one (PEFT has no stacked form for some experts;
/// `check_whole_layers` keeps `inject` from placing such adapters).
type LayerStacks<'a, B> = (Option<&'a Lora<B>>, Option<Vec<&'a Lora<B>>>, Option<Vec<&'a Lora<B>>>);

fn layer_stacks<B: Backend>(moe: &SparseMoe<B>) -> LayerStacks<'_, B> {
    let experts = moe.experts.len();
    fn all<'a, B: Backend>(loras: Vec<&'a Lora<B>>, experts: usize) -> Option<Vec<&'a Lora<B>>> {
        (loras.len() == experts).then_some(loras)
    }
    (
        moe.gate.adapter.as_ref(),
        all(moe.experts.iter().filter_map(|m| m.gate_up[0].adapter.as_ref()).collect(), experts),
        all(moe.experts.iter().filter_map(|m| m.down_proj.adapter.as_ref()).collect(), experts),
    )
}

/// The `target_parameters` of `model`'s stacked adapters ([`stacked`]'s tensors).
pub(crate) fn stacked_targets<B: Backend>(model: &LlamaForCausalLM<B>) -> Vec<&'static str> {
    let (mut gate_up, mut down, mut router) = (false, false, false);
    for moe in model.model.layers.iter().filter_map(|l| l.moe.as_ref()) {
        let (r, g, d) = layer_stacks(moe);
        router |= r.is_some();
        gate_up |= g.is_some();
        down |= d.is_some();
    }
    [(gate_up, "gate_up_proj"), (down, "down_proj"), (router, "gate.weight")]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect()
}

/// The experts' and routers' adapters of `model` in PEFT 0.21's stacked form (what
/// [`per_expert`] reads): tensors by key (under `prefix`) as `[shape]` and f32 values. The
/// router's key is `mlp.gate` (transformers 5's name, also Mixtral's).
pub(crate) fn stacked<B: Backend>(model: &LlamaForCausalLM<B>, prefix: &str) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let host = |t: burn::tensor::Tensor<B, 2>| -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec().expect("f32 adapter")
    };
    let mut out = Vec::new();
    for (i, layer) in model.model.layers.iter().enumerate() {
        let Some(moe) = &layer.moe else { continue };
        let stacked = format!("{prefix}model.layers.{i}.mlp.experts");
        let (router, gate_up, down) = layer_stacks(moe);
        if let Some(lora) = router {
            let at = format!("{prefix}model.layers.{i}.mlp.gate");
            let [h, r] = lora.lora_a.dims();
            let [_, e] = lora.lora_b.dims();
            out.push((format!("{at}.lora_A.weight"), vec![r, h], host(lora.lora_a.val().transpose())));
            out.push((format!("{at}.lora_B.weight"), vec![e, r], host(lora.lora_b.val().transpose())));
        }
        let experts = moe.experts.len();
        let mut join = |at: String, loras: &[&Lora<B>]| {
            // A: expert e's rows e·R..(e+1)·R; B: expert e's columns k·experts + e.
            let [cols, r] = loras[0].lora_a.dims();
            let [_, rows] = loras[0].lora_b.dims();
            let mut a = Vec::with_capacity(experts * r * cols);
            let mut b = vec![0f32; rows * experts * r];
            for (e, lora) in loras.iter().enumerate() {
                a.extend(host(lora.lora_a.val().transpose()));
                let b_e = host(lora.lora_b.val().transpose()); // [rows, r]
                for row in 0..rows {
                    for k in 0..r {
                        b[row * experts * r + k * experts + e] = b_e[row * r + k];
                    }
                }
            }
            out.push((format!("{at}.lora_A.weight"), vec![experts * r, cols], a));
            out.push((format!("{at}.lora_B.weight"), vec![rows, experts * r], b));
        };
        if let Some(loras) = gate_up {
            let at = match down.is_some() {
                true => format!("{stacked}.base_layer"),
                false => stacked.clone(),
            };
            join(at, &loras);
        }
        if let Some(loras) = down {
            join(stacked, &loras);
        }
    }
    out
}
