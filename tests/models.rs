//! Parity of temper-models with transformers, on tiny random checkpoints made by
//! `tests/fixtures/make_fixtures.py` and on the real SmolLM2-135M-Instruct GGUF; and the errors
//! users get for broken files.

mod common;

use std::path::Path;

use burn::tensor::{DType, Int, Tensor, TensorData};
use common::{Expected, fixtures, load_hf_dir, rel_err, smollm2_path};
use temper::backend::CpuBackend as B;
use temper_models::gguf::Gguf;
use temper_models::{ForwardOptions, Message, Sampling};

fn check_parity(name: &str) {
    let dir = fixtures().join("models").join(name);
    check_parity_of(name, &load_hf_dir::<B>(&dir).unwrap());
}

fn check_parity_of(name: &str, model: &temper_models::LlamaForCausalLM<B>) {
    let dir = fixtures().join("models").join(name);
    let expected = Expected::open(&dir.join("expected.safetensors"));
    let device = Default::default();
    let int = |key: &str| Tensor::<B, 2, Int>::from_data(expected.get(key).1, &device);
    let (shape, _) = expected.get("logits_plain");
    let (batch, seq, vocab) = (shape[0], shape[1], shape[2]);

    let plain: Vec<f32> = model
        .forward(int("input_ids"), ForwardOptions::default(), None)
        .into_data()
        .to_vec()
        .unwrap();
    let err = rel_err(&plain, &expected.f32("logits_plain"), |_| true);
    assert!(
        err < 1e-4,
        "{name}: causal logits differ from transformers: rel err {err:e}"
    );

    let mask: Vec<i64> = expected.get("attention_mask").1.to_vec().unwrap();
    assert!(mask.contains(&0), "fixture should pad");
    let options = ForwardOptions {
        position_ids: Some(int("position_ids")),
        attention_mask: Some(int("attention_mask")),
        segment_ids: None,
    };
    let masked: Vec<f32> = model
        .forward(int("input_ids"), options, None)
        .into_data()
        .to_vec()
        .unwrap();
    assert_eq!(masked.len(), batch * seq * vocab);
    // Logits at padding positions are meaningless in both implementations.
    let err = rel_err(&masked, &expected.f32("logits_masked"), |i| mask[i / vocab] == 1);
    assert!(
        err < 1e-4,
        "{name}: padded logits differ from transformers: rel err {err:e}"
    );

    // Long-RoPE fixtures: an input past the pretraining length takes the long factors.
    if expected.names().iter().any(|n| n == "logits_long") {
        let long: Vec<f32> = model
            .forward(int("long_input_ids"), ForwardOptions::default(), None)
            .into_data()
            .to_vec()
            .unwrap();
        let err = rel_err(&long, &expected.f32("logits_long"), |_| true);
        assert!(err < 1e-4, "{name}: logits past the long-RoPE switch differ: rel err {err:e}");
    }

    // Greedy decoding with the KV cache gives transformers' `generate` ids (newer fixtures).
    if expected.names().iter().any(|n| n == "greedy_ids") {
        let ids: Vec<i64> = expected.get("input_ids").1.to_vec().unwrap();
        let prompt: Vec<u32> = ids[..seq].iter().map(|&i| i as u32).collect();
        let want: Vec<i64> = expected.get("greedy_ids").1.to_vec().unwrap();
        let sampling = Sampling {
            max_new_tokens: want.len(),
            ..Sampling::default()
        };
        let got = temper_models::generate(model, &prompt, &[], &sampling, &device).unwrap();
        let got: Vec<i64> = got.iter().map(|&i| i as i64).collect();
        assert_eq!(got, want, "{name}: greedy ids");

        // Batched (GRPO's generation): prompts of different lengths (left-padded caches), one
        // prompt twice (read once), a row that stops at its EOS while the others go on: each
        // row as it is alone.
        let short = &prompt[..prompt.len() / 2];
        let alone = |p: &[u32], eos: &[u32]| temper_models::generate(model, p, eos, &sampling, &device).unwrap();
        let eos = [alone(short, &[])[0]];
        let prompts: Vec<&[u32]> = vec![&prompt, short, &prompt];
        let batch = temper_models::generate_batch(model, &prompts, &eos, &sampling, &[1, 2, 3], &device).unwrap();
        for (i, (p, got)) in prompts.iter().zip(&batch).enumerate() {
            assert_eq!(got, &alone(p, &eos), "{name}: batched row {i}");
        }
        assert_eq!(batch[1].len(), 1, "{name}: the short prompt's row stops at its EOS");
    }
}

