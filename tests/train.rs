//! The trainer against a PEFT + PyTorch run (`tests/fixtures/train/make_train_fixtures.py`):
//! per-step losses and the final adapter; an interrupted-and-resumed run against the
//! uninterrupted one; config errors that name the file and key.

mod common;

use std::path::Path;

use burn::backend::Autodiff;
use burn::tensor::DType;
use common::{job_yaml, load_job, rel_err, train_dir};
use safetensors::SafeTensors;
use temper::backend::CpuBackend;
use temper_trainer::{Job, Resume, TrainOptions, train};

type AD = Autodiff<CpuBackend>;

fn run(job: &Job, options: TrainOptions) -> temper_trainer::Summary {
    train::<AD>(job, &Default::default(), DType::F32, options).unwrap()
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(train_dir().join("expected.json")).unwrap()).unwrap()
}

/// PyTorch + PEFT's per-step losses of the fixture run.
fn peft_losses() -> Vec<f32> {
    expected()["loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

/// The rows of a run's `metrics.jsonl`.
fn metrics_rows(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The trained tensors of an output directory: the adapter, or the whole model of a full
/// fine-tuning (f32 either way).
fn adapter(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let file = match dir.join("adapter_model.safetensors") {
        a if a.exists() => a,
        _ => dir.join("model.safetensors"),
    };
    let bytes = std::fs::read(file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| {
            let values = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (name, values)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The first three steps of the same LoRA run on Qwen3, Gemma 3, Phi-3 (fused projections,
/// partial rotary, long-RoPE: rows longer than its pretraining length take the long factors),
/// Qwen3-MoE and Mixtral (all-linear: attention, routers and PEFT's stacked experts, with the
/// load-balancing loss) equal PyTorch + PEFT's: losses, grad norms, learning rates, and the
/// mixtures' `aux_loss` (`make_train_fixtures.py --families`).
#[test]
fn lora_sft_on_each_family_matches_peft() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["qwen3_qk_norm", "gemma3_text", "phi3_longrope", "qwen3_moe", "mixtral"] {
        let dir = train_dir().join("families").join(name);
        let out = tmp.path().join(name);
        let yaml = job_yaml(&out)
            .replace(
                &train_dir().join("tiny").display().to_string(),
                &dir.join("model").display().to_string(),
            )
            .replace(
                &train_dir().join("init_adapter").display().to_string(),
                &dir.join("init_adapter").display().to_string(),
            );
        // The 10-step run's schedule, stopped after its third step.
        let job = load_job(tmp.path(), &yaml, &[]).unwrap();
        let options = TrainOptions {
            stop_after_steps: Some(3),
            ..TrainOptions::default()
        };
        let summary = run(&job, options);
        assert_eq!(summary.steps, 3, "{name}");
        let exp: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
        for (i, row) in metrics_rows(&out).iter().enumerate() {
            for key in ["loss", "grad_norm", "learning_rate", "aux_loss"] {
                if exp.get(key).is_none() {
                    assert!(row.get(key).is_none(), "{name}: {key} logged without a mixture of experts");
                    continue;
                }
                let got = row[key].as_f64().unwrap_or_else(|| panic!("{name}: no {key} in {row}"));
                let want = exp[key][i].as_f64().unwrap();
                // Gemma 3's third grad norm is 1.3e-4 from PEFT's where OpenBLAS runs its
                // AVX-512 kernels (Zen 4, Cooper Lake: another order of f32 sums, carried
                // through two updates at lr 1e-2), under 1e-4 with its Zen or Haswell ones.
                let tolerance = if key == "grad_norm" { 3e-4 } else { 1e-4 };
                assert!(
                    (got - want).abs() <= tolerance * want.abs().max(1e-12),
                    "{name}, step {}: {key} {got} vs PEFT's {want}",
                    i + 1
                );
            }
        }
    }
}

#[test]
fn lora_sft_matches_peft_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let full_out = tmp.path().join("full");
    let job = load_job(tmp.path(), &job_yaml(&full_out), &[]).unwrap();
    let summary = run(&job, TrainOptions::default());
    assert_eq!(summary.steps, 10);

    // Per-step losses equal PyTorch + PEFT's.
    let exp = expected();
    let want = peft_losses();
    let got: Vec<f32> = summary.losses.iter().map(|l| l.1 as f32).collect();
    let err = rel_err(&got, &want, |_| true);
    assert!(err < 1e-4, "losses differ by {err}: {got:?} vs {want:?}");
    // ... and so do the logged grad norms and learning rates.
    for (i, row) in metrics_rows(&full_out).iter().enumerate() {
        let gn = row["grad_norm"].as_f64().unwrap();
        let want_gn = exp["grad_norm"][i].as_f64().unwrap();
        assert!(
            (gn - want_gn).abs() / want_gn < 1e-4,
            "step {}: grad_norm {gn} vs {want_gn}",
            i + 1
        );
        let lr = row["learning_rate"].as_f64().unwrap();
        assert!(
            (lr - exp["learning_rate"][i].as_f64().unwrap()).abs() < 1e-12,
            "step {}: lr",
            i + 1
        );
    }
    // The final adapter equals PEFT's, tensor by tensor.
    let ours = adapter(&full_out);
    let theirs = adapter(&train_dir().join("final_adapter"));
    assert_eq!(
        ours.iter().map(|t| &t.0).collect::<Vec<_>>(),
        theirs.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    for ((name, a), (_, b)) in ours.iter().zip(&theirs) {
        let err = rel_err(a, b, |_| true);
        assert!(err < 1e-4, "{name}: {err}");
    }

    // Interrupted after 4 steps (as Ctrl-C would), then resumed: the same curve and adapter.
    // With activation checkpointing per block, which must not change a step.
    let out = tmp.path().join("resumed");
    let job = load_job(tmp.path(), &job_yaml(&out), &["training.gradient_checkpointing=true"]).unwrap();
    let first = run(
        &job,
        TrainOptions {
            stop_after_steps: Some(4),
            ..Default::default()
        },
    );
    assert!(first.interrupted && first.steps == 4);
    assert!(out.join("checkpoint-4/trainer_state.json").exists());
    assert!(
        !out.join("adapter_model.safetensors").exists(),
        "no final adapter for an interrupted run"
    );
    let second = run(
        &job,
        TrainOptions {
            resume: Some(Resume::Latest),
            ..Default::default()
        },
    );
    assert_eq!(second.steps, 10);
    let resumed: Vec<f32> = second.losses.iter().map(|l| l.1 as f32).collect();
    assert_eq!(resumed.len(), 10);
    let err = rel_err(&resumed, &got, |_| true);
    assert!(err < 1e-6, "resumed curve differs by {err}: {resumed:?} vs {got:?}");
    for ((name, a), (_, b)) in adapter(&out).iter().zip(&ours) {
        assert!(rel_err(a, b, |_| true) < 1e-6, "{name} after resume");
    }
}

/// f16's dynamic loss scaling, driven on f32 (the CPU backend has no f16): a power-of-two scale
/// changes no step; a scale that overflows skips steps (no update), halving each time until
/// the gradients are finite, and a run interrupted among those resumes exactly.
#[test]
fn loss_scaling_skips_overflowing_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let scaled = |name: &str, scale: f64, steps: u64, opts: TrainOptions| {
        let out = tmp.path().join(name);
        let yaml = job_yaml(&out).replace("  max_steps: 10\n", &format!("  max_steps: {steps}\n"));
        let job = load_job(tmp.path(), &yaml, &[]).unwrap();
        let summary = run(
            &job,
            TrainOptions {
                loss_scale: Some(scale),
                ..opts
            },
        );
        (summary, out)
    };
    // 1024: every product stays exact, so the run is PEFT's.
    let (summary, out) = scaled("x1024", 1024.0, 10, TrainOptions::default());
    let want = peft_losses();
    let got: Vec<f32> = summary.losses.iter().map(|l| l.1 as f32).collect();
    assert!(rel_err(&got, &want, |_| true) < 1e-4, "{got:?} vs {want:?}");
    for ((name, a), (_, b)) in adapter(&out).iter().zip(adapter(&train_dir().join("final_adapter"))) {
        assert!(rel_err(a, &b, |_| true) < 1e-4, "{name}");
    }
    // 2^140 is infinite in f32: steps are skipped until the scale is small enough.
    let (_, out) = scaled("overflow", 2f64.powi(140), 24, TrainOptions::default());
    let rows = metrics_rows(&out);
    let skipped = rows.iter().take_while(|r| r["grad_norm"].is_null()).count();
    assert!((13..20).contains(&skipped), "{skipped} skipped: {rows:?}");
    assert!(
        rows[skipped..]
            .iter()
            .all(|r| r["grad_norm"].as_f64().is_some_and(f64::is_finite))
    );
    let scales: Vec<f64> = rows.iter().map(|r| r["loss_scale"].as_f64().unwrap()).collect();
    assert_eq!(scales[0], 2f64.powi(139));
    assert_eq!(scales[skipped - 1], 2f64.powi(140 - skipped as i32));
    let init = adapter(&train_dir().join("init_adapter"));
    let trained = adapter(&out);
    assert!(trained.iter().all(|(_, v)| v.iter().all(|x| x.is_finite())));
    assert_ne!(init, trained);
    // Interrupted among the skipped steps, then resumed: the same run.
    let (first, resumed) = scaled(
        "overflow-resumed",
        2f64.powi(140),
        24,
        TrainOptions {
            stop_after_steps: Some(8),
            ..Default::default()
        },
    );
    assert!(first.interrupted);
    let job = load_job(
        tmp.path(),
        &job_yaml(&resumed).replace("  max_steps: 10\n", "  max_steps: 24\n"),
        &[],
    )
    .unwrap();
    run(
        &job,
        TrainOptions {
            resume: Some(Resume::Latest),
            ..Default::default()
        },
    );
    for ((name, a), (_, b)) in adapter(&resumed).iter().zip(&trained) {
        assert!(rel_err(a, b, |_| true) < 1e-6, "{name} after resume");
    }
}

/// Full fine-tuning (every weight, the embedding included) with activation checkpointing per
/// decoder block takes the same steps as without.
#[test]
fn full_fine_tuning_with_activation_checkpointing() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = |name: &str, checkpointing: bool| {
        let out = tmp.path().join(name);
        let yaml = job_yaml(&out)
            .replace(
                &format!(
                    "  type: lora\n  path: {}\n  loraplus_lr_ratio: 2.0\n",
                    train_dir().join("init_adapter").display()
                ),
                "  type: full\n",
            )
            .replace("  max_steps: 10\n", "  max_steps: 3\n")
            .replace("1.0e-2", "1.0e-3");
        assert!(yaml.contains("type: full"), "{yaml}");
        let set = format!("training.gradient_checkpointing={checkpointing}");
        run(&load_job(tmp.path(), &yaml, &[&set]).unwrap(), TrainOptions::default());
        metrics_rows(&out)
            .iter()
            .map(|row| (row["loss"].as_f64().unwrap(), row["grad_norm"].as_f64().unwrap()))
            .collect::<Vec<_>>()
    };
    let (plain, checkpointed) = (steps("plain", false), steps("checkpointed", true));
    assert_eq!(plain.len(), 3);
    for ((l, g), (lc, gc)) in plain.iter().zip(&checkpointed) {
        assert!(close(*l, *lc) && close(*g, *gc), "{plain:?} vs {checkpointed:?}");
    }
}

#[test]
fn checkpoints_rotate_and_the_loss_is_watched() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let job = load_job(
        tmp.path(),
        &job_yaml(&out),
        &[
            "training.save_steps=2",
            "training.save_total_limit=2",
            "training.max_steps=6",
        ],
    )
    .unwrap();
    run(&job, TrainOptions::default());
    let kept: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("checkpoint"))
        .collect();
    let mut kept = kept;
    kept.sort();
    assert_eq!(kept, vec!["checkpoint-4", "checkpoint-6"]);
    assert!(
        out.join("runs").read_dir().unwrap().next().is_some(),
        "a TensorBoard event file"
    );
    assert!(out.join("config.yaml").exists());

    // A learning rate that blows the weights up: the run stops and names the step.
    let out = tmp.path().join("nan");
    let job = load_job(
        tmp.path(),
        &job_yaml(&out),
        &["training.learning_rate=1.0e30", "training.warmup_steps=0"],
    )
    .unwrap();
    let err = train::<AD>(&job, &Default::default(), DType::F32, TrainOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("step ") && err.contains("the loss is"), "{err}");

    // Pre-tokenized ids past the tiny model's 128-token vocabulary, in the training data and in
    // the evaluation data: an error naming where, not a panic inside the backend.
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"input_ids\": [5, 6, 7, 500], \"labels\": [5, 6, 7, 500]}\n").unwrap();
    for (key, during) in [("data.path", "step 1"), ("data.eval.path", "evaluation data")] {
        let out = tmp.path().join("vocab");
        let set = format!("{key}={}", bad.display());
        let job = load_job(tmp.path(), &job_yaml(&out), &[&set, "training.eval_steps=1"]).unwrap();
        let err = train::<AD>(&job, &Default::default(), DType::F32, TrainOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(during) && err.contains("token id 500"), "{key}: {err}");
    }
}

#[test]
fn config_errors_name_file_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let yaml = job_yaml(&out);
    let cases: [(&str, Vec<&str>, &str); 11] = [
        (
            "misspelled key",
            vec!["training.learnin_rate=1"],
            "unknown field `learnin_rate`",
        ),
        ("r = 0", vec!["adapter.r=0"], "adapter.r: must be > 0"),
        (
            "lr < 0",
            vec!["training.learning_rate=-1"],
            "training.learning_rate: must be > 0",
        ),
        (
            "wrong type",
            vec!["training.micro_batch_size=two"],
            "training.micro_batch_size",
        ),
        (
            "bad enum",
            vec!["training.lr_scheduler=exponential"],
            "training.lr_scheduler",
        ),
        (
            "missing model",
            vec!["model.path=/nonexistent/model"],
            "model.path: /nonexistent/model does not exist",
        ),
        (
            "packing without length",
            vec!["data.packing=true", "data.max_length=null"],
            "data.packing",
        ),
        (
            "another objective's section",
            vec!["training.objective=dpo", "training.orpo.beta=0.2"],
            "training.orpo: applies to `objective: orpo`, but the objective is `dpo`",
        ),
        (
            "weights for the losses",
            vec![
                "training.objective=dpo",
                "training.dpo.loss_type=[sigmoid, sft]",
                "training.dpo.loss_weights=[1]",
            ],
            "training.dpo.loss_weights: has 1 weights for 2 loss types",
        ),
        (
            "unknown loss",
            vec!["training.objective=dpo", "training.dpo.loss_type=[sigmoid, kto]"],
            "training.dpo.loss_type",
        ),
        (
            "robust's flip rate",
            vec![
                "training.objective=dpo",
                "training.dpo.loss_type=robust",
                "training.dpo.label_smoothing=0.5",
            ],
            "training.dpo.label_smoothing: must be in [0, 0.5 for the robust loss)",
        ),
    ];
    for (what, overrides, want) in cases {
        let err = load_job(tmp.path(), &yaml, &overrides).expect_err(what);
        assert!(err.contains("job.yaml") && err.contains(want), "{what}: {err}");
    }
    // Checked against the model before its weights load: longer than its context (256).
    let job = load_job(tmp.path(), &yaml, &["data.max_length=4096"]).unwrap();
    let err = train::<AD>(&job, &Default::default(), DType::F32, TrainOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("data.max_length") && err.contains("context (256)"),
        "{err}"
    );
}

