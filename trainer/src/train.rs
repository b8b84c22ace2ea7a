//! The training loop: [`train`] prepares a [`Run`] once (model, optimizer, state, data,
//! reference), then repeats its named steps until the last one. Each step is a method a reader
//! finds by name; the objective plugs in through [`Loss`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, ElementConversion, Tensor};
use temper_data::{Batch, Cursor, DataConfig, DataLoader, LoaderOptions, Pipeline};
use temper_kernels::Products;
use temper_models::config::{CheckpointDtype, MoeConfig};
use temper_models::save::{DEFAULT_SHARD_BYTES, save_pretrained};
use temper_models::{LlamaForCausalLM, ModelConfig, Tokenizer};
use temper_peft::{LoraConfig, SavedModule};

use crate::blocks::{Checkpointed, plain};
use crate::forward::check_vocab;
use crate::checkpoint::{self, TrainerState};
use crate::config::JobConfig;
use crate::error::{Error, Result};
use crate::grpo::{Grpo, ROUND_FILE, Sample, SavedRound};
use crate::job::{AdapterSpec, Job, ObjectiveSpec};
use crate::metrics::{MetricsLog, Progress, Row};
use crate::objective::Loss;
use crate::optim::{AdamW, AdamWConfig, LossScaler, global_grad_norm, learning_rate};
use crate::preference::{self as pref, RefCache, Reference};
use crate::step::{Metric, StepResult};
use crate::sync::{Collective, all_gather, sync_gradients};

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
    /// The inputs of the base's products ([`Job::products`]): with `Bf16` a frozen base is held
    /// in bf16 and every base product takes bf16 inputs (CPU backends, whose tensors stay f32).
    pub products: Products,
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

/// Runs a job to its end (or its interruption) on backend `B` with weights stored in `dtype`.
/// A config error found on the way (against the model or the data) names the job's file.
pub fn train<B: AutodiffBackend>(job: &Job, device: &B::Device, dtype: DType, opts: TrainOptions) -> Result<Summary> {
    run_job::<B>(job, device, dtype, &opts).map_err(|e| e.in_file(job.file()))
}

fn run_job<B: AutodiffBackend>(job: &Job, device: &B::Device, dtype: DType, opts: &TrainOptions) -> Result<Summary> {
    let mut run = Run::<B>::prepare(job, device, dtype, opts)?;
    run.evaluate_at_start()?;
    while run.state.step < run.state.total_steps {
        let started = Instant::now();
        let Some(micro) = run.next_micro_batches()? else {
            break; // the data ran out before max_steps
        };
        let lr = run.learning_rate();
        let (mut grads, local) = run.forward_backward(&micro)?;
        let step = run.all_reduce(&mut grads, local)?;
        let grad_norm = run.update(grads, &step, micro.next, lr)?;
        run.report(&step, micro.epoch, lr, grad_norm, started.elapsed())?;
        run.evaluate_if_due()?;
        if run.checkpoint_if_due(step.stop)? {
            break; // stopped early, with a checkpoint to resume from
        }
    }
    run.finish()
}

/// How a run saves its model: the adapter in PEFT's format, or the whole model (full
/// fine-tuning) as a Hugging Face directory with its tokenizer.
enum SaveAs {
    Lora(LoraConfig),
    Full(ModelConfig, Arc<Tokenizer>),
}

/// One optimizer step's micro-batches, gathered before any forward: the loss is divided by
/// the target tokens (or pairs) of all of them, so every token weighs the same however the
/// batches split them.
struct MicroBatches {
    batches: Vec<Batch>,
    /// The data cursor after the last of them.
    next: Cursor,
    epoch: u64,
}

/// Everything a run holds from its first step to its last.
struct Run<'a, B: AutodiffBackend> {
    job: &'a Job,
    opts: &'a TrainOptions,
    device: &'a B::Device,
    /// The weights' storage dtype.
    dtype: DType,
    collective: Option<&'a dyn Collective>,
    /// Seconds the last step spent in the all-reduce (data-parallel runs).
    all_reduce_seconds: Option<f64>,
    /// Rank 0 alone writes: logs, metrics, checkpoints, the final adapter.
    main: bool,
    model: LlamaForCausalLM<B>,
    save_as: SaveAs,
    optim: AdamW<B::InnerBackend>,
    state: TrainerState,
    /// The step this process started from (0, or a resumed checkpoint's).
    start_step: u64,
    warmup: u64,
    loader: DataLoader,
    loss: Loss,
    reference: Reference<B::InnerBackend>,
    tokenizer: Arc<Tokenizer>,
    eval_data: Option<DataConfig>,
    /// The resolved config as YAML, saved beside the outputs and in each checkpoint.
    config_yaml: String,
    log: Option<MetricsLog>,
    progress: Progress,
    last_train: Option<Row>,
    last_eval: Option<Row>,
    interrupted: bool,
    /// GRPO's reward functions and current round.
    grpo: Option<Grpo<B::InnerBackend>>,
    /// The epoch of the data the last step read.
    epoch: u64,
    /// GRPO: the metrics and samples of the rounds generated since the last logged step
    /// (their metrics are averaged into the next logged row, as TRL averages its logging
    /// window's).
    round_metrics: Vec<Vec<(&'static str, f64)>>,
    samples: Vec<Sample>,
    /// A mixture of experts with `output_router_logits`: the load-balancing loss's coefficient.
    router_aux_loss: Option<f64>,
    /// `training.eval_generation` (rank 0): the rows answered at each evaluation.
    generation_eval: Option<GenerationEval>,
}

/// The evaluation rows that `training.eval_generation` answers, prepared once.
struct GenerationEval {
    rows: Vec<temper_data::EvalRow>,
    prompts: Vec<Vec<u32>>,
    eos: Vec<u32>,
    context: usize,
}