#[test]
fn parity_llama_gqa_llama3_rope_old_config_form() {
    check_parity("llama_gqa_llama3");
}

#[test]
fn parity_qwen2_bias_tied() {
    check_parity("qwen2_bias_tied");
}

#[test]
fn parity_mistral_sliding_window() {
    check_parity("mistral_window");
}

/// Qwen3's per-head q/k norms, explicit head_dim and biased projections, from the HF checkpoint
/// and from the same weights as llama.cpp writes them (GGUF architecture `qwen3`).
#[test]
fn parity_qwen3_qk_norm_hf_and_gguf() {
    check_parity("qwen3_qk_norm");
    let path = fixtures().join("models/qwen3_qk_norm/model.gguf");
    let gguf = Gguf::open(&path).unwrap();
    let config = temper_models::gguf::config_from_gguf(&gguf).unwrap();
    let hf = temper_models::ModelConfig::from_file(fixtures().join("models/qwen3_qk_norm/config.json")).unwrap();
    assert_eq!(
        (
            config.family,
            config.head_dim,
            config.qk_norm,
            config.qkv_bias,
            config.o_bias
        ),
        (hf.family, hf.head_dim, true, true, true)
    );
    let model = temper_models::load_weights::<B>(&path, &config, &Default::default(), DType::F32).unwrap();
    check_parity_of("qwen3_qk_norm", &model);
}

/// Phi-3 / Phi-4-mini: fused `qkv_proj` and `gate_up_proj`, RoPE on half of each head, and
/// long-RoPE whose short factors serve the prompt and long ones the positions past the
/// pretraining length (the greedy run crosses it), with the attention factor; from the HF
/// checkpoint and from the same weights as llama.cpp writes them (GGUF architecture `phi3`).
#[test]
fn parity_phi3_fused_partial_rotary_longrope_hf_and_gguf() {
    check_parity("phi3_longrope");
    let dir = fixtures().join("models/phi3_longrope");
    let gguf = Gguf::open(&dir.join("model.gguf")).unwrap();
    let config = temper_models::gguf::config_from_gguf(&gguf).unwrap();
    let hf = temper_models::ModelConfig::from_file(dir.join("config.json")).unwrap();
    assert_eq!(
        (config.family, config.rotary_dim, config.fused_projections, &config.rope_scaling),
        (hf.family, 8, true, &hf.rope_scaling)
    );
    let model = temper_models::load_weights::<B>(&dir.join("model.gguf"), &config, &Default::default(), DType::F32).unwrap();
    check_parity_of("phi3_longrope", &model);
}

/// Mixtures of experts: Qwen3-MoE (top-2 of 4, renormalised, a dense middle layer) and Mixtral
/// (`block_sparse_moe`, f32 router scores); each expert runs on its routed tokens only.
#[test]
fn parity_qwen3_moe_and_mixtral_hf_and_gguf() {
    check_parity("qwen3_moe");
    check_parity("mixtral");
    // As llama.cpp writes them: Mixtral under `llama` (q/k permuted), Qwen3-MoE as `qwen3moe`,
    // the experts stacked per layer.
    for (name, family) in [
        ("mixtral", temper_models::Family::Mixtral),
        ("qwen3_moe_gguf", temper_models::Family::Qwen3Moe),
    ] {
        let path = fixtures().join("models").join(name).join("model.gguf");
        let config = temper_models::gguf::config_from_gguf(&Gguf::open(&path).unwrap()).unwrap();
        let moe = config.moe.as_ref().unwrap();
        assert_eq!((config.family, moe.num_experts, moe.top_k), (family, 4, 2), "{name}");
        let model = temper_models::load_weights::<B>(&path, &config, &Default::default(), DType::F32).unwrap();
        check_parity_of(name, &model);
    }
}