/// DPO from the fixture adapter on `pref.jsonl`, 3 steps of 4 pairs, as make_dpo_fixtures.py.
fn dpo_yaml(out: &Path, loss_type: &str, label_smoothing: f64) -> String {
    preference_yaml(
        out,
        &format!("objective: dpo\n  dpo: {{beta: 0.1, loss_type: {loss_type}, label_smoothing: {label_smoothing}}}"),
    )
}

/// A preference job from the fixture adapter on `pref.jsonl`; `objective` is the lines that
/// choose and configure the objective under `training:`.
/// Every metric TRL logged (`want`: one object per step) equals ours within 1e-4, relative,
/// or absolute below 1e-2 (rewards start at exactly 0, policy == reference).
fn assert_metrics_match(case: &str, rows: &[serde_json::Value], want: &serde_json::Value) {
    let want = want.as_array().unwrap();
    assert_eq!(rows.len(), want.len(), "{case}");
    for (step, (row, want)) in rows.iter().zip(want).enumerate() {
        for (key, b) in want.as_object().unwrap() {
            let (a, b) = (row[key].as_f64().unwrap_or(f64::NAN), b.as_f64().unwrap());
            let tol = 1e-4 * b.abs().max(1e-2);
            assert!((a - b).abs() <= tol, "{case} step {}: {key} {a} vs TRL {b}", step + 1);
        }
    }
}

