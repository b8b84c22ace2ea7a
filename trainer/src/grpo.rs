//! GRPO on a model: each step's prompts completed `num_generations` times by the policy
//! (batched, with a KV cache), the completions scored by the reward functions, their
//! group-relative advantages, and the micro-batches the loss reads (with the log-probabilities
//! of the policy that generated them and of the reference, when the loss needs them). A round
//! serves `num_iterations` steps.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use temper_data::{Batch, PromptBatch, RolloutBatch};
use temper_models::{LlamaForCausalLM, Sampling, Tokenizer};
use temper_trl::{GrpoParams, group_advantages, grpo_loss, weighted_rewards};

use crate::blocks::{HiddenFn, plain};
use crate::config::{GrpoSection, RewardFunction};
use crate::error::{Error, Result};
use crate::forward::{Scoring, int_matrix, scored_token_logps_at};
use crate::step::{Metric, StepSums};
use crate::sync::{Collective, all_gather};

/// The log-probabilities of each completion token of `batch` (`[rows, completion_len]`) at
/// `temperature`, and with `entropy` their entropies.
pub(crate) fn rollout_logps<B: Backend>(
    model: &LlamaForCausalLM<B>,
    hidden: HiddenFn<B>,
    batch: &RolloutBatch,
    scoring: Scoring,
    device: &B::Device,
) -> (Tensor<B, 2>, Option<Tensor<B, 2>>) {
    let shape = [batch.rows, batch.completion_len];
    let (positions, targets) = batch.positions();
    let ids = int_matrix(&batch.input_ids, [batch.rows, batch.seq_len], device);
    // Right padding under a causal mask: real tokens never see the padding after them.
    let out = scored_token_logps_at(model, hidden, ids, Default::default(), positions, targets, scoring, device);
    (out.logps.reshape(shape), out.entropy.map(|e| e.reshape(shape)))
}

fn matrix<B: Backend>(values: &[f32], shape: [usize; 2], device: &B::Device) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

/// The loss of one rollout micro-batch (its share before the step's division, see
/// `temper_trl::GrpoOutput::loss`); adds TRL's `kl`, `entropy` and `clip_ratio/*` to `sums`
/// (averaged over micro-batches at logging).
pub(crate) fn grpo_step_loss<B: Backend>(
    model: &LlamaForCausalLM<B>,
    hidden: HiddenFn<B>,
    batch: &RolloutBatch,
    params: &GrpoParams,
    temperature: f64,
    device: &B::Device,
    sums: &mut StepSums,
) -> Tensor<B, 1> {
    let shape = [batch.rows, batch.completion_len];
    let scoring = Scoring {
        temperature,
        entropy: true,
    };
    let (logps, entropy) = rollout_logps(model, hidden, batch, scoring, device);
    let old = batch.old_logps.as_ref().map(|v| matrix(v, shape, device));
    let reference = batch.ref_logps.as_ref().map(|v| matrix(v, shape, device));
    let advantages = Tensor::from_data(TensorData::new(batch.advantages.clone(), [batch.rows]), device);
    let mask = matrix(&batch.mask, shape, device);
    let out = grpo_loss(logps, old, reference, advantages, mask, entropy, params);
    if let Some(kl) = out.kl {
        sums.add(Metric::Kl, kl);
    }
    if let Some(e) = out.entropy {
        sums.add(Metric::Entropy, e);
    }
    sums.add(Metric::ClipLowMean, out.clip_low);
    sums.add(Metric::ClipHighMean, out.clip_high);
    sums.add(Metric::ClipRegionMean, out.clip_region);
    // TRL's nanmean at logging leaves out micro-batches without a counted token.
    if !out.clip_low_min.is_nan() {
        sums.add(Metric::ClipLowMin, out.clip_low_min);
        sums.add(Metric::ClipHighMax, out.clip_high_max);
        sums.add(Metric::CountedMicroBatches, 1.0);
    }
    sums.add(Metric::MicroBatches, 1.0);
    out.loss
}

#[cfg(test)]
thread_local! {
    /// Completions and rewards a test gives instead of sampling and scoring (as TRL's
    /// `rollout_func` does in its fixture).
    pub(crate) static REPLAY: std::cell::RefCell<Option<Replay>> = const { std::cell::RefCell::new(None) };
}

/// For each prompt (its ids), its completions in order with their rewards per function.
#[cfg(test)]
pub(crate) struct Replay {
    pub by_prompt: std::collections::HashMap<Vec<u32>, Vec<(Vec<u32>, Vec<f32>)>>,
}

#[cfg(test)]
impl Replay {
    /// The `k`-th copy of a prompt in the round gets its `k`-th completion.
    fn answer(&self, prompts: &[&[u32]]) -> (Vec<Vec<u32>>, Vec<f32>) {
        let mut seen: std::collections::HashMap<&[u32], usize> = std::collections::HashMap::new();
        let (mut completions, mut rewards) = (Vec::new(), Vec::new());
        for p in prompts {
            let k = seen.entry(p).or_default();
            let (ids, r) = &self.by_prompt[*p][*k];
            *k += 1;
            completions.push(ids.clone());
            rewards.extend_from_slice(r);
        }
        (completions, rewards)
    }
}

/// A round's completions with their rewards, as `completions.jsonl` shows them.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Sample {
    pub step: u64,
    pub prompt: Value,
    pub completion: String,
    pub rewards: Map<String, Value>,
    pub reward: f32,
    pub advantage: f32,
}