/// Gemma 3's text model: scaled embeddings, `(1 + w)` norms around attention and MLP, q/k norms,
/// GeGLU, a sliding layer with its own RoPE base then a global one with linear scaling,
/// `query_pre_attn_scalar`, logit soft-capping.
#[test]
fn parity_gemma3_text() {
    check_parity("gemma3_text");
}

/// Gemma 3 from GGUF as llama.cpp writes and runs it: norms stored as `1 + w`, the norms around
/// the MLP under llama.cpp's names, every sixth layer global, the local RoPE base 10000 and
/// `query_pre_attn_scalar` = head_dim. The checkpoint's logits (transformers gives them from
/// this file too, with llama.cpp's query scale).
#[test]
fn parity_gemma3_gguf() {
    let dir = fixtures().join("models/gemma3_gguf");
    let gguf = Gguf::open(&dir.join("model.gguf")).unwrap();
    let config = temper_models::gguf::config_from_gguf(&gguf).unwrap();
    let hf = temper_models::ModelConfig::from_file(dir.join("config.json")).unwrap();
    // GGUF holds the epsilon as f32.
    assert!((config.rms_norm_eps - hf.rms_norm_eps).abs() < 1e-12);
    assert_eq!(
        temper_models::ModelConfig {
            rms_norm_eps: hf.rms_norm_eps,
            max_position_embeddings: hf.max_position_embeddings,
            bos_token_id: hf.bos_token_id,
            eos_token_ids: hf.eos_token_ids.clone(),
            pad_token_id: hf.pad_token_id,
            dtype: hf.dtype,
            ..config.clone()
        },
        hf
    );
    let model =
        temper_models::load_weights::<B>(&dir.join("model.gguf"), &config, &Default::default(), DType::F32).unwrap();
    check_parity_of("gemma3_gguf", &model);
}

#[test]
fn parity_llama_sharded_bf16() {
    check_parity("llama_sharded_bf16");
}

#[test]
fn kv_cache_matches_full_forward() {
    // Mistral's sliding window, and Gemma 3's (whose sliding layer has its own RoPE).
    for name in ["mistral_window", "gemma3_text"] {
        kv_cache_matches_full_forward_of(name);
    }
}

fn kv_cache_matches_full_forward_of(name: &str) {
    let model = load_hf_dir::<B>(&fixtures().join("models").join(name)).unwrap();
    let device = Default::default();
    let ids: Vec<i64> = (0..9).map(|i| (i * 13 + 5) % 128).collect();
    let full: Vec<f32> = model
        .forward(
            Tensor::from_data(TensorData::new(ids.clone(), [1, 9]), &device),
            ForwardOptions::default(),
            None,
        )
        .into_data()
        .to_vec()
        .unwrap();
    let mut cache = temper_models::KvCache::new(model.num_layers());
    let mut stepped = Vec::new();
    // A 5-token prefill, then one token at a time (crossing the sliding window of 4).
    for chunk in [&ids[..5], &ids[5..6], &ids[6..7], &ids[7..8], &ids[8..9]] {
        let t = Tensor::from_data(TensorData::new(chunk.to_vec(), [1, chunk.len()]), &device);
        let out: Vec<f32> = model
            .forward(t, ForwardOptions::default(), Some(&mut cache))
            .into_data()
            .to_vec()
            .unwrap();
        stepped.extend(out);
    }
    let err = rel_err(&stepped, &full, |_| true);
    assert!(
        err < 1e-5,
        "{name}: cached decoding differs from a full forward: {err:e}"
    );
}