fn preference_yaml(out: &Path, objective: &str) -> String {
    format!(
        r#"
model:
  path: {tiny}
adapter:
  type: lora
  path: {init}
data:
  path: {data}
  max_length: 64
training:
  {objective}
  max_steps: 3
  micro_batch_size: 4
  learning_rate: 1.0e-2
  lr_scheduler: constant
  precision: f32
output_dir: {out}
"#,
        tiny = train_dir().join("tiny").display(),
        init = train_dir().join("init_adapter").display(),
        data = train_dir().join("pref.jsonl").display(),
        out = out.display(),
    )
}

/// KTO's three steps equal TRL's `KTOTrainer` (`make_kto_fixtures.py`): losses, grad norms and
/// every metric it logs, on unpaired completions (batches of 3, the KL pairs rotated within
/// each) and on pairs that TRL unpairs.
#[test]
fn kto_matches_trl() {
    let tmp = tempfile::tempdir().unwrap();
    let exp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(train_dir().join("kto_expected.json")).unwrap()).unwrap();
    let unpaired = format!("data.path={}", train_dir().join("kto.jsonl").display());
    let cases: [(&str, &str, Vec<&str>); 6] = [
        ("kto", "{}", vec![&unpaired, "training.micro_batch_size=3"]),
        (
            "weights",
            "{desirable_weight: 1.5, undesirable_weight: 0.5}",
            vec![&unpaired, "training.micro_batch_size=3"],
        ),
        (
            "apo_zero_unpaired",
            "{loss_type: apo_zero_unpaired}",
            vec![&unpaired, "training.micro_batch_size=3"],
        ),
        ("paired", "{}", vec![]),
        (
            "precompute",
            "{precompute_ref_log_probs: true}",
            vec![&unpaired, "training.micro_batch_size=3"],
        ),
        (
            "apo_precompute",
            "{loss_type: apo_zero_unpaired, precompute_ref_log_probs: true}",
            vec![&unpaired, "training.micro_batch_size=3"],
        ),
    ];
    for (case, section, mut set) in cases {
        set.push("data.shuffle=false");
        let out = tmp.path().join(case);
        let objective = format!("objective: kto\n  kto: {section}");
        let job = load_job(tmp.path(), &preference_yaml(&out, &objective), &set).unwrap();
        run(&job, TrainOptions::default());
        assert_eq!(
            out.join("ref_logps.bin").exists(),
            case.ends_with("precompute"),
            "{case}"
        );
        let rows = metrics_rows(&out);
        assert_metrics_match(case, &rows, &exp[case]);
        for (step, (row, want)) in rows.iter().zip(exp[case].as_array().unwrap()).enumerate() {
            let want = want.as_object().unwrap();
            // A side with no row in the batch is not logged (TRL's paired case: a batch of
            // chosen completions only).
            for key in ["rewards/rejected", "rewards/margins"] {
                assert_eq!(
                    row.get(key).is_some(),
                    want.contains_key(key),
                    "{case} step {}: {key}",
                    step + 1
                );
            }
        }
    }
    // Shuffled, into a second epoch (new micro-batches, new KL pairs), and resumed: the
    // precomputed reference covers every micro-batch the run sees, so it trains as the live one.
    // The first part of the precomputed run is a 3-step run, resumed as a 5-step one: the
    // reference then covers the steps it did not.
    let shuffled = |name: &str, precompute: bool, steps: &str| {
        let out = tmp.path().join(name);
        let objective = format!("objective: kto\n  kto: {{precompute_ref_log_probs: {precompute}}}");
        let set = [unpaired.as_str(), "training.micro_batch_size=3", steps];
        (
            load_job(tmp.path(), &preference_yaml(&out, &objective), &set).unwrap(),
            out,
        )
    };
    let (live, live_out) = shuffled("shuffled_live", false, "training.max_steps=5");
    run(&live, TrainOptions::default());
    let (pre, _) = shuffled("shuffled_precompute", true, "training.max_steps=3");
    let first = run(
        &pre,
        TrainOptions {
            stop_after_steps: Some(2),
            ..Default::default()
        },
    );
    assert!(first.interrupted);
    let (pre, pre_out) = shuffled("shuffled_precompute", true, "training.max_steps=5");
    run(
        &pre,
        TrainOptions {
            resume: Some(Resume::Latest),
            ..Default::default()
        },
    );
    let (a, b) = (metrics_rows(&pre_out), metrics_rows(&live_out));
    assert_eq!(a.len(), 5);
    for (x, y) in a.iter().zip(&b) {
        for key in ["loss", "kl", "grad_norm"] {
            let (x, y) = (x[key].as_f64().unwrap(), y[key].as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-5 * y.abs().max(1.0),
                "{key}: precomputed {x} vs live {y}"
            );
        }
    }
}