/// What a checkpoint keeps of a round that has steps left (`num_iterations` > 1), so a resumed
/// run continues it rather than generating from a policy that has moved on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SavedRound {
    pub uses_left: usize,
    pub batches: Vec<RolloutBatch>,
}

pub(crate) const ROUND_FILE: &str = "grpo_round.json";

/// A round just generated: its micro-batches for this step, its metrics and its samples.
pub(crate) struct NewRound {
    pub batches: Vec<Batch>,
    pub metrics: Vec<(&'static str, f64)>,
    pub samples: Vec<Sample>,
}

/// GRPO's state across steps: the reward functions (a command stays alive between rounds, a
/// reward model stays loaded), and the round being used.
pub(crate) struct Grpo<B: Backend> {
    section: GrpoSection,
    params: GrpoParams,
    scorers: Vec<Scorer<B>>,
    /// Each function's `rewards/<name>/mean` and `/std` (named once per run).
    metric_names: Vec<(&'static str, &'static str)>,
    weights: Vec<f32>,
    eos: Vec<u32>,
    pad: u32,
    context: usize,
    seed: u64,
    micro_batch_size: usize,
    tokenizer: Arc<Tokenizer>,
    /// The current round's micro-batches and the steps it still serves.
    pub round: Option<SavedRound>,
}

impl<B: Backend> Grpo<B> {
    /// Starts the reward functions (a command's program is spawned and a reward model loaded
    /// here, so a wrong path fails before the first step). `vocab`: the policy's.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        section: &GrpoSection,
        tokenizer: Arc<Tokenizer>,
        eos: Vec<u32>,
        pad: u32,
        context: usize,
        seed: u64,
        micro_batch_size: usize,
        vocab: usize,
        device: &B::Device,
    ) -> Result<Self> {
        let scorers = section
            .rewards
            .iter()
            .enumerate()
            .map(|(i, r)| Scorer::new(r, i, pad, vocab, device))
            .collect::<Result<Vec<_>>>()?;
        let metric_names = section
            .rewards
            .iter()
            .map(|r| {
                let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
                (
                    leak(format!("rewards/{}/mean", r.name())),
                    leak(format!("rewards/{}/std", r.name())),
                )
            })
            .collect();
        let weights = match &section.reward_weights {
            Some(w) => w.iter().map(|&w| w as f32).collect(),
            None => vec![1.0; section.rewards.len()],
        };
        Ok(Self {
            params: section.params(),
            section: section.clone(),
            scorers,
            metric_names,
            weights,
            eos,
            pad,
            context,
            seed,
            micro_batch_size,
            tokenizer,
            round: None,
        })
    }

    /// Takes a use of the current round: its micro-batches, when it has steps left.
    pub(crate) fn reuse(&mut self) -> Option<Vec<Batch>> {
        let round = self.round.as_mut().filter(|r| r.uses_left > 0)?;
        round.uses_left -= 1;
        Some(round.batches.iter().cloned().map(Batch::Rollout).collect())
    }