impl<'a, B: AutodiffBackend> Run<'a, B> {
    /// Checks everything that can be checked on the config and the data before the weights
    /// load, then builds the model, the optimizer, the state (fresh or resumed), the loader and
    /// DPO's reference.
    fn prepare(job: &'a Job, device: &'a B::Device, dtype: DType, opts: &'a TrainOptions) -> Result<Self> {
        let config = &job.config;
        let t = &config.training;
        let out = &config.output_dir;
        let collective = opts.collective.as_deref();
        let (rank, world) = collective.map_or((0, 1), |c| (c.rank(), c.world_size()));
        let main = rank == 0;
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;

        let (model_config, tokenizer) = temper_models::load_config_and_tokenizer(&config.model.path)?;
        check_context(config, &model_config)?;
        let resume_dir = resume_dir(out, &opts.resume)?;
        let resumed = resume_dir.as_deref().map(checkpoint::load).transpose()?;
        if let Some(dir) = &resume_dir {
            check_same_adapter(config, dir)?;
        }
        let tokenizer = Arc::new(tokenizer);
        let loader_options = LoaderOptions {
            seed: t.seed,
            rank,
            world_size: world,
            epochs: if t.max_steps.is_some() { None } else { Some(t.epochs) },
            ..job.objective.loader_options(job.objective.loader_rows(t))
        };
        let pipeline = Arc::new(Pipeline::new(&config.data, tokenizer.clone(), loader_options)?);
        check_objective_fits_data(&job.objective, &pipeline, "data")?;
        if let Some(eval) = config.data.eval_config() {
            // Found now, not at the first evaluation hours in.
            let eval = Pipeline::new(&eval, tokenizer.clone(), loader_options)?;
            check_objective_fits_data(&job.objective, &eval, "data.eval")?;
        }
        check_kto_balance(job, &tokenizer, loader_options, main)?;
        let total_steps = total_steps(config, resumed.as_ref(), &tokenizer, loader_options, collective)?;

        let (model, save_as) = build_model::<B>(
            job,
            &model_config,
            &tokenizer,
            device,
            (dtype, opts.products),
            resumed.as_ref().map(|r| r.dir.as_path()),
        )?;
        let mut optim = AdamW::<B::InnerBackend>::new(AdamWConfig::from_training(t, job.adapter.loraplus_lr_ratio()));
        let loss_scaler = opts
            .loss_scale
            .or((dtype == DType::F16).then_some(LossScaler::INITIAL_SCALE))
            .map(LossScaler::new);
        let state = match resumed {
            None => TrainerState::new(total_steps, loss_scaler),
            Some(r) => {
                let skipped = r.state.loss_scaler.map_or(0, |s| s.skipped);
                let trainable = crate::optim::trainable_names(&model);
                let unused = optim.load_state(r.optimizer, r.state.step - skipped, &trainable, device);
                if let Some(first) = unused.first() {
                    return Err(Error::Checkpoint {
                        path: r.dir.clone(),
                        message: format!(
                            "optimizer state for {first}{}, which this model has no trainable parameter for \
                             (written for another model or adapter?); resuming would restart its moments",
                            match unused.len() {
                                1 => String::new(),
                                n => format!(" and {} more", n - 1),
                            }
                        ),
                    });
                }
                let mut state = r.state;
                state.total_steps = total_steps;
                // A checkpoint of several workers needs as many (one worker would go on with
                // rank 0's cursor over another sharding).
                if world > 1 || state.rank_cursors.len() > 1 {
                    state.cursor = rank_cursor(&state, rank, world, &r.dir)?;
                }
                state
            }
        };
        let config_yaml = config.to_yaml();
        if main {
            let path = out.join("config.yaml");
            temper_models::atomic::write_file_atomic(&path, config_yaml.as_bytes()).map_err(|e| Error::io(&path, e))?;
        }
        let reference = build_reference(
            job,
            &model,
            &tokenizer,
            loader_options,
            total_steps,
            resume_dir.as_deref(),
            main,
            device,
        )?;
        // A resumed run drops the rows its interrupted predecessor logged after the
        // checkpoint: they are logged again as the steps are redone.
        let log = match main {
            true => Some(MetricsLog::open(out, resume_dir.is_some().then_some(state.step))?),
            false => None,
        };
        let warmup = match t.warmup_steps {
            0 => (t.warmup_ratio * total_steps as f64).ceil() as u64,
            n => n,
        };
        let grpo = match &job.objective {
            ObjectiveSpec::Grpo(g) => {
                let eos = temper_models::load::stop_token_ids(&model_config, &tokenizer);
                let mut grpo = Grpo::new(
                    g,
                    tokenizer.clone(),
                    eos,
                    pipeline.pad_id(),
                    model_config.max_position_embeddings,
                    t.seed,
                    t.micro_batch_size,
                    model_config.vocab_size,
                    device,
                )?;
                // A round with steps left continues where the checkpoint left it: rank 0's in
                // the checkpoint, the other workers' beside it.
                if let Some(dir) = resume_dir.as_deref().filter(|d| d.join(ROUND_FILE).exists()) {
                    let path = match rank {
                        0 => dir.join(ROUND_FILE),
                        _ => rank_round_file(out, state.step, rank),
                    };
                    let text = std::fs::read_to_string(&path).map_err(|e| Error::Checkpoint {
                        path: path.clone(),
                        message: format!(
                            "{} stopped in the middle of a GRPO round, and this worker's part of it cannot be \
                             read ({e}): resume from a checkpoint at the end of a round",
                            dir.display()
                        ),
                    })?;
                    let round: SavedRound = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
                        path: path.clone(),
                        message: format!("unreadable GRPO round: {e}"),
                    })?;
                    grpo.round = Some(round);
                }
                if main {
                    trim_samples(out, resume_dir.is_some().then_some(state.step))?;
                }
                Some(grpo)
            }
            _ => None,
        };
        let generation_eval = match (&config.training.eval_generation, config.data.eval_config()) {
            (Some(g), Some(eval)) if main => {
                // Read now, so a bad row or reference column fails before training.
                let key = "training.eval_generation";
                let rows = temper_data::read_rows(&eval, g.rows)
                    .map_err(|e| Error::config(key, format!("data.eval: {e}")).in_file(&config.file))?;
                if rows.is_empty() {
                    return Err(Error::config(key, "data.eval has no rows to answer").in_file(&config.file));
                }
                let encoder = crate::eval::prompt_encoder(&eval, tokenizer.clone())?;
                let prompts = rows.iter().map(|r| crate::eval::prompt_ids(&encoder, r).map(|p| p.0)).collect::<Result<_>>()?;
                crate::eval::check_references(&g.scorers, &rows).map_err(|e| e.in_file(&config.file))?;
                let eos = temper_models::load::stop_token_ids(&model_config, &tokenizer);
                Some(GenerationEval {
                    rows,
                    prompts,
                    eos,
                    context: model_config.max_position_embeddings,
                })
            }
            _ => None,
        };
        let epoch = state.cursor.epoch;
        Ok(Run {
            job,
            opts,
            device,
            dtype,
            collective,
            all_reduce_seconds: None,
            main,
            save_as,
            optim,
            start_step: state.step,
            warmup,
            loader: pipeline.spawn(state.cursor),
            loss: Loss::new(&job.objective),
            reference,
            tokenizer,
            eval_data: config.data.eval_config(),
            config_yaml,
            log,
            progress: Progress::new(total_steps, state.step, main),
            state,
            model,
            last_train: None,
            last_eval: None,
            interrupted: false,
            // transformers' sequence classifiers (reward models) add no load-balancing loss.
            router_aux_loss: model_config
                .moe
                .as_ref()
                .and_then(MoeConfig::aux_loss_coef)
                .filter(|_| job.objective.name() != "reward"),
            generation_eval,
            grpo,
            epoch,
            round_metrics: Vec::new(),
            samples: Vec::new(),
        })
    }

    fn learning_rate(&self) -> f64 {
        let t = &self.job.config.training;
        learning_rate(
            t.lr_scheduler,
            t.learning_rate,
            self.state.step,
            self.warmup,
            self.state.total_steps,
        )
    }

    /// The step's `gradient_accumulation_steps` micro-batches (fewer where the data ends;
    /// `None` when it has ended), each checked against the vocabulary.
    fn next_micro_batches(&mut self) -> Result<Option<MicroBatches>> {
        if self.grpo.is_some() {
            return self.next_round();
        }
        let (vocab, step) = (self.model.vocab_size(), self.state.step + 1);
        let mut micro = MicroBatches {
            batches: Vec::with_capacity(self.job.config.training.gradient_accumulation_steps),
            next: self.state.cursor,
            epoch: 0,
        };
        for _ in 0..self.job.config.training.gradient_accumulation_steps {
            let Some(b) = self.loader.next() else { break };
            let b = b?;
            check_vocab(&b.batch, vocab, || format!("step {step}"))?;
            (micro.next, micro.epoch) = (b.next, b.epoch);
            micro.batches.push(b.batch);
        }
        Ok((!micro.batches.is_empty()).then_some(micro))
    }

    /// GRPO: the current round's micro-batches while it serves steps, else a new round from
    /// the next batch of prompts (`None` when the data has ended).
    fn next_round(&mut self) -> Result<Option<MicroBatches>> {
        let (vocab, step) = (self.model.vocab_size(), self.state.step + 1);
        let grpo = self.grpo.as_mut().expect("a GRPO run");
        if let Some(batches) = grpo.reuse() {
            return Ok(Some(MicroBatches {
                batches,
                next: self.state.cursor,
                epoch: self.epoch,
            }));
        }
        let Some(loaded) = self.loader.next() else {
            return Ok(None);
        };
        let loaded = loaded?;
        check_vocab(&loaded.batch, vocab, || format!("step {step}"))?;
        let Batch::Prompts(prompts) = &loaded.batch else {
            unreachable!("GRPO's loader reads prompts")
        };
        let policy = self.model.valid();
        let reference = match &self.reference {
            Reference::Model(m) => Some(m.as_ref()),
            _ => None,
        };
        let round = grpo.new_round(&policy, reference, prompts, step, self.collective, self.device)?;
        self.round_metrics.push(round.metrics);
        self.samples.extend(round.samples);
        self.epoch = loaded.epoch;
        Ok(Some(MicroBatches {
            batches: round.batches,
            next: loaded.next,
            epoch: loaded.epoch,
        }))
    }

    /// Each micro-batch's forward and backward, the gradients accumulated (of the loss
    /// divided by the step's normaliser, times f16's loss scale), and what the step saw.
    fn forward_backward(&self, micro: &MicroBatches) -> Result<(GradientsParams, StepResult)> {
        let t = &self.job.config.training;
        let device = self.device;
        let rank = self.collective.map_or(0, |c| c.rank());
        // Dropout masks come from a seed per step (and rank), so a resumed run draws the same.
        B::seed(
            device,
            t.seed.wrapping_add(self.state.step).wrapping_add((rank as u64) << 32),
        );
        let denominator: usize = micro.batches.iter().map(Batch::loss_normaliser).sum();
        let mut sums = self.loss.empty_sums();
        let mut accumulator = GradientsAccumulator::<LlamaForCausalLM<B>>::new();
        let prepared = self.loss.prepare(
            &self.model.clone().no_grad(),
            &micro.batches,
            |b| Ok(self.reference.logps(b, device)?.map(Tensor::from_inner)),
            t.gradient_accumulation_steps,
            self.collective,
            device,
        )?;
        for (batch, (reference, kl)) in micro.batches.iter().zip(prepared) {
            let blocks = t.gradient_checkpointing.then(Checkpointed::<B>::new);
            let hidden = |m: &LlamaForCausalLM<B>, ids, options| match &blocks {
                Some(blocks) => blocks.forward_hidden(m, ids, options),
                None => plain(m, ids, options),
            };
            let reference = |_: &Batch| Ok(reference);
            let (loss, routings) = temper_models::moe::record_routing::<B, _>(|| {
                self.loss
                    .micro_batch(&self.model, &hidden, batch, reference, kl, device, &mut sums)
            });
            let Some(mut loss) = loss? else {
                continue;
            };
            // A mixture of experts with `output_router_logits`: transformers adds
            // `router_aux_loss_coef` times the load-balancing loss to each forward's loss; here
            // the step's objective gets the micro-batches' mean of it.
            if let Some(coef) = self.router_aux_loss
                && let Some(aux) = temper_models::moe::load_balancing_loss(&routings)
            {
                sums.add(Metric::AuxLoss, aux.clone().into_scalar().elem::<f32>() as f64);
                sums.add(Metric::RoutedMicroBatches, 1.0);
                let weight = coef * denominator.max(1) as f64 / micro.batches.len() as f64;
                loss = loss + aux.mul_scalar(weight);
            }
            let grads = (loss * self.loss_scale() as f32 / denominator.max(1) as f32).backward();
            let grads = match &blocks {
                Some(blocks) => blocks.gradients(&self.model, grads),
                None => GradientsParams::from_grads(grads, &self.model),
            };
            accumulator.accumulate(&self.model, grads);
        }
        let step = self.state.step + 1;
        let result = StepResult {
            denominator,
            tokens: micro.batches.iter().map(Batch::num_tokens).sum(),
            examples: micro.batches.iter().map(Batch::num_examples).sum(),
            sums,
            stop: self.opts.stop.load(Ordering::SeqCst) || self.opts.stop_after_steps.is_some_and(|n| step >= n),
            cursors: vec![micro.next],
        };
        Ok((accumulator.grads(), result))
    }

    /// f16's loss scale for this step (1 without one): the gradients come multiplied by it.
    fn loss_scale(&self) -> f64 {
        self.state.loss_scaler.map_or(1.0, |s| s.scale)
    }

    /// With several workers, one all-reduce: the gradients weighted by each worker's share of
    /// the normaliser, and the step's result (its layout lives in [`StepResult::pack`]).
    fn all_reduce(&mut self, grads: &mut GradientsParams, local: StepResult) -> Result<StepResult> {
        let Some(c) = self.collective else {
            return Ok(local);
        };
        let started = Instant::now();
        let (totals, bytes) = sync_gradients(c, &self.model, grads, local.pack(c), self.device)?;
        self.all_reduce_seconds = Some(started.elapsed().as_secs_f64());
        if self.state.step == self.start_step {
            self.progress.note(&format!(
                "data parallel: {} workers, {bytes} bytes all-reduced per step{}",
                c.world_size(),
                c.device_bucket().map_or(" through the host".into(), |n| format!(
                    " on the device, in buckets of up to {n} values"
                ))
            ));
        }
        Ok(StepResult::unpack(&totals, c.world_size()))
    }

    /// Stops on a loss that is not a number; clips, then applies the optimizer (unless f16's
    /// gradients overflowed); advances the state to `next` in the data. Returns the gradients'
    /// norm.
    fn update(&mut self, mut grads: GradientsParams, step: &StepResult, next: Cursor, lr: f64) -> Result<f64> {
        let loss = step.loss();
        if !loss.is_finite() {
            self.progress.finish();
            return Err(Error::NonFiniteLoss {
                step: self.state.step + 1,
                value: loss as f32,
            });
        }
        let loss_scale = self.loss_scale();
        let grad_norm = global_grad_norm(&self.model, &grads, loss_scale, self.device)
            .into_scalar()
            .elem::<f32>() as f64;
        let apply = match self.state.loss_scaler.as_mut() {
            Some(scaler) => scaler.update(grad_norm.is_finite()),
            None => true,
        };
        if apply {
            let max = self.job.config.training.max_grad_norm;
            let clip = if max > 0.0 && grad_norm > max {
                max / (grad_norm + 1e-6)
            } else {
                1.0
            };
            let model = self.model.clone();
            self.model = self.optim.step(model, &mut grads, lr, clip / loss_scale);
        } else {
            self.progress.note(&format!(
                "step {}: the gradients overflowed at loss scale {loss_scale}; step skipped, scale now {}",
                self.state.step + 1,
                loss_scale / 2.0
            ));
        }
        let state = &mut self.state;
        state.step += 1;
        state.cursor = next;
        if self.collective.is_some_and(|c| c.world_size() > 1) {
            state.rank_cursors = step.cursors.clone();
        }
        state.num_tokens += step.tokens as u64;
        state.num_examples += step.examples as u64;
        state.losses.push((state.step, loss));
        Ok(grad_norm)
    }

    /// The step's row: to the heartbeat file, and every `logging_steps` to the metrics and
    /// the terminal.
    fn report(&mut self, step: &StepResult, epoch: u64, lr: f64, grad_norm: f64, took: Duration) -> Result<()> {
        let state = &self.state;
        let logged = state.step.is_multiple_of(self.job.config.training.logging_steps) || state.step == state.total_steps;
        let (rounds, samples) = match logged {
            true => (
                mean_rows(&std::mem::take(&mut self.round_metrics)),
                std::mem::take(&mut self.samples),
            ),
            false => (Vec::new(), Vec::new()),
        };
        let row = Row {
            step: state.step,
            values: [("loss", step.loss())]
                .into_iter()
                .chain(step.sums.logged(step.denominator, false))
                .chain([
                    ("learning_rate", lr),
                    ("grad_norm", grad_norm),
                    ("num_tokens", state.num_tokens as f64),
                    ("tokens_per_second", step.tokens as f64 / took.as_secs_f64()),
                    ("step_time", took.as_secs_f64()),
                    ("epoch", epoch as f64),
                ])
                .chain(state.loss_scaler.map(|s| ("loss_scale", s.scale)))
                .chain(self.all_reduce_seconds.map(|s| ("all_reduce_seconds", s)))
                .chain(rounds)
                .collect(),
        };
        if let Some(path) = &self.opts.heartbeat {
            std::fs::write(path, state.step.to_string()).map_err(|e| Error::io(path, e))?;
        }
        if let Some(log) = self.log.as_mut()
            && logged
        {
            log.write(&row)?;
            self.progress.update(&row);
            if matches!(&self.job.objective, ObjectiveSpec::Grpo(g) if g.log_completions) && !samples.is_empty() {
                write_samples(&self.job.config.output_dir, &samples)?;
            }
        }
        self.last_train = Some(row);
        Ok(())
    }

    /// Before the first step of a new run, so the log shows what training changed.
    fn evaluate_at_start(&mut self) -> Result<()> {
        if self.job.config.training.eval_steps.is_some() && self.state.step == 0 {
            self.evaluate_now()?;
        }
        Ok(())
    }

    /// Every `eval_steps`, and after the last step.
    fn evaluate_if_due(&mut self) -> Result<()> {
        let step = self.state.step;
        if self
            .job
            .config
            .training
            .eval_steps
            .is_some_and(|every| step.is_multiple_of(every) || step == self.state.total_steps)
        {
            self.evaluate_now()?;
        }
        Ok(())
    }

    /// Rank 0 evaluates (when there is evaluation data) and logs the row.
    fn evaluate_now(&mut self) -> Result<()> {
        let (Some(eval), Some(log)) = (&self.eval_data, self.log.as_mut()) else {
            return Ok(());
        };
        let t = &self.job.config.training;
        let values = evaluate(
            &self.model,
            &self.reference,
            &self.loss,
            eval,
            &self.tokenizer,
            t.micro_batch_size,
            &self.job.objective,
            max_eval_rows(&self.job.config),
            self.device,
        )?;
        let mut values = values;
        if let (Some(g), Some(spec)) = (&self.generation_eval, &t.eval_generation) {
            let (scored, samples) = generation_scores(&self.model.valid(), &self.tokenizer, g, spec, self.device)?;
            values.extend(scored);
            log.text("eval_samples", &samples.0, self.state.step)?;
            let path = self.job.config.output_dir.join("eval_generations.jsonl");
            let mut lines = String::new();
            for s in samples.1 {
                lines.push_str(&format!("{}\n", serde_json::json!({"step": self.state.step, "row": s.0, "output": s.1})));
            }
            use std::io::Write as _;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|mut f| f.write_all(lines.as_bytes()))
                .map_err(|e| Error::io(&path, e))?;
        }
        let row = Row {
            step: self.state.step,
            values,
        };
        self.progress.note(&format!("step {}: {}", row.step, show(&row.values)));
        log.write(&row)?;
        self.last_eval = Some(row);
        Ok(())
    }

    /// Saves a checkpoint every `save_steps`, and when asked to stop before the last step;
    /// returns whether the run stops here.
    fn checkpoint_if_due(&mut self, stop: bool) -> Result<bool> {
        let step = self.state.step;
        self.interrupted = stop && step < self.state.total_steps;
        let due = self
            .job
            .config
            .training
            .save_steps
            .is_some_and(|every| step.is_multiple_of(every));
        if self.main && (due || self.interrupted) {
            let dir = self.save_checkpoint()?;
            self.progress.note(&format!("saved {}", dir.display()));
        }
        if !self.main
            && (due || self.interrupted)
            && let Some(round) = self.grpo.as_ref().and_then(|g| g.round.as_ref()).filter(|r| r.uses_left > 0)
        {
            // The other workers' parts of an unfinished round, beside rank 0's checkpoint.
            let out = &self.job.config.output_dir;
            let rank = self.collective.map_or(0, |c| c.rank());
            let path = rank_round_file(out, step, rank);
            let dir = path.parent().expect("a file in a folder");
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            let text = serde_json::to_string(round).expect("a round serializes");
            temper_models::atomic::write_file_atomic(&path, text.as_bytes()).map_err(|e| Error::io(&path, e))?;
        }
        Ok(self.interrupted)
    }

    fn save_checkpoint(&self) -> Result<PathBuf> {
        let out = &self.job.config.output_dir;
        let precomputed = matches!(self.reference, Reference::Precomputed(_));
        checkpoint::save(
            out,
            &self.state,
            &self.optim.state_tensors(),
            &self.config_yaml,
            |dir| {
                save_model(&self.model, &self.save_as, dir)?;
                if let Some(round) = self.grpo.as_ref().and_then(|g| g.round.as_ref()).filter(|r| r.uses_left > 0) {
                    let path = dir.join(ROUND_FILE);
                    let text = serde_json::to_string(round).expect("a round serializes");
                    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
                }
                if precomputed {
                    let (from, to) = (out.join(pref::CACHE_FILE), dir.join(pref::CACHE_FILE));
                    std::fs::copy(&from, &to).map_err(|e| Error::io(&to, e))?;
                }
                Ok(())
            },
            self.job.config.training.save_total_limit,
        )
    }

    /// After the loop: a run that trained nothing is an error; a finished one writes its model
    /// and model card.
    fn finish(self) -> Result<Summary> {
        self.progress.finish();
        let state = self.state;
        if state.step == self.start_step && !self.interrupted && self.start_step < state.total_steps {
            // The data ran out before the first step. Saving an unchanged adapter with a model
            // card would look like a finished run.
            return Err(Error::config(
                "data",
                format!(
                    "no training step ran: the data gave no batch (step {} of {})",
                    self.start_step, state.total_steps
                ),
            ));
        }
        let out = &self.job.config.output_dir;
        if !self.interrupted && self.main {
            save_model(&self.model, &self.save_as, out)?;
            let record = crate::card::RunRecord {
                state: &state,
                last_train: self.last_train.as_ref(),
                last_eval: self.last_eval.as_ref(),
                hardware: format!(
                    "{} on {:?}, {:?}{}",
                    B::name(self.device),
                    self.device,
                    self.dtype,
                    match self.model.products {
                        Products::Bf16 => " with bf16 products",
                        Products::F32 => "",
                    }
                ),
            };
            crate::card::write(self.job, &record, out)?;
        }
        Ok(Summary {
            steps: state.step,
            total_steps: state.total_steps,
            losses: state.losses,
            output_dir: out.clone(),
            interrupted: self.interrupted,
        })
    }
}