/// Reward modelling's three steps equal TRL's `RewardTrainer` (`make_reward_fixtures.py`):
/// losses, grad norms and its metrics, for a LoRA adapter with the `score` head in full (plain,
/// with a `margin` column, with centring, over two accumulated micro-batches) and for full
/// fine-tuning of a `LlamaForSequenceClassification` checkpoint. The LoRA run's adapter equals
/// TRL's, and saves as PEFT's SEQ_CLS adapter; the full run saves a classifier directory.
#[test]
fn reward_matches_trl() {
    let tmp = tempfile::tempdir().unwrap();
    let exp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(train_dir().join("reward_expected.json")).unwrap()).unwrap();
    let margin = format!("data.path={}", train_dir().join("reward_margin.jsonl").display());
    let init = format!("adapter.path={}", train_dir().join("init_reward_adapter").display());
    let tiny_rm = format!("model.path={}", train_dir().join("tiny_rm").display());
    let cases: [(&str, &str, Vec<&str>); 5] = [
        ("lora", "{}", vec![]),
        ("margin", "{}", vec![&margin]),
        ("center", "{center_rewards_coefficient: 0.1}", vec![]),
        (
            "accumulate",
            "{}",
            vec!["training.micro_batch_size=2", "training.gradient_accumulation_steps=2"],
        ),
        (
            "full",
            "{}",
            vec![
                &tiny_rm,
                "adapter.type=full",
                "adapter.path=null",
                "training.learning_rate=1e-3",
            ],
        ),
    ];
    for (case, section, own) in cases {
        // The case's own overrides come last, so they win.
        let set: Vec<&str> = [init.as_str(), "data.shuffle=false"].into_iter().chain(own).collect();
        let out = tmp.path().join(case);
        let objective = format!("objective: reward\n  reward: {section}");
        let job = load_job(tmp.path(), &preference_yaml(&out, &objective), &set).unwrap();
        run(&job, TrainOptions::default());
        assert_metrics_match(case, &metrics_rows(&out), &exp[case]);
    }
    // The adapter after three steps equals TRL's, `score` included, in PEFT's SEQ_CLS layout.
    let ours = adapter(&tmp.path().join("lora"));
    let theirs = adapter(&train_dir().join("final_reward_adapter"));
    assert_eq!(
        ours.iter().map(|t| &t.0).collect::<Vec<_>>(),
        theirs.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    for ((name, a), (_, b)) in ours.iter().zip(&theirs) {
        let err = rel_err(a, b, |_| true);
        assert!(err < 1e-4, "{name}: {err}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("lora/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(
        (&config["task_type"], &config["modules_to_save"]),
        (&"SEQ_CLS".into(), &serde_json::json!(["score"]))
    );
    // Full fine-tuning writes a classifier transformers loads: `score`, no `lm_head`, the pad id.
    let full = tmp.path().join("full");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(full.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(
        (&config["pad_token_id"], &config["id2label"]["0"]),
        (&2.into(), &"LABEL_0".into())
    );
    let names: Vec<String> = adapter(&full).into_iter().map(|t| t.0).collect();
    assert!(names.contains(&"score.weight".to_string()) && !names.iter().any(|n| n.starts_with("lm_head")));
    // `temper score` with TRL's trained adapter on the causal base gives transformers' scores.
    let score = |model: &str, adapter: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_temper"));
        cmd.arg("score").arg("--model").arg(train_dir().join(model));
        if let Some(a) = adapter {
            cmd.arg("--adapter").arg(train_dir().join(a));
        }
        cmd.arg("--data").arg(train_dir().join("pref.jsonl")).output().unwrap()
    };
    let out = score("tiny", Some("final_reward_adapter"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let want = exp["scores"].as_array().unwrap();
    assert_eq!(lines.len(), want.len());
    for (line, want) in lines.iter().zip(want) {
        for (side, b) in ["chosen", "rejected"].iter().zip(want.as_array().unwrap()) {
            let (a, b) = (line[side].as_f64().unwrap(), b.as_f64().unwrap());
            assert!(
                (a - b).abs() < 1e-4,
                "row {}: {side} {a} vs transformers {b}",
                line["row"]
            );
        }
    }
    // A model without a reward head is refused by name.
    let out = score("tiny", None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("has no reward head (`score`)"),
        "{err}"
    );

    // Full fine-tuning from a causal LM (a fresh head), interrupted and resumed: the resumed
    // run reads its head back from the classifier checkpoint and ends where an unbroken one does.
    let full_yaml = |out: &Path| preference_yaml(out, "objective: reward");
    let full_set = ["adapter.type=full", "adapter.path=null", "training.learning_rate=1e-3"];
    let straight = tmp.path().join("straight");
    let job = load_job(tmp.path(), &full_yaml(&straight), &full_set).unwrap();
    let want = run(&job, TrainOptions::default()).losses;
    let resumed = tmp.path().join("resumed");
    let job = load_job(tmp.path(), &full_yaml(&resumed), &full_set).unwrap();
    let first = run(
        &job,
        TrainOptions {
            stop_after_steps: Some(1),
            ..Default::default()
        },
    );
    assert!(first.interrupted);
    let got = run(
        &job,
        TrainOptions {
            resume: Some(Resume::Latest),
            ..Default::default()
        },
    )
    .losses;
    let a: Vec<f32> = got.iter().map(|l| l.1 as f32).collect();
    let b: Vec<f32> = want.iter().map(|l| l.1 as f32).collect();
    assert!(rel_err(&a, &b, |_| true) < 1e-6, "resumed {a:?} vs {b:?}");
    for ((name, x), (_, y)) in adapter(&resumed).iter().zip(adapter(&straight)) {
        assert!(rel_err(x, &y, |_| true) < 1e-6, "{name} after resume");
    }
    // A reward model does not generate.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_temper"))
        .args(["generate", "--prompt", "w5 w6", "--model"])
        .arg(&straight)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("does not generate"), "{err}");
}

#[test]
fn dpo_matches_trl() {
    let tmp = tempfile::tempdir().unwrap();
    let exp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(train_dir().join("dpo_expected.json")).unwrap()).unwrap();
    let dpo = |section: &str| format!("objective: dpo\n  dpo: {{beta: 0.1, {section}}}");
    let checkpointed = ["training.gradient_checkpointing=true"];
    let cases: [(&str, String, &[&str]); 11] = [
        ("sigmoid", dpo("loss_type: sigmoid"), &[]),
        ("hinge", dpo("loss_type: hinge"), &[]),
        ("ipo", dpo("loss_type: ipo"), &[]),
        ("robust", dpo("loss_type: robust, label_smoothing: 0.1"), &[]),
        ("sigmoid_norm", dpo("loss_type: sigmoid_norm"), &[]),
        ("rpo", dpo("loss_type: [sigmoid, sft], loss_weights: [1.0, 0.5]"), &[]),
        ("precompute", dpo("precompute_ref_log_probs: true"), &[]),
        (
            "simpo",
            "objective: simpo\n  simpo: {beta: 2.0, gamma: 0.5, label_smoothing: 0.1, cpo_alpha: 0.3}".into(),
            &[],
        ),
        ("orpo", "objective: orpo\n  orpo: {beta: 0.1}".into(), &[]),
        // Activation checkpointing per block changes no step (ORPO also reads prompt tokens).
        ("sigmoid", dpo("loss_type: sigmoid"), &checkpointed),
        ("orpo", "objective: orpo\n  orpo: {beta: 0.1}".into(), &checkpointed),
    ];
    for (i, (case, objective, set)) in cases.into_iter().enumerate() {
        let out = tmp.path().join(format!("{i}-{case}"));
        let job = load_job(tmp.path(), &preference_yaml(&out, &objective), set).unwrap();
        run(&job, TrainOptions::default());
        // Every metric TRL logged for the case (SimPO's and ORPO's `logits/*` are TRL's means
        // over all positions and the vocabulary; Temper logs DPO's per-token means).
        assert_metrics_match(case, &metrics_rows(&out), &exp[case]);
    }
    // Evaluation logs the same metrics with TRL's `eval_` names: at step 0 the policy is the
    // starting adapter, so on the training pairs they are TRL's first-step values.
    let out = tmp.path().join("eval");
    let eval_set = [
        format!("data.eval.path={}", train_dir().join("pref.jsonl").display()),
        "training.eval_steps=3".to_string(),
    ];
    let eval_set: Vec<&str> = eval_set.iter().map(String::as_str).collect();
    let job = load_job(
        tmp.path(),
        &preference_yaml(&out, &dpo("loss_type: sigmoid")),
        &eval_set,
    )
    .unwrap();
    run(&job, TrainOptions::default());
    let first = metrics_rows(&out).swap_remove(0);
    assert_eq!(first["step"], 0, "{first}");
    let trl = &exp["sigmoid"][0];
    for key in [
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
        "rewards/margins",
    ] {
        let (a, b) = (
            first[format!("eval_{key}")].as_f64().unwrap(),
            trl[key].as_f64().unwrap(),
        );
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1e-2), "eval_{key} {a} vs TRL {b}");
    }
    assert!(
        (first["eval_loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6,
        "{first}"
    );
    // The precomputed reference is saved with checkpoints, so a resumed run reads it back.
    let out = tmp.path().join("precompute-resume");
    let job = load_job(
        tmp.path(),
        &preference_yaml(&out, &dpo("precompute_ref_log_probs: true")),
        &["training.save_steps=1"],
    )
    .unwrap();
    let first = run(
        &job,
        TrainOptions {
            stop_after_steps: Some(1),
            ..Default::default()
        },
    );
    assert!(first.interrupted && out.join("checkpoint-1/ref_logps.bin").exists());
    std::fs::remove_file(out.join("ref_logps.bin")).unwrap();
    let resumed = run(
        &job,
        TrainOptions {
            resume: Some(Resume::Latest),
            ..Default::default()
        },
    );
    let want: Vec<f64> = exp["sigmoid"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["loss"].as_f64().unwrap())
        .collect();
    for ((_, a), b) in resumed.losses.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-4 * b.abs(), "{:?} vs {want:?}", resumed.losses);
    }
    // A fresh adapter (B = 0) is its own reference at the start: the first loss is ln 2.
    let out = tmp.path().join("fresh");
    let yaml = dpo_yaml(&out, "sigmoid", 0.0).replace(
        &format!("  path: {}\n", train_dir().join("init_adapter").display()),
        "  r: 4\n",
    );
    let job = load_job(tmp.path(), &yaml, &["training.max_steps=1"]).unwrap();
    let summary = run(&job, TrainOptions::default());
    assert!(
        (summary.losses[0].1 - std::f64::consts::LN_2).abs() < 1e-6,
        "{:?}",
        summary.losses
    );
    // SFT data under a DPO objective is refused by name.
    let job = load_job(
        tmp.path(),
        &dpo_yaml(&out, "sigmoid", 0.0),
        &[&format!("data.path={}", train_dir().join("data.jsonl").display())],
    )
    .unwrap();
    let err = train::<AD>(&job, &Default::default(), DType::F32, TrainOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("training.objective") && err.contains("preference data"),
        "{err}"
    );
}