    /// A new round from `prompts` at optimizer step `step` (1-based): generation with
    /// `policy` (no autodiff, no dropout), rewards, advantages (over every worker's
    /// completions with batch scaling), the micro-batches with the log-probabilities the loss
    /// needs (`old` from `policy` when the round serves several steps; `reference` with a KL
    /// term), for this step (its first use).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new_round(
        &mut self,
        policy: &LlamaForCausalLM<B>,
        reference: Option<&LlamaForCausalLM<B>>,
        prompts: &PromptBatch,
        step: u64,
        collective: Option<&dyn Collective>,
        device: &B::Device,
    ) -> Result<NewRound> {
        let g = self.section.num_generations;
        let rank = collective.map_or(0, |c| c.rank());
        let rows: Vec<(usize, &[u32])> = prompts
            .prompts
            .iter()
            .enumerate()
            .flat_map(|(i, p)| std::iter::repeat_n((i, p.prompt_ids.as_slice()), g))
            .collect();
        let n = rows.len();
        // Each completion's own seed, from the step, its prompt and its place among that
        // prompt's copies: the same samples whatever the batching or the worker (N workers draw
        // what one worker with their rounds together would), and again after a resume.
        let mut copies: std::collections::HashMap<&[u32], u64> = std::collections::HashMap::new();
        let seeds: Vec<u64> = rows
            .iter()
            .map(|(_, p)| {
                let k = copies.entry(p).or_default();
                *k += 1;
                mix(self.seed, step, content_hash(p), *k - 1)
            })
            .collect();
        let sampling = Sampling {
            max_new_tokens: self.section.max_completion_length,
            temperature: self.section.temperature as f32,
            top_p: self.section.top_p as f32,
            top_k: self.section.top_k,
            seed: 0,
            max_length: Some(self.context),
        };
        let started = Instant::now();
        let ids: Vec<&[u32]> = rows.iter().map(|(_, p)| *p).collect();
        #[cfg(test)]
        let replayed = REPLAY.with(|r| r.borrow().as_ref().map(|r| r.answer(&ids)));
        #[cfg(not(test))]
        let replayed: Option<(Vec<Vec<u32>>, Vec<f32>)> = None;
        let (completions, given) = match replayed {
            Some((completions, rewards)) => (completions, Some(rewards)),
            None => (
                temper_models::generate::generate_batch(policy, &ids, &self.eos, &sampling, &seeds, device)?,
                None,
            ),
        };
        let generation_seconds = started.elapsed().as_secs_f64();
        let generated: usize = completions.iter().map(Vec::len).sum();
        let truncated: Vec<bool> = completions
            .iter()
            .map(|c| c.last().is_none_or(|t| !self.eos.contains(t) && *t != self.pad))
            .collect();
        let texts = completions
            .iter()
            .map(|c| self.tokenizer.decode(c, true))
            .collect::<std::result::Result<Vec<_>, _>>()?;

        // Rewards, [n, functions].
        let f = self.scorers.len();
        let mut per_func = vec![0.0f32; n * f];
        let items: Vec<Item> = rows
            .iter()
            .zip(&texts)
            .zip(&completions)
            .map(|(((p, prompt_ids), text), ids)| Item {
                prompt: &prompts.prompts[*p].prompt,
                completion: text,
                tokens: ids.len(),
                columns: &prompts.prompts[*p].columns,
                prompt_ids,
                completion_ids: ids,
            })
            .collect();
        for (j, scorer) in self.scorers.iter_mut().enumerate().filter(|_| given.is_none()) {
            let values = scorer.score(&items, device).map_err(|message| Error::Reward {
                name: self.section.rewards[j].name().to_string(),
                index: j,
                message,
            })?;
            for (i, v) in values.into_iter().enumerate() {
                per_func[i * f + j] = v;
            }
        }

        if let Some(given) = given {
            per_func = given;
        }
        // What TRL gathers over the processes: rewards, lengths, truncation.
        let mut local = per_func.clone();
        local.extend(completions.iter().map(|c| c.len() as f32));
        local.extend(truncated.iter().map(|&t| t as u8 as f32));
        let gathered: Vec<f32> = match collective {
            Some(c) if c.world_size() > 1 => all_gather(c, &local)?.concat(),
            _ => local,
        };
        let chunk = n * f + 2 * n;
        let (mut all_funcs, mut lengths, mut clipped) = (Vec::new(), Vec::new(), Vec::new());
        for w in gathered.chunks(chunk) {
            all_funcs.extend_from_slice(&w[..n * f]);
            lengths.extend_from_slice(&w[n * f..n * f + n]);
            clipped.extend(w[n * f + n..].iter().map(|&t| t > 0.0));
        }
        let all_rewards = weighted_rewards(&all_funcs, &self.weights);
        let adv = group_advantages(&all_rewards, g, self.section.scale_rewards);
        let mine = rank * n..(rank + 1) * n;
        let advantages = &adv.advantages[mine.clone()];
        let rewards = &all_rewards[mine];

        let mut metrics = vec![
            ("reward", adv.reward),
            ("reward_std", adv.reward_std),
            ("frac_reward_zero_std", adv.frac_reward_zero_std),
        ];
        for (j, (mean_name, std_name)) in self.metric_names.iter().enumerate() {
            let column: Vec<f32> = all_funcs.chunks(f).map(|r| r[j]).collect();
            metrics.push((mean_name, temper_trl::grpo::nanmean(&column) as f64));
            metrics.push((std_name, temper_trl::grpo::nanstd(&column) as f64));
        }
        metrics.extend(length_metrics(&lengths, &clipped));
        metrics.push(("completions/tokens_per_second", generated as f64 / generation_seconds.max(1e-9)));

        let samples = rows
            .iter()
            .enumerate()
            .map(|(i, (p, _))| Sample {
                step,
                prompt: prompts.prompts[*p].prompt.clone(),
                completion: texts[i].clone(),
                rewards: self
                    .section
                    .rewards
                    .iter()
                    .enumerate()
                    .map(|(j, r)| (r.name().to_string(), json!(finite_or_null(per_func[i * f + j]))))
                    .collect(),
                reward: rewards[i],
                advantage: advantages[i],
            })
            .collect();

        // The round shuffled once, then cut into micro-batches (TRL's shuffle_sequence_dict
        // and split_tensor_dict).
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut StdRng::seed_from_u64(mix(self.seed, step, rank as u64, u64::MAX)));
        let counts = |i: usize| !(self.section.mask_truncated_completions && truncated[i]);
        let mut batches = Vec::new();
        for part in order.chunks(self.micro_batch_size) {
            let prompts_of: Vec<&[u32]> = part.iter().map(|&i| rows[i].1).collect();
            let completions_of: Vec<&[u32]> = part.iter().map(|&i| completions[i].as_slice()).collect();
            let counted: Vec<bool> = part.iter().map(|&i| counts(i)).collect();
            let mut b = RolloutBatch::collate(&prompts_of, &completions_of, &counted, self.pad);
            b.advantages = part.iter().map(|&i| advantages[i]).collect();
            b.loss_weight = temper_trl::grpo::loss_weight(self.params.loss_type, b.rows, b.counted_tokens());
            let scoring = Scoring {
                temperature: self.section.temperature,
                entropy: false,
            };
            let values = |m: &LlamaForCausalLM<B>, b: &RolloutBatch| -> Vec<f32> {
                let (logps, _) = rollout_logps(m, &plain, b, scoring, device);
                logps.into_data().convert::<f32>().to_vec().expect("f32 log-probabilities")
            };
            if self.section.num_iterations > 1 {
                b.old_logps = Some(values(policy, &b));
            }
            if let Some(r) = reference {
                b.ref_logps = Some(values(r, &b));
            }
            batches.push(b);
        }
        self.round = Some(SavedRound {
            uses_left: self.section.num_iterations - 1,
            batches: batches.clone(),
        });
        Ok(NewRound {
            batches: batches.into_iter().map(Batch::Rollout).collect(),
            metrics,
            samples,
        })
    }
}