/// Where worker `rank` (> 0) keeps its part of a GRPO round unfinished at checkpoint `step`.
fn rank_round_file(out: &Path, step: u64, rank: usize) -> PathBuf {
    out.join("grpo_rounds").join(format!("step-{step}-rank-{rank}.json"))
}

/// `completions.jsonl` without the rows of steps after `step` (a resumed run logs them again),
/// or gone for a fresh run (`None`).
fn trim_samples(out: &Path, step: Option<u64>) -> Result<()> {
    let path = out.join("completions.jsonl");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let Some(step) = step else {
        return std::fs::remove_file(&path).map_err(|e| Error::io(&path, e));
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .flat_map(|l| [l, "\n"])
        .collect();
    temper_models::atomic::write_file_atomic(&path, kept.as_bytes()).map_err(|e| Error::io(&path, e))
}

/// Each name's mean over `rows` (which name the same quantities, in the same order).
fn mean_rows(rows: &[Vec<(&'static str, f64)>]) -> Vec<(&'static str, f64)> {
    let Some(first) = rows.first() else {
        return Vec::new();
    };
    first
        .iter()
        .enumerate()
        .map(|(i, (name, _))| (*name, rows.iter().map(|r| r[i].1).sum::<f64>() / rows.len() as f64))
        .collect()
}

/// Appends a step's GRPO samples to `completions.jsonl` (TRL's logged completions).
fn write_samples(out: &Path, samples: &[Sample]) -> Result<()> {
    use std::io::Write;
    let path = out.join("completions.jsonl");
    let mut text = String::new();
    for s in samples {
        text.push_str(&serde_json::to_string(s).expect("a sample serializes"));
        text.push('\n');
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| Error::io(&path, e))
}

/// The evaluation rows a run scores (`data.eval.max_rows`, else all).
fn max_eval_rows(job: &JobConfig) -> usize {
    job.data.eval.as_ref().and_then(|e| e.max_rows).unwrap_or(usize::MAX)
}

/// The checkpoint a `--resume` names: the newest complete one in `out`, or the one given.
fn resume_dir(out: &Path, resume: &Option<Resume>) -> Result<Option<PathBuf>> {
    Ok(match resume {
        None => None,
        Some(Resume::Dir(d)) => Some(d.clone()),
        Some(Resume::Latest) => {
            Some(
                checkpoint::list(out)?
                    .pop()
                    .map(|(_, d)| d)
                    .ok_or_else(|| Error::Checkpoint {
                        path: out.to_path_buf(),
                        message: "--resume: no complete checkpoint in the output directory".into(),
                    })?,
            )
        }
    })
}

fn check_context(job: &JobConfig, model: &ModelConfig) -> Result<()> {
    if job.training.gradient_checkpointing
        && model
            .moe
            .as_ref()
            .and_then(MoeConfig::aux_loss_coef)
            .is_some()
    {
        // The checkpointed forward runs the blocks outside the graph first: the routers'
        // logits it records could not carry the load-balancing loss's gradient.
        return Err(Error::config(
            "training.gradient_checkpointing",
            "is not supported with a mixture of experts' load-balancing loss (the model's config.json sets \
             output_router_logits); turn one of them off",
        ));
    }
    match job.data.max_length {
        Some(max) if max > model.max_position_embeddings => Err(Error::config(
            "data.max_length",
            format!(
                "{max} is longer than the model's context ({})",
                model.max_position_embeddings
            ),
        )),
        _ => Ok(()),
    }
}

/// KTO learns from both kinds of completion: data with only one kind is refused, and, as TRL
/// does, a warning says when the weights do not balance unequal counts.
fn check_kto_balance(job: &Job, tokenizer: &Arc<Tokenizer>, options: LoaderOptions, main: bool) -> Result<()> {
    let ObjectiveSpec::Kto(k) = &job.objective else {
        return Ok(());
    };
    // Every row, whatever this worker's shard.
    let all = LoaderOptions {
        rank: 0,
        world_size: 1,
        epochs: Some(1),
        ..options
    };
    let (d, u) = Pipeline::new(&job.config.data, tokenizer.clone(), all)?.label_counts()?;
    if d + u == 0 {
        return Err(Error::config(
            "data",
            "no row to train on (every row was skipped as bad)",
        ));
    }
    // APO-zero has no KL term: one kind alone still trains (pushed up, or down, from the
    // reference), as TRL allows.
    if (d == 0 || u == 0) && k.loss_type.uses_kl() {
        let paths: Vec<String> = job
            .config
            .data
            .resolved_sources()
            .iter()
            .map(|s| s.path.clone())
            .collect();
        return Err(Error::config(
            "data",
            format!(
                "{}: column `label`: all {} rows are {}; KTO learns from desirable (true) and undesirable (false) \
                 completions together, so the data needs both",
                paths.join(", "),
                d + u,
                if u == 0 {
                    "true (desirable)"
                } else {
                    "false (undesirable)"
                }
            ),
        ));
    }
    if main && d != u {
        // TRL's KTOTrainer: either weight in its range brings the two sides' total weights
        // within a factor 4/3 of each other.
        let round = |x: f64| (x * 100.0).round() / 100.0;
        let (d, u) = (d as f64, u as f64);
        let desirable = (
            round(u * k.undesirable_weight / d),
            round(u * k.undesirable_weight / d * 1.33),
        );
        let undesirable = (
            round(d * k.desirable_weight / u / 1.33),
            round(d * k.desirable_weight / u),
        );
        let within = |w: f64, (lo, hi): (f64, f64)| lo <= w && w <= hi;
        if !within(k.desirable_weight, desirable) && !within(k.undesirable_weight, undesirable) {
            eprintln!(
                "warning: {d} desirable and {u} undesirable rows, and the KTO weights do not balance them: set EITHER \
                 training.kto.desirable_weight in [{}, {}] OR training.kto.undesirable_weight in [{}, {}] (not both), \
                 as TRL recommends",
                desirable.0, desirable.1, undesirable.0, undesirable.1
            );
        }
    }
    Ok(())
}

/// The objective can train on `data` (the section named `which`).
fn check_objective_fits_data(objective: &ObjectiveSpec, data: &Pipeline, which: &str) -> Result<()> {
    let wrong = |message: &str| Err(Error::config("training.objective", format!("{which}: {message}")));
    match (objective.is_online(), data.prompts) {
        (true, true) => return Ok(()),
        (false, true) => {
            return wrong(
                "the data has prompts alone (a `prompt` column and no completion): that is for `objective: grpo`, \
                 which generates the completions; give SFT or preference data for this objective",
            );
        }
        _ => {}
    }
    match (
        objective.is_unpaired(),
        objective.is_preference(),
        data.preference,
        data.unpaired,
    ) {
        (true, _, _, true) | (false, true, true, false) | (false, false, false, false) => Ok(()),
        (true, _, _, false) => wrong(
            "KTO needs completions labelled desirable or not (`prompt`, `completion`, `label` columns) or preference pairs (`chosen`, `rejected`)",
        ),
        (false, _, _, true) => wrong(
            "the data is unpaired completions with a `label` (KTO's format): set `objective: kto`, or give pairs or SFT data",
        ),
        (false, false, true, _) => wrong(
            "the data is preference pairs (chosen/rejected): set `objective: dpo` (or simpo, orpo, kto, reward), or give SFT data",
        ),
        (false, true, false, _) => wrong("preference training needs preference data (`chosen` and `rejected` columns)"),
    }
}

/// The run's length in optimizer steps: `max_steps` (a resumed run goes on to the one it is
/// given now), a resumed run's own, or counted from one pass over the data.
fn total_steps(
    job: &JobConfig,
    resumed: Option<&checkpoint::Loaded>,
    tokenizer: &Arc<Tokenizer>,
    options: LoaderOptions,
    collective: Option<&dyn Collective>,
) -> Result<u64> {
    let t = &job.training;
    Ok(match (resumed, t.max_steps) {
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
        (_, Some(n)) => n,
        (Some(r), None) => r.state.total_steps,
        (None, None) => {
            // A stream has no length: one pass over the data counts the batches (and finds bad
            // rows before the first step rather than hours in).
            let one_epoch = LoaderOptions {
                epochs: Some(1),
                ..options
            };
            let counter = Arc::new(Pipeline::new(&job.data, tokenizer.clone(), one_epoch)?);
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
            match &t.grpo {
                // A batch of prompts is one round: `num_iterations` steps.
                Some(g) => (batches * t.epochs * g.num_iterations as u64).max(1),
                None => (batches * t.epochs)
                    .div_ceil(t.gradient_accumulation_steps as u64)
                    .max(1),
            }
        }
    })
}

/// This worker's data cursor in a checkpoint of a data-parallel run.
fn rank_cursor(state: &TrainerState, rank: usize, world: usize, dir: &Path) -> Result<Cursor> {
    match state.rank_cursors.get(rank) {
        Some(c) if state.rank_cursors.len() == world => Ok(*c),
        _ => Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            message: format!(
                "saved by {} workers; resuming needs the same number (this job has {world})",
                state.rank_cursors.len().max(1)
            ),
        }),
    }
}

/// DPO's reference, built once: LoRA trains only adapters, so the base never changes. It is
/// the base with adapters off, or, when training starts from an existing adapter, that
/// adapter as it was (TRL's "ref" adapter). Either way it shares the policy's base weights.
/// With `precompute_ref_log_probs`, its log-probabilities are computed once (or read from the
/// checkpoint a run resumes) and the model is dropped.
fn build_reference<B: AutodiffBackend>(
    job: &Job,
    model: &LlamaForCausalLM<B>,
    tokenizer: &Arc<Tokenizer>,
    loader_options: LoaderOptions,
    total_steps: u64,
    resume_dir: Option<&Path>,
    main: bool,
    device: &B::Device,
) -> Result<Reference<B::InnerBackend>> {
    let Some(precompute) = job.objective.reference() else {
        return Ok(Reference::None);
    };
    let reference = match job.adapter.init_from() {
        Some(initial) => temper_peft::load_adapter(model.valid(), initial)?.0,
        None => {
            let mut r = model.valid();
            r.set_adapters_enabled(false);
            r
        }
    };
    if !precompute {
        return Ok(Reference::Model(Box::new(reference)));
    }
    let config = &job.config;
    // KTO's cover is the run's micro-batches: a resumed run given more steps needs more.
    let micro_batches = (total_steps as usize).saturating_mul(config.training.gradient_accumulation_steps);
    let saved = resume_dir.map(|d| d.join(pref::CACHE_FILE)).filter(|p| p.exists());
    let saved = saved.map(|path| RefCache::load(&path)).transpose()?;
    let cache = match saved {
        Some(cache) if loader_options.unpaired.is_none() || cache.covers(micro_batches) => cache,
        _ => {
            let started = Instant::now();
            let pipelines =
                pref::precompute_pipelines(config, tokenizer, loader_options, micro_batches, max_eval_rows(config))?;
            let mut cache = RefCache::compute(&reference, &pipelines, device)?;
            if loader_options.unpaired.is_some() {
                cache.set_covered(micro_batches);
            }
            eprintln!(
                "reference log-probabilities of {} pairs or sequences precomputed in {:.1} s",
                cache.len(),
                started.elapsed().as_secs_f64()
            );
            cache
        }
    };
    if main {
        cache.save(&job.config.output_dir.join(pref::CACHE_FILE))?;
    }
    Ok(Reference::Precomputed(cache))
}

/// Loads the weights (the config and tokenizer are read already), then adds (or restores) the
/// adapter, or makes every weight trainable.
fn build_model<B: AutodiffBackend>(
    job: &Job,
    model_config: &ModelConfig,
    tokenizer: &Arc<Tokenizer>,
    device: &B::Device,
    (dtype, products): (DType, Products),
    checkpoint: Option<&Path>,
) -> Result<(LlamaForCausalLM<B>, SaveAs)> {
    let (config, seed) = (&job.config, job.config.training.seed);
    let reward = matches!(job.objective, ObjectiveSpec::Reward(_));
    if model_config.score_head && !reward {
        return Err(Error::config(
            "model.path",
            format!(
                "{} is a reward model (`*ForSequenceClassification`, a `score` head and no language head): train it \
                 with `objective: reward`, or give a causal language model for `objective: {}`",
                config.model.path.display(),
                job.objective.name()
            ),
        ));
    }
    // A full fine-tuning checkpoint holds the whole model; a LoRA one only the adapter.
    let weights_from = match &job.adapter {
        AdapterSpec::Full => checkpoint.unwrap_or(&config.model.path),
        AdapterSpec::Lora { .. } => &config.model.path,
    };
    let mut model_config = model_config.clone();
    // A full reward run's checkpoint is a classifier: `score`, no `lm_head`.
    let load_config = match (reward, &job.adapter, checkpoint) {
        (true, AdapterSpec::Full, Some(_)) => ModelConfig {
            score_head: true,
            ..model_config.clone()
        },
        _ => model_config.clone(),
    };
    let mut base = if config.model.random_init && weights_from == config.model.path {
        let source = temper_models::llama::random_weights(&load_config, seed);
        LlamaForCausalLM::load(&load_config, &source, device, dtype)?
    } else {
        temper_models::load_weights::<B>(weights_from, &load_config, device, dtype)?
    };
    if reward {
        // A reward model scores with `score` (a causal LM's checkpoint gets a fresh one, drawn
        // as transformers draws it); its language head is never used.
        base.add_score_head(0.02, seed);
        base.lm_head = None;
        model_config.score_head = true;
        model_config.pad_token_id = tokenizer.pad_token_id();
    }
    let AdapterSpec::Lora {
        config: lora,
        init_from,
        quantize_base,
        ..
    } = &job.adapter
    else {
        // Every weight trains in f32; bf16 products round them as autocast does.
        let mut model = base.map(&mut TrainAll);
        model.set_products(products);
        return Ok((model, SaveAs::Full(model_config, tokenizer.clone())));
    };
    let (mut model, mut lora) = match checkpoint.or(init_from.as_deref()) {
        Some(dir) => temper_peft::load_adapter(base.no_grad(), dir)?,
        None => {
            let mut lora = lora.clone();
            if reward {
                // Listed before the adapter is placed, so `score` is never also LoRA-adapted.
                lora.modules_to_save.push(SavedModule::Score);
            }
            let (model, _) = temper_peft::inject(base, &lora, seed).map_err(|e| match e {
                temper_peft::Error::Invalid { key, message } => Error::config(&format!("adapter.{key}"), message),
                other => other.into(),
            })?;
            (model, lora.clone())
        }
    };
    if reward && !lora.modules_to_save.contains(&SavedModule::Score) {
        // PEFT's SEQ_CLS adapters train the head in full and save it with the adapter; this one
        // started as a language model's.
        lora.modules_to_save.push(SavedModule::Score);
        let score = model.score.as_mut().expect("added above");
        score.weight = score.weight.clone().set_require_grad(true);
    }
    let model = match quantize_base {
        None => model,
        Some(q) => temper_peft::quantize_base(model, *q)?.0,
    };
    let mut model = match products {
        Products::Bf16 => temper_peft::keep_base_bf16(model).0,
        Products::F32 => model,
    };
    model.set_products(products);
    lora.base_model_name_or_path = Some(
        config
            .base_model_id()
            .map(String::from)
            .unwrap_or_else(|| config.model.path.display().to_string()),
    );
    Ok((model, SaveAs::Lora(lora)))
}

/// Marks every float parameter trainable (full fine-tuning).
struct TrainAll;

impl<B: Backend> ModuleMapper<B> for TrainAll {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        param.set_require_grad(true)
    }
}

