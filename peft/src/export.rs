//! A PEFT LoRA adapter as a llama.cpp GGUF adapter (`llama-cli --lora FILE`), laid out as
//! llama.cpp's `convert_lora_to_gguf.py` writes it: `general.type = adapter`,
//! `adapter.type = lora`, `adapter.lora.alpha`, and per module `blk.N.attn_q.weight.lora_a`
//! (`[r, in]`) and `.lora_b` (`[out, r]`, rows permuted for q/k like the base weights).
//! Like that script it needs only the base model's configuration, not its weights.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::DType;
use temper_models::gguf::{GgufWriter, WriteValue, gguf_module_name, permute_rows};
use temper_models::llama::checkpoint_shapes;
use temper_models::{Family, ModelConfig};

use crate::adapter::{CONFIG_FILE, WEIGHTS_FILE, float_data, parse_weights, read_bytes};
use crate::config::LoraConfig;
use crate::error::{Error, Result};

/// A matrix read from the adapter file: shape and f32 values.
type Matrix = (Vec<usize>, Vec<f32>);

/// Writes the adapter in `adapter_dir` as a GGUF LoRA adapter for llama.cpp.
///
/// llama.cpp scales every pair by `alpha / rank`. rsLoRA and `rank_pattern`/`alpha_pattern`
/// scale differently (and llama.cpp's own converter ignores them); the difference is folded
/// into `lora_b`, so the exported adapter computes exactly what PEFT computes.
pub fn export_gguf(adapter_dir: &Path, base: &ModelConfig, out: &Path) -> Result<usize> {
    let config = LoraConfig::from_file(&adapter_dir.join(CONFIG_FILE))?;
    let path = adapter_dir.join(WEIGHTS_FILE);
    let err = |key: &str, message: String| Error::Tensor {
        path: path.clone(),
        key: key.to_string(),
        message,
    };
    if config.use_dora {
        return Err(Error::Unsupported(format!(
            "{}: DoRA adapters cannot be exported to GGUF, llama.cpp has no DoRA (use `temper merge`)",
            adapter_dir.display()
        )));
    }
    if config.init_lora_weights == crate::config::InitLoraWeights::Pissa {
        // A PiSSA adapter applies to the SVD residual of the base, not to the base llama.cpp
        // loads; the pair alone would compute the wrong model there.
        return Err(Error::Unsupported(format!(
            "{}: PiSSA adapters apply to the residual of the base, which llama.cpp does not have (use `temper merge`)",
            adapter_dir.display()
        )));
    }
    let bytes = read_bytes(&path)?;
    let st = parse_weights(&bytes, &path)?;
    let shapes: BTreeMap<String, Vec<usize>> = checkpoint_shapes(base).into_iter().collect();
    // module -> (A [r, in], B [out, r])
    let mut pairs: BTreeMap<String, (Option<Matrix>, Option<Matrix>)> = BTreeMap::new();
    for key in st.names() {
        let module_key = key.strip_prefix("base_model.model.").unwrap_or(key);
        let (module, is_a) = if let Some(m) = module_key.strip_suffix(".lora_A.weight") {
            (m, true)
        } else if let Some(m) = module_key.strip_suffix(".lora_B.weight") {
            (m, false)
        } else {
            return Err(err(
                key,
                "not a LoRA A/B matrix: llama.cpp adapters hold only LoRA pairs (modules_to_save and \
                 embeddings need `temper merge`)"
                    .into(),
            ));
        };
        let view = st.tensor(key).map_err(|e| err(key, e.to_string()))?;
        let data = float_data(&view, key, &path)?.convert_dtype(DType::F32);
        let entry = pairs.entry(module.to_string()).or_default();
        let value = Some((
            view.shape().to_vec(),
            data.to_vec::<f32>().expect("f32 after conversion"),
        ));
        if is_a { entry.0 = value } else { entry.1 = value }
    }
    let (arch, permute) = match base.family {
        // llama.cpp converts Mistral checkpoints with its llama architecture, q/k permuted.
        Family::Llama | Family::Mistral => ("llama", true),
        Family::Qwen2 => ("qwen2", false),
        Family::Qwen3 => ("qwen3", false),
        Family::Gemma3 => ("gemma3", false),
        Family::Phi3 => ("phi3", false),
        // Adapters on attention only: llama.cpp holds the experts as 3-D tensors, which an
        // expert's adapter has no name in (the export stops at the first such module).
        Family::Qwen3Moe => ("qwen3moe", false),
        Family::Mixtral => ("llama", true),
    };
    let mut w = GgufWriter::new();
    w.add("general.architecture", WriteValue::String(arch.into()));
    w.add("general.type", WriteValue::String("adapter".into()));
    w.add("adapter.type", WriteValue::String("lora".into()));
    w.add("adapter.lora.alpha", WriteValue::F32(config.lora_alpha as f32));
    w.add("general.file_type", WriteValue::U32(0)); // all f32
    for (module, (a, b)) in &pairs {
        let key_a = format!("base_model.model.{module}.lora_A.weight");
        let key_b = format!("base_model.model.{module}.lora_B.weight");
        let (a_shape, a) = a
            .clone()
            .ok_or_else(|| err(&key_a, "missing (its lora_B is present)".into()))?;
        let (b_shape, mut b) = b
            .clone()
            .ok_or_else(|| err(&key_b, "missing (its lora_A is present)".into()))?;
        if module.contains(".experts") {
            return Err(err(
                &key_a,
                format!(
                    "{module}: llama.cpp holds experts as stacked 3-D tensors, which its adapters cannot name; \
                     `temper merge` the adapter, then convert the merged model"
                ),
            ));
        }
        let base_shape = shapes
            .get(&format!("{module}.weight"))
            .ok_or_else(|| err(&key_a, format!("the base model has no linear layer {module}")))?;
        // The rank comes from the config, as `load_adapter` takes it: tensors of another rank
        // would be scaled by the wrong alpha / r in llama.cpp.
        let (out_f, in_f, r) = (base_shape[0], base_shape[1], config.rank_for(module));
        if a_shape != [r, in_f] || b_shape != [out_f, r] {
            return Err(err(
                &key_a,
                format!(
                    "shapes {a_shape:?} / {b_shape:?} do not fit {module} ([{out_f}, {in_f}]) of the base model \
                     with the rank {r} that adapter_config.json gives it ([{r}, {in_f}] / [{out_f}, {r}])"
                ),
            ));
        }
        let gguf = gguf_module_name(module).ok_or_else(|| err(&key_a, format!("{module} has no llama.cpp name")))?;
        let wanted = config.scaling_for(module) as f32;
        let applied = config.lora_alpha as f32 / r as f32;
        if (wanted - applied).abs() > 1e-6 * wanted.abs() {
            b.iter_mut().for_each(|v| *v *= wanted / applied);
        }
        if permute && module.ends_with("self_attn.q_proj") {
            b = permute_rows(&b, out_f, r, base.num_attention_heads);
        } else if permute && module.ends_with("self_attn.k_proj") {
            b = permute_rows(&b, out_f, r, base.num_key_value_heads);
        }
        w.add_tensor(&format!("{gguf}.weight.lora_a"), vec![r, in_f], a);
        w.add_tensor(&format!("{gguf}.weight.lora_b"), vec![out_f, r], b);
    }
    if pairs.is_empty() {
        return Err(Error::Format {
            path,
            message: "the adapter holds no LoRA matrices".into(),
        });
    }
    w.write(out).map_err(|e| Error::Format {
        path: out.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(pairs.len())
}