fn finite_or_null(v: f32) -> Option<f32> {
    v.is_finite().then_some(v)
}

/// TRL's `completions/*` metrics over every worker's completions: lengths (EOS included), the
/// share cut at `max_completion_length`, and the lengths of those that ended.
fn length_metrics(lengths: &[f32], clipped: &[bool]) -> Vec<(&'static str, f64)> {
    let stats = |xs: &[f32]| -> (f64, f64, f64) {
        if xs.is_empty() {
            return (0.0, 0.0, 0.0);
        }
        let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / xs.len() as f64;
        let min = xs.iter().copied().fold(f32::INFINITY, f32::min) as f64;
        let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        (mean, min, max)
    };
    let (mean, min, max) = stats(lengths);
    let ended: Vec<f32> = lengths
        .iter()
        .zip(clipped)
        .filter(|(_, c)| !**c)
        .map(|(&l, _)| l)
        .collect();
    let (t_mean, t_min, t_max) = stats(&ended);
    vec![
        ("completions/mean_length", mean),
        ("completions/min_length", min),
        ("completions/max_length", max),
        (
            "completions/clipped_ratio",
            clipped.iter().filter(|&&c| c).count() as f64 / clipped.len().max(1) as f64,
        ),
        ("completions/mean_terminated_length", t_mean),
        ("completions/min_terminated_length", t_min),
        ("completions/max_terminated_length", t_max),
    ]
}