fn save_model<B: Backend>(model: &LlamaForCausalLM<B>, save_as: &SaveAs, dir: &Path) -> Result<()> {
    match save_as {
        SaveAs::Lora(config) => temper_peft::save_adapter(model, config, dir)?,
        SaveAs::Full(config, tokenizer) => {
            save_pretrained(model, config, dir, CheckpointDtype::F32, DEFAULT_SHARD_BYTES)?;
            tokenizer.save_pretrained(dir)?;
        }
    }
    Ok(())
}

/// `training.eval_generation`: the answers to the prepared rows (greedy), their `eval_*`
/// scores, and the samples as a Markdown table (for TensorBoard) and as (row, answer).
#[allow(clippy::type_complexity)]
fn generation_scores<B: Backend>(
    model: &LlamaForCausalLM<B>,
    tokenizer: &Tokenizer,
    g: &GenerationEval,
    spec: &crate::config::EvalGeneration,
    device: &B::Device,
) -> Result<(Vec<(&'static str, f64)>, (String, Vec<(usize, String)>))> {
    let generation = crate::eval::GenerationSection {
        max_new_tokens: spec.max_new_tokens,
        batch_size: g.prompts.len(),
        ..Default::default()
    };
    let answers = crate::eval::generate_answers(model, tokenizer, &g.prompts, &generation, &g.eos, g.context, device)?;
    let scored = crate::eval::score_answers(&spec.scorers, &g.rows, &answers, 0)?;
    let values = scored
        .measures
        .iter()
        .map(|(name, m)| (metric_name(&format!("eval_{name}")), m.value))
        .collect();
    let cell = |s: &str| s.replace('|', "\\|").replace('\n', "<br>");
    let mut table = String::from("| row | prompt | answer | reference |\n|---|---|---|---|\n");
    for (i, (row, answer)) in g.rows.iter().zip(&answers).enumerate() {
        let prompt = match &row.prompt {
            temper_data::Content::Text(s) => s.clone(),
            temper_data::Content::Messages(m) => m.iter().map(|m| format!("{}: {}", m.role, m.content)).collect::<Vec<_>>().join("\n"),
        };
        table.push_str(&format!(
            "| {i} | {} | {} | {} |\n",
            cell(&prompt),
            cell(answer),
            cell(row.answer.as_deref().unwrap_or(""))
        ));
    }
    Ok((values, (table, answers.into_iter().enumerate().collect())))
}

/// A metric name that lives as long as the process: the logged rows' names are `&'static`,
/// and the scorers' names are known only from the config (a few bytes, interned once each).
fn metric_name(name: &str) -> &'static str {
    static NAMES: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut names = NAMES.lock().expect("no panic while locked");
    match names.iter().find(|n| **n == name) {
        Some(n) => n,
        None => {
            let leaked: &'static str = Box::leak(name.to_string().into_boxed_str());
            names.push(leaked);
            leaked
        }
    }
}

