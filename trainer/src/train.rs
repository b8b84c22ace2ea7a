//! The training loop.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, ElementConversion, Int, Tensor, TensorData};
use temper_data::{Batch, Cursor, IGNORE_INDEX, LoaderOptions, Pipeline, PreferenceBatch, SftBatch};
use temper_models::config::CheckpointDtype;
use temper_models::save::{DEFAULT_SHARD_BYTES, save_pretrained};
use temper_models::{ForwardOptions, LlamaForCausalLM, ModelConfig, Tokenizer};
use temper_peft::LoraConfig;
use temper_trl::{DpoParams, TokenLoss, dpo_loss, sequence_logps, token_cross_entropy};

use crate::checkpoint::{self, TrainerState};
use crate::config::{AdapterKind, BaseQuantization, JobConfig, Objective};
use crate::error::{Error, Result};
use crate::metrics::{MetricsLog, Progress, Row};
use crate::optim::{AdamW, AdamWConfig, global_grad_norm, learning_rate};

/// Where to resume from.
#[derive(Debug, Clone)]
pub enum Resume {
    /// The newest complete checkpoint in `output_dir`.
    Latest,
    Dir(PathBuf),
}

#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    pub resume: Option<Resume>,
    /// Set by Ctrl-C / SIGTERM: save a checkpoint after the current step and return.
    pub stop: Arc<AtomicBool>,
    /// Stop (with a checkpoint) after this many steps, as an interruption would.
    pub stop_after_steps: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Summary {
    pub steps: u64,
    pub total_steps: u64,
    /// `(step, loss)` of every step, including those before a resume.
    pub losses: Vec<(u64, f64)>,
    pub output_dir: PathBuf,
    /// Stopped early (signal or `stop_after_steps`), with a checkpoint.
    pub interrupted: bool,
}

/// The model with its adapter, and how to save it.
enum Trainable {
    Lora(LoraConfig),
    Full(ModelConfig, Arc<Tokenizer>),
}