/// `temper train` with the model given by Hub id, found offline in a Hugging Face cache, as a
/// user runs it: the adapter records the id, the model card describes the run, and
/// `hub.push` without a token fails before training.
/// `precision: bf16` on the CPU (bf16 frozen base, bf16 products with f32 sums, f32 adapters,
/// optimizer and loss): the PEFT SFT run and TRL's DPO run stay within bf16's tolerance of their
/// f32 references, and are not the f32 run itself.
#[test]
fn bf16_products_stay_within_bf16_of_the_references() {
    let tmp = tempfile::tempdir().unwrap();
    let bf16 = || TrainOptions {
        products: temper_kernels::Products::Bf16,
        ..Default::default()
    };
    let within = |what: &str, got: &[f64], want: &[f64], tol: f64| {
        assert_eq!(got.len(), want.len(), "{what}");
        let mut largest = 0f64;
        for (step, (a, b)) in got.iter().zip(want).enumerate() {
            let err = (a - b).abs() / b.abs().max(1e-2);
            assert!(err <= tol, "{what} step {}: {a} vs {b} (relative {err:.2e})", step + 1);
            largest = largest.max(err);
        }
        largest
    };
    // SFT against PyTorch + PEFT (f32).
    let out = tmp.path().join("sft");
    let job = load_job(tmp.path(), &job_yaml(&out), &[]).unwrap();
    let got: Vec<f64> = run(&job, bf16()).losses.iter().map(|l| l.1).collect();
    let want: Vec<f64> = peft_losses().iter().map(|&l| l as f64).collect();
    let largest = within("sft loss", &got, &want, 1e-2);
    assert!(largest > 1e-6, "the bf16 run equals the f32 one: were its products bf16?");
    // DPO (sigmoid) against TRL: loss and reward margins.
    let exp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(train_dir().join("dpo_expected.json")).unwrap()).unwrap();
    let out = tmp.path().join("dpo");
    let yaml = preference_yaml(&out, "objective: dpo\n  dpo: {beta: 0.1, loss_type: sigmoid}");
    let job = load_job(tmp.path(), &yaml, &[]).unwrap();
    run(&job, bf16());
    let rows = metrics_rows(&out);
    for key in ["loss", "logps/chosen", "logps/rejected"] {
        let got: Vec<f64> = rows.iter().map(|r| r[key].as_f64().unwrap()).collect();
        let want: Vec<f64> = exp["sigmoid"].as_array().unwrap().iter().map(|r| r[key].as_f64().unwrap()).collect();
        within(&format!("dpo {key}"), &got, &want, 1e-2);
    }
}

