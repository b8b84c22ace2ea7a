//! LoRA interop with Hugging Face PEFT, on adapters written by PEFT
//! (`tests/fixtures/make_peft_fixtures.py`) for the tiny models of `tests/models.rs`.

mod common;

use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use common::{Expected, fixtures, load_hf_dir, rel_err, smollm2_path};
use safetensors::SafeTensors;
use temper::backend::CpuBackend;
use temper_models::{ForwardOptions, LlamaForCausalLM};
use temper_peft::{BaseQuantization, LoraConfig, TargetModules, inject, load_adapter, save_adapter};

type B = CpuBackend;
type AD = Autodiff<CpuBackend>;

/// adapter fixture -> base model fixture
const CASES: [(&str, &str); 11] = [
    ("pissa", "llama_gqa_llama3"),
    ("lora_list", "llama_gqa_llama3"),
    ("rslora_all_linear", "qwen2_bias_tied"),
    ("dora", "llama_gqa_llama3"),
    ("rank_pattern_regex", "mistral_window"),
    ("modules_to_save", "llama_gqa_llama3"),
    ("qwen3_all_linear", "qwen3_qk_norm"),
    ("gemma3_dora", "gemma3_text"),
    ("phi3_all_linear", "phi3_longrope"),
    ("qwen3_moe_all_linear", "qwen3_moe"),
    ("mixtral_experts", "mixtral"),
];

fn adapter_dir(name: &str) -> PathBuf {
    fixtures().join("adapters").join(name)
}

fn load<Bk: Backend>(adapter: &str, base: &str) -> LlamaForCausalLM<Bk> {
    let model = load_hf_dir::<Bk>(&fixtures().join("models").join(base)).unwrap();
    load_adapter(model, &adapter_dir(adapter))
        .unwrap_or_else(|e| panic!("{adapter}: {e}"))
        .0
}

fn batch<Bk: Backend>(expected: &Expected) -> (Tensor<Bk, 2, Int>, Tensor<Bk, 2, Int>, Vec<i64>) {
    let device = Default::default();
    let ids = Tensor::from_data(expected.get("input_ids").1, &device);
    let mask_data = expected.get("attention_mask").1;
    let mask_vec: Vec<i64> = mask_data.to_vec().unwrap();
    (ids, Tensor::from_data(mask_data, &device), mask_vec)
}

fn logits<Bk: Backend>(
    model: &LlamaForCausalLM<Bk>,
    ids: Tensor<Bk, 2, Int>,
    mask: Tensor<Bk, 2, Int>,
) -> Tensor<Bk, 3> {
    // PEFT's reference passes attention_mask only; transformers then counts positions 0..seq.
    let options = ForwardOptions {
        attention_mask: Some(mask),
        position_ids: None,
        segment_ids: None,
    };
    model.forward(ids, options, None)
}

#[test]
fn logits_match_peft() {
    for (adapter, base) in CASES {
        let model = load::<B>(adapter, base);
        let expected = Expected::open(&adapter_dir(adapter).join("expected.safetensors"));
        let (ids, mask, mask_vec) = batch::<B>(&expected);
        let got: Vec<f32> = logits(&model, ids, mask).into_data().to_vec().unwrap();
        let want = expected.f32("logits");
        let vocab = want.len() / mask_vec.len();
        let err = rel_err(&got, &want, |i| mask_vec[i / vocab] == 1);
        assert!(err < 1e-4, "{adapter}: logits differ from PEFT's: rel err {err:e}");
    }
}

#[test]
fn adapter_off_is_the_base_model() {
    let (adapter, base) = ("lora_list", "llama_gqa_llama3");
    let mut model = load::<B>(adapter, base);
    let plain = load_hf_dir::<B>(&fixtures().join("models").join(base)).unwrap();
    let expected = Expected::open(&adapter_dir(adapter).join("expected.safetensors"));
    let (ids, mask, _) = batch::<B>(&expected);
    let with: Vec<f32> = logits(&model, ids.clone(), mask.clone()).into_data().to_vec().unwrap();
    model.set_adapters_enabled(false);
    let off: Vec<f32> = logits(&model, ids.clone(), mask.clone()).into_data().to_vec().unwrap();
    let base_logits: Vec<f32> = logits(&plain, ids, mask).into_data().to_vec().unwrap();
    assert!(
        off == base_logits,
        "adapters off must give the base model's logits exactly"
    );
    assert!(
        rel_err(&with, &off, |_| true) > 1e-3,
        "the adapter should change the logits"
    );
}

