//! The training loop.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, ElementConversion, Int, Tensor, TensorData};
use temper_data::{Batch, Cursor, IGNORE_INDEX, LoaderOptions, Pipeline, SftBatch};
use temper_models::config::CheckpointDtype;
use temper_models::save::{DEFAULT_SHARD_BYTES, save_pretrained};
use temper_models::{ForwardOptions, LlamaForCausalLM, ModelConfig, Tokenizer};
use temper_peft::LoraConfig;
use temper_trl::{TokenLogps, TokenLoss, head_token_logps, token_logps};

use crate::blocks::{Checkpointed, Hidden, plain};
use crate::checkpoint::{self, TrainerState};
use crate::config::{AdapterKind, BaseQuantization, JobConfig, Objective};
use crate::error::{Error, Result};
use crate::metrics::{MetricsLog, Progress, Row};
use crate::optim::{AdamW, AdamWConfig, LossScaler, global_grad_norm, learning_rate};
use crate::preference::{self as pref, PreferenceObjective, RefCache, Reference};
use crate::sync::{Collective, all_gather, in_own_slot, sync_gradients};

/// Where to resume from.
#[derive(Debug, Clone)]
pub enum Resume {
    /// The newest complete checkpoint in `output_dir`.
    Latest,
    Dir(PathBuf),
}