#[test]
fn hub_ids_and_the_model_card() {
    let tmp = tempfile::tempdir().unwrap();
    let sha = "1111111111111111111111111111111111111111";
    let cache = tmp.path().join("hf/hub");
    let repo = cache.join("models--temper-test--tiny");
    let snapshot = repo.join("snapshots").join(sha);
    std::fs::create_dir_all(&snapshot).unwrap();
    for f in std::fs::read_dir(train_dir().join("tiny")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, snapshot.join(f.file_name().unwrap())).unwrap();
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), sha).unwrap();

    let out = tmp.path().join("out");
    let yaml = job_yaml(&out).replace(&train_dir().join("tiny").display().to_string(), "temper-test/tiny");
    std::fs::write(tmp.path().join("job.yaml"), yaml).unwrap();
    let temper = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_temper"))
            .arg("train")
            .arg(tmp.path().join("job.yaml"))
            .args(args)
            .env("HF_HOME", tmp.path().join("hf"))
            .env("HF_HUB_OFFLINE", "1")
            .env_remove("HF_TOKEN")
            .env_remove("HF_HUB_CACHE")
            .env_remove("HF_TOKEN_PATH")
            .output()
            .unwrap()
    };
    let run = temper(&[
        "--set",
        "training.max_steps=2",
        "--set",
        "training.eval_steps=2",
        "--set",
        &format!("data.eval.path={}", train_dir().join("data.jsonl").display()),
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));

    let adapter_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(adapter_config["base_model_name_or_path"], "temper-test/tiny");
    let config = std::fs::read_to_string(out.join("config.yaml")).unwrap();
    assert!(config.contains("path: temper-test/tiny"), "{config}");
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    let metrics = metrics_rows(&out);
    let last_loss = metrics.iter().rev().find_map(|r| r["loss"].as_f64()).unwrap();
    let eval_loss = metrics.iter().rev().find_map(|r| r["eval_loss"].as_f64()).unwrap();
    for want in [
        "---\nbase_model: \"temper-test/tiny\"\nlibrary_name: peft\npipeline_tag: text-generation\n",
        "- \"base_model:adapter:temper-test/tiny\"\n- lora\n- sft\n- temper\n---",
        "| learning rate | 0.01 (linear schedule) |",
        "| batch | 2 per micro-batch × 2 accumulation steps |",
        "| steps | 2 of 2 |",
        // 2 steps × 2 micro-batches × 2 examples, unpacked.
        "Seen in training: 8 examples",
        &format!("| loss | {last_loss:.6} |"),
        &format!("| eval_loss | {eval_loss:.6} |"),
        "PeftModel.from_pretrained(base, \"out\")",
        "- burn 0.21.0",
    ] {
        assert!(card.contains(want), "missing {want:?} in\n{card}");
    }

    // Another revision is not in the cache, and the Hub is offline.
    let run = temper(&["--set", "model.revision=v9"]);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        !run.status.success() && err.contains("model.path") && err.contains("v9") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
    // Pushing needs a token: said before any training.
    let run = temper(&["--set", "hub.push=true", "--set", "hub.repo=me/tiny-sft"]);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        !run.status.success() && err.contains("hub.push") && err.contains("HF_TOKEN"),
        "{err}"
    );
    assert!(!err.contains("step 1/"), "{err}");
}

/// A free TCP port on the loopback interface, with `span` free ports above it too (the
/// collective's data ports) as far as a quick bind can tell.
fn free_port(span: u16) -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        if port < 60000 && (1..=span).all(|i| std::net::TcpListener::bind(("127.0.0.1", port + i)).is_ok()) {
            return port;
        }
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-5 * b.abs().max(1e-3)
}

/// The loss of each step; a step logged twice (redone after a restart) counts once, its last.
fn metrics_losses(out: &Path) -> Vec<f64> {
    let mut by_step = std::collections::BTreeMap::new();
    for row in metrics_rows(out) {
        by_step.insert(row["step"].as_u64().unwrap(), row["loss"].as_f64().unwrap());
    }
    by_step.into_values().collect()
}

fn assert_same_run(a: &Path, b: &Path, what: &str) {
    let (la, lb) = (metrics_losses(a), metrics_losses(b));
    assert_eq!(la.len(), lb.len(), "{what}");
    for (x, y) in la.iter().zip(&lb) {
        assert!(close(*x, *y), "{what}: losses {la:?} vs {lb:?}");
    }
    assert_same_adapter(a, b, what);
}

/// The adapters in `a` and `b` have the same tensors, equal within 1e-5.
fn assert_same_adapter(a: &Path, b: &Path, what: &str) {
    for ((na, va), (nb, vb)) in adapter(a).iter().zip(adapter(b)) {
        assert_eq!(na, &nb);
        let worst = va.iter().zip(&vb).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "{what}: {na} differs by {worst}");
    }
}