/// Temper writes what PEFT writes: same keys, shapes, dtypes and values, `{"format": "pt"}`.
#[test]
fn saved_adapters_have_peft_keys_shapes_and_dtypes() {
    let out_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/peft-roundtrip");
    for (adapter, base) in CASES {
        let base_model = load_hf_dir::<B>(&fixtures().join("models").join(base)).unwrap();
        let (model, config) = load_adapter(base_model, &adapter_dir(adapter)).unwrap();
        let out = out_root.join(adapter);
        save_adapter(&model, &config, &out).unwrap();
        let ours = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
        let theirs = std::fs::read(adapter_dir(adapter).join("adapter_model.safetensors")).unwrap();
        let (ours_st, theirs_st) = (
            SafeTensors::deserialize(&ours).unwrap(),
            SafeTensors::deserialize(&theirs).unwrap(),
        );
        let mut ours_names = ours_st.names();
        let mut theirs_names = theirs_st.names();
        ours_names.sort();
        theirs_names.sort();
        assert_eq!(ours_names, theirs_names, "{adapter}: keys");
        for name in theirs_names {
            let (a, b) = (ours_st.tensor(name).unwrap(), theirs_st.tensor(name).unwrap());
            assert_eq!((a.shape(), a.dtype()), (b.shape(), b.dtype()), "{adapter}: {name}");
            assert_eq!(a.data(), b.data(), "{adapter}: {name} values");
        }
        let (_, meta) = SafeTensors::read_metadata(&ours).unwrap();
        assert_eq!(
            meta.metadata()
                .as_ref()
                .and_then(|m| m.get("format"))
                .map(String::as_str),
            Some("pt")
        );
        // And the config reads back to the same settings; a mixture of experts' stacked
        // parameters are named as PEFT names them.
        let base_model = load_hf_dir::<B>(&fixtures().join("models").join(base)).unwrap();
        assert_eq!(load_adapter(base_model, &out).unwrap().1.r, config.r);
        let json = |dir: &Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap()
        };
        let (ours, theirs) = (json(&out), json(&adapter_dir(adapter)));
        let set = |v: &serde_json::Value, key: &str| -> Vec<String> {
            let mut items: Vec<String> =
                v[key].as_array().into_iter().flatten().map(|s| s.as_str().unwrap().to_string()).collect();
            items.sort();
            items
        };
        for key in ["target_parameters", "rank_pattern", "alpha_pattern"] {
            match key {
                "target_parameters" => assert_eq!(set(&ours, key), set(&theirs, key), "{adapter}: {key}"),
                _ => {
                    let numbers = |v: &serde_json::Value| -> Vec<(String, f64)> {
                        let mut items: Vec<(String, f64)> = v[key]
                            .as_object()
                            .into_iter()
                            .flatten()
                            .map(|(k, n)| (k.clone(), n.as_f64().unwrap()))
                            .collect();
                        items.sort_by(|a, b| a.0.cmp(&b.0));
                        items
                    };
                    assert_eq!(numbers(&ours), numbers(&theirs), "{adapter}: {key}");
                }
            }
        }
    }
}