/// Runs a job to its end (or its interruption) on backend `B` with weights stored in `dtype`.
pub fn train<B: AutodiffBackend>(
    job: &JobConfig,
    device: &B::Device,
    dtype: DType,
    opts: TrainOptions,
) -> Result<Summary> {
    let t = &job.training;
    let out = &job.output_dir;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;

    // Everything that can fail on the config or the data fails here, before the weights load.
    let (model_config, tokenizer) = temper_models::load_config_and_tokenizer(&job.model.path)?;
    if let Some(max) = job.data.max_length
        && max > model_config.max_position_embeddings
    {
        return Err(Error::config(
            "data.max_length",
            format!(
                "{max} is longer than the model's context ({})",
                model_config.max_position_embeddings
            ),
        ));
    }
    let resume_dir = match &opts.resume {
        None => None,
        Some(Resume::Dir(d)) => Some(d.clone()),
        Some(Resume::Latest) => {
            Some(
                checkpoint::list(out)?
                    .pop()
                    .map(|(_, d)| d)
                    .ok_or_else(|| Error::Checkpoint {
                        path: out.clone(),
                        message: "--resume: no complete checkpoint in the output directory".into(),
                    })?,
            )
        }
    };
    let resumed = resume_dir.as_deref().map(checkpoint::load).transpose()?;
    let tokenizer = Arc::new(tokenizer);
    let loader_options = LoaderOptions {
        batch_size: t.micro_batch_size,
        seed: t.seed,
        rank: 0,
        world_size: 1,
        epochs: if t.max_steps.is_some() { None } else { Some(t.epochs) },
    };
    let pipeline = Arc::new(Pipeline::new(&job.data, tokenizer.clone(), loader_options)?);
    match (t.objective, pipeline.preference) {
        (Objective::Sft, true) => {
            return Err(Error::config(
                "training.objective",
                "the data is preference pairs (chosen/rejected): set `objective: dpo`, or give SFT data",
            ));
        }
        (Objective::Dpo, false) => {
            return Err(Error::config(
                "training.objective",
                "DPO needs preference data (`chosen` and `rejected` columns)",
            ));
        }
        _ => {}
    }
    let total_steps = match (&resumed, t.max_steps) {
        (Some(r), _) => r.state.total_steps,
        (None, Some(n)) => n,
        (None, None) => {
            // A stream has no length: one pass over the data counts the batches (and finds bad
            // rows before the first step rather than hours in).
            let count_options = LoaderOptions {
                epochs: Some(1),
                ..loader_options
            };
            let counter = Arc::new(Pipeline::new(&job.data, tokenizer.clone(), count_options)?);
            let mut batches = 0u64;
            for b in counter.spawn(Cursor::default()) {
                b?;
                batches += 1;
            }
            (batches * t.epochs)
                .div_ceil(t.gradient_accumulation_steps as u64)
                .max(1)
        }
    };
    let warmup = if t.warmup_steps > 0 {
        t.warmup_steps
    } else {
        (t.warmup_ratio * total_steps as f64).ceil() as u64
    };

    // The model, its adapter, the optimizer.
    let (model, trainable) = build_model::<B>(
        job,
        &model_config,
        &tokenizer,
        device,
        dtype,
        resumed.as_ref().map(|r| r.dir.as_path()),
    )?;
    let mut model = model;
    let mut optim = AdamW::<B::InnerBackend>::new(AdamWConfig::from_training(t, job.adapter.loraplus_lr_ratio));
    let mut state = TrainerState {
        step: 0,
        total_steps,
        cursor: Cursor::default(),
        num_tokens: 0,
        losses: Vec::new(),
    };
    if let Some(r) = resumed {
        optim.load_state(r.optimizer, r.state.step, device);
        state = r.state;
    }
    let config_yaml = job.to_yaml();
    std::fs::write(out.join("config.yaml"), &config_yaml).map_err(|e| Error::io(out.join("config.yaml"), e))?;

    // DPO's reference, built once: LoRA trains only adapters, so the base never changes. It is
    // the base with adapters off, or, when training starts from an existing adapter, that
    // adapter as it was (TRL's "ref" adapter). Either way it shares the policy's base weights.
    let reference = match (t.objective, t.dpo.reference_free, &job.adapter.path) {
        (Objective::Dpo, false, Some(initial)) => Some(temper_peft::load_adapter(model.valid(), initial)?.0),
        (Objective::Dpo, false, None) => {
            let mut r = model.valid();
            r.set_adapters_enabled(false);
            Some(r)
        }
        _ => None,
    };
    let mut log = MetricsLog::open(out)?;
    let progress = Progress::new(total_steps, state.step);
    let mut loader = pipeline.clone().spawn(state.cursor);
    let eval_data = job.data.eval_config();
    let max_eval_rows = job.data.eval.as_ref().and_then(|e| e.max_rows).unwrap_or(usize::MAX);
    let eval_now = |model: &LlamaForCausalLM<B>, eval: &temper_data::DataConfig, step: u64| -> Result<Row> {
        let values = evaluate(
            model,
            reference.as_ref(),
            &t.dpo,
            eval,
            &tokenizer,
            t.micro_batch_size,
            max_eval_rows,
            device,
        )?;
        progress.note(&format!("step {step}: {}", show(&values)));
        Ok(Row { step, values })
    };
    if let (Some(_), Some(eval), 0) = (t.eval_steps, &eval_data, state.step) {
        // The starting point, so the log shows what training changed.
        log.write(&eval_now(&model, eval, 0)?)?;
    }
    let save = |model: &LlamaForCausalLM<B>, optim: &AdamW<B::InnerBackend>, state: &TrainerState| {
        checkpoint::save(
            out,
            state,
            &optim.state_tensors(),
            &config_yaml,
            |dir| save_model(model, &trainable, dir),
            t.save_total_limit,
        )
    };
    let mut interrupted = false;

    while state.step < total_steps {
        let started = Instant::now();
        let lr = learning_rate(t.lr_scheduler, t.learning_rate, state.step, warmup, total_steps);
        // Gather the step's micro-batches first: the loss is divided by the target tokens of
        // all of them, so every token weighs the same however the batches split them.
        let mut micro = Vec::with_capacity(t.gradient_accumulation_steps);
        let mut next_cursor = state.cursor;
        let mut epoch = 0;
        for _ in 0..t.gradient_accumulation_steps {
            match loader.next() {
                Some(b) => {
                    let b = b?;
                    next_cursor = b.next;
                    epoch = b.epoch;
                    micro.push(b.batch);
                }
                None => break,
            }
        }
        if micro.is_empty() {
            break; // the data ran out before max_steps
        }
        // The step's normaliser: target tokens (SFT) or pairs (DPO), over all micro-batches.
        let denominator: usize = micro
            .iter()
            .map(|b| match b {
                Batch::Sft(b) => b.num_target_tokens(),
                Batch::Preference(b) => b.pairs,
            })
            .sum();
        let tokens: usize = micro
            .iter()
            .map(|b| match b {
                Batch::Sft(b) => b.num_tokens(),
                Batch::Preference(b) => b.num_tokens(),
            })
            .sum();
        // Dropout masks come from a seed per step, so a resumed run draws the same ones.
        B::seed(device, t.seed.wrapping_add(state.step));
        let mut accumulator = GradientsAccumulator::<LlamaForCausalLM<B>>::new();
        let mut sums = StepSums::default();
        for batch in &micro {
            let loss = match batch {
                Batch::Sft(b) => sft_loss(&model, b, device).map(|l| {
                    sums.add(
                        "mean_token_accuracy",
                        l.correct.clone().into_scalar().elem::<i64>() as f64,
                    );
                    l.sum
                }),
                Batch::Preference(b) => {
                    let ref_logps = reference
                        .as_ref()
                        .map(|r| Tensor::from_inner(preference_logps(r, b, device).0));
                    Some(dpo_step_loss(&model, ref_logps, b, &t.dpo, device, &mut sums))
                }
            };
            let Some(loss) = loss else { continue };
            sums.add("loss", loss.clone().into_scalar().elem::<f32>() as f64);
            let grads = (loss / denominator.max(1) as f32).backward();
            accumulator.accumulate(&model, GradientsParams::from_grads(grads, &model));
        }
        let loss = sums.get("loss") / denominator.max(1) as f64;
        if !loss.is_finite() {
            progress.finish();
            return Err(Error::NonFiniteLoss {
                step: state.step + 1,
                value: loss as f32,
            });
        }
        let mut grads = accumulator.grads();
        let grad_norm: f32 = global_grad_norm(&model, &grads, device).into_scalar().elem::<f32>();
        let scale = if t.max_grad_norm > 0.0 && grad_norm as f64 > t.max_grad_norm {
            t.max_grad_norm / (grad_norm as f64 + 1e-6)
        } else {
            1.0
        };
        model = optim.step(model, &mut grads, lr, scale);

        state.step += 1;
        state.cursor = next_cursor;
        state.num_tokens += tokens as u64;
        state.losses.push((state.step, loss));
        let seconds = started.elapsed().as_secs_f64();
        let row = Row {
            step: state.step,
            values: [("loss", loss)]
                .into_iter()
                .chain(sums.logged(denominator))
                .chain([
                    ("learning_rate", lr),
                    ("grad_norm", grad_norm as f64),
                    ("num_tokens", state.num_tokens as f64),
                    ("tokens_per_second", tokens as f64 / seconds),
                    ("epoch", epoch as f64),
                ])
                .collect(),
        };
        if state.step.is_multiple_of(t.logging_steps) || state.step == total_steps {
            log.write(&row)?;
            progress.update(&row);
        }
        if let (Some(every), Some(eval)) = (t.eval_steps, &eval_data)
            && (state.step.is_multiple_of(every) || state.step == total_steps)
        {
            log.write(&eval_now(&model, eval, state.step)?)?;
        }
        let stop = opts.stop.load(Ordering::SeqCst) || opts.stop_after_steps.is_some_and(|n| state.step >= n);
        if t.save_steps.is_some_and(|every| state.step.is_multiple_of(every)) || (stop && state.step < total_steps) {
            let dir = save(&model, &optim, &state)?;
            progress.note(&format!("saved {}", dir.display()));
        }
        if stop && state.step < total_steps {
            interrupted = true;
            break;
        }
    }
    progress.finish();
    if !interrupted {
        save_model(&model, &trainable, out)?;
    }
    Ok(Summary {
        steps: state.step,
        total_steps,
        losses: state.losses,
        output_dir: out.clone(),
        interrupted,
    })
}