#[test]
fn gguf_dequantizes_like_gguf_py() {
    let gguf = Gguf::open(fixtures().join("quants.gguf")).unwrap();
    let expected = Expected::open(&fixtures().join("quants_expected.safetensors"));
    for name in [
        "f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k",
    ] {
        let data = gguf.read(name).unwrap();
        assert_eq!(data.shape.as_slice(), &[4, 512], "{name}");
        let got: Vec<f32> = data.convert_dtype(DType::F32).to_vec().unwrap();
        let want = expected.f32(name);
        let err = rel_err(&got, &want, |_| true);
        assert!(err < 1e-6, "{name}: rel err {err:e}");
    }
    let err = gguf.read("q2_k").unwrap_err().to_string();
    assert!(
        err.contains("quants.gguf") && err.contains("q2_k") && err.contains("Q2_K"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Broken input: a clear error naming the file and tensor, never a panic.

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn edit_config(dir: &Path, key: &str, value: serde_json::Value) {
    let path = dir.join("config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    c[key] = value;
    std::fs::write(&path, c.to_string()).unwrap();
}

#[test]
fn broken_checkpoints_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("models/qwen2_bias_tied");

    let err = load_hf_dir::<B>(&tmp.path().join("nope")).unwrap_err().to_string();
    assert!(err.contains("nope") && err.contains("config.json"), "{err}");

    // Truncated download.
    let dir = tmp.path().join("truncated");
    copy_dir(&src, &dir);
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_hf_dir::<B>(&dir).unwrap_err().to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("not a valid safetensors"),
        "{err}"
    );

    // A config that disagrees with the weights: the tensor and both shapes are named.
    let dir = tmp.path().join("shape");
    copy_dir(&src, &dir);
    edit_config(&dir, "intermediate_size", serde_json::json!(100));
    let err = load_hf_dir::<B>(&dir).unwrap_err().to_string();
    assert!(
        err.contains("model.layers.0.mlp.gate_proj.weight") && err.contains("[100, 64]") && err.contains("[112, 64]"),
        "{err}"
    );

    // A tensor the architecture needs is absent.
    let dir = tmp.path().join("missing");
    copy_dir(&fixtures().join("models/llama_gqa_llama3"), &dir);
    edit_config(&dir, "num_hidden_layers", serde_json::json!(3));
    let err = load_hf_dir::<B>(&dir).unwrap_err().to_string();
    assert!(
        err.contains("model.layers.2.self_attn.q_proj.weight") && err.contains("not found"),
        "{err}"
    );

    // A shard the index names is missing.
    let dir = tmp.path().join("shard");
    copy_dir(&fixtures().join("models/llama_sharded_bf16"), &dir);
    std::fs::remove_file(dir.join("model-00002-of-00003.safetensors")).unwrap();
    let err = load_hf_dir::<B>(&dir).unwrap_err().to_string();
    assert!(err.contains("model-00002-of-00003.safetensors"), "{err}");

    // Unsupported architecture.
    let dir = tmp.path().join("arch");
    copy_dir(&src, &dir);
    edit_config(&dir, "model_type", serde_json::json!("gpt_neox"));
    let err = load_hf_dir::<B>(&dir).unwrap_err().to_string();
    assert!(err.contains("unsupported model_type \"gpt_neox\""), "{err}");
}

#[test]
fn broken_gguf_gives_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixtures().join("quants.gguf")).unwrap();
    let path = tmp.path().join("cut.gguf");
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
    let err = Gguf::open(&path).err().unwrap().to_string();
    assert!(err.contains("cut.gguf") && err.contains("truncated"), "{err}");
    std::fs::write(&path, &bytes[..200]).unwrap();
    let err = Gguf::open(&path).err().unwrap().to_string();
    assert!(
        err.contains("cut.gguf") && err.contains("truncated GGUF header"),
        "{err}"
    );
    std::fs::write(&path, b"not a gguf at all").unwrap();
    let err = Gguf::open(&path).err().unwrap().to_string();
    assert!(err.contains("bad magic"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// The real model. `scripts/fetch-model.sh` puts it where `smollm2_path` looks.

#[test]
fn smollm2_gguf_matches_transformers() {
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("smollm2/reference.json")).unwrap()).unwrap();
    let device = Default::default();
    let loaded = temper_models::load_pretrained::<B>(&smollm2_path(), &device, DType::F32).unwrap();
    let tok = &loaded.tokenizer;

    // Tokenizer built from GGUF metadata against transformers' AutoTokenizer(gguf_file=...).
    let texts = reference["texts"].as_array().unwrap();
    for (text, ids) in texts.iter().zip(reference["ids"].as_array().unwrap()) {
        let want: Vec<u32> = serde_json::from_value(ids.clone()).unwrap();
        let text = text.as_str().unwrap();
        assert_eq!(tok.encode(text, true).unwrap(), want, "token ids of {text:?}");
        assert_eq!(tok.decode(&want, false).unwrap(), text, "round trip of {text:?}");
    }

    // Chat template.
    let chat = tok
        .apply_chat_template(&[Message::new("user", "What is the capital of France?")], true)
        .unwrap();
    assert_eq!(chat, reference["chat_text"].as_str().unwrap());
    let ids = tok.encode(&chat, false).unwrap();
    let want: Vec<u32> = serde_json::from_value(reference["chat_ids"].clone()).unwrap();
    assert_eq!(ids, want);

    // Logits of transformers loading the same GGUF (dequantized to f32).
    let expected = Expected::open(&fixtures().join("smollm2/logits.safetensors"));
    let positions: Vec<i64> = expected.get("positions").1.to_vec().unwrap();
    let want = expected.f32("logits");
    let input: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    let n = input.len();
    let logits = loaded.model.forward(
        Tensor::from_data(TensorData::new(input, [1, n]), &device),
        ForwardOptions::default(),
        None,
    );
    let vocab = loaded.config.vocab_size;
    for (row, &pos) in positions.iter().enumerate() {
        let got: Vec<f32> = logits
            .clone()
            .slice([0..1, pos as usize..pos as usize + 1, 0..vocab])
            .into_data()
            .to_vec()
            .unwrap();
        let err = rel_err(&got, &want[row * vocab..(row + 1) * vocab], |_| true);
        assert!(err < 1e-3, "logits at position {pos}: rel err {err:e}");
    }

    // Greedy decoding gives transformers' tokens, and the answer.
    let greedy: Vec<u32> = serde_json::from_value(reference["greedy_ids"].clone()).unwrap();
    let sampling = Sampling {
        max_new_tokens: greedy.len(),
        ..Sampling::default()
    };
    let out = temper_models::generate(&loaded.model, &ids, &loaded.eos_token_ids(), &sampling, &device).unwrap();
    assert_eq!(out, greedy[..out.len()]);
    let text = tok.decode(&out, true).unwrap();
    assert!(text.contains("Paris"), "{text}");
}

/// `checkpoint_shapes` names exactly the tensors transformers writes, so a model built from a
/// config alone (benchmarks) has the same structure as a loaded one.
#[test]
fn random_weights_from_config_alone() {
    for name in [
        "llama_gqa_llama3",
        "qwen2_bias_tied",
        "mistral_window",
        "llama_sharded_bf16",
        "qwen3_qk_norm",
        "gemma3_text",
        "phi3_longrope",
        "qwen3_moe",
        "mixtral",
    ] {
        let dir = fixtures().join("models").join(name);
        let config = temper_models::ModelConfig::from_file(dir.join("config.json")).unwrap();
        let source = temper_models::weights::SafetensorsSource::open_dir(&dir).unwrap();
        let mut written: Vec<String> = source.names().map(str::to_string).collect();
        written.sort();
        let mut expected: Vec<String> = temper_models::llama::checkpoint_shapes(&config)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        expected.sort();
        assert_eq!(written, expected, "{name}");
        let random = temper_models::llama::random_weights(&config, 1);
        let model =
            temper_models::LlamaForCausalLM::<B>::load(&config, &random, &Default::default(), DType::F32).unwrap();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64, 2, 3], [1, 3]), &Default::default());
        let logits: Vec<f32> = model
            .forward(ids, ForwardOptions::default(), None)
            .into_data()
            .to_vec()
            .unwrap();
        assert!(logits.iter().all(|x| x.is_finite()));
    }
}