/// One backward pass: only adapter (and modules_to_save) parameters get gradients, and they
/// equal PyTorch + PEFT's for the same weights and batch.
#[test]
fn gradients_match_peft() {
    for (adapter, base) in CASES {
        let model = load::<AD>(adapter, base);
        let expected = Expected::open(&adapter_dir(adapter).join("expected.safetensors"));
        let (ids, mask, _) = batch::<AD>(&expected);
        let logits = logits(&model, ids.clone(), mask.clone());
        let [b, s, v] = logits.dims();
        // transformers' causal LM loss: shift by one, ignore padding labels, mean over the rest.
        let lp = log_softmax(logits.slice([0..b, 0..s - 1, 0..v]), 2);
        let targets = ids.slice([0..b, 1..s]);
        let keep = mask.slice([0..b, 1..s]).float();
        let picked = lp.gather(2, targets.unsqueeze_dim::<3>(2)).squeeze_dim::<2>(2);
        let loss = (picked * keep.clone()).sum().neg() / keep.sum();
        let want_loss = expected.f32("loss")[0];
        let got_loss: f32 = loss.clone().into_scalar();
        assert!(
            (got_loss - want_loss).abs() / want_loss.abs() < 1e-5,
            "{adapter}: loss {got_loss} vs {want_loss}"
        );
        let grads = loss.backward();

        let mut model = model;
        let mut checked = 0;
        let grad_of = |key: &str| expected.f32(&format!("grad.base_model.model.{key}"));
        let check = |key: String, got: Option<Tensor<CpuBackend, 2>>, transpose: bool| {
            let got = got.unwrap_or_else(|| panic!("{adapter}: no gradient for {key}"));
            let got = if transpose { got.transpose() } else { got };
            let got: Vec<f32> = got.into_data().to_vec().unwrap();
            let err = rel_err(&got, &grad_of(&key), |_| true);
            assert!(err < 1e-4, "{adapter}: gradient of {key}: rel err {err:e}");
        };
        // PEFT's stacked expert adapters (transformers 5): expert e's rows of A and columns
        // k·experts + e of B.
        let mut stacked: std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)> = Default::default();
        for (name, linear) in model.linears_mut() {
            assert!(
                linear.weight.grad(&grads).is_none() || (name == "lm_head" && adapter == "modules_to_save"),
                "{adapter}: {name} base weight got a gradient"
            );
            if let (Some(lora), Some((layer, rest))) = (&linear.adapter, name.split_once(".experts.")) {
                let (e, proj) = rest.split_once('.').unwrap();
                let e: usize = e.parse().unwrap();
                let layer = layer.replace("block_sparse_moe", "mlp");
                let gate_up = proj == "gate_up_proj";
                // Both fixtures have 4 experts; `out_f` is the layer's output width.
                let (experts, out_f) = (4, linear.dims()[1]);
                let at = match gate_up {
                    true => format!("{layer}.experts.base_layer"),
                    false => format!("{layer}.experts"),
                };
                let a: Vec<f32> = lora.lora_a.grad(&grads).unwrap().transpose().into_data().to_vec().unwrap();
                let b: Vec<f32> = lora.lora_b.grad(&grads).unwrap().transpose().into_data().to_vec().unwrap();
                let r = lora.rank();
                let in_f = a.len() / r;
                let entry = stacked
                    .entry(format!("{at}.lora_A.weight"))
                    .or_insert_with(|| (vec![experts * r, in_f], vec![0.0; experts * r * in_f]));
                for (i, v) in a.iter().enumerate() {
                    entry.1[e * r * in_f + i] += v;
                }
                let (rows, offset) = (out_f, 0);
                let entry = stacked
                    .entry(format!("{at}.lora_B.weight"))
                    .or_insert_with(|| (vec![rows, experts * r], vec![0.0; rows * experts * r]));
                for row in 0..out_f {
                    for k in 0..r {
                        entry.1[(offset + row) * experts * r + k * experts + e] = b[row * r + k];
                    }
                }
                continue;
            }
            if name == "lm_head" && adapter == "modules_to_save" {
                check(format!("{name}.weight"), linear.weight.grad(&grads), true);
                checked += 1;
            }
            let Some(lora) = &linear.adapter else { continue };
            // PEFT 0.21 names Mixtral's router as transformers 5 does.
            let name = name.replace("block_sparse_moe.gate", "mlp.gate");
            check(format!("{name}.lora_A.weight"), lora.lora_a.grad(&grads), true);
            check(format!("{name}.lora_B.weight"), lora.lora_b.grad(&grads), true);
            checked += 2;
            if let Some(m) = &lora.lora_magnitude_vector {
                let got = m.grad(&grads).expect("magnitude gradient").unsqueeze::<2>();
                check(format!("{name}.lora_magnitude_vector"), Some(got), false);
                checked += 1;
            }
        }
        assert!(
            model.model.embed_tokens.grad(&grads).is_none(),
            "{adapter}: embeddings got a gradient"
        );
        for (key, (_, got)) in &stacked {
            let err = rel_err(got, &grad_of(key), |_| true);
            assert!(err < 1e-4, "{adapter}: gradient of {key}: rel err {err:e}");
            checked += 1;
        }
        let expected_count = expected.names().iter().filter(|n| n.starts_with("grad.")).count();
        assert_eq!(checked, expected_count, "{adapter}: every PEFT gradient was compared");
    }
}

// ---------------------------------------------------------------------------------------------
// Adapters that do not fit: clear errors, never a silently ignored adapter.

fn write_adapter(dir: &Path, config: serde_json::Value, tensors: Vec<(&str, Vec<usize>)>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(k, shape)| {
            let n: usize = shape.iter().product();
            (k.to_string(), shape, vec![0u8; n * 4])
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(k, s, b)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("adapter_model.safetensors")).unwrap();
}