/// Data parallelism through `temper launch`, as users run it: 2 workers with micro-batch b
/// train as 1 worker with 2b (losses and adapter); two nodes on loopback give the same result
/// over many all-reduces; a worker killed mid-run stops the group, is named, and
/// `--max-restarts 1` finishes from the last checkpoint with the uninterrupted run's adapter.
#[test]
fn data_parallel_launch() {
    let tmp = tempfile::tempdir().unwrap();
    let exe = env!("CARGO_BIN_EXE_temper");
    let job = |out: &Path, steps: u64| {
        let yaml = job_yaml(out)
            .replace("  max_steps: 10\n", &format!("  max_steps: {steps}\n  save_steps: 5\n"))
            .replace("  gradient_accumulation_steps: 2\n", "");
        let path = out.with_extension("yaml");
        std::fs::write(&path, yaml).unwrap();
        path
    };
    let launch = |job: &Path, args: &[String]| {
        std::process::Command::new(exe)
            .arg("launch")
            .args(args)
            .arg(job)
            .env_remove("RANK")
            .env_remove("WORLD_SIZE")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let finish = |child: std::process::Child| {
        let out = child.wait_with_output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let port = |p: u16| vec!["--master-port".to_string(), p.to_string()];

    // One worker with micro-batch 4 (in this process), then two workers with micro-batch 2
    // each (through `temper launch`): the same run. Returns the one worker's output and the
    // launcher's log.
    let one_and_two = |name: &str, job: &dyn Fn(&Path) -> std::path::PathBuf, steps: u64| {
        let single = tmp.path().join(format!("{name}-one"));
        let one = train::<AD>(
            &Job::load(&job(&single), &["training.micro_batch_size=4".into()]).unwrap(),
            &Default::default(),
            DType::F32,
            TrainOptions::default(),
        );
        assert_eq!(one.unwrap().steps, steps, "{name}");
        let two = tmp.path().join(format!("{name}-two"));
        let mut args = vec!["--nproc-per-node".to_string(), "2".into()];
        args.extend(port(free_port(5)));
        let (ok, err) = finish(launch(&job(&two), &args));
        assert!(ok, "{err}");
        assert_same_run(&single, &two, &format!("{name}: 2 workers x 2 vs 1 worker x 4"));
        (single, err)
    };
    let (single, err) = one_and_two("lora", &|out| job(out, 12), 12);
    assert!(err.contains("data parallel: 2 workers"), "{err}");
    assert!(
        err.contains("engine burn (from the device)") && err.contains("through the host"),
        "{err}"
    );
    // NCCL sums on CUDA devices only: refused before any worker starts, naming the flag or key.
    let refused = tmp.path().join("refused");
    let (ok, err) = finish(launch(&job(&refused, 2), &["--engine".into(), "nccl".into()]));
    assert!(
        !ok && err.contains("--engine: the nccl engine sums gradients on CUDA devices"),
        "{err}"
    );
    let (ok, err) = finish(launch(
        &job(&refused, 2),
        &["--set".into(), "launch.engine=nccl".into()],
    ));
    assert!(!ok && err.contains("launch.engine: the nccl engine"), "{err}");
    let (ok, err) = finish(launch(
        &job(&refused, 2),
        &["--set".into(), "launch.engine=gloo".into()],
    ));
    assert!(!ok && err.contains("launch.engine") && err.contains("gloo"), "{err}");

    // Two nodes of one worker each, on loopback.
    let nodes = tmp.path().join("nodes");
    let p = free_port(5);
    let node = |rank: usize| {
        let mut a: Vec<String> = ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(["--node-rank".into(), rank.to_string()]);
        a.extend(port(p));
        launch(&job(&nodes, 12), &a)
    };
    let (n0, n1) = (node(0), node(1));
    let ((ok0, err0), (ok1, err1)) = (finish(n0), finish(n1));
    assert!(ok0 && ok1, "{err0}\n{err1}");
    assert_same_run(&single, &nodes, "2 nodes on loopback vs 1 worker x 4");

    // DPO the same way: 2 workers x 2 pairs = 1 worker x 4 pairs.
    let dpo_job = |out: &Path| {
        let path = out.with_extension("yaml");
        std::fs::write(&path, dpo_yaml(out, "sigmoid", 0.0)).unwrap();
        path
    };
    let dpo_one = tmp.path().join("dpo-one");
    train::<AD>(
        &Job::load(&dpo_job(&dpo_one), &[]).unwrap(),
        &Default::default(),
        DType::F32,
        TrainOptions::default(),
    )
    .unwrap();
    let dpo_two = tmp.path().join("dpo-two");
    let mut args: Vec<String> = ["--nproc-per-node", "2", "--set", "training.micro_batch_size=2"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(port(free_port(5)));
    let (ok, err) = finish(launch(&dpo_job(&dpo_two), &args));
    assert!(ok, "{err}");
    assert_same_run(&dpo_one, &dpo_two, "DPO: 2 workers x 2 pairs vs 1 worker x 4");

    // KTO the same way as TRL's two processes (make_kto_ddp_fixture.py): each worker's KL
    // estimate averaged over both before the loss, as TRL gathers it.
    let kto_two = tmp.path().join("kto-two");
    let kto_job = kto_two.with_extension("yaml");
    let yaml = preference_yaml(&kto_two, "objective: kto")
        .replace(
            &train_dir().join("pref.jsonl").display().to_string(),
            &train_dir().join("kto_ddp.jsonl").display().to_string(),
        )
        .replace("micro_batch_size: 4", "micro_batch_size: 3")
        .replace("  max_length: 64\n", "  max_length: 64\n  shuffle: false\n");
    std::fs::write(&kto_job, yaml).unwrap();
    let mut args = vec!["--nproc-per-node".to_string(), "2".into()];
    args.extend(port(free_port(5)));
    let (ok, err) = finish(launch(&kto_job, &args));
    assert!(ok, "{err}");
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(train_dir().join("kto_ddp_expected.json")).unwrap()).unwrap();
    let rows = metrics_rows(&kto_two);
    assert_eq!(rows.len(), 3);
    for (step, (row, want)) in rows.iter().zip(want.as_array().unwrap()).enumerate() {
        for key in ["loss", "grad_norm", "kl"] {
            let (a, b) = (row[key].as_f64().unwrap(), want[key].as_f64().unwrap());
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1e-2),
                "KTO, 2 workers, step {}: {key} {a} vs TRL's 2 processes {b}",
                step + 1
            );
        }
    }

    // GRPO the same way: each worker completes its own prompts (a completion's seed comes from
    // its prompt, so both draw what one worker would), the rewards are gathered, and `dapo`
    // divides by the completion tokens of both workers' rounds.
    let grpo_job = |out: &Path| {
        let path = job(out, 3);
        let yaml = std::fs::read_to_string(&path).unwrap();
        let data = train_dir().join("data.jsonl").display().to_string();
        assert!(yaml.contains(&data));
        let yaml = yaml
            .replace(&data, &train_dir().join("../bad/prompts_only.jsonl").display().to_string())
            .replace(
                "training:\n",
                "training:\n  objective: grpo\n  grpo: {num_generations: 2, max_completion_length: 6, \
                 rewards: [{type: length, target: 2, penalty: 0.5}]}\n",
            );
        std::fs::write(&path, yaml).unwrap();
        path
    };
    one_and_two("GRPO", &grpo_job, 3);
    // Rounds serving two steps, the group stopped mid-round (its checkpoint at step 3, the
    // second round's first step) and launched again for 5 steps: each worker continues its own
    // part of the round (rank 1's beside the checkpoint), as the uninterrupted group does.
    let grpo_rounds = |out: &Path, steps: u64| {
        let path = grpo_job(out);
        let yaml = std::fs::read_to_string(&path)
            .unwrap()
            .replace("max_completion_length: 6,", "max_completion_length: 6, num_iterations: 2,")
            .replace("  lr_scheduler: linear\n", "  lr_scheduler: constant\n")
            .replace(
                "  max_steps: 3\n  save_steps: 5\n",
                &format!("  max_steps: {steps}\n  save_steps: 3\n"),
            );
        assert!(yaml.contains("num_iterations: 2") && yaml.contains("save_steps: 3"));
        std::fs::write(&path, yaml).unwrap();
        path
    };
    let two_workers = |job: &Path| {
        let mut args = vec!["--nproc-per-node".to_string(), "2".into()];
        args.extend(port(free_port(5)));
        finish(launch(job, &args))
    };
    let whole = tmp.path().join("grpo-rounds-whole");
    let (ok, err) = two_workers(&grpo_rounds(&whole, 5));
    assert!(ok, "{err}");
    let parts = tmp.path().join("grpo-rounds-parts");
    let (ok, err) = two_workers(&grpo_rounds(&parts, 3));
    assert!(ok, "{err}");
    assert!(parts.join("grpo_rounds/step-3-rank-1.json").exists());
    let (ok, err) = two_workers(&grpo_rounds(&parts, 5));
    assert!(ok, "{err}");
    assert_same_run(&whole, &parts, "GRPO, 2 workers, resumed in the middle of a round");

    // Full fine-tuning the same way: every weight's gradient is all-reduced (SmolLM2's 538 MB
    // crashed burn-collective before its buffers went in chunks), and every weight must agree.
    let full_job = |out: &Path| {
        let path = job(out, 6);
        let lora = format!(
            "  type: lora\n  path: {}\n  loraplus_lr_ratio: 2.0\n",
            train_dir().join("init_adapter").display()
        );
        let yaml = std::fs::read_to_string(&path).unwrap();
        assert!(yaml.contains(&lora));
        std::fs::write(&path, yaml.replace(&lora, "  type: full\n")).unwrap();
        path
    };
    one_and_two("full fine-tuning", &full_job, 6);

    // Waits until rank 1 of the run in `dir` has done `step` steps.
    let reach = |dir: &Path, step: u64| {
        let beat = dir.join("logs/rank-1.heartbeat");
        let started = std::time::Instant::now();
        loop {
            let done: u64 = std::fs::read_to_string(&beat)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            if done >= step {
                break;
            }
            assert!(started.elapsed().as_secs() < 60, "rank 1 never reached step {step}");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    };

    // Kill rank 1 mid-run.
    let killed = tmp.path().join("killed");
    let run_and_signal = |max_restarts: u32, signal: &str| {
        let _ = std::fs::remove_dir_all(&killed);
        let mut args = vec!["--nproc-per-node".to_string(), "2".into(), "--max-restarts".into()];
        args.push(max_restarts.to_string());
        args.extend(["--hang-timeout".to_string(), "3".into()]);
        args.extend(port(free_port(10)));
        let child = launch(&job(&killed, 24), &args);
        reach(&killed, 7);
        signal_worker(child.id(), 1, signal);
        let stopped = std::time::Instant::now();
        let (ok, err) = finish(child);
        (ok, err, stopped.elapsed())
    };
    let (ok, err, took) = run_and_signal(0, "-KILL");
    assert!(!ok, "{err}");
    assert!(err.contains("rank 1 was killed by signal 9"), "{err}");
    assert!(took.as_secs() < 20, "the group took {took:?} to stop");
    // A hung worker (stopped, alive): found by the hang timeout (3 s here).
    let (ok, err, took) = run_and_signal(0, "-STOP");
    assert!(
        !ok && err.contains("finished no step for") && err.contains("(hung)"),
        "{err}"
    );
    assert!(took.as_secs() < 20, "the group took {took:?} to stop");
    let (ok, err, _) = run_and_signal(1, "-KILL");
    assert!(ok && err.contains("restart 1/1 from the last checkpoint"), "{err}");
    let uninterrupted = tmp.path().join("uninterrupted");
    // The worker count from the job's `launch:` section this time.
    let mut args = vec!["--set".to_string(), "launch.nproc_per_node=2".into()];
    args.extend(port(free_port(5)));
    let (ok, err) = finish(launch(&job(&uninterrupted, 24), &args));
    assert!(ok, "{err}");
    let final_loss = |out: &Path| *metrics_losses(out).last().unwrap();
    assert!(close(final_loss(&killed), final_loss(&uninterrupted)));
    assert_same_adapter(&killed, &uninterrupted, "restarted run");

    // Ctrl-C (SIGINT to the launcher): the group stops after one agreed step within seconds,
    // rank 0 saves it, and the same command again resumes to the uninterrupted run's adapter.
    let interrupted = tmp.path().join("interrupted");
    let again = || {
        let mut args = vec!["--nproc-per-node".to_string(), "2".into()];
        args.extend(port(free_port(5)));
        launch(&job(&interrupted, 24), &args)
    };
    let child = again();
    reach(&interrupted, 7);
    std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let stopped = std::time::Instant::now();
    let (ok, err) = finish(child);
    assert!(!ok && err.contains("interrupted"), "{err}");
    assert!(
        stopped.elapsed().as_secs() < 20,
        "the group took {:?} to stop",
        stopped.elapsed()
    );
    let saved = temper_trainer::checkpoint::list(&interrupted).unwrap();
    assert!(
        !saved.is_empty() && err.contains("saved"),
        "no checkpoint at Ctrl-C:\n{err}"
    );
    let (ok, err) = finish(again());
    assert!(ok, "{err}");
    assert_same_adapter(&interrupted, &uninterrupted, "run resumed after Ctrl-C");
}

/// Sends `signal` (`-KILL`, `-STOP`) to the worker of `rank` among `launcher`'s children (found
/// in /proc by the RANK in its environment).
fn signal_worker(launcher: u32, rank: usize, signal: &str) {
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(launcher) {
            continue;
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let want = format!("RANK={rank}");
        if environ.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
            std::process::Command::new("kill")
                .args([signal, &pid.to_string()])
                .status()
                .unwrap();
            return;
        }
    }
    panic!("no worker of rank {rank} under {launcher}");
}