#[derive(Clone, Default)]
pub struct TrainOptions {
    pub resume: Option<Resume>,
    /// Set by Ctrl-C / SIGTERM: save a checkpoint after the current step and return.
    pub stop: Arc<AtomicBool>,
    /// Stop (with a checkpoint) after this many steps, as an interruption would.
    pub stop_after_steps: Option<u64>,
    /// Data parallelism: this worker's rank among the job's workers and their all-reduce.
    /// `None`: one worker.
    pub collective: Option<Arc<dyn Collective>>,
    /// A file whose content becomes the step number after each step (the launcher watches it
    /// to find hung workers).
    pub heartbeat: Option<PathBuf>,
    /// Dynamic loss scaling from this scale, whatever the precision (f16 always has it, from
    /// [`LossScaler::INITIAL_SCALE`]).
    pub loss_scale: Option<f64>,
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
/// A config error found on the way (against the model or the data) names the job's file.
pub fn train<B: AutodiffBackend>(
    job: &JobConfig,
    device: &B::Device,
    dtype: DType,
    opts: TrainOptions,
) -> Result<Summary> {
    run::<B>(job, device, dtype, opts).map_err(|e| e.in_file(&job.file))
}

fn run<B: AutodiffBackend>(job: &JobConfig, device: &B::Device, dtype: DType, opts: TrainOptions) -> Result<Summary> {
    let t = &job.training;
    let out = &job.output_dir;
    let collective = opts.collective.as_deref();
    let (rank, world) = collective.map_or((0, 1), |c| (c.rank(), c.world_size()));
    // Rank 0 alone writes: logs, metrics, checkpoints, the final adapter.
    let main = rank == 0;
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
    if let Some(dir) = &resume_dir {
        check_same_adapter(job, dir)?;
    }
    let tokenizer = Arc::new(tokenizer);
    let loader_options = LoaderOptions {
        batch_size: t.micro_batch_size,
        seed: t.seed,
        rank,
        world_size: world,
        epochs: if t.max_steps.is_some() { None } else { Some(t.epochs) },
    };
    let pipeline = Arc::new(Pipeline::new(&job.data, tokenizer.clone(), loader_options)?);
    match (t.objective.is_preference(), pipeline.preference) {
        (false, true) => {
            return Err(Error::config(
                "training.objective",
                "the data is preference pairs (chosen/rejected): set `objective: dpo` (or simpo, orpo), or give SFT data",
            ));
        }
        (true, false) => {
            return Err(Error::config(
                "training.objective",
                "preference training needs preference data (`chosen` and `rejected` columns)",
            ));
        }
        _ => {}
    }
    let objective = PreferenceObjective::from_config(t);
    let total_steps = match (&resumed, t.max_steps) {
        // A resumed run goes to the `max_steps` it is given now (a longer run continues).
        (Some(r), Some(n)) if n < r.state.step => {
            return Err(Error::config(
                "training.max_steps",
                format!(
                    "{n}, but the checkpoint {} is at step {} already",
                    r.dir.display(),
                    r.state.step
                ),
            ));
        }
        (Some(_), Some(n)) => n,
        (Some(r), None) => r.state.total_steps,
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
            if let Some(c) = collective {
                // Shards can differ by a batch: every worker stops at the shortest one's end.
                let all = all_gather(c, &[batches as f32])?;
                batches = all.iter().map(|v| v[0] as u64).min().unwrap_or(0);
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
    let vocab = model.vocab_size();
    let mut optim = AdamW::<B::InnerBackend>::new(AdamWConfig::from_training(t, job.adapter.loraplus_lr_ratio));
    let mut state = TrainerState {
        step: 0,
        total_steps,
        cursor: Cursor::default(),
        num_tokens: 0,
        num_examples: 0,
        rank_cursors: Vec::new(),
        losses: Vec::new(),
        loss_scaler: opts
            .loss_scale
            .or((dtype == DType::F16).then_some(LossScaler::INITIAL_SCALE))
            .map(LossScaler::new),
    };
    if let Some(r) = resumed {
        let skipped = r.state.loss_scaler.map_or(0, |s| s.skipped);
        optim.load_state(r.optimizer, r.state.step - skipped, device);
        state = r.state;
        state.total_steps = total_steps;
        if world > 1 {
            state.cursor = match state.rank_cursors.get(rank) {
                Some(c) if state.rank_cursors.len() == world => *c,
                _ => {
                    return Err(Error::Checkpoint {
                        path: r.dir.clone(),
                        message: format!(
                            "saved by {} workers; resuming needs the same number (this job has {world})",
                            state.rank_cursors.len().max(1)
                        ),
                    });
                }
            };
        }
    }
    let config_yaml = job.to_yaml();
    if main {
        let path = out.join("config.yaml");
        temper_models::save::write_file_atomic(&path, config_yaml.as_bytes()).map_err(|e| Error::io(&path, e))?;
    }

    // DPO's reference, built once: LoRA trains only adapters, so the base never changes. It is
    // the base with adapters off, or, when training starts from an existing adapter, that
    // adapter as it was (TRL's "ref" adapter). Either way it shares the policy's base weights.
    let max_eval_rows = job.data.eval.as_ref().and_then(|e| e.max_rows).unwrap_or(usize::MAX);
    let dpo = t.dpo.clone().unwrap_or_default();
    let reference_model = match (t.objective, dpo.reference_free, &job.adapter.path) {
        (Objective::Dpo, false, Some(initial)) => Some(temper_peft::load_adapter(model.valid(), initial)?.0),
        (Objective::Dpo, false, None) => {
            let mut r = model.valid();
            r.set_adapters_enabled(false);
            Some(r)
        }
        _ => None,
    };
    let reference = match reference_model {
        None => Reference::None,
        Some(m) if !dpo.precompute_ref_log_probs => Reference::Model(Box::new(m)),
        Some(m) => {
            // A resumed run reads the values its checkpoint saved; a new run computes them.
            let saved = resume_dir
                .as_ref()
                .map(|d| d.join(pref::CACHE_FILE))
                .filter(|p| p.exists());
            let cache = match saved {
                Some(path) => RefCache::load(&path)?,
                None => {
                    let started = Instant::now();
                    let (pipelines, limits) =
                        pref::precompute_pipelines(job, &tokenizer, loader_options, max_eval_rows)?;
                    let cache = RefCache::compute(&m, &pipelines, &limits, device)?;
                    eprintln!(
                        "reference log-probabilities of {} pairs precomputed in {:.1} s",
                        cache.len(),
                        started.elapsed().as_secs_f64()
                    );
                    cache
                }
            };
            if main {
                cache.save(&out.join(pref::CACHE_FILE))?;
            }
            Reference::Precomputed(cache)
        }
    };
    let precomputed = matches!(reference, Reference::Precomputed(_));
    // A resumed run drops the rows its interrupted predecessor logged after the checkpoint:
    // they are logged again as the steps are redone.
    let mut log = if main {
        Some(MetricsLog::open(out, resume_dir.is_some().then_some(state.step))?)
    } else {
        None
    };
    let progress = Progress::new(total_steps, state.step, main);
    let mut loader = pipeline.clone().spawn(state.cursor);
    let eval_data = job.data.eval_config();
    let eval_now = |model: &LlamaForCausalLM<B>, eval: &temper_data::DataConfig, step: u64| -> Result<Row> {
        let values = evaluate(
            model,
            &reference,
            objective.as_ref(),
            eval,
            &tokenizer,
            t.micro_batch_size,
            max_eval_rows,
            device,
        )?;
        progress.note(&format!("step {step}: {}", show(&values)));
        Ok(Row { step, values })
    };
    if let (Some(_), Some(eval), 0, Some(log)) = (t.eval_steps, &eval_data, state.step, log.as_mut()) {
        // The starting point, so the log shows what training changed.
        log.write(&eval_now(&model, eval, 0)?)?;
    }
    let save = |model: &LlamaForCausalLM<B>, optim: &AdamW<B::InnerBackend>, state: &TrainerState| {
        checkpoint::save(
            out,
            state,
            &optim.state_tensors(),
            &config_yaml,
            |dir| {
                save_model(model, &trainable, dir)?;
                if precomputed {
                    let (from, to) = (out.join(pref::CACHE_FILE), dir.join(pref::CACHE_FILE));
                    std::fs::copy(&from, &to).map_err(|e| Error::io(&to, e))?;
                }
                Ok(())
            },
            t.save_total_limit,
        )
    };
    let mut interrupted = false;
    let start_step = state.step;
    let (mut last_train, mut last_eval) = (None, None);

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
                    check_vocab(&b.batch, vocab, || format!("step {}", state.step + 1))?;
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
        let denominator: usize = micro.iter().map(Batch::loss_normaliser).sum();
        let tokens: usize = micro.iter().map(Batch::num_tokens).sum();
        let examples: usize = micro.iter().map(Batch::num_examples).sum();
        // Dropout masks come from a seed per step (and rank), so a resumed run draws the same.
        B::seed(
            device,
            t.seed.wrapping_add(state.step).wrapping_add((rank as u64) << 32),
        );
        // f16's loss scale for this step (1 without one): the gradients come multiplied by it.
        let loss_scale = state.loss_scaler.map_or(1.0, |s| s.scale);
        let mut accumulator = GradientsAccumulator::<LlamaForCausalLM<B>>::new();
        let mut sums = StepSums::default();
        if t.objective == Objective::Sft {
            // Present on every worker, even one whose micro-batches had no target.
            sums.add("loss", 0.0);
            sums.add("mean_token_accuracy", 0.0);
        }
        for batch in &micro {
            let blocks = t.gradient_checkpointing.then(Checkpointed::<B>::new);
            let checkpointed = |m: &LlamaForCausalLM<B>, ids, options| match &blocks {
                Some(blocks) => blocks.forward_hidden(m, ids, options),
                None => plain(m, ids, options),
            };
            let loss = match batch {
                Batch::Sft(b) => sft_loss(&model, &checkpointed, b, device).map(|l| {
                    sums.add(
                        "mean_token_accuracy",
                        l.correct.clone().into_scalar().elem::<i64>() as f64,
                    );
                    l.sum
                }),
                Batch::Preference(b) => {
                    let ref_logps = reference.logps(b, device)?.map(Tensor::from_inner);
                    let objective = objective.as_ref().expect("checked: preference data has an objective");
                    Some(pref::preference_step_loss(
                        &model,
                        &checkpointed,
                        ref_logps,
                        b,
                        objective,
                        device,
                        &mut sums,
                    ))
                }
            };
            let Some(loss) = loss else { continue };
            sums.add("loss", loss.clone().into_scalar().elem::<f32>() as f64);
            let grads = (loss * loss_scale as f32 / denominator.max(1) as f32).backward();
            let grads = match &blocks {
                Some(blocks) => blocks.gradients(&model, grads),
                None => GradientsParams::from_grads(grads, &model),
            };
            accumulator.accumulate(&model, grads);
        }
        let mut grads = accumulator.grads();
        let (mut denominator, mut tokens, mut examples) = (denominator, tokens, examples);
        let mut stop = opts.stop.load(Ordering::SeqCst) || opts.stop_after_steps.is_some_and(|n| state.step + 1 >= n);
        let mut cursors = vec![next_cursor];
        if let Some(c) = collective {
            // One all-reduce: gradients weighted by each worker's share of the normaliser,
            // the step's counters and metric sums, a stop request from any worker, and every
            // worker's data cursor (in its own slots).
            let names: Vec<&'static str> = sums.sorted_names();
            let mut counters = vec![denominator as f32, tokens as f32, examples as f32, stop as u8 as f32];
            counters.extend(names.iter().map(|n| sums.get(n) as f32));
            counters.extend(in_own_slot(
                c,
                &[
                    next_cursor.epoch as f32,
                    next_cursor.window as f32,
                    next_cursor.batch as f32,
                ],
            ));
            let (totals, bytes) = sync_gradients(c, &model, &mut grads, counters, device)?;
            if state.step == start_step {
                progress.note(&format!(
                    "data parallel: {world} workers, {bytes} bytes all-reduced per step"
                ));
            }
            (denominator, tokens, examples) = (totals[0] as usize, totals[1] as usize, totals[2] as usize);
            stop = totals[3] > 0.0;
            let mut s = StepSums::default();
            for (i, n) in names.iter().enumerate() {
                s.add(n, totals[4 + i] as f64);
            }
            sums = s;
            let at = 4 + names.len();
            cursors = totals[at..at + 3 * world]
                .chunks(3)
                .map(|c| Cursor {
                    epoch: c[0] as u64,
                    window: c[1] as u64,
                    batch: c[2] as u64,
                })
                .collect();
        }
        let loss = sums.get("loss") / denominator.max(1) as f64;
        if !loss.is_finite() {
            progress.finish();
            return Err(Error::NonFiniteLoss {
                step: state.step + 1,
                value: loss as f32,
            });
        }
        let grad_norm = global_grad_norm(&model, &grads, loss_scale, device)
            .into_scalar()
            .elem::<f32>() as f64;
        let apply = match state.loss_scaler.as_mut() {
            Some(scaler) => scaler.update(grad_norm.is_finite()),
            None => true,
        };
        if apply {
            let clip = if t.max_grad_norm > 0.0 && grad_norm > t.max_grad_norm {
                t.max_grad_norm / (grad_norm + 1e-6)
            } else {
                1.0
            };
            model = optim.step(model, &mut grads, lr, clip / loss_scale);
        } else {
            progress.note(&format!(
                "step {}: the gradients overflowed at loss scale {loss_scale}; step skipped, scale now {}",
                state.step + 1,
                loss_scale / 2.0
            ));
        }

        state.step += 1;
        state.cursor = next_cursor;
        if world > 1 {
            state.rank_cursors = cursors;
        }
        state.num_tokens += tokens as u64;
        state.num_examples += examples as u64;
        state.losses.push((state.step, loss));
        let seconds = started.elapsed().as_secs_f64();
        let row = Row {
            step: state.step,
            values: [("loss", loss)]
                .into_iter()
                .chain(sums.logged(denominator))
                .chain([
                    ("learning_rate", lr),
                    ("grad_norm", grad_norm),
                    ("num_tokens", state.num_tokens as f64),
                    ("tokens_per_second", tokens as f64 / seconds),
                    ("epoch", epoch as f64),
                ])
                .chain(state.loss_scaler.map(|s| ("loss_scale", s.scale)))
                .collect(),
        };
        if let Some(path) = &opts.heartbeat {
            std::fs::write(path, state.step.to_string()).map_err(|e| Error::io(path, e))?;
        }
        if let Some(log) = log.as_mut()
            && (state.step.is_multiple_of(t.logging_steps) || state.step == total_steps)
        {
            log.write(&row)?;
            progress.update(&row);
        }
        last_train = Some(row);
        if let (Some(every), Some(eval), Some(log)) = (t.eval_steps, &eval_data, log.as_mut())
            && (state.step.is_multiple_of(every) || state.step == total_steps)
        {
            let row = eval_now(&model, eval, state.step)?;
            log.write(&row)?;
            last_eval = Some(row);
        }
        if main
            && (t.save_steps.is_some_and(|every| state.step.is_multiple_of(every))
                || (stop && state.step < total_steps))
        {
            let dir = save(&model, &optim, &state)?;
            progress.note(&format!("saved {}", dir.display()));
        }
        if stop && state.step < total_steps {
            interrupted = true;
            break;
        }
    }
    progress.finish();
    if state.step == start_step && !interrupted && start_step < total_steps {
        // Nothing trained: the data ran out before the first step. Saving an unchanged
        // adapter with a model card would look like a finished run.
        return Err(Error::config(
            "data",
            format!("no training step ran: the data gave no batch (step {start_step} of {total_steps})"),
        ));
    }
    if !interrupted && main {
        save_model(&model, &trainable, out)?;
        let record = crate::card::RunRecord {
            state: &state,
            last_train: last_train.as_ref(),
            last_eval: last_eval.as_ref(),
            hardware: format!("{} on {device:?}, {dtype:?}", B::name(device)),
        };
        crate::card::write(job, &record, out)?;
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
                    let (model, _) = temper_peft::inject(base, &config, job.training.seed).map_err(|e| match e {
                        temper_peft::Error::Invalid { key, message } => Error::config(&format!("adapter.{key}"), message),
                        other => other.into(),
                    })?;
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
            config.base_model_name_or_path = Some(
                job.base_model_id()
                    .map(String::from)
                    .unwrap_or_else(|| job.model.path.display().to_string()),
            );
            Ok((model, Trainable::Lora(config)))
        }
    }
}

/// A resumed run continues the adapter its checkpoint holds, so a changed `adapter` section
/// would be silently ignored (the checkpoint's shapes win) while `config.yaml` and the model
/// card recorded the new values: an error naming what changed instead.
fn check_same_adapter(job: &JobConfig, checkpoint: &Path) -> Result<()> {
    // A checkpoint without a readable config (written by an older version) is not checked.
    let Ok(text) = std::fs::read_to_string(checkpoint.join("config.yaml")) else {
        return Ok(());
    };
    let Ok(saved) = serde_yaml::from_str::<JobConfig>(&text) else {
        return Ok(());
    };
    let fields = |a: &crate::config::AdapterSection| {
        serde_yaml::to_value(a)
            .ok()
            .and_then(|v| v.as_mapping().cloned())
            .unwrap_or_default()
    };
    let (before, now) = (fields(&saved.adapter), fields(&job.adapter));
    let show = |v: Option<&serde_yaml::Value>| {
        v.map_or("unset".to_string(), |v| {
            serde_yaml::to_string(v).unwrap_or_default().trim().replace('\n', " ")
        })
    };
    let mut keys: Vec<&str> = before.keys().chain(now.keys()).filter_map(|k| k.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    let changed: Vec<(&str, String)> = keys
        .into_iter()
        .filter(|k| before.get(*k) != now.get(*k))
        .map(|k| (k, format!("adapter.{k} is {} there, {} now", show(before.get(k)), show(now.get(k)))))
        .collect();
    let Some((first, _)) = changed.first() else {
        return Ok(());
    };
    Err(Error::config(
        &format!("adapter.{first}"),
        format!(
            "resuming from {}: the adapter differs from the one the run started with ({}); \
             resume with the original settings, or start a new output_dir",
            checkpoint.display(),
            changed.iter().map(|(_, c)| c.as_str()).collect::<Vec<_>>().join("; ")
        ),
    ))
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

pub(crate) fn ints<B: Backend>(values: &[u32], shape: [usize; 2], device: &B::Device) -> Tensor<B, 2, Int> {
    let v: Vec<i64> = values.iter().map(|&x| x as i64).collect();
    Tensor::from_data(TensorData::new(v, shape), device)
}

/// The SFT loss of one batch: logits only at positions whose next token is a target, so
/// prompts and padding never reach the output head.
fn sft_loss<B: Backend>(
    model: &LlamaForCausalLM<B>,
    hidden: Hidden<B>,
    batch: &SftBatch,
    device: &B::Device,
) -> Option<TokenLoss<B>> {
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
    let logps = token_logps_at(
        model,
        hidden,
        ints(&batch.input_ids, [b, s], device),
        options,
        positions,
        targets,
        device,
    );
    Some(TokenLoss::from_logps(logps))
}

/// Log-probabilities of `targets` at `positions` (flat `row * seq + t` indices) of a forward
/// pass: the output head runs only where a target follows, so prompts and padding never reach
/// it. A frozen head goes through [`head_token_logps`] (no `[n, vocab]` tensor kept for the
/// backward pass); a trained one (full fine-tuning, a LoRA on `lm_head`) through its logits.
pub(crate) fn token_logps_at<B: Backend>(
    model: &LlamaForCausalLM<B>,
    hidden: Hidden<B>,
    input_ids: Tensor<B, 2, Int>,
    options: ForwardOptions<B>,
    mut positions: Vec<i64>,
    mut targets: Vec<i64>,
    device: &B::Device,
) -> TokenLogps<B> {
    let [rows, s] = input_ids.dims();
    let n = positions.len();
    // The head's rows, rounded up by repeating the last position (sliced off below).
    let multiple = head_rows_multiple::<B>(device);
    let padded = n.div_ceil(multiple) * multiple;
    positions.resize(padded, positions.last().copied().unwrap_or(0));
    targets.resize(padded, targets.last().copied().unwrap_or(0));
    let hidden = hidden(model, input_ids, options); // [rows, s, h]
    let h = hidden.dims()[2];
    let picked = hidden.reshape([rows * s, h]).select(0, int_vector(positions, device)); // [padded, h]
    let targets = int_vector(targets, device);
    let out = match frozen_head_weight(model) {
        Some(weight) => {
            let rows_per_chunk = (HEAD_CHUNK_ELEMENTS / weight.dims()[0]).max(64) / 64 * 64;
            head_token_logps(picked, weight, targets, rows_per_chunk)
        }
        None => {
            let logits = model.head(picked.reshape([1, padded, h])); // [1, padded, vocab]
            let vocab = logits.dims()[2];
            token_logps(logits.reshape([padded, vocab]), targets)
        }
    };
    if padded == n {
        return out;
    }
    TokenLogps {
        logps: out.logps.slice(0..n),
        hits: out.hits.slice(0..n),
        mean_logits: out.mean_logits.slice(0..n),
    }
}

/// Logits the chunked head holds at a time (64 MiB in f32).
const HEAD_CHUNK_ELEMENTS: usize = 1 << 24;

/// The output head's weight (`[vocab, hidden]`) when nothing in the head is trained: no
/// gradient on it, no adapter, not quantized.
fn frozen_head_weight<B: Backend>(model: &LlamaForCausalLM<B>) -> Option<Tensor<B, 2>> {
    let weight = match &model.lm_head {
        // Linear keeps `[in, out]`.
        Some(head) if head.adapter.is_none() && head.quantized.is_none() && head.bias.is_none() => {
            head.weight.val().transpose()
        }
        Some(_) => return None,
        None => model.model.embed_tokens.val(),
    };
    (!weight.is_require_grad()).then_some(weight)
}

/// What the output head's row count is rounded up to. The number of target positions changes
/// with every batch, and backends that compile a kernel per matmul shape (cubecl's: CUDA,
/// wgpu) would compile new ones for each; on the CPU padded rows are only extra work.
fn head_rows_multiple<B: Backend>(device: &B::Device) -> usize {
    if B::name(device).contains("cubecl<") { 64 } else { 1 }
}

pub(crate) fn int_vector<B: Backend>(values: Vec<i64>, device: &B::Device) -> Tensor<B, 1, Int> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n]), device)
}