/// Loads the weights (the config and tokenizer are read already), then adds (or restores) the
/// adapter, or makes every weight trainable.
fn build_model<B: AutodiffBackend>(
    job: &JobConfig,
    model_config: &ModelConfig,
    tokenizer: &Arc<Tokenizer>,
    device: &B::Device,
    dtype: DType,
    checkpoint: Option<&Path>,
) -> Result<(LlamaForCausalLM<B>, Trainable)> {
    let a = &job.adapter;
    // A full fine-tuning checkpoint holds the whole model; a LoRA one only the adapter.
    let weights_from = match a.kind {
        AdapterKind::Full => checkpoint.unwrap_or(&job.model.path),
        AdapterKind::Lora => &job.model.path,
    };
    let base = if job.model.random_init && weights_from == job.model.path {
        let source = temper_models::weights::RandomSource::new(model_config, job.training.seed);
        LlamaForCausalLM::load(model_config, &source, device, dtype)?
    } else {
        temper_models::load_weights::<B>(weights_from, model_config, device, dtype)?
    };
    match a.kind {
        AdapterKind::Full => {
            let model = base.map(&mut TrainAll);
            Ok((model, Trainable::Full(model_config.clone(), tokenizer.clone())))
        }
        AdapterKind::Lora => {
            let from = checkpoint.or(a.path.as_deref());
            let (model, config) = match from {
                Some(dir) => temper_peft::load_adapter(base.no_grad(), dir)?,
                None => {
                    let config = a.lora_config()?;
                    let (model, _) = temper_peft::inject(base, &config, job.training.seed)?;
                    (model, config)
                }
            };
            let model = match a.quantize_base {
                None => model,
                Some(q) => {
                    let bits = match q {
                        BaseQuantization::Q8_0 => 8,
                        BaseQuantization::Q4_0 => 4,
                    };
                    temper_peft::quantize_base(model, bits)?.0
                }
            };
            let mut config = config;
            config.base_model_name_or_path = Some(job.model.path.display().to_string());
            Ok((model, Trainable::Lora(config)))
        }
    }
}