#[test]
fn bad_adapters_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let base = || load_hf_dir::<B>(&fixtures().join("models/llama_gqa_llama3")).unwrap();
    let q = "base_model.model.model.layers.0.self_attn.q_proj";
    let cfg = |extra: serde_json::Value| {
        let mut c = serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
            "layers_to_transform": [0]});
        c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        c
    };
    let ok_tensors = || {
        vec![
            (format!("{q}.lora_A.weight"), vec![2, 64]),
            (format!("{q}.lora_B.weight"), vec![64, 2]),
        ]
    };
    let run = |name: &str, config: serde_json::Value, tensors: Vec<(String, Vec<usize>)>| -> String {
        let dir = tmp.path().join(name);
        write_adapter(
            &dir,
            config,
            tensors.iter().map(|(k, s)| (k.as_str(), s.clone())).collect(),
        );
        load_adapter(base(), &dir)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };

    assert_eq!(
        run("fine", cfg(serde_json::json!({})), ok_tensors()),
        "",
        "a fitting adapter loads"
    );
    let err = run(
        "nothing",
        cfg(serde_json::json!({"target_modules": ["query_key_value"]})),
        ok_tensors(),
    );
    assert!(
        err.contains("query_key_value")
            && err.contains("match no linear layer")
            && err.contains("model.layers.0.self_attn.q_proj"),
        "{err}"
    );
    let mut wrong = ok_tensors();
    wrong[0].1 = vec![2, 32];
    let err = run("shape", cfg(serde_json::json!({})), wrong);
    assert!(
        err.contains(&format!("{q}.lora_A.weight")) && err.contains("[2, 32]") && err.contains("[2, 64]"),
        "{err}"
    );
    let err = run("missing", cfg(serde_json::json!({})), ok_tensors()[..1].to_vec());
    assert!(
        err.contains(&format!("{q}.lora_B.weight")) && err.contains("missing"),
        "{err}"
    );
    let mut extra = ok_tensors();
    extra.push((
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight".into(),
        vec![2, 64],
    ));
    let err = run("extra", cfg(serde_json::json!({})), extra);
    assert!(
        err.contains("layers.1.self_attn.q_proj.lora_A.weight") && err.contains("belong to no adapter"),
        "{err}"
    );
    let err = run("type", cfg(serde_json::json!({"peft_type": "LOHA"})), ok_tensors());
    assert!(err.contains("adapter_config.json") && err.contains("LOHA"), "{err}");
    // PEFT's stacked expert parameters: on a model without experts, an unknown parameter, and
    // a stacked tensor that is not experts x rank rows.
    let err = run("no-experts", cfg(serde_json::json!({"target_parameters": ["gate_up_proj"]})), ok_tensors());
    assert!(err.contains("target_parameters") && err.contains("this model has no experts"), "{err}");
    let err = run("param", cfg(serde_json::json!({"target_parameters": ["experts.w9"]})), ok_tensors());
    assert!(err.contains("\"experts.w9\" is not supported"), "{err}");
    let dir = tmp.path().join("stacked-shape");
    let stacked = "base_model.model.model.layers.0.mlp.experts";
    write_adapter(
        &dir,
        serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
            "target_parameters": ["down_proj"], "layers_to_transform": [0]}),
        vec![
            (format!("{q}.lora_A.weight").as_str(), vec![2, 64]),
            (format!("{q}.lora_B.weight").as_str(), vec![64, 2]),
            (format!("{stacked}.lora_A.weight").as_str(), vec![7, 48]),
            (format!("{stacked}.lora_B.weight").as_str(), vec![64, 7]),
        ],
    );
    let mixtral = load_hf_dir::<B>(&fixtures().join("models/mixtral")).unwrap();
    let err = load_adapter(mixtral, &dir).err().expect("refused").to_string();
    assert!(err.contains("experts.lora_A.weight") && err.contains("[4 experts x rank, 48]"), "{err}");
}

/// PiSSA moves the top singular directions of W into the adapter: the model is unchanged at
/// init, and with the adapter off it is the residual, not the base.
#[test]
fn pissa_starts_at_the_base() {
    let base = load_hf_dir::<B>(&fixtures().join("models/llama_gqa_llama3")).unwrap();
    let config = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: TargetModules::AllLinear,
        init_lora_weights: temper_peft::InitLoraWeights::Pissa,
        ..LoraConfig::default()
    };
    let (mut model, _) = inject(base.clone(), &config, 0).unwrap();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64, 5, 9, 3, 7], [1, 5]), &Default::default());
    let run = |m: &LlamaForCausalLM<B>| -> Vec<f32> {
        m.forward(ids.clone(), ForwardOptions::default(), None)
            .into_data()
            .to_vec()
            .unwrap()
    };
    let want = run(&base);
    let err = rel_err(&run(&model), &want, |_| true);
    assert!(err < 1e-5, "PiSSA must start at the base model: {err:e}");
    model.set_adapters_enabled(false);
    assert!(
        rel_err(&run(&model), &want, |_| true) > 1e-3,
        "the residual alone differs from the base"
    );
}