/// Metrics over the evaluation data, without gradients: `eval_loss` (per target token for
/// SFT, per pair for preference objectives) and the objective's `eval_*` metrics.
#[allow(clippy::too_many_arguments)]
fn evaluate<B: AutodiffBackend>(
    model: &LlamaForCausalLM<B>,
    reference: &Reference<B::InnerBackend>,
    loss: &Loss,
    eval: &DataConfig,
    tokenizer: &Arc<Tokenizer>,
    batch_size: usize,
    objective: &ObjectiveSpec,
    max_rows: usize,
    device: &B::Device,
) -> Result<Vec<(&'static str, f64)>> {
    let model = model.valid();
    let options = objective.loader_options(batch_size);
    // The pipeline names its settings `data.*`; these are the evaluation data's.
    let in_eval = |e: temper_data::Error| match e {
        temper_data::Error::Config { key, message } => Error::config(&key.replacen("data", "data.eval", 1), message),
        other => Error::Data(other),
    };
    let pipeline = Arc::new(Pipeline::new(eval, tokenizer.clone(), options).map_err(in_eval)?);
    let mut sums = loss.empty_sums();
    let (mut count, mut rows) = (0usize, 0usize);
    let vocab = model.vocab_size();
    for b in pipeline.spawn(Cursor::default()) {
        let batch = b.map_err(in_eval)?.batch;
        check_vocab(&batch, vocab, || "evaluation data".to_string())?;
        rows += match &batch {
            Batch::Sft(b) => b.batch_size,
            Batch::Preference(b) => b.pairs,
            Batch::Unpaired(b) => b.rows,
            Batch::Prompts(_) | Batch::Rollout(_) => unreachable!("GRPO runs do not evaluate (config check)"),
        };
        count += batch.loss_normaliser();
        let batches = [batch];
        let (r, kl) = loss
            .prepare(&model, &batches, |b| reference.logps(b, device), 1, None, device)?
            .pop()
            .expect("one micro-batch");
        loss.micro_batch(&model, &plain, &batches[0], |_: &Batch| Ok(r), kl, device, &mut sums)?;
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
    let mut out = vec![("eval_loss", sums.get(Metric::Loss) / count as f64)];
    out.extend(sums.logged(count, true));
    Ok(out)
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
    if saved.training.objective != job.training.objective {
        return Err(Error::config(
            "training.objective",
            format!(
                "resuming from {}: the run started with `objective: {}`, not `{}`; resume with the original \
                 objective, or start a new output_dir",
                checkpoint.display(),
                saved.training.objective.name(),
                job.training.objective.name()
            ),
        ));
    }
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
        .map(|k| {
            (
                k,
                format!("adapter.{k} is {} there, {} now", show(before.get(k)), show(now.get(k))),
            )
        })
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

fn show(values: &[(&str, f64)]) -> String {
    values
        .iter()
        .map(|(n, v)| format!("{n} {v:.4}"))
        .collect::<Vec<_>>()
        .join(", ")
}