/// Marks every float parameter trainable (full fine-tuning).
struct TrainAll;

impl<B: Backend> ModuleMapper<B> for TrainAll {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        param.set_require_grad(true)
    }
}

fn save_model<B: Backend>(model: &LlamaForCausalLM<B>, trainable: &Trainable, dir: &Path) -> Result<()> {
    match trainable {
        Trainable::Lora(config) => temper_peft::save_adapter(model, config, dir)?,
        Trainable::Full(config, tokenizer) => {
            save_pretrained(model, config, dir, CheckpointDtype::F32, DEFAULT_SHARD_BYTES)?;
            tokenizer.save_pretrained(dir)?;
        }
    }
    Ok(())
}

fn ints<B: Backend>(values: &[u32], shape: [usize; 2], device: &B::Device) -> Tensor<B, 2, Int> {
    let v: Vec<i64> = values.iter().map(|&x| x as i64).collect();
    Tensor::from_data(TensorData::new(v, shape), device)
}

/// The SFT loss of one batch: logits only at positions whose next token is a target, so
/// prompts and padding never reach the output head.
fn sft_loss<B: Backend>(model: &LlamaForCausalLM<B>, batch: &SftBatch, device: &B::Device) -> Option<TokenLoss<B>> {
    let (b, s) = (batch.batch_size, batch.seq_len);
    let mut positions = Vec::new();
    let mut targets = Vec::new();
    for r in 0..b {
        for t in 0..s.saturating_sub(1) {
            let label = batch.labels[r * s + t + 1];
            if label != IGNORE_INDEX {
                positions.push((r * s + t) as i64);
                targets.push(label as i64);
            }
        }
    }
    if positions.is_empty() {
        return None;
    }
    let options = ForwardOptions {
        // Right padding needs no mask under causal attention: real tokens never look ahead.
        position_ids: Some(ints(&batch.position_ids, [b, s], device)),
        attention_mask: None,
        segment_ids: batch.is_packed().then(|| ints(&batch.segment_ids, [b, s], device)),
    };
    let logits = logits_at(
        model,
        ints(&batch.input_ids, [b, s], device),
        options,
        positions,
        device,
    );
    Some(token_cross_entropy(logits, int_vector(targets, device)))
}