/// `all-linear` on a mixture of experts means what it means to PEFT 0.21: attention, routers and
/// each expert's stacked gate-up (twice the rank) and down, not the dense MLP of
/// `mlp_only_layers`; an expert's gate without its up is refused, as PEFT refuses it.
#[test]
fn all_linear_on_experts_is_peft_s() {
    let base = || load_hf_dir::<B>(&fixtures().join("models/qwen3_moe")).unwrap();
    let config = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: TargetModules::AllLinear,
        ..LoraConfig::default()
    };
    let (model, injected) = inject(base(), &config, 0).unwrap();
    let rank = |name: &str| {
        let linears = model.linears();
        let (_, l) = linears.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{name}"));
        l.adapter.as_ref().map(|a| (a.rank(), a.scaling))
    };
    assert_eq!(rank("model.layers.0.mlp.experts.3.gate_up_proj"), Some((8, 2.0)));
    assert_eq!(rank("model.layers.0.mlp.experts.3.down_proj"), Some((4, 2.0)));
    assert_eq!(rank("model.layers.2.mlp.gate"), Some((4, 2.0)));
    assert_eq!(rank("model.layers.1.mlp.gate_proj"), None, "the dense layer");
    assert!(injected.targets.iter().all(|n| !n.starts_with("model.layers.1.mlp.")));
    let gate_only = LoraConfig {
        target_modules: TargetModules::Names(vec!["gate_proj".into()]),
        ..config
    };
    let err = inject(base(), &gate_only, 0).err().expect("refused").to_string();
    assert!(err.contains("targets one of") && err.contains("experts.0.gate_proj"), "{err}");
    // What PEFT 0.21 could not load: dropout or DoRA on experts and routers.
    let dropout = LoraConfig {
        target_modules: TargetModules::Names(vec!["gate".into()]),
        lora_dropout: 0.05,
        ..gate_only
    };
    let err = inject(base(), &dropout, 0).err().expect("refused").to_string();
    assert!(err.contains("lora_dropout") && err.contains("mlp.gate"), "{err}");
}

#[test]
fn new_adapters_start_at_the_base_and_train_only_adapters() {
    let base = load_hf_dir::<B>(&fixtures().join("models/qwen2_bias_tied")).unwrap();
    let config = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: TargetModules::AllLinear,
        use_dora: true,
        ..LoraConfig::default()
    };
    let (model, injected) = inject(base.clone(), &config, 7).unwrap();
    assert_eq!(injected.targets.len(), 2 * 7, "all linear layers but the (tied) head");
    // r * (in + out) per module plus DoRA's magnitude (out).
    let per_layer = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 112), (64, 112), (112, 64)]
        .iter()
        .map(|(i, o)| 4 * (i + o) + o)
        .sum::<usize>();
    assert_eq!(injected.trainable_parameters, 2 * per_layer);
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64, 5, 9, 3], [1, 4]), &Default::default());
    let a: Vec<f32> = model
        .forward(ids.clone(), ForwardOptions::default(), None)
        .into_data()
        .to_vec()
        .unwrap();
    let b: Vec<f32> = base
        .forward(ids, ForwardOptions::default(), None)
        .into_data()
        .to_vec()
        .unwrap();
    assert!(
        rel_err(&a, &b, |_| true) < 1e-6,
        "B = 0 and m = ||W||: the adapted model starts at the base"
    );
    let _ = DType::F32;
}

/// Merging folds each adapter into its base weight: same logits, no adapter left; the
/// saved directory (sharded here) loads back to the same model.
#[test]
fn merged_models_compute_what_the_adapter_computed() {
    use temper_models::config::CheckpointDtype;
    use temper_models::save::save_pretrained;
    // Left under target/ for `make_peft_fixtures.py --check` (transformers loads them).
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/peft-roundtrip");
    for (adapter, base) in CASES {
        let model = load::<B>(adapter, base);
        let expected = Expected::open(&adapter_dir(adapter).join("expected.safetensors"));
        let (ids, mask, mask_vec) = batch::<B>(&expected);
        let before: Vec<f32> = logits(&model, ids.clone(), mask.clone()).into_data().to_vec().unwrap();
        let mut merged = temper_peft::merge_adapters(model);
        assert!(merged.linears_mut().iter().all(|(_, l)| l.adapter.is_none()));
        let after: Vec<f32> = logits(&merged, ids.clone(), mask.clone()).into_data().to_vec().unwrap();
        let vocab = before.len() / mask_vec.len();
        let err = rel_err(&after, &before, |i| mask_vec[i / vocab] == 1);
        // f32 rounding of a different order of operations: 1.2e-5 for rslora_all_linear where
        // OpenBLAS runs its Haswell kernels (OPENBLAS_CORETYPE=Haswell), under 1e-5 with AVX-512.
        assert!(err < 3e-5, "{adapter}: merged logits differ: {err:e}");

        let config =
            temper_models::ModelConfig::from_file(fixtures().join("models").join(base).join("config.json")).unwrap();
        let out = root.join(format!("{adapter}-merged"));
        let _ = std::fs::remove_dir_all(&out);
        save_pretrained(&merged, &config, &out, CheckpointDtype::F32, 100_000).unwrap();
        assert!(
            out.join("model.safetensors.index.json").exists(),
            "{adapter}: small shards"
        );
        let reloaded = load_hf_dir::<B>(&out).unwrap();
        let again: Vec<f32> = logits(&reloaded, ids, mask).into_data().to_vec().unwrap();
        assert_eq!(again, after, "{adapter}: saved and reloaded");
    }
}