/// FNV-1a over token ids: a prompt's identity for its seeds.
fn content_hash(ids: &[u32]) -> u64 {
    ids.iter().fold(0xCBF2_9CE4_8422_2325u64, |h, &t| {
        (h ^ t as u64).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// A seed from a run's seed and a completion's coordinates (SplitMix64's finaliser).
fn mix(seed: u64, step: u64, rank: u64, i: u64) -> u64 {
    let mut z = seed
        ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ rank.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ i.wrapping_mul(0x1656_67B1_9E37_79F9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One completion as a reward function sees it.
struct Item<'a> {
    prompt: &'a Value,
    completion: &'a str,
    tokens: usize,
    columns: &'a Map<String, Value>,
    prompt_ids: &'a [u32],
    completion_ids: &'a [u32],
}

/// A reward function, ready to score.
enum Scorer<B: Backend> {
    Accuracy { column: String },
    Format { pattern: Regex },
    Length { target: usize, penalty: f32 },
    Command(Box<CommandReward>),
    /// A reward model, and the token its scores are read before (its padding).
    Model { model: Box<LlamaForCausalLM<B>>, pad: u32 },
}

/// Rows scored by a reward model at once.
const REWARD_MODEL_ROWS: usize = 16;

impl<B: Backend> Scorer<B> {
    fn new(f: &RewardFunction, index: usize, pad: u32, vocab: usize, device: &B::Device) -> Result<Self> {
        let fail = |message: String| Error::Reward {
            name: f.name().to_string(),
            index,
            message,
        };
        Ok(match f {
            RewardFunction::Model { path, adapter, .. } => {
                let mut loaded = temper_models::load_pretrained::<B>(path, device, burn::tensor::DType::F32)?;
                if let Some(dir) = adapter {
                    loaded.model = temper_peft::load_adapter(loaded.model, dir)?.0;
                }
                let shown = match adapter {
                    Some(a) => format!("{} with {}", path.display(), a.display()),
                    None => path.display().to_string(),
                };
                if loaded.model.score.is_none() {
                    return Err(fail(format!(
                        "{shown} has no reward head (`score`): give a reward model (a `*ForSequenceClassification` \
                         directory), or its base with `adapter:` trained with `objective: reward`"
                    )));
                }
                if loaded.model.vocab_size() != vocab {
                    return Err(fail(format!(
                        "{shown} has a vocabulary of {} tokens and the policy {vocab}: a reward model reads the \
                         policy's tokens, so it must share its tokenizer (train it from the same base)",
                        loaded.model.vocab_size()
                    )));
                }
                // A classifier's own config names the token its scores skip; a reward adapter
                // pools as it was trained, at the tokenizer's pad (or EOS) token.
                let pad = match loaded.config.pad_token_id {
                    Some(id) if loaded.config.score_head => id,
                    _ => pad,
                };
                Scorer::Model {
                    model: Box::new(loaded.model),
                    pad,
                }
            }
            RewardFunction::Accuracy { column, .. } => Scorer::Accuracy { column: column.clone() },
            RewardFunction::Format { pattern, .. } => Scorer::Format {
                pattern: Regex::new(pattern).expect("validated with the config"),
            },
            RewardFunction::Length { target, penalty, .. } => Scorer::Length {
                target: *target,
                penalty: *penalty as f32,
            },
            RewardFunction::Command { command, timeout_s, .. } => Scorer::Command(Box::new(
                CommandReward::start(command, Duration::from_secs(*timeout_s)).map_err(fail)?,
            )),
        })
    }

    /// One value per item; an error says which row and why.
    fn score(&mut self, items: &[Item], device: &B::Device) -> std::result::Result<Vec<f32>, String> {
        match self {
            Scorer::Model { model, pad } => {
                let mut out = Vec::with_capacity(items.len());
                for chunk in items.chunks(REWARD_MODEL_ROWS) {
                    let prompts: Vec<&[u32]> = chunk.iter().map(|i| i.prompt_ids).collect();
                    let completions: Vec<&[u32]> = chunk.iter().map(|i| i.completion_ids).collect();
                    let rows = RolloutBatch::collate(&prompts, &completions, &vec![true; chunk.len()], *pad);
                    out.extend(crate::reward::batch_scores(model, &Batch::Rollout(rows), *pad, device));
                }
                Ok(out)
            }
            Scorer::Accuracy { column } => items
                .iter()
                .enumerate()
                .map(|(row, item)| {
                    let reference = match item.columns.get(column.as_str()) {
                        Some(Value::String(s)) => s.clone(),
                        Some(Value::Number(x)) => x.to_string(),
                        Some(other) => {
                            return Err(format!(
                                "completion {row}: column `{column}` holds {other}, not an answer (a string or a number)"
                            ));
                        }
                        None => {
                            let mut names: Vec<&str> = item.columns.keys().map(String::as_str).collect();
                            names.sort_unstable();
                            return Err(format!(
                                "completion {row}: the row has no column `{column}` (its columns: {}); set the \
                                 reward's `column`",
                                names.join(", ")
                            ));
                        }
                    };
                    Ok(temper_trl::rewards::accuracy(item.completion, &reference))
                })
                .collect(),
            Scorer::Format { pattern } => Ok(items
                .iter()
                .map(|i| temper_trl::rewards::format(i.completion, pattern))
                .collect()),
            Scorer::Length { target, penalty } => Ok(items
                .iter()
                .map(|i| temper_trl::rewards::length(i.tokens, *target, *penalty))
                .collect()),
            Scorer::Command(c) => c.score(items),
        }
    }
}

/// A reward program kept alive for the run: JSON lines in, one number per line out.
struct CommandReward {
    shown: String,
    timeout: Duration,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<std::io::Result<String>>,
    /// The end of what the program wrote to its standard error, for the error message.
    stderr: Arc<Mutex<String>>,
}

impl CommandReward {
    fn start(argv: &[String], timeout: Duration) -> std::result::Result<Self, String> {
        let shown = argv.join(" ");
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start `{shown}`: {e}"))?;
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let (tx, lines) = channel();
        std::thread::Builder::new()
            .name("temper-reward-out".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        let tail = Arc::new(Mutex::new(String::new()));
        let keep = tail.clone();
        std::thread::Builder::new()
            .name("temper-reward-err".into())
            .spawn(move || {
                // Bytes, decoded leniently: a program's stderr need not be UTF-8, and it must be
                // drained to its end (a full pipe would stop the program).
                let mut reader = BufReader::new(stderr);
                let mut bytes = Vec::new();
                while reader.read_until(b'\n', &mut bytes).is_ok_and(|n| n > 0) {
                    let line = String::from_utf8_lossy(&bytes).into_owned();
                    bytes.clear();
                    let mut t = keep.lock().expect("not poisoned");
                    t.push_str(&line);
                    if t.len() > 2000 {
                        let cut = t.len() - 2000;
                        let cut = (cut..t.len()).find(|&i| t.is_char_boundary(i)).unwrap_or(cut);
                        t.drain(..cut);
                    }
                }
            })
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        Ok(Self {
            shown,
            timeout,
            stdin: child.stdin.take(),
            child,
            lines,
            stderr: tail,
        })
    }

    /// Why the program stopped answering: its exit status and the end of its standard error.
    fn gone(&mut self, row: usize) -> String {
        // The stderr thread may still be reading the program's last words.
        std::thread::sleep(Duration::from_millis(100));
        let status = match self.child.try_wait() {
            Ok(Some(s)) => format!("it exited ({s})"),
            _ => "it closed its output".to_string(),
        };
        let err = self.stderr.lock().expect("not poisoned").trim().to_string();
        format!(
            "`{}` gave no answer for completion {row}: {status}{}",
            self.shown,
            if err.is_empty() {
                String::new()
            } else {
                format!("; its standard error ends with:\n{err}")
            }
        )
    }

    fn score(&mut self, items: &[Item]) -> std::result::Result<Vec<f32>, String> {
        let mut input = String::new();
        for item in items {
            let mut line = item.columns.clone();
            line.insert("prompt".into(), item.prompt.clone());
            line.insert("completion".into(), Value::String(item.completion.to_string()));
            input.push_str(&Value::Object(line).to_string());
            input.push('\n');
        }
        // Written from a thread: a program that stops reading must not block training past its
        // timeout (a stopped program closes the pipe and the write ends).
        let Some(mut stdin) = self.stdin.take() else {
            return Err(self.gone(0));
        };
        let writer = std::thread::Builder::new()
            .name("temper-reward-in".into())
            .spawn(move || {
                let written = stdin.write_all(input.as_bytes()).and_then(|_| stdin.flush());
                written.map(|_| stdin)
            })
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        let answers = self.answers(items.len());
        if answers.is_err() {
            // Training stops here: the program too, so the writer cannot wait on it.
            let _ = self.child.kill();
        }
        match writer.join() {
            Ok(Ok(stdin)) => self.stdin = Some(stdin),
            _ if answers.is_ok() => return Err(self.gone(items.len())),
            _ => {}
        }
        let answers = answers?;
        // One line per completion: a line more is a program out of step with its input.
        if let Ok(Ok(extra)) = self.lines.recv_timeout(Duration::from_millis(50)) {
            return Err(format!(
                "`{}` printed more lines than the {} completions it was given (next: {extra:?}): it must print \
                 exactly one number per input line, and nothing else on its standard output",
                self.shown,
                items.len()
            ));
        }
        Ok(answers)
    }

    /// The program's next `n` answers, each within the timeout.
    fn answers(&mut self, n: usize) -> std::result::Result<Vec<f32>, String> {
        let mut out = Vec::with_capacity(n);
        for row in 0..n {
            let line = match self.lines.recv_timeout(self.timeout) {
                Ok(Ok(line)) => line,
                Ok(Err(e)) => return Err(format!("`{}`: reading its output: {e}", self.shown)),
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    return Err(format!(
                        "`{}` gave no answer for completion {row} within {} s (timeout_s); it was stopped",
                        self.shown,
                        self.timeout.as_secs()
                    ));
                }
                Err(RecvTimeoutError::Disconnected) => return Err(self.gone(row)),
            };
            let text = line.trim();
            let value = match text {
                // A function with nothing to say about this completion (TRL's `None`).
                "null" | "None" | "nan" | "NaN" => f32::NAN,
                _ => match text.parse::<f32>() {
                    Ok(v) if v.is_finite() => v,
                    _ => {
                        return Err(format!(
                            "`{}` answered {text:?} for completion {row}: expected one number per line (or `null`)",
                            self.shown
                        ));
                    }
                },
            };
            out.push(value);
        }
        Ok(out)
    }
}

impl Drop for CommandReward {
    fn drop(&mut self) {
        // Closing its input lets a well-behaved program end; then it is stopped regardless.
        self.stdin.take();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type H = burn::backend::NdArray;

    fn item<'a>(prompt: &'a Value, completion: &'a str, columns: &'a Map<String, Value>) -> Item<'a> {
        Item {
            prompt,
            completion,
            tokens: 3,
            columns,
            prompt_ids: &[],
            completion_ids: &[],
        }
    }

    #[test]
    fn a_command_scores_json_lines_and_its_failures_are_errors() {
        let prompt = json!("What is 2 + 2?");
        let mut columns = Map::new();
        columns.insert("answer".into(), json!("4"));
        let items = [item(&prompt, "#### 4", &columns), item(&prompt, "#### 5", &columns)];
        let sh = |script: &str| vec!["sh".to_string(), "-c".to_string(), script.to_string()];
        // Echoes 1 for a line containing the answer 4, else 0; kept alive across calls.
        let mut good = CommandReward::start(
            &sh(r#"while read -r line; do case "$line" in *'#### 4'*) echo 1;; *) echo 0.5;; esac; done"#),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(good.score(&items).unwrap(), [1.0, 0.5]);
        assert_eq!(good.score(&items).unwrap(), [1.0, 0.5]);

        // The error of a program that fails on `items` within `secs`.
        let fails = |script: &str, secs: u64, items: &[Item]| {
            CommandReward::start(&sh(script), Duration::from_secs(secs))
                .unwrap()
                .score(items)
                .unwrap_err()
        };
        let garbage = fails("while read -r l; do echo yes; done", 10, &items);
        assert!(garbage.contains("answered \"yes\" for completion 0"), "{garbage}");

        let exits = fails("read -r l; echo oops >&2; exit 3", 10, &items);
        assert!(exits.contains("gave no answer for completion 0"), "{exits}");
        assert!(exits.contains("oops"), "{exits}");

        let chatty = fails("while read -r l; do echo 1; echo 2; echo 3; done", 10, &items);
        assert!(chatty.contains("printed more lines than the 2 completions"), "{chatty}");

        // A program that never reads: the input (over a pipe's 64 KiB) cannot block training
        // past the timeout.
        let long = "x".repeat(100_000);
        let big = [item(&prompt, &long, &columns)];
        let deaf = fails("sleep 30", 1, &big);
        assert!(deaf.contains("within 1 s"), "{deaf}");

        let hangs = fails("sleep 30", 1, &items);
        assert!(hangs.contains("within 1 s"), "{hangs}");

        let missing = CommandReward::start(&["/no/such/program".to_string()], Duration::from_secs(1)).err();
        assert!(missing.unwrap().contains("cannot start `/no/such/program`"));
    }

    #[test]
    fn accuracy_reads_its_column_and_names_a_missing_one() {
        let prompt = json!("q");
        let mut columns = Map::new();
        columns.insert("answer".into(), json!(4));
        let device = Default::default();
        let mut acc = Scorer::<H>::Accuracy { column: "answer".into() };
        assert_eq!(
            acc.score(&[item(&prompt, "so #### 4", &columns), item(&prompt, "5", &columns)], &device)
                .unwrap(),
            [1.0, 0.0]
        );
        let mut other = Scorer::<H>::Accuracy { column: "solution".into() };
        let e = other.score(&[item(&prompt, "4", &columns)], &device).unwrap_err();
        assert!(e.contains("no column `solution` (its columns: answer)"), "{e}");
    }

    /// Two steps of each case equal TRL 1.16's `GRPOTrainer` given the same completions and
    /// rewards (`make_grpo_fixtures.py`, through TRL's `rollout_func`): losses, grad norms and
    /// every metric it logs, for each loss type, group / batch / no scaling, a KL term against
    /// the base, rounds reused (`num_iterations` 2) with clipped and capped ratios, token- and
    /// sequence-level ratios, and truncated completions masked.
    #[test]
    fn grpo_matches_trl() {
        use burn::backend::{Autodiff, NdArray};

        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/train");
        let exp: Value =
            serde_json::from_str(&std::fs::read_to_string(fixtures.join("grpo_expected.json")).unwrap()).unwrap();
        let tmp = std::env::temp_dir().join(format!("temper-grpo-parity-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let data = tmp.join("prompts.jsonl");
        let prompts: Vec<String> = exp["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| json!({ "prompt": p }).to_string() + "\n")
            .collect();
        std::fs::write(&data, prompts.concat()).unwrap();
        let ids = |v: &Value| -> Vec<u32> { v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect() };
        let mut by_prompt = std::collections::HashMap::new();
        for p in exp["prompts"].as_array().unwrap() {
            let p = p.as_str().unwrap();
            let rows = exp["completions"][p]
                .as_array()
                .unwrap()
                .iter()
                .zip(exp["rewards"][p].as_array().unwrap())
                .map(|(c, r)| {
                    let r = r.as_array().unwrap().iter().map(|x| x.as_f64().map_or(f32::NAN, |x| x as f32));
                    (ids(c), r.collect())
                })
                .collect::<Vec<_>>();
            by_prompt.insert(ids(&exp["prompt_ids"][p]), rows);
        }
        REPLAY.with(|r| *r.borrow_mut() = Some(Replay { by_prompt }));
        for (case, spec) in exp["cases"].as_object().unwrap() {
            let out = tmp.join(case);
            let mut section: Map<String, Value> = spec["config"].as_object().unwrap().clone();
            section.insert("num_generations".into(), json!(4));
            section.insert("max_completion_length".into(), json!(5));
            section.insert("temperature".into(), json!(0.7));
            // Stand-ins: the replay gives the rewards.
            section.insert(
                "rewards".into(),
                json!([{"type": "length", "target": 0, "name": "first"}, {"type": "length", "target": 0, "name": "second"}]),
            );
            let yaml = format!(
                "model:\n  path: {tiny}\nadapter:\n  type: lora\n  path: {init}\ndata:\n  path: {data}\n  shuffle: false\n  max_length: null\n\
                 training:\n  objective: grpo\n  grpo: {section}\n  max_steps: 2\n  micro_batch_size: 8\n  \
                 learning_rate: 1.0e-2\n  lr_scheduler: constant\n  precision: f32\n  logging_steps: 1\n\
                 output_dir: {out}\n",
                tiny = fixtures.join("tiny").display(),
                init = fixtures.join("init_adapter").display(),
                data = data.display(),
                section = Value::Object(section),
                out = out.display(),
            );
            let file = tmp.join(format!("{case}.yaml"));
            std::fs::write(&file, yaml).unwrap();
            let job = crate::job::Job::load(&file, &[]).unwrap();
            crate::train::train::<Autodiff<NdArray>>(
                &job,
                &Default::default(),
                burn::tensor::DType::F32,
                Default::default(),
            )
            .unwrap();
            let rows: Vec<Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            let want = spec["steps"].as_array().unwrap();
            assert_eq!(rows.len(), want.len(), "{case}");
            for (step, (row, want)) in rows.iter().zip(want).enumerate() {
                for (key, b) in want.as_object().unwrap() {
                    let (a, b) = (row[key].as_f64().unwrap_or(f64::NAN), b.as_f64().unwrap());
                    let tol = 1e-4 * b.abs().max(1e-2);
                    assert!((a - b).abs() <= tol, "{case} step {}: {key} {a} vs TRL {b}", step + 1);
                }
            }
        }
        REPLAY.with(|r| *r.borrow_mut() = None);
        let _ = std::fs::remove_dir_all(&tmp);
    }

    /// Generation on the tiny model, rounds serving two steps: a run stopped mid-round and
    /// resumed (the round read back from the checkpoint, the next one regenerated from the same
    /// seeds) logs the uninterrupted run's losses and rewards, and the completions log has each
    /// generating step's completions.
    #[test]
    fn a_resumed_run_continues_its_round_and_draws_the_same_samples() {
        use burn::backend::{Autodiff, NdArray};

        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let tmp = std::env::temp_dir().join(format!("temper-grpo-resume-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let yaml = |out: &std::path::Path| {
            format!(
                "model:\n  path: {tiny}\nadapter:\n  type: lora\n  r: 4\n  target_modules: all-linear\n\
                 data:\n  path: {data}\n  max_length: 64\ntraining:\n  objective: grpo\n  grpo: {{num_generations: 2, \
                 max_completion_length: 6, num_iterations: 2, rewards: [{{type: length, target: 2, penalty: 0.5}}, \
                 {{type: format, pattern: 'w1[0-9] '}}]}}\n  max_steps: 5\n  micro_batch_size: 2\n  \
                 gradient_accumulation_steps: 2\n  learning_rate: 1.0e-2\n  precision: f32\n  logging_steps: 1\n  \
                 save_steps: 1\noutput_dir: {out}\n",
                tiny = fixtures.join("train/tiny").display(),
                data = fixtures.join("bad/prompts_only.jsonl").display(),
                out = out.display(),
            )
        };
        let run = |name: &str, opts: crate::train::TrainOptions| {
            let out = tmp.join(name);
            let file = tmp.join(format!("{name}.yaml"));
            std::fs::write(&file, yaml(&out)).unwrap();
            let job = crate::job::Job::load(&file, &[]).unwrap();
            crate::train::train::<Autodiff<NdArray>>(&job, &Default::default(), burn::tensor::DType::F32, opts)
                .unwrap();
            out
        };
        let rows = |out: &std::path::Path| -> Vec<Vec<Option<f64>>> {
            std::fs::read_to_string(out.join("metrics.jsonl"))
                .unwrap()
                .lines()
                .map(|l| {
                    let v: Value = serde_json::from_str(l).unwrap();
                    ["loss", "grad_norm", "reward", "rewards/length/mean"]
                        .iter()
                        .map(|k| v[k].as_f64())
                        .collect()
                })
                .collect()
        };
        let whole = run("whole", Default::default());
        let want = rows(&whole);
        assert_eq!(want.len(), 5);
        // Something to learn: the rewards differ within groups, so the policy moves.
        assert!(want.iter().all(|r| r[1].unwrap() > 0.0), "{want:?}");
        // Rounds at steps 1, 3 and 5: their metrics on those steps only.
        let generated: Vec<bool> = want.iter().map(|r| r[2].is_some()).collect();
        assert_eq!(generated, [true, false, true, false, true]);
        let samples = std::fs::read_to_string(whole.join("completions.jsonl")).unwrap();
        assert_eq!(samples.lines().count(), 3 * 4);

        let opts = |stop: Option<u64>, resume: bool| crate::train::TrainOptions {
            stop_after_steps: stop,
            resume: resume.then_some(crate::train::Resume::Latest),
            ..Default::default()
        };
        // Stopped after step 2 (a fresh round next) and after step 3 (mid-round).
        for stop in [2, 3] {
            let name = format!("stopped{stop}");
            run(&name, opts(Some(stop), false));
            let out = run(&name, opts(None, true));
            assert!(out.join("checkpoint-3").join(ROUND_FILE).exists() || stop == 2);
            let got = rows(&out);
            assert_eq!(got.len(), want.len(), "stopped at {stop}");
            for (step, (g, w)) in got.iter().zip(&want).enumerate() {
                for (a, b) in g.iter().zip(w) {
                    match (a, b) {
                        (Some(a), Some(b)) => assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "stopped at {stop}, step {}: {a} vs {b}", step + 1),
                        _ => assert_eq!(a.is_some(), b.is_some(), "stopped at {stop}, step {}", step + 1),
                    }
                }
            }
        }
        let _ = std::fs::remove_dir_all(&tmp);
    }

    /// A reward model as a GRPO reward: the adapter TRL's `RewardTrainer` trained
    /// (`make_reward_fixtures.py`) scores prompt + completion as transformers does; a model
    /// without a score head, or with another vocabulary, is refused when training starts.
    #[test]
    fn a_reward_model_scores_completions_as_transformers() {
        let train = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/train");
        let exp: Value =
            serde_json::from_str(&std::fs::read_to_string(train.join("reward_expected.json")).unwrap()).unwrap();
        let (_, tok) = temper_models::load_config_and_tokenizer(&train.join("tiny")).unwrap();
        let encode = |t: &str| tok.encode(t, true).unwrap();
        let rows: Vec<Value> = std::fs::read_to_string(train.join("pref.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let ids: Vec<(Vec<u32>, Vec<u32>)> = rows
            .iter()
            .map(|r| {
                let p = r["prompt"].as_str().unwrap();
                (encode(p), encode(&format!("{}</s>", r["chosen"].as_str().unwrap())))
            })
            .collect();
        let (prompt, columns) = (json!(""), Map::new());
        let items: Vec<Item> = ids
            .iter()
            .map(|(p, c)| Item {
                prompt_ids: p,
                completion_ids: c,
                ..item(&prompt, "", &columns)
            })
            .collect();
        let device = Default::default();
        let model = |path: &str, adapter: Option<&str>| RewardFunction::Model {
            path: train.join(path),
            adapter: adapter.map(|a| train.join(a)),
            name: None,
        };
        let mut scorer = Scorer::<H>::new(&model("tiny", Some("final_reward_adapter")), 0, 2, 128, &device).unwrap();
        let got = scorer.score(&items, &device).unwrap();
        for (i, (g, want)) in got.iter().zip(exp["scores"].as_array().unwrap()).enumerate() {
            let want = want[0].as_f64().unwrap() as f32;
            assert!((g - want).abs() < 1e-4, "pair {i}: {g} vs transformers {want}");
        }
        let error = |f: RewardFunction, vocab: usize| match Scorer::<H>::new(&f, 1, 2, vocab, &device) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted"),
        };
        let e = error(model("tiny", None), 128);
        assert!(e.contains("training.grpo.rewards[1]") && e.contains("no reward head"), "{e}");
        let e = error(model("tiny_rm", None), 1000);
        assert!(e.contains("vocabulary of 128 tokens and the policy 1000"), "{e}");
    }

    #[test]
    fn lengths_count_ended_completions_apart() {
        let m = length_metrics(&[2.0, 4.0, 6.0], &[false, true, false]);
        let get = |k: &str| m.iter().find(|(n, _)| *n == k).unwrap().1;
        assert_eq!(get("completions/mean_length"), 4.0);
        assert!((get("completions/clipped_ratio") - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(get("completions/mean_terminated_length"), 4.0);
        assert_eq!(get("completions/max_terminated_length"), 6.0);
    }
}