/// Stops at an id past the embedding, which would index out of bounds inside the backend (a
/// panic there); `during` names the step or the evaluation.
fn check_vocab(batch: &Batch, vocab: usize, during: impl FnOnce() -> String) -> Result<()> {
    match batch.max_token_id().filter(|&id| id as usize >= vocab) {
        Some(id) => Err(Error::TokenOutOfVocab {
            during: during(),
            id,
            vocab,
        }),
        None => Ok(()),
    }
}

/// Metrics over the evaluation data, without gradients: `eval_loss` (per target token for
/// SFT, per pair for DPO), and for DPO `eval_rewards/*`.
#[allow(clippy::too_many_arguments)]
fn evaluate<B: AutodiffBackend>(
    model: &LlamaForCausalLM<B>,
    reference: &Reference<B::InnerBackend>,
    objective: Option<&PreferenceObjective>,
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
    // The pipeline names its settings `data.*`; these are the evaluation data's.
    let in_eval = |e: temper_data::Error| match e {
        temper_data::Error::Config { key, message } => Error::config(&key.replacen("data", "data.eval", 1), message),
        other => Error::Data(other),
    };
    let pipeline = Arc::new(Pipeline::new(eval, tokenizer.clone(), options).map_err(in_eval)?);
    let mut sums = StepSums::default();
    let (mut count, mut rows) = (0usize, 0usize);
    let vocab = model.vocab_size();
    for b in pipeline.spawn(Cursor::default()) {
        let b = b.map_err(in_eval)?;
        check_vocab(&b.batch, vocab, || "evaluation data".to_string())?;
        match b.batch {
            Batch::Sft(batch) => {
                rows += batch.batch_size;
                count += batch.num_target_tokens();
                if let Some(loss) = sft_loss(&model, &plain, &batch, device) {
                    sums.add("loss", loss.sum.into_scalar().elem::<f32>() as f64);
                }
            }
            Batch::Preference(batch) => {
                rows += batch.pairs;
                count += batch.pairs;
                let ref_logps = reference.logps(&batch, device)?;
                let objective = objective.expect("checked: preference data has an objective");
                let loss = pref::preference_step_loss(&model, &plain, ref_logps, &batch, objective, device, &mut sums);
                sums.add("loss", loss.into_scalar().elem::<f32>() as f64);
            }
        }
        if rows >= max_rows {
            break;
        }
    }
    if count == 0 {
        // An `eval_loss` of 0 would read as a perfect model.
        return Err(Error::config(
            "data.eval",
            format!("the evaluation data gave nothing to score ({rows} rows in batches, no target token or pair)"),
        ));
    }
    let mut out = vec![("eval_loss", sums.get("loss") / count as f64)];
    out.extend(
        sums.logged(count)
            .into_iter()
            .filter_map(|(name, v)| Some((eval_name(name)?, v))),
    );
    Ok(out)
}