/// `temper merge` on the real SmolLM2 GGUF with a random adapter: the merged Hugging Face
/// directory (weights, config, tokenizer) loads back and computes the adapted model.
#[test]
fn temper_merge_writes_a_loadable_hf_directory() {
    let gguf = smollm2_path();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/peft-roundtrip");
    let device = Default::default();
    let loaded = temper_models::load_pretrained::<B>(&gguf, &device, DType::F32).unwrap();
    let config = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: TargetModules::Names(vec!["q_proj".into(), "down_proj".into()]),
        init_lora_weights: temper_peft::InitLoraWeights::Random,
        ..LoraConfig::default()
    };
    let (adapted, _) = inject(loaded.model, &config, 3).unwrap();
    let adapter = root.join("smollm2-adapter");
    save_adapter(&adapted, &config, &adapter).unwrap();
    let out = root.join("smollm2-merged");
    let _ = std::fs::remove_dir_all(&out);
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_temper"))
        .args(["merge", "--dtype", "f32", "--model"])
        .arg(&gguf)
        .arg("--adapter")
        .arg(&adapter)
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let merged = temper_models::load_pretrained::<B>(&out, &device, DType::F32).unwrap();
    let text = "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n";
    let ids = merged.tokenizer.encode(text, false).unwrap();
    assert_eq!(
        ids,
        loaded.tokenizer.encode(text, false).unwrap(),
        "the written tokenizer.json"
    );
    assert_eq!(merged.tokenizer.chat_template, loaded.tokenizer.chat_template);
    let input: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    let n = input.len();
    let t = || Tensor::<B, 2, Int>::from_data(TensorData::new(input.clone(), [1, n]), &device);
    let want: Vec<f32> = adapted
        .forward(t(), ForwardOptions::default(), None)
        .into_data()
        .to_vec()
        .unwrap();
    let got: Vec<f32> = merged
        .model
        .forward(t(), ForwardOptions::default(), None)
        .into_data()
        .to_vec()
        .unwrap();
    let err = rel_err(&got, &want, |_| true);
    assert!(err < 1e-4, "merged SmolLM2 differs from the adapted one: {err:e}");

    // The default dtype, bf16 (this used to panic in the ndarray backend, leaving a folder with
    // only config.json): every weight is the f32 merge's, rounded to bf16 once.
    let out_bf16 = root.join("smollm2-merged-bf16");
    let _ = std::fs::remove_dir_all(&out_bf16);
    let merged = std::process::Command::new(env!("CARGO_BIN_EXE_temper"))
        .args(["merge", "--model"])
        .arg(&gguf)
        .arg("--adapter")
        .arg(&adapter)
        .arg("--out")
        .arg(&out_bf16)
        .output()
        .unwrap();
    assert!(merged.status.success(), "{}", String::from_utf8_lossy(&merged.stderr));
    let (f32_bytes, bf16_bytes) = (
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(out_bf16.join("model.safetensors")).unwrap(),
    );
    let (f32_st, bf16_st) = (
        safetensors::SafeTensors::deserialize(&f32_bytes).unwrap(),
        safetensors::SafeTensors::deserialize(&bf16_bytes).unwrap(),
    );
    assert_eq!(f32_st.len(), bf16_st.len());
    for (name, full) in f32_st.tensors() {
        let half = bf16_st.tensor(&name).unwrap();
        assert_eq!(
            (half.dtype(), half.shape()),
            (safetensors::Dtype::BF16, full.shape()),
            "{name}"
        );
        let rounded: Vec<u8> = full
            .data()
            .chunks_exact(4)
            .flat_map(|b| half::bf16::from_f32(f32::from_le_bytes(b.try_into().unwrap())).to_le_bytes())
            .collect();
        assert!(rounded == half.data(), "{name}: not the f32 merge rounded to bf16");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_bf16.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
}