#[test]
fn half_precision_on_the_cpu_backend_is_an_error_not_a_panic() {
    let dir = fixtures().join("models/qwen2_bias_tied");
    let config = temper_models::ModelConfig::from_file(dir.join("config.json")).unwrap();
    let source = temper_models::weights::SafetensorsSource::open_dir(&dir).unwrap();
    let e = temper_models::LlamaForCausalLM::<B>::load(&config, &source, &Default::default(), DType::BF16).unwrap_err();
    assert!(e.to_string().contains("BF16") && e.to_string().contains("f32"), "{e}");
}

/// A SentencePiece (Llama 2 / TinyLlama style) vocabulary from GGUF metadata, without merges
/// in the file: the same ids and text as transformers' tokenizer for the same GGUF.
#[test]
fn sentencepiece_gguf_tokenizer_matches_transformers() {
    // Llama's vocabulary, then Gemma's (no dummy prefix, runs of spaces stored as spaces,
    // merges in vocabulary order).
    for name in ["tiny_spm", "tiny_gemma_spm"] {
        sentencepiece_gguf_tokenizer_matches(name);
    }
}

fn sentencepiece_gguf_tokenizer_matches(name: &str) {
    let gguf = Gguf::open(fixtures().join(format!("{name}.gguf"))).unwrap();
    let tok = temper_models::Tokenizer::from_gguf(&gguf).unwrap();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join(format!("{name}.json"))).unwrap()).unwrap();
    let texts = reference["texts"].as_array().unwrap();
    for (i, text) in texts.iter().enumerate() {
        let text = text.as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(reference["ids"][i].clone()).unwrap();
        assert_eq!(tok.encode(text, true).unwrap(), want, "{name}: ids of {text:?}");
        assert_eq!(
            tok.decode(&want, true).unwrap(),
            reference["decoded"][i].as_str().unwrap(),
            "{name}: decode of {text:?}"
        );
    }
}