/// TRL's names of the evaluation metrics (`eval_` + the training name).
fn eval_name(name: &str) -> Option<&'static str> {
    Some(match name {
        "rewards/chosen" => "eval_rewards/chosen",
        "rewards/rejected" => "eval_rewards/rejected",
        "rewards/accuracies" => "eval_rewards/accuracies",
        "rewards/margins" => "eval_rewards/margins",
        "logps/chosen" => "eval_logps/chosen",
        "logps/rejected" => "eval_logps/rejected",
        "logits/chosen" => "eval_logits/chosen",
        "logits/rejected" => "eval_logits/rejected",
        "nll_loss" => "eval_nll_loss",
        "log_odds_ratio" => "eval_log_odds_ratio",
        "log_odds_chosen" => "eval_log_odds_chosen",
        _ => return None,
    })
}

/// Per-step sums of the logged quantities, divided by the step's normaliser when logged.
#[derive(Default)]
pub(crate) struct StepSums {
    values: Vec<(&'static str, f64)>,
}

impl StepSums {
    pub(crate) fn add(&mut self, name: &'static str, v: f64) {
        match self.values.iter_mut().find(|(n, _)| *n == name) {
            Some(e) => e.1 += v,
            None => self.values.push((name, v)),
        }
    }

    fn get(&self, name: &str) -> f64 {
        self.values.iter().find(|(n, _)| *n == name).map_or(0.0, |e| e.1)
    }

    /// The names, sorted: the order workers pack their sums in.
    fn sorted_names(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.values.iter().map(|(n, _)| *n).collect();
        names.sort_unstable();
        names
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

fn show(values: &[(&str, f64)]) -> String {
    values
        .iter()
        .map(|(n, v)| format!("{n} {v:.4}"))
        .collect::<Vec<_>>()
        .join(", ")
}
