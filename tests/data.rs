//! The data pipeline against TRL: fixtures written by Python `datasets` in each format, and the
//! token ids / labels TRL's trainers prepare from them (`tests/fixtures/data/make_data_fixtures.py`).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::{Int, Tensor, TensorData};
use common::{fixtures, load_hf_dir, rel_err, smollm2_path};
use serde_json::Value;
use temper::backend::CpuBackend;
use temper_data::{
    Batch, Cursor, DataConfig, Encoded, Format, IGNORE_INDEX, LoaderOptions, PackingStrategy, Pipeline, SftBatch,
    Truncation, pack_bfd,
};
use temper_models::ForwardOptions;
use temper_models::Tokenizer;
use temper_models::gguf::Gguf;

fn data_dir() -> PathBuf {
    fixtures().join("data")
}

fn tokenizer() -> Arc<Tokenizer> {
    let gguf = Gguf::open(smollm2_path()).unwrap();
    Arc::new(Tokenizer::from_gguf(&gguf).unwrap())
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(data_dir().join("expected.json")).unwrap()).unwrap()
}

fn config(yaml_like: Value) -> DataConfig {
    serde_json::from_value(yaml_like).unwrap()
}

fn options(batch_size: usize) -> LoaderOptions {
    LoaderOptions {
        seed: 7,
        ..LoaderOptions::one_pass(batch_size)
    }
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

/// Every row of a source, encoded in file order.
fn encode_all(cfg: Value, tok: &Arc<Tokenizer>) -> Vec<Encoded> {
    let mut cfg = config(cfg);
    cfg.shuffle = false;
    let pipeline = Pipeline::new(&cfg, tok.clone(), options(1)).unwrap();
    pipeline
        .preview(usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(_, e)| e)
        .collect()
}

fn assert_sft_equal(name: &str, ours: &[Encoded], theirs: &Value) {
    let theirs = theirs.as_array().unwrap();
    let ours: Vec<_> = ours.iter().filter(|e| !matches!(e, Encoded::Dropped)).collect();
    assert_eq!(ours.len(), theirs.len(), "{name}: row count");
    for (i, (o, t)) in ours.iter().zip(theirs).enumerate() {
        let Encoded::Sft(o) = o else {
            panic!("{name}: row {i} is not SFT")
        };
        let o_ids: Vec<i64> = o.input_ids.iter().map(|&x| x as i64).collect();
        let o_labels: Vec<i64> = o.labels.iter().map(|&x| x as i64).collect();
        assert_eq!(o_ids, ids(&t["input_ids"]), "{name}: row {i} input_ids");
        assert_eq!(o_labels, ids(&t["labels"]), "{name}: row {i} labels");
    }
}

fn path(name: &str) -> String {
    data_dir().join(name).display().to_string()
}

#[test]
fn sft_rows_match_trl() {
    let tok = tokenizer();
    let exp = expected();
    let max = |m: usize| Value::from(m);
    let cases: Vec<(&str, Value)> = vec![
        (
            "messages_train",
            serde_json::json!({"path": path("messages"), "max_length": max(1024)}),
        ),
        (
            "messages_assistant_only",
            serde_json::json!({"path": path("messages"), "assistant_only_loss": true,
                               "chat_template": exp["marker_template"]}),
        ),
        (
            "messages_keep_end_24",
            serde_json::json!({"path": path("messages"), "max_length": 24, "truncation": "keep_end"}),
        ),
        (
            "prompt_completion",
            serde_json::json!({"path": path("prompt_completion.parquet")}),
        ),
        (
            "prompt_completion_keep_start_6",
            serde_json::json!({"path": path("prompt_completion.parquet"), "max_length": 6}),
        ),
        ("pc_chat", serde_json::json!({"path": path("pc_chat.jsonl")})),
        ("text", serde_json::json!({"path": path("text.jsonl.gz")})),
        ("text", serde_json::json!({"path": path("text_file_format.arrow")})),
        ("alpaca", serde_json::json!({"path": path("alpaca.json")})),
        ("sharegpt", serde_json::json!({"path": path("sharegpt.jsonl")})),
    ];
    for (name, cfg) in cases {
        assert_sft_equal(name, &encode_all(cfg, &tok), &exp[name]);
    }
    // Without {% generation %} markers, assistant turns are found by rendering prefixes; on
    // SmolLM2's ChatML that gives the same mask as the marked template.
    let fallback = encode_all(
        serde_json::json!({"path": path("messages"), "assistant_only_loss": true}),
        &tok,
    );
    assert_sft_equal(
        "messages_assistant_only (prefix fallback)",
        &fallback,
        &exp["messages_assistant_only"],
    );
}

#[test]
fn packing_matches_trl_bfd() {
    let tok = tokenizer();
    let exp = expected();
    let cfg = serde_json::json!({"path": path("text.jsonl.gz"), "packing": true, "max_length": 12});
    let once: Vec<_> = encode_all(cfg, &tok)
        .into_iter()
        .map(|e| match e {
            Encoded::Sft(x) => x,
            other => panic!("{other:?}"),
        })
        .collect();
    let twice: Vec<_> = once.iter().chain(&once).cloned().collect();
    let rows = pack_bfd(twice, 12, PackingStrategy::Bfd);
    let theirs = exp["packed_text_40"].as_array().unwrap();
    assert_eq!(rows.len(), theirs.len());
    for (r, t) in rows.iter().zip(theirs) {
        assert_eq!(
            r.input_ids.iter().map(|&x| x as i64).collect::<Vec<_>>(),
            ids(&t["input_ids"])
        );
        assert_eq!(
            r.labels.iter().map(|&x| x as i64).collect::<Vec<_>>(),
            ids(&t["labels"])
        );
        assert_eq!(
            r.seq_lengths.iter().map(|&x| x as i64).collect::<Vec<_>>(),
            ids(&t["seq_lengths"])
        );
    }
}

#[test]
fn preference_rows_match_trl() {
    let tok = tokenizer();
    let exp = expected();
    for (name, file) in [
        ("pref_chat", "pref_chat.parquet"),
        ("pref_implicit", "pref_implicit.jsonl"),
    ] {
        let ours = encode_all(serde_json::json!({"path": path(file)}), &tok);
        let theirs = exp[name].as_array().unwrap();
        assert_eq!(ours.len(), theirs.len(), "{name}");
        for (o, t) in ours.iter().zip(theirs) {
            let Encoded::Preference(o) = o else {
                panic!("{name}: {o:?}")
            };
            let v = |x: &[u32]| x.iter().map(|&i| i as i64).collect::<Vec<_>>();
            assert_eq!(v(&o.prompt_ids), ids(&t["prompt_ids"]), "{name} prompt");
            assert_eq!(v(&o.chosen_ids), ids(&t["chosen_ids"]), "{name} chosen");
            assert_eq!(v(&o.rejected_ids), ids(&t["rejected_ids"]), "{name} rejected");
        }
    }
}

fn run(cfg: &DataConfig, tok: &Arc<Tokenizer>, opts: LoaderOptions, start: Cursor) -> Vec<(Batch, Cursor, u64)> {
    let pipeline = Arc::new(Pipeline::new(cfg, tok.clone(), opts).unwrap());
    pipeline
        .spawn(start)
        .map(|b| b.unwrap())
        .map(|b| (b.batch, b.next, b.epoch))
        .collect()
}

fn first_ids(batch: &Batch) -> Vec<Vec<u32>> {
    match batch {
        Batch::Sft(b) => b.input_ids.chunks(b.seq_len).map(|r| r.to_vec()).collect(),
        Batch::Preference(b) => b.input_ids.chunks(b.seq_len).map(|r| r.to_vec()).collect(),
        Batch::Unpaired(b) => b.input_ids.chunks(b.seq_len).map(|r| r.to_vec()).collect(),
        Batch::Rollout(b) => b.input_ids.chunks(b.seq_len).map(|r| r.to_vec()).collect(),
        Batch::Prompts(b) => b.prompts.iter().map(|p| p.prompt_ids.clone()).collect(),
    }
}

#[test]
fn loader_resumes_exactly_and_shards_disjointly() {
    let tok = tokenizer();
    // Mixed sources with weights, a small shuffle buffer, packing windows of 3 examples.
    let cfg = config(serde_json::json!({
        "sources": [
            {"path": path("text.jsonl.gz"), "weight": 1.0},
            {"path": path("messages"), "weight": 2.0},
            {"path": path("alpaca.json"), "weight": 1.0},
        ],
        "shuffle_buffer": 4, "packing": true, "max_length": 64, "packing_window": 3,
    }));
    let mut opts = options(2);
    opts.epochs = Some(2);
    let all = run(&cfg, &tok, opts, Cursor::default());
    assert!(all.len() >= 4, "{} batches", all.len());
    assert_eq!(all.last().unwrap().2, 1, "two epochs");
    // The same seed gives the same batches; resuming after batch k gives the rest.
    assert_eq!(run(&cfg, &tok, opts, Cursor::default()).len(), all.len());
    for k in [1, all.len() / 2, all.len() - 1] {
        let resumed = run(&cfg, &tok, opts, all[k - 1].1);
        let rest: Vec<_> = all[k..].iter().map(|b| first_ids(&b.0)).collect();
        let got: Vec<_> = resumed.iter().map(|b| first_ids(&b.0)).collect();
        assert_eq!(got, rest, "resume after batch {k}");
    }
    // Two epochs see the rows in different orders.
    let mut plain = cfg.clone();
    plain.packing = false;
    plain.sources.iter_mut().for_each(|s| s.weight = None);
    let batches = run(&plain, &tok, opts, Cursor::default());
    // Token 2 (`<|im_end|>`) is also the pad token: drop it to compare rows across batches.
    let epoch_rows = |e: u64| -> Vec<Vec<u32>> {
        batches
            .iter()
            .filter(|b| b.2 == e)
            .flat_map(|b| first_ids(&b.0))
            .map(|r| r.into_iter().filter(|&t| t != 2).collect())
            .collect()
    };
    let (e0, e1) = (epoch_rows(0), epoch_rows(1));
    assert_eq!(e0.len(), 3 + 4 + 2);
    assert_ne!(e0, e1);
    let (mut s0, mut s1) = (e0.clone(), e1.clone());
    s0.sort();
    s1.sort();
    assert_eq!(s0, s1, "each epoch sees every row once");
    // Rank sharding: two ranks split an epoch's rows between them.
    opts.epochs = Some(1);
    let rows_of = |rank: usize| -> Vec<Vec<u32>> {
        let o = LoaderOptions {
            rank,
            world_size: 2,
            ..opts
        };
        run(&plain, &tok, o, Cursor::default())
            .iter()
            .flat_map(|(b, _, _)| first_ids(b))
            .map(|r| r.into_iter().filter(|&t| t != 2).collect())
            .collect()
    };
    let (r0, r1) = (rows_of(0), rows_of(1));
    assert_eq!(r0.len() + r1.len(), 9);
    let mut both: Vec<_> = r0.iter().chain(&r1).cloned().collect();
    both.sort();
    assert_eq!(both, s0, "the ranks' rows are disjoint and cover the epoch");
}

#[test]
fn packed_rows_attend_only_within_examples() {
    // A packed row's logits equal each example's own logits: no attention across examples.
    let model = load_hf_dir::<CpuBackend>(&fixtures().join("models/llama_gqa_llama3")).unwrap();
    let device = Default::default();
    let (a, b): (Vec<u32>, Vec<u32>) = ((1..8).collect(), (20..25).collect());
    let labels = |x: &[u32]| x.iter().map(|&t| t as i32).collect::<Vec<_>>();
    let packed_ids: Vec<u32> = a.iter().chain(&b).copied().collect();
    let batch = SftBatch::collate(&[(&packed_ids, &labels(&packed_ids), &[a.len(), b.len()])], 0, None);
    let int = |v: &[u32], n: usize| {
        Tensor::<CpuBackend, 2, Int>::from_data(
            TensorData::new(v.iter().map(|&x| x as i64).collect::<Vec<_>>(), [1, n]),
            &device,
        )
    };
    let n = packed_ids.len();
    let packed: Vec<f32> = model
        .forward(
            int(&batch.input_ids, n),
            ForwardOptions {
                position_ids: Some(int(&batch.position_ids, n)),
                attention_mask: None,
                segment_ids: Some(int(&batch.segment_ids, n)),
            },
            None,
        )
        .into_data()
        .to_vec()
        .unwrap();
    let alone = |x: &[u32]| -> Vec<f32> {
        model
            .forward(int(x, x.len()), ForwardOptions::default(), None)
            .into_data()
            .to_vec()
            .unwrap()
    };
    let expected: Vec<f32> = alone(&a).into_iter().chain(alone(&b)).collect();
    let err = rel_err(&packed, &expected, |_| true);
    assert!(err < 1e-5, "packed vs separate logits: {err}");
}

fn error_of(cfg: Value, tok: &Arc<Tokenizer>) -> String {
    let cfg = config(cfg);
    match Pipeline::new(&cfg, tok.clone(), options(2)) {
        Err(e) => e.to_string(),
        Ok(p) => {
            let p = Arc::new(p);
            let results: Vec<_> = p.spawn(Cursor::default()).collect();
            results
                .into_iter()
                .find_map(|r| r.err())
                .map(|e| e.to_string())
                .expect("an error")
        }
    }
}

#[test]
fn bad_input_names_file_row_and_column() {
    let tok = tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| -> String {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    // A row of the wrong type.
    let p = write(
        "bad_type.jsonl",
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": 3, \"completion\": \"b\"}\n",
    );
    let e = error_of(serde_json::json!({"path": p}), &tok);
    assert!(
        e.contains("bad_type.jsonl, row 1") && e.contains("\"prompt\"") && e.contains("a number"),
        "{e}"
    );
    // An unreadable JSON line.
    let p = write("broken.jsonl", "{\"text\": \"ok\"}\n{\"text\": \"no end}\n");
    let e = error_of(serde_json::json!({"path": p}), &tok);
    assert!(e.contains("broken.jsonl, row 1") && e.contains("not valid JSON"), "{e}");
    // An empty message list.
    let p = write("empty.jsonl", "{\"messages\": []}\n");
    let e = error_of(serde_json::json!({"path": p}), &tok);
    assert!(e.contains("empty.jsonl, row 0") && e.contains("empty"), "{e}");
    // A missing column (renamed to one that does not exist).
    let e = error_of(
        serde_json::json!({"path": path("prompt_completion.parquet"), "format": "prompt_completion",
                           "columns": {"prompt": "question"}}),
        &tok,
    );
    assert!(
        e.contains("prompt_completion.parquet") && e.contains("\"question\" is missing"),
        "{e}"
    );
    // No recognisable format.
    let p = write("odd.jsonl", "{\"question\": \"a\"}\n");
    let e = error_of(serde_json::json!({"path": p}), &tok);
    assert!(
        e.contains("odd.jsonl") && e.contains("cannot tell the dataset format"),
        "{e}"
    );
    // A corrupt Parquet file: cut in half.
    let bytes = std::fs::read(data_dir().join("prompt_completion.parquet")).unwrap();
    let p = dir.path().join("cut.parquet");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = error_of(serde_json::json!({"path": p.display().to_string()}), &tok);
    assert!(e.contains("cut.parquet"), "{e}");
    // A corrupt Arrow stream: the body damaged after the schema.
    let arrow = data_dir().join("messages/train/data-00000-of-00001.arrow");
    let mut bytes = std::fs::read(arrow).unwrap();
    let n = bytes.len();
    bytes.truncate(n - n / 3);
    let p = dir.path().join("cut.arrow");
    std::fs::write(&p, &bytes).unwrap();
    let e = error_of(serde_json::json!({"path": p.display().to_string()}), &tok);
    assert!(e.contains("cut.arrow"), "{e}");
    // A split that does not exist.
    let e = error_of(
        serde_json::json!({"path": path("messages"), "split": "validation"}),
        &tok,
    );
    assert!(e.contains("\"validation\" not found") && e.contains("train"), "{e}");
    // Preference pairs with nothing to prefer.
    let p = write(
        "same.jsonl",
        "{\"prompt\": \"Q\", \"chosen\": \" A\", \"rejected\": \" A\"}\n",
    );
    let e = error_of(serde_json::json!({"path": p}), &tok);
    assert!(e.contains("same.jsonl, row 0") && e.contains("identical"), "{e}");
    let p = write(
        "blank.jsonl",
        "{\"prompt\": \"Q\", \"chosen\": \" A\", \"rejected\": \"  \"}\n",
    );
    let e = error_of(serde_json::json!({"path": p}), &tok);
    assert!(e.contains("blank.jsonl, row 0") && e.contains("empty"), "{e}");
    // skip_bad_rows: the good rows train, the bad one is counted.
    let p = write(
        "mixed.jsonl",
        "{\"text\": \"one\"}\n{\"text\": 5}\n{\"text\": \"three\"}\n",
    );
    let cfg = config(serde_json::json!({"path": p, "skip_bad_rows": true}));
    let pipeline = Arc::new(Pipeline::new(&cfg, tok.clone(), options(8)).unwrap());
    let loader = pipeline.spawn(Cursor::default());
    let stats = loader.stats.clone();
    let batches: Vec<_> = loader.map(|b| b.unwrap()).collect();
    assert_eq!(stats.get(&stats.bad_rows_skipped), 1);
    match &batches[0].batch {
        Batch::Sft(b) => assert_eq!(b.batch_size, 2),
        other => panic!("{other:?}"),
    }
    assert!(stats.skipped_examples.lock().unwrap()[0].contains("mixed.jsonl, row 1"));
}

#[test]
fn formats_and_splits_are_detected() {
    let tok = tokenizer();
    let test_split = config(serde_json::json!({"path": path("messages"), "split": "test", "shuffle": false}));
    let p = Pipeline::new(&test_split, tok.clone(), options(4)).unwrap();
    assert_eq!(p.preview(10).unwrap().len(), 2);
    assert_eq!(
        Format::detect(&["chosen".into(), "rejected".into()]),
        Some(Format::Preference)
    );
    // A glob over several files of one format.
    let glob = config(serde_json::json!({"path": format!("{}/pref_*.parquet", data_dir().display())}));
    assert!(Pipeline::new(&glob, tok.clone(), options(1)).unwrap().preference);
    // Mixing SFT and preference sources is refused.
    let mixed =
        config(serde_json::json!({"sources": [{"path": path("text.jsonl.gz")}, {"path": path("pref_chat.parquet")}]}));
    let e = Pipeline::new(&mixed, tok.clone(), options(1))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("data.sources[1]"), "{e}");
    // Truncation of preference pairs happens per sequence, as TRL's collator does.
    let pairs = temper_data::PreferenceBatch::collate(
        &[temper_data::PreferenceExample {
            prompt_ids: vec![1, 2, 3],
            chosen_ids: vec![4, 5],
            rejected_ids: vec![6],
            margin: None,
        }],
        0,
        Some(4),
        Truncation::KeepStart,
        None,
    );
    assert_eq!(pairs.input_ids, vec![1, 2, 3, 4, 1, 2, 3, 6]);
    let _ = (IGNORE_INDEX, Path::new("."));
}

/// GRPO's prompts: a prompt-only dataset, or any with a `prompt` (the rest are columns for the
/// rewards), in whole batches; a conversational prompt ends with the generation prompt.
#[test]
fn prompts_for_grpo() {
    let tok = tokenizer();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data");
    let opts = LoaderOptions {
        prompts: true,
        ..options(8)
    };
    let cfg = |file: &str| {
        let mut c = config(serde_json::json!({"path": examples.join(file)}));
        c.shuffle = false;
        c
    };
    let batches = run(&cfg("arith_prompts_test.jsonl"), &tok, opts, Cursor::default());
    // 50 prompts: six whole batches of 8, the last 2 dropped (as TRL's sampler drops them).
    assert_eq!(batches.len(), 6);
    let Batch::Prompts(first) = &batches[0].0 else {
        panic!("prompt batches")
    };
    assert_eq!(first.prompts.len(), 8);
    let p = &first.prompts[0];
    assert_eq!(p.columns["answer"], "83");
    assert_eq!(p.prompt[0]["content"], "Compute 28 plus 55.");
    let text = tok.decode(&p.prompt_ids, false).unwrap();
    assert!(text.ends_with("<|im_start|>assistant\n"), "{text:?}");
    assert!(text.contains("Compute 28 plus 55."), "{text:?}");

    // Pairs read as prompts: the chosen and rejected answers are columns like any other.
    let pipeline = Pipeline::new(&cfg("arith_pref_test.jsonl"), tok.clone(), opts).unwrap();
    assert!(pipeline.prompts && !pipeline.preference);
    let Encoded::Prompt(p) = &pipeline.preview(1).unwrap()[0].1 else {
        panic!("a prompt")
    };
    let mut columns: Vec<&str> = p.columns.keys().map(String::as_str).collect();
    columns.sort_unstable();
    assert_eq!(columns, ["chosen", "rejected"]);
    // Without GRPO, a prompt-only dataset is detected as such (and refused by the trainer).
    let plain = Pipeline::new(&cfg("arith_prompts_test.jsonl"), tok, options(8)).unwrap();
    assert!(plain.prompts);
}