/// Qwen3's chat template (multi-turn reasoning dropped from earlier turns, kept in the last;
/// tool turns grouped) and Gemma 3's (system folded into the first user turn, `model` turns,
/// strict alternation) render exactly as transformers renders them, and refuse what it refuses.
#[test]
fn qwen3_and_gemma3_chat_templates_render_as_transformers() {
    let dir = fixtures().join("chat");
    for name in ["qwen3", "gemma3"] {
        let source = std::fs::read_to_string(dir.join(format!("{name}.jinja"))).unwrap();
        let template = temper_models::ChatTemplate::new(&source).unwrap();
        let cases: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap()).unwrap();
        assert_eq!(cases.len(), 8);
        for case in cases {
            let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
            let generation_prompt = case["add_generation_prompt"].as_bool().unwrap();
            let bos = case["bos_token"].as_str().unwrap();
            let got = template.render(&messages, generation_prompt, bos, "");
            match (case["text"].as_str(), case["error"].as_str()) {
                (Some(want), _) => assert_eq!(got.unwrap().text, want, "{name}: {messages:?}"),
                (None, Some(error)) => {
                    let e = got.unwrap_err();
                    assert!(e.contains(error), "{name}: {e} (transformers: {error})");
                }
                _ => panic!("{name}: a case without text or error"),
            }
        }
    }
}