/// Logits (`[n, vocab]`, f32) at `positions` (flat `row * seq + t` indices) of a forward pass:
/// only where a target follows, so prompts and padding never reach the output head.
fn logits_at<B: Backend>(
    model: &LlamaForCausalLM<B>,
    input_ids: Tensor<B, 2, Int>,
    options: ForwardOptions<B>,
    positions: Vec<i64>,
    device: &B::Device,
) -> Tensor<B, 2> {
    let [rows, s] = input_ids.dims();
    let n = positions.len();
    let hidden = model.forward_hidden(input_ids, options, None); // [rows, s, h]
    let h = hidden.dims()[2];
    let picked = hidden.reshape([rows * s, h]).select(0, int_vector(positions, device)); // [n, h]
    let logits = model.head(picked.reshape([1, n, h])); // [1, n, vocab]
    let vocab = logits.dims()[2];
    logits.reshape([n, vocab])
}

fn int_vector<B: Backend>(values: Vec<i64>, device: &B::Device) -> Tensor<B, 1, Int> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n]), device)
}

/// Metrics over the evaluation data, without gradients: `eval_loss` (per target token for
/// SFT, per pair for DPO), and for DPO `eval_rewards/*`.
#[allow(clippy::too_many_arguments)]
fn evaluate<B: AutodiffBackend>(
    model: &LlamaForCausalLM<B>,
    reference: Option<&LlamaForCausalLM<B::InnerBackend>>,
    dpo: &crate::config::DpoSection,
    eval: &temper_data::DataConfig,
    tokenizer: &Arc<Tokenizer>,
    batch_size: usize,
    max_rows: usize,
    device: &B::Device,
) -> Result<Vec<(&'static str, f64)>> {
    let model = model.valid();
    let options = LoaderOptions {
        batch_size,
        seed: 0,
        rank: 0,
        world_size: 1,
        epochs: Some(1),
    };
    let pipeline = Arc::new(Pipeline::new(eval, tokenizer.clone(), options)?);
    let mut sums = StepSums::default();
    let (mut count, mut rows) = (0usize, 0usize);
    for b in pipeline.spawn(Cursor::default()) {
        match b?.batch {
            Batch::Sft(batch) => {
                rows += batch.batch_size;
                count += batch.num_target_tokens();
                if let Some(loss) = sft_loss(&model, &batch, device) {
                    sums.add("loss", loss.sum.into_scalar().elem::<f32>() as f64);
                }
            }
            Batch::Preference(batch) => {
                rows += batch.pairs;
                count += batch.pairs;
                let ref_logps = reference.map(|r| preference_logps(r, &batch, device).0);
                let loss = dpo_step_loss(&model, ref_logps, &batch, dpo, device, &mut sums);
                sums.add("loss", loss.into_scalar().elem::<f32>() as f64);
            }
        }
        if rows >= max_rows {
            break;
        }
    }
    let mut out = vec![("eval_loss", sums.get("loss") / count.max(1) as f64)];
    for (name, v) in sums.logged(count) {
        if name.starts_with("rewards/") {
            out.push((eval_name(name), v));
        }
    }
    Ok(out)
}

fn eval_name(name: &str) -> &'static str {
    match name {
        "rewards/chosen" => "eval_rewards/chosen",
        "rewards/rejected" => "eval_rewards/rejected",
        "rewards/accuracies" => "eval_rewards/accuracies",
        _ => "eval_rewards/margins",
    }
}

/// Per-step sums of the logged quantities, divided by the step's normaliser when logged.
#[derive(Default)]
struct StepSums {
    values: Vec<(&'static str, f64)>,
}

impl StepSums {
    fn add(&mut self, name: &'static str, v: f64) {
        match self.values.iter_mut().find(|(n, _)| *n == name) {
            Some(e) => e.1 += v,
            None => self.values.push((name, v)),
        }
    }

    fn get(&self, name: &str) -> f64 {
        self.values.iter().find(|(n, _)| *n == name).map_or(0.0, |e| e.1)
    }