/// The GGUF export computes, the way llama.cpp reads it (scale alpha / rank, q/k rows in
/// llama.cpp's order), the same update `scaling · B·A` that PEFT applies.
#[test]
fn gguf_export_matches_peft_updates() {
    use temper_models::gguf::Gguf;
    let tmp = tempfile::tempdir().unwrap();
    for (adapter, base) in [
        ("lora_list", "llama_gqa_llama3"),
        ("rank_pattern_regex", "mistral_window"),
        ("rslora_all_linear", "qwen2_bias_tied"),
        ("phi3_all_linear", "phi3_longrope"),
    ] {
        let base_config =
            temper_models::ModelConfig::from_file(fixtures().join("models").join(base).join("config.json")).unwrap();
        let out = tmp.path().join(format!("{adapter}.gguf"));
        let pairs = temper_peft::export_gguf(&adapter_dir(adapter), &base_config, &out).unwrap();
        let gguf = Gguf::open(&out).unwrap();
        assert_eq!(gguf.get("general.type").and_then(|v| v.as_str()), Some("adapter"));
        assert_eq!(gguf.get("adapter.type").and_then(|v| v.as_str()), Some("lora"));
        let alpha = gguf.get("adapter.lora.alpha").and_then(|v| v.as_f64()).unwrap() as f32;
        let config = LoraConfig::from_file(&adapter_dir(adapter).join("adapter_config.json")).unwrap();
        let file = std::fs::read(adapter_dir(adapter).join("adapter_model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&file).unwrap();
        let device = Default::default();
        let mat = |data: TensorData| Tensor::<B, 2>::from_data(data.convert_dtype(DType::F32), &device);
        let mut seen = 0;
        for name in st.names().into_iter().filter(|n| n.ends_with(".lora_A.weight")) {
            let module = name
                .trim_start_matches("base_model.model.")
                .trim_end_matches(".lora_A.weight");
            let get = |k: &str| {
                let t = st.tensor(k).unwrap();
                TensorData::from_bytes_vec(t.data().to_vec(), t.shape().to_vec(), DType::F32)
            };
            let a = mat(get(name));
            let b = mat(get(&name.replace("lora_A", "lora_B")));
            let want: Vec<f32> = (b.matmul(a) * config.scaling_for(module)).into_data().to_vec().unwrap();
            let gname = temper_models::gguf::gguf_module_name(module).unwrap();
            let ga = gguf.read(&format!("{gname}.weight.lora_a")).unwrap();
            let gb = gguf.read(&format!("{gname}.weight.lora_b")).unwrap();
            let r = gb.shape[1] as f32; // llama.cpp: rank = lora_b->ne[0]
            let delta = mat(gb).matmul(mat(ga)) * (alpha / r); // [out, in], GGUF row order
            let [rows, cols] = delta.dims();
            let mut got: Vec<f32> = delta.into_data().to_vec().unwrap();
            let heads = if module.ends_with("q_proj") {
                Some(base_config.num_attention_heads)
            } else if module.ends_with("k_proj") {
                Some(base_config.num_key_value_heads)
            } else {
                None
            };
            if let Some(h) = heads.filter(|_| base != "qwen2_bias_tied") {
                // undo llama.cpp's row order to compare in Hugging Face's
                let permuted =
                    temper_models::gguf::permute_rows(&(0..rows).map(|i| i as f32).collect::<Vec<_>>(), rows, 1, h);
                let mut hf = vec![0f32; got.len()];
                for (gguf_row, &hf_row) in permuted.iter().enumerate() {
                    let hf_row = hf_row as usize;
                    hf[hf_row * cols..(hf_row + 1) * cols]
                        .copy_from_slice(&got[gguf_row * cols..(gguf_row + 1) * cols]);
                }
                got = hf;
            }
            let err = rel_err(&got, &want, |_| true);
            assert!(err < 1e-5, "{adapter}: {module}: {err:e}");
            seen += 1;
        }
        assert_eq!(seen, pairs, "{adapter}");
        if base == "phi3_longrope" {
            // llama.cpp's fused Phi-3 layers.
            assert_eq!(gguf.get("general.architecture").and_then(|v| v.as_str()), Some("phi3"));
            for name in ["blk.1.attn_qkv.weight.lora_a", "blk.1.ffn_up.weight.lora_b"] {
                assert!(gguf.read(name).is_ok(), "{name}");
            }
        }
    }
    let base_config =
        temper_models::ModelConfig::from_file(fixtures().join("models/llama_gqa_llama3/config.json")).unwrap();
    let err = temper_peft::export_gguf(&adapter_dir("dora"), &base_config, &tmp.path().join("x.gguf"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("DoRA"), "{err}");
    let moe = temper_models::ModelConfig::from_file(&fixtures().join("models/mixtral/config.json")).unwrap();
    let err = temper_peft::export_gguf(&adapter_dir("mixtral_experts"), &moe, &tmp.path().join("x.gguf"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("target_parameters") && err.contains("temper merge"), "{err}");
    let err = temper_peft::export_gguf(&adapter_dir("pissa"), &base_config, &tmp.path().join("x.gguf"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("PiSSA"), "{err}");
    let err = temper_peft::export_gguf(
        &adapter_dir("modules_to_save"),
        &base_config,
        &tmp.path().join("x.gguf"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("lm_head.weight") && err.contains("temper merge"), "{err}");
}

/// QLoRA-style base: 8- and 4-bit block quantization that dequantizes exactly as llama.cpp's
/// Q8_0/Q4_0 (gguf-py as the reference), a model that stays close to the dense one, the
/// memory it saves, and adapter gradients through it.
#[test]
fn quantized_base_matches_llama_cpp_blocks_and_trains_adapters() {
    use temper_models::gguf::Gguf;
    use temper_models::quant::QuantizedWeight;
    let device = Default::default();
    // gguf-py quantized these [4, 512] values (out = 4, in = 512) to Q8_0 and Q4_0.
    let gguf = Gguf::open(fixtures().join("quants.gguf")).unwrap();
    let values = Tensor::<B, 2>::from_data(gguf.read("f32").unwrap(), &device).transpose(); // [in, out]
    let expected = Expected::open(&fixtures().join("quants_expected.safetensors"));
    for (bits, name) in [(8, "q8_0"), (4, "q4_0")] {
        let q = QuantizedWeight::quantize(values.clone(), bits);
        let got: Vec<f32> = q.dequantize().transpose().into_data().to_vec().unwrap();
        let err = rel_err(&got, &expected.f32(name), |_| true);
        assert!(err < 1e-6, "{name}: {err:e}");
    }

    let base = load_hf_dir::<B>(&fixtures().join("models/llama_gqa_llama3")).unwrap();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![3i64, 17, 42, 5, 99, 7], [1, 6]), &device);
    let dense: Vec<f32> = base
        .forward(ids.clone(), ForwardOptions::default(), None)
        .into_data()
        .to_vec()
        .unwrap();
    for (quantization, bits, tol) in [(BaseQuantization::Q8_0, 8, 2e-2), (BaseQuantization::Q4_0, 4, 2e-1)] {
        let (model, report) = temper_peft::quantize_base(base.clone(), quantization).unwrap();
        // q/k/v/o/gate/up (in = 64) of both layers; down_proj (in = 112) and lm_head stay dense.
        assert_eq!(report.quantized_layers, 12, "{report:?}");
        assert!(report.dense_layers.contains(&"lm_head".to_string()));
        assert!(
            report
                .dense_layers
                .contains(&"model.layers.0.mlp.down_proj".to_string())
        );
        let quantized_share = (64 * 64 * 2 + 64 * 32 * 2 + 64 * 112 * 2) * 2 * 4; // dense f32 bytes of those layers
        let per_param = if bits == 8 { 1.0 + 4.0 / 32.0 } else { 0.5 + 4.0 / 32.0 };
        let expected_after =
            report.bytes_before - quantized_share + (quantized_share as f64 / 4.0 * per_param) as usize;
        assert_eq!(report.bytes_after, expected_after, "{bits} bits: {report:?}");
        let got: Vec<f32> = model
            .forward(ids.clone(), ForwardOptions::default(), None)
            .into_data()
            .to_vec()
            .unwrap();
        let err = rel_err(&got, &dense, |_| true);
        assert!(err < tol, "{bits}-bit base: logits rel err {err:e}");
    }

    // Gradients of a LoRA on an 8-bit base: present, and close to those on the dense base.
    let config = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: TargetModules::AllLinear,
        init_lora_weights: temper_peft::InitLoraWeights::Random,
        ..LoraConfig::default()
    };
    let grads_of = |quantize: bool| -> Vec<f32> {
        let base = load_hf_dir::<AD>(&fixtures().join("models/llama_gqa_llama3")).unwrap();
        let (model, _) = inject(base, &config, 5).unwrap();
        let mut model = if quantize {
            temper_peft::quantize_base(model, BaseQuantization::Q8_0).unwrap().0
        } else {
            model
        };
        let ids = Tensor::<AD, 2, Int>::from_data(
            TensorData::new(vec![3i64, 17, 42, 5, 99, 7], [1, 6]),
            &Default::default(),
        );
        let loss = model
            .forward(ids, ForwardOptions::default(), None)
            .powi_scalar(2)
            .mean();
        let grads = loss.backward();
        let mut out = Vec::new();
        for (name, l) in model.linears_mut() {
            assert!(l.weight.grad(&grads).is_none(), "{name}: the base got a gradient");
            if let Some(q) = &l.quantized {
                assert!(q.scales.grad(&grads).is_none(), "{name}: scales got a gradient");
            }
            let Some(lora) = l.adapter.as_ref() else { continue };
            let g: Vec<f32> = lora
                .lora_b
                .grad(&grads)
                .expect("adapter gradient")
                .into_data()
                .to_vec()
                .unwrap();
            out.extend(g);
        }
        out
    };
    let (dense_grads, q8_grads) = (grads_of(false), grads_of(true));
    let err = rel_err(&q8_grads, &dense_grads, |_| true);
    assert!(err < 5e-2, "adapter gradients on the 8-bit base: rel err {err:e}");
}