/// Examples packed into one row stay apart in sliding-window layers too: each one's logits equal
/// its own forward (Mistral's window of 4, and Gemma 3's sliding layer with its local RoPE).
#[test]
fn packed_examples_stay_apart_in_sliding_window_layers() {
    let device = Default::default();
    let row = |ids: &[i64]| Tensor::<B, 2, Int>::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), &device);
    let (a, b): (Vec<i64>, Vec<i64>) = (
        (0..6).map(|i| 3 + i * 7).collect(),
        (0..7).map(|i| 5 + i * 11).collect(),
    );
    for name in ["mistral_window", "gemma3_text"] {
        let model = load_hf_dir::<B>(&fixtures().join("models").join(name)).unwrap();
        let alone = |ids: &[i64]| -> Vec<f32> {
            model
                .forward(row(ids), ForwardOptions::default(), None)
                .into_data()
                .to_vec()
                .unwrap()
        };
        let packed_ids: Vec<i64> = a.iter().chain(&b).copied().collect();
        let positions: Vec<i64> = (0..a.len() as i64).chain(0..b.len() as i64).collect();
        let segments: Vec<i64> = [0].repeat(a.len()).into_iter().chain([1].repeat(b.len())).collect();
        let options = ForwardOptions {
            position_ids: Some(row(&positions)),
            attention_mask: None,
            segment_ids: Some(row(&segments)),
        };
        let packed: Vec<f32> = model
            .forward(row(&packed_ids), options, None)
            .into_data()
            .to_vec()
            .unwrap();
        let vocab = packed.len() / packed_ids.len();
        let expected: Vec<f32> = alone(&a).into_iter().chain(alone(&b)).collect();
        let err = rel_err(&packed, &expected, |_| true);
        assert!(
            err < 1e-5,
            "{name}: packed logits differ from each example's own: {err:e}"
        );
        assert_eq!(packed.len(), (a.len() + b.len()) * vocab);
    }
}

/// `temper eval`'s `choice` scorer gives the log-likelihoods transformers computes for each
/// option, scored as lm-evaluation-harness does (tests/fixtures/eval/make_choice.py), with
/// options of different lengths padded together in a batch.
#[test]
fn choice_loglikelihoods_equal_transformers() {
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("eval/choice.json")).unwrap()).unwrap();
    let device = Default::default();
    let loaded = temper_models::load_pretrained::<B>(&smollm2_path(), &device, DType::F32).unwrap();
    let file: std::sync::Arc<Path> = Path::new("choice.json").into();
    let rows: Vec<temper_data::EvalRow> = fixture["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| temper_data::EvalRow {
            at: temper_data::Location::file(&file),
            prompt: match &r["prompt"] {
                serde_json::Value::String(s) => temper_data::Content::Text(s.clone()),
                m => temper_data::Content::Messages(serde_json::from_value(m.clone()).unwrap()),
            },
            raw_prompt: r["prompt"].clone(),
            answer: None,
            columns: r.as_object().unwrap().clone(),
        })
        .collect();
    let data: temper_data::DataConfig = serde_json::from_value(serde_json::json!({"path": "choice.json"})).unwrap();
    let tokenizer = std::sync::Arc::new(loaded.tokenizer);
    let encoder = temper_data::Encoder::new(tokenizer.clone(), data.encode_options(false, false)).unwrap();
    let (acc, norm, lls) = temper_trainer::eval::choice_scores(
        &loaded.model,
        &tokenizer,
        &encoder,
        &rows,
        "choices",
        "answer",
        3,
        loaded.config.max_position_embeddings,
        &device,
    )
    .unwrap();
    for (row, got) in fixture["rows"].as_array().unwrap().iter().zip(&lls) {
        let want: Vec<f64> = serde_json::from_value(row["loglikelihoods"].clone()).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 2e-3 * w.abs().max(1.0), "{}: {got:?} vs {want:?}", row["prompt"]);
        }
        assert_eq!(got.len(), want.len());
    }
    // Every answer is the most likely option by sum; per character, the last row's long wrong
    // option wins (-24.6 over 21 characters against -7.3 over 5), as lm-eval's acc_norm has it.
    assert_eq!(acc, vec![1.0; 5]);
    assert_eq!(norm, vec![1.0, 1.0, 1.0, 1.0, 0.0]);
}