    /// The logged means: per target token or pair, and `logits/*` per completion token as TRL
    /// averages them. Names starting with `_` are counts, not logged.
    fn logged(&self, denominator: usize) -> Vec<(&'static str, f64)> {
        self.values
            .iter()
            .filter(|(n, _)| *n != "loss" && !n.starts_with('_'))
            .map(|&(n, v)| {
                let by = match n {
                    "logits/chosen" => self.get("_chosen_tokens"),
                    "logits/rejected" => self.get("_rejected_tokens"),
                    _ => denominator as f64,
                };
                (n, v / by.max(1.0))
            })
            .collect()
    }
}

/// Positions predicting a completion token of a preference batch: (flat position, target, row).
fn completion_positions(batch: &PreferenceBatch) -> (Vec<i64>, Vec<i64>, Vec<i64>) {
    let s = batch.seq_len;
    let (mut pos, mut tgt, mut row) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..2 * batch.pairs {
        for t in 0..s.saturating_sub(1) {
            if batch.completion_mask[r * s + t + 1] == 1 {
                pos.push((r * s + t) as i64);
                tgt.push(batch.input_ids[r * s + t + 1] as i64);
                row.push(r as i64);
            }
        }
    }
    (pos, tgt, row)
}

/// Summed completion log-probabilities of every row of a preference batch (chosen rows, then
/// rejected rows), and the mean logit at completion positions per row (TRL's `logits/*`).
fn preference_logps<B: Backend>(
    model: &LlamaForCausalLM<B>,
    batch: &PreferenceBatch,
    device: &B::Device,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let (rows, s) = (2 * batch.pairs, batch.seq_len);
    let (pos, tgt, row) = completion_positions(batch);
    let ids = ints(&batch.input_ids, [rows, s], device);
    let logits = logits_at(model, ids, ForwardOptions::default(), pos, device); // [n, vocab]
    let row = int_vector(row, device);
    let mean_logits = Tensor::<B, 1>::zeros([rows], device).select_assign(
        0,
        row.clone(),
        logits.clone().detach().mean_dim(1).squeeze_dim::<1>(1),
        burn::tensor::IndexingUpdateOp::Add,
    );
    (sequence_logps(logits, int_vector(tgt, device), row, rows), mean_logits)
}

/// The summed DPO loss of one micro-batch; adds TRL's `rewards/*`, `logps/*` and `logits/*`
/// (as sums over pairs) to `sums`. No `reference`: reference-free (log π_ref = 0).
fn dpo_step_loss<B: Backend>(
    model: &LlamaForCausalLM<B>,
    reference: Option<Tensor<B, 1>>,
    batch: &PreferenceBatch,
    dpo: &crate::config::DpoSection,
    device: &B::Device,
    sums: &mut StepSums,
) -> Tensor<B, 1> {
    let p = batch.pairs;
    let (logps, mean_logits) = preference_logps(model, batch, device);
    let reference = reference.unwrap_or_else(|| Tensor::<B, 1>::zeros([2 * p], device));
    let s = batch.seq_len;
    let lengths: Vec<f32> = (0..2 * p)
        .map(|r| {
            batch.completion_mask[r * s + 1..(r + 1) * s]
                .iter()
                .filter(|&&m| m == 1)
                .count() as f32
        })
        .collect();
    let lengths = Tensor::<B, 1>::from_data(TensorData::new(lengths, [2 * p]), device);
    let half = |t: Tensor<B, 1>, second: bool| if second { t.slice(p..2 * p) } else { t.slice(0..p) };
    let out = dpo_loss(
        half(logps.clone(), false),
        half(logps.clone(), true),
        half(reference.clone(), false),
        half(reference, true),
        half(lengths.clone(), false),
        half(lengths.clone(), true),
        DpoParams {
            beta: dpo.beta,
            loss_type: dpo.loss_type,
            label_smoothing: dpo.label_smoothing,
        },
    );
    let sum = |t: Tensor<B, 1>| -> f64 { t.sum().into_scalar().elem::<f32>() as f64 };
    let (cr, rr) = (out.chosen_rewards.clone(), out.rejected_rewards.clone());
    sums.add("rewards/chosen", sum(cr.clone()));
    sums.add("rewards/rejected", sum(rr.clone()));
    sums.add("rewards/accuracies", sum(cr.clone().greater(rr.clone()).float()));
    sums.add("rewards/margins", sum(cr - rr));
    let logps = logps.detach();
    sums.add("logps/chosen", sum(half(logps.clone(), false)));
    sums.add("logps/rejected", sum(half(logps, true)));
    sums.add("logits/chosen", sum(half(mean_logits.clone(), false)));
    sums.add("logits/rejected", sum(half(mean_logits, true)));
    sums.add("_chosen_tokens", sum(half(lengths.clone(), false)));
    sums.add("_rejected_tokens", sum(half(lengths, true)));
    out.losses.sum()
}

fn show(values: &[(&str, f64)]) -> String {
    values
        .iter()
        .map(|(n, v)| format!("{n} {v:.4}"))
        .collect::<Vec<_>>()
        .join(", ")
}