/// `temper eval` end to end on the tiny model and its trained adapter: every kind of measure,
/// the files it writes, sampled decoding reproducible from its seed, and flag errors.
#[test]
fn eval_command_writes_its_report() {
    let tmp = tempfile::tempdir().unwrap();
    let rows = tmp.path().join("rows.jsonl");
    let mut text = String::new();
    for i in 0..5 {
        text.push_str(&format!(
            "{}\n",
            serde_json::json!({"prompt": format!("a b {i} c"), "completion": format!(" d {i} e"),
                               "choices": [" d", " zz yy xx"], "answer": 0})
        ));
    }
    std::fs::write(&rows, text).unwrap();
    let cases = tmp.path().join("cases.jsonl");
    std::fs::write(
        &cases,
        "{\"id\": \"any\", \"prompt\": \"a b\", \"regex\": \".*\"}\n{\"id\": \"never\", \"prompt\": \"a\", \"not_regex\": \"\"}\n",
    )
    .unwrap();
    let eval = |out: &Path, extra: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_temper"));
        cmd.args(["eval", "--model"]).arg(train_dir().join("tiny"));
        cmd.arg("--adapter").arg(train_dir().join("final_adapter"));
        cmd.arg("--data").arg(&rows).arg("--regression").arg(&cases);
        for s in ["exact_match", "contains", "rouge", "bleu", "chrf", "refusal", "choice", "regex=e$"] {
            cmd.args(["--scorer", s]);
        }
        cmd.args(["--max-new-tokens", "6", "--output-dir"]).arg(out).args(extra);
        cmd.output().unwrap()
    };
    let out = tmp.path().join("report");
    let run = eval(&out, &[]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let printed = String::from_utf8(run.stdout).unwrap();
    assert!(printed.starts_with("| metric | n | base | "), "{printed}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    let variants = report["variants"].as_array().unwrap();
    assert_eq!(variants.len(), 2);
    let metrics = variants[1]["metrics"].as_object().unwrap();
    let names: Vec<&str> = metrics.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "loss", "perplexity", "exact_match", "contains", "rouge1", "rouge2", "rougeL", "bleu", "chrf", "refusal",
            "regex", "choice", "choice_norm", "regression"
        ]
    );
    for v in variants {
        let m = &v["metrics"];
        let loss = m["loss"]["value"].as_f64().unwrap();
        assert!(loss.is_finite() && loss > 0.0);
        assert!((m["perplexity"]["value"].as_f64().unwrap() - loss.exp()).abs() < 1e-9);
        let ci: Vec<f64> = serde_json::from_value(m["loss"]["ci"].clone()).unwrap();
        assert!(ci[0] <= loss && loss <= ci[1], "{ci:?} around {loss}");
        assert_eq!(m["choice"]["count"], 5);
        // The empty pattern matches every answer: `never` fails for both models.
        assert_eq!(m["regression"]["value"], 0.5);
    }
    assert_eq!(report["regression"][0]["id"], "never", "failing cases first");
    let samples = std::fs::read_to_string(out.join("eval_samples.jsonl")).unwrap();
    assert_eq!(samples.lines().count(), 10, "5 rows x 2 models");
    let first: serde_json::Value = serde_json::from_str(samples.lines().next().unwrap()).unwrap();
    assert_eq!((&first["model"], &first["reference"]), (&"base".into(), &" d 0 e".into()));
    assert!(out.join("eval.md").is_file());
    // Sampling is seeded per row: the same seed gives the same answers.
    let sampled = |dir: &str| {
        let out = tmp.path().join(dir);
        let run = eval(&out, &["--set", "generation.temperature=1.0", "--set", "generation.seed=3"]);
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        std::fs::read_to_string(out.join("eval_samples.jsonl")).unwrap()
    };
    assert_eq!(sampled("s1"), sampled("s2"));
    // Flags a user gets wrong.
    for (extra, want) in [
        (vec!["--scorer", "rouge=1"], "only `regex=PATTERN` takes a value"),
        (vec!["--scorer", "blue"], "scorers[0].type: unknown variant `blue`"),
        (vec!["--max-rows", "0"], "(command line): max_rows: must be > 0"),
    ] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_temper"));
        cmd.args(["eval", "--model"]).arg(train_dir().join("tiny")).arg("--data").arg(&rows);
        cmd.args(["--output-dir"]).arg(tmp.path().join("bad")).args(&extra);
        let run = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success() && err.contains(want), "{extra:?}: {err}");
    }
}
