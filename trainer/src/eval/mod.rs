//! Evaluation of a model and its adapters on held-out rows: loss and perplexity, scores of
//! generated answers (exact match, regex, contains, ROUGE, BLEU, chrF, refusals), multiple
//! choice by log-likelihood, and a regression set of fixed cases, each with a 95% interval.
//! `temper eval` runs it; training's `eval_generation` scores a few rows the same way.

pub mod config;
mod report;
pub mod review;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::DType;
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use temper_data::{
    Batch, Content, Cursor, DataConfig, Encoded, Encoder, EvalRow, LoaderOptions, Pipeline, Sample,
    read_rows,
};
use temper_models::{ForwardOptions, LlamaForCausalLM, Sampling, Tokenizer};
use temper_trl::scores;

pub use config::{EvalConfig, GenerationSection, Scorer};
pub use report::{Report, VariantReport, markdown, update_model_card};

use crate::blocks::plain;
use crate::error::{Error, Result};
use crate::forward::{check_vocab, int_matrix, sft_token_logps, token_logps_at};

/// A metric's value, how many rows (or tokens) it is over, and its 95% interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measure {
    pub value: f64,
    pub count: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ci: Option<[f64; 2]>,
}

impl Measure {
    /// A share of rows (each row's value in [0, 1]) with its Wilson interval.
    fn share(values: &[f64]) -> Self {
        let hits: f64 = values.iter().sum();
        Self {
            value: hits / values.len().max(1) as f64,
            count: values.len(),
            ci: scores::wilson(hits, values.len()).map(|(a, b)| [a, b]),
        }
    }

    /// A mean of per-row values in [0, 1] with its normal-approximation interval, cut to
    /// that range.
    fn mean(values: &[f64]) -> Self {
        let (value, ci) = scores::mean_interval(values);
        Self {
            value,
            count: values.len(),
            ci: ci.map(|(a, b)| [a.max(0.0), b.min(1.0)]),
        }
    }
}

/// Resamples of the bootstrap intervals of corpus BLEU and chrF.
const BOOTSTRAP_RESAMPLES: usize = 1000;

/// Every scorer's per-row values and summary measures over a set of answers.
#[derive(Debug, Clone, Default)]
pub struct Scored {
    /// Per row: metric name to value.
    pub rows: Vec<BTreeMap<String, f64>>,
    /// In the scorers' order.
    pub measures: Vec<(String, Measure)>,
}

/// The text a scorer compares an answer with: the scorer's `reference` column, else the row's
/// own answer. Errors name the row.
fn reference(row: &EvalRow, scorer: &Scorer) -> Result<String> {
    let at = || row.at.to_string();
    match scorer.reference_column() {
        Some(column) => match row.columns.get(column) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Number(n)) => Ok(n.to_string()),
            Some(Value::Null) | None => Err(Error::config(
                &format!("scorers ({})", scorer.name()),
                format!("{}: the row has no `{column}` column (its reference)", at()),
            )),
            Some(other) => Err(Error::config(
                &format!("scorers ({})", scorer.name()),
                format!("{}: column `{column}` is not a string or number: {other}", at()),
            )),
        },
        None => row.answer.clone().ok_or_else(|| {
            Error::config(
                &format!("scorers ({})", scorer.name()),
                format!(
                    "{}: the row has no answer to compare with (a prompt alone): name a column with `reference`",
                    at()
                ),
            )
        }),
    }
}

/// Checks that every row has the reference each scorer compares with, before any answer is
/// generated for them.
pub(crate) fn check_references(scorers: &[Scorer], rows: &[EvalRow]) -> Result<()> {
    for s in scorers.iter().filter(|s| s.needs_reference()) {
        for row in rows {
            reference(row, s)?;
        }
    }
    Ok(())
}

/// Scores `answers` (one per row) with every generating scorer. `seed` seeds the bootstrap
/// intervals.
pub fn score_answers(scorers: &[Scorer], rows: &[EvalRow], answers: &[String], seed: u64) -> Result<Scored> {
    assert_eq!(rows.len(), answers.len(), "one answer per row");
    let n = rows.len();
    let mut out = Scored {
        rows: vec![BTreeMap::new(); n],
        measures: Vec::new(),
    };
    for scorer in scorers.iter().filter(|s| s.generates()) {
        let refs: Vec<String> = if scorer.needs_reference() {
            rows.iter().map(|r| reference(r, scorer)).collect::<Result<_>>()?
        } else {
            vec![String::new(); n]
        };
        let name = scorer.name().to_string();
        let mut per_row = |metric: &str, values: Vec<f64>, measure: Measure| {
            for (row, v) in out.rows.iter_mut().zip(&values) {
                row.insert(metric.to_string(), *v);
            }
            out.measures.push((metric.to_string(), measure));
        };
        let each = |f: &dyn Fn(&str, &str) -> f64| -> Vec<f64> {
            answers.iter().zip(&refs).map(|(a, r)| f(a, r)).collect()
        };
        match scorer {
            Scorer::ExactMatch { pattern: None, .. } => {
                let v = each(&|a, r| temper_trl::rewards::accuracy(a, r) as f64);
                per_row(&name, v.clone(), Measure::share(&v));
            }
            Scorer::ExactMatch { pattern: Some(p), .. } => {
                let re = Regex::new(p).expect("checked with the config");
                let read = |a: &str| {
                    re.captures(a)
                        .and_then(|c| c.get(1).or_else(|| c.get(0)))
                        .map(|m| m.as_str().to_string())
                };
                let v = each(&|a, r| read(a).is_some_and(|x| temper_trl::rewards::same_answer(&x, r)) as u8 as f64);
                per_row(&name, v.clone(), Measure::share(&v));
            }
            Scorer::Regex { pattern, .. } => {
                let re = Regex::new(pattern).expect("checked with the config");
                let v = each(&|a, _| re.is_match(a) as u8 as f64);
                per_row(&name, v.clone(), Measure::share(&v));
            }
            Scorer::Contains { .. } => {
                let v = each(&|a, r| scores::contains(a, r) as u8 as f64);
                per_row(&name, v.clone(), Measure::share(&v));
            }
            Scorer::Refusal { .. } => {
                let v = each(&|a, _| scores::refuses(a) as u8 as f64);
                per_row(&name, v.clone(), Measure::share(&v));
            }
            Scorer::Rouge { .. } => {
                let all: Vec<scores::Rouge> = answers.iter().zip(&refs).map(|(a, r)| scores::rouge(a, r)).collect();
                let gets: [fn(&scores::Rouge) -> f64; 3] = [|r| r.rouge1, |r| r.rouge2, |r| r.rouge_l];
                for (metric, get) in scorer.metric_names().iter().zip(gets) {
                    let v: Vec<f64> = all.iter().map(get).collect();
                    per_row(metric, v.clone(), Measure::mean(&v));
                }
            }
            Scorer::Bleu { .. } => {
                let stats: Vec<_> = answers.iter().zip(&refs).map(|(a, r)| scores::bleu_stats(a, r)).collect();
                let v: Vec<f64> = stats.iter().map(scores::sentence_bleu).collect();
                per_row(&name, v, corpus_measure(&stats, seed, |s| scores::bleu(s)));
            }
            Scorer::Chrf { .. } => {
                let stats: Vec<_> = answers.iter().zip(&refs).map(|(a, r)| scores::chrf_stats(a, r)).collect();
                let v: Vec<f64> = stats.iter().map(|s| scores::chrf([s])).collect();
                per_row(&name, v, corpus_measure(&stats, seed, |s| scores::chrf(s)));
            }
            Scorer::Choice { .. } => unreachable!("filtered: generates nothing"),
        }
    }
    Ok(out)
}

/// A corpus score (BLEU, chrF) of all rows' statistics, with its bootstrap interval.
fn corpus_measure<S>(stats: &[S], seed: u64, score: impl Fn(&mut dyn Iterator<Item = &S>) -> f64) -> Measure {
    let n = stats.len();
    Measure {
        value: score(&mut stats.iter()),
        count: n,
        ci: scores::bootstrap(n, BOOTSTRAP_RESAMPLES, seed, |idx| score(&mut idx.iter().map(|&i| &stats[i])))
            .map(|(a, b)| [a, b]),
    }
}


/// How prompts become token ids: the data config's chat template and truncation, as the
/// trainer encodes GRPO's prompts.
pub(crate) fn prompt_encoder(data: &DataConfig, tokenizer: Arc<Tokenizer>) -> Result<Encoder> {
    Encoder::new(tokenizer, data.encode_options(false, false)).map_err(Error::from)
}

/// The token ids the model is asked to complete for `row`, and whether their start was cut
/// to `data.max_length`.
pub(crate) fn prompt_ids(encoder: &Encoder, row: &EvalRow) -> Result<(Vec<u32>, bool)> {
    let sample = Sample::Prompt {
        prompt: row.prompt.clone(),
        raw: row.raw_prompt.clone(),
        columns: row.columns.clone(),
    };
    match encoder.encode(&sample, &row.at)? {
        Encoded::Prompt(p) => Ok((p.prompt_ids, p.truncated)),
        other => unreachable!("a prompt encodes as a prompt, got {other:?}"),
    }
}

/// The answers of `model` to each row, batched; row `i` samples with seed `seed + i`.
#[allow(clippy::too_many_arguments)]
pub fn generate_answers<B: Backend>(
    model: &LlamaForCausalLM<B>,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    generation: &GenerationSection,
    eos: &[u32],
    context: usize,
    device: &B::Device,
) -> Result<Vec<String>> {
    let sampling = Sampling {
        max_new_tokens: generation.max_new_tokens,
        temperature: generation.temperature,
        top_p: generation.top_p,
        top_k: generation.top_k,
        seed: generation.seed,
        max_length: Some(context),
    };
    let mut out = Vec::with_capacity(prompts.len());
    for (chunk_at, chunk) in prompts.chunks(generation.batch_size.max(1)).enumerate() {
        let first = chunk_at * generation.batch_size.max(1);
        let refs: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
        let seeds: Vec<u64> = (0..chunk.len()).map(|i| generation.seed.wrapping_add((first + i) as u64)).collect();
        let ids = temper_models::generate_batch(model, &refs, eos, &sampling, &seeds, device)?;
        for ids in ids {
            // The final end-of-turn token is the model's stop, not part of its answer.
            out.push(tokenizer.decode(&ids, true)?);
        }
    }
    Ok(out)
}

/// The negative log-likelihood of each row's answer (the trainer's SFT masks: completions,
/// assistant turns) and its number of target tokens. `None` when the rows have no answers to
/// score (prompts alone, preference pairs).
pub fn held_out_loss<B: Backend>(
    model: &LlamaForCausalLM<B>,
    data: &DataConfig,
    tokenizer: Arc<Tokenizer>,
    batch_size: usize,
    max_rows: usize,
    device: &B::Device,
) -> Result<Option<Vec<(f64, usize)>>> {
    let mut data = data.clone();
    data.shuffle = false;
    data.packing = false;
    let pipeline = Arc::new(Pipeline::new(&data, tokenizer, LoaderOptions::one_pass(batch_size))?);
    if pipeline.prompts {
        return Ok(None);
    }
    let mut per_row: Vec<(f64, usize)> = Vec::new();
    let mut rows = 0usize;
    let vocab = model.vocab_size();
    for batch in pipeline.spawn(Cursor::default()) {
        let batch = batch?.batch;
        check_vocab(&batch, vocab, || "evaluation data".into())?;
        let Batch::Sft(batch) = batch else {
            return Ok(None);
        };
        // A full last batch may run past max_rows: only its first rows count.
        let keep = batch.batch_size.min(max_rows - rows);
        let batch = truncate_rows(batch, keep);
        rows += keep;
        let mut sums = vec![(0.0f64, 0usize); keep];
        if let Some((logps, owner)) = sft_token_logps(model, &plain::<B>, &batch, device) {
            let logps: Vec<f32> = logps.logps.cast(DType::F32).into_data().to_vec().expect("f32 log-probabilities");
            for (lp, r) in logps.iter().zip(owner) {
                sums[r].0 -= *lp as f64;
                sums[r].1 += 1;
            }
        }
        per_row.extend(sums);
        if rows >= max_rows {
            break;
        }
    }
    Ok(per_row.iter().any(|r| r.1 > 0).then_some(per_row))
}

/// The loss per target token over rows (their summed NLL and token counts), and perplexity,
/// each with a 95% bootstrap interval over rows (the unit that was sampled), seeded.
fn loss_measures(per_row: &[(f64, usize)], seed: u64) -> [Measure; 2] {
    let loss = |idx: &mut dyn Iterator<Item = &(f64, usize)>| {
        let (nll, tokens) = idx.fold((0.0, 0usize), |a, r| (a.0 + r.0, a.1 + r.1));
        nll / tokens.max(1) as f64
    };
    let tokens: usize = per_row.iter().map(|r| r.1).sum();
    let value = loss(&mut per_row.iter());
    let ci = scores::bootstrap(per_row.len(), BOOTSTRAP_RESAMPLES, seed, |idx| {
        loss(&mut idx.iter().map(|&i| &per_row[i]))
    });
    [
        Measure {
            value,
            count: tokens,
            ci: ci.map(|(a, b)| [a, b]),
        },
        Measure {
            value: value.exp(),
            count: tokens,
            ci: ci.map(|(a, b)| [a.exp(), b.exp()]),
        },
    ]
}

fn truncate_rows(mut batch: temper_data::SftBatch, keep: usize) -> temper_data::SftBatch {
    if keep < batch.batch_size {
        let n = keep * batch.seq_len;
        batch.batch_size = keep;
        batch.input_ids.truncate(n);
        batch.labels.truncate(n);
        batch.position_ids.truncate(n);
        batch.segment_ids.truncate(n);
    }
    batch
}

/// Multiple choice by log-likelihood: per row, whether the most likely option (summed
/// log-likelihood; and divided by the option's length in characters, `norm`, as
/// lm-evaluation-harness's `acc_norm`) is the answer, and every option's log-likelihood. As
/// lm-evaluation-harness scores a continuation: the context's trailing spaces move to it, its
/// tokens are those of context + option past the context's, no special tokens are added.
/// Conversations are rendered with the generation prompt.
#[allow(clippy::too_many_arguments)]
pub fn choice_scores<B: Backend>(
    model: &LlamaForCausalLM<B>,
    tokenizer: &Tokenizer,
    encoder: &Encoder,
    rows: &[EvalRow],
    options_column: &str,
    answer_column: &str,
    batch_size: usize,
    max_length: usize,
    device: &B::Device,
) -> Result<(Vec<f64>, Vec<f64>, Vec<Vec<f64>>)> {
    let key = "scorers (choice)";
    // (row, option) -> (input ids, context length, option length in characters)
    let mut seqs: Vec<(usize, Vec<u32>, usize, usize)> = Vec::new();
    let mut answers = Vec::with_capacity(rows.len());
    let mut counts = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let at = &row.at;
        let options: Vec<String> = match row.columns.get(options_column) {
            Some(Value::Array(items)) if items.len() >= 2 => items
                .iter()
                .map(|v| match v {
                    Value::String(s) if !s.is_empty() => Ok(s.clone()),
                    Value::Number(n) => Ok(n.to_string()),
                    other => Err(Error::config(key, format!("{at}: option {other} of `{options_column}` is not a non-empty string"))),
                })
                .collect::<Result<_>>()?,
            other => {
                return Err(Error::config(
                    key,
                    format!(
                        "{at}: column `{options_column}` must be a list of at least two options, got {}",
                        other.map_or("nothing".into(), |v| v.to_string())
                    ),
                ));
            }
        };
        let answer = match row.columns.get(answer_column) {
            Some(Value::Number(n)) => n.as_u64().map(|x| x as usize).filter(|&x| x < options.len()),
            Some(Value::String(s)) => options.iter().position(|o| o == s).or_else(|| {
                // "A", "B", ... as ARC's answerKey.
                let c = s.trim();
                (c.len() == 1 && c.as_bytes()[0].is_ascii_uppercase())
                    .then(|| (c.as_bytes()[0] - b'A') as usize)
                    .filter(|&x| x < options.len())
            }),
            _ => None,
        }
        .ok_or_else(|| {
            Error::config(
                key,
                format!(
                    "{at}: column `{answer_column}` must be the right option's index (0-{}), letter or text, got {}",
                    options.len() - 1,
                    row.columns.get(answer_column).map_or("nothing".into(), |v| v.to_string())
                ),
            )
        })?;
        answers.push(answer);
        counts.push(options.len());
        let context = match &row.prompt {
            Content::Text(t) => t.clone(),
            Content::Messages(m) => encoder
                .render_chat(m, true)
                .map_err(|message| Error::config(key, format!("{}: {message}", row.at)))?,
        };
        for option in &options {
            let (mut context, mut continuation) = (context.clone(), option.clone());
            let trailing = context.len() - context.trim_end().len();
            if trailing > 0 {
                continuation = format!("{}{continuation}", &context[context.len() - trailing..]);
                context.truncate(context.len() - trailing);
            }
            // As lm-evaluation-harness's HFLM: no special tokens added; the input is the
            // context's tokens, then those of context + option past the context's length.
            let whole = tokenizer.encode(&format!("{context}{continuation}"), false)?;
            let mut ids = tokenizer.encode(&context, false)?;
            let ctx = ids.len();
            if whole.len() <= ctx || ctx == 0 {
                return Err(Error::config(key, format!("{at}: option {option:?} adds no token to the prompt")));
            }
            ids.extend_from_slice(&whole[ctx..]);
            // Longer than the model's context: the context's start is cut, as lm-eval keeps
            // the last `max_length` tokens.
            let cut = ids.len().saturating_sub(max_length);
            if cut >= ctx {
                return Err(Error::config(
                    key,
                    format!("{at}: option {option:?} alone is longer than the model's context ({max_length} tokens)"),
                ));
            }
            ids.drain(..cut);
            // lm-eval's acc_norm divides by the option's length without the space before it
            // (its `target_delimiter`), which options here carry themselves.
            seqs.push((i, ids, ctx - cut, option.trim_start().chars().count().max(1)));
        }
    }
    let vocab = model.vocab_size();
    if let Some(id) = seqs.iter().flat_map(|s| &s.1).find(|&&id| id as usize >= vocab) {
        return Err(Error::TokenOutOfVocab {
            during: "choice scoring".into(),
            id: *id,
            vocab,
        });
    }
    let moe = model.model.layers.iter().any(|l| l.moe.is_some());
    let mut lls = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(batch_size.max(1)) {
        let s = chunk.iter().map(|c| c.1.len()).max().expect("a chunk is not empty");
        let b = chunk.len();
        let mut ids = vec![0u32; b * s];
        let mut real = vec![0u32; b * s];
        let (mut positions, mut targets, mut owner) = (Vec::new(), Vec::new(), Vec::new());
        for (r, (_, whole, ctx, _)) in chunk.iter().enumerate() {
            ids[r * s..r * s + whole.len()].copy_from_slice(whole);
            real[r * s..r * s + whole.len()].fill(1);
            for t in *ctx..whole.len() {
                positions.push((r * s + t - 1) as i64);
                targets.push(whole[t] as i64);
                owner.push(r);
            }
        }
        let options = ForwardOptions {
            position_ids: None,
            // Right padding needs no mask under causal attention, but a mixture of experts
            // would route the padding: keep it out, as the trainer does.
            attention_mask: moe.then(|| int_matrix(&real, [b, s], device)),
            segment_ids: None,
        };
        let logps = token_logps_at(model, &plain::<B>, int_matrix(&ids, [b, s], device), options, positions, targets, device);
        let logps: Vec<f32> = logps.logps.cast(DType::F32).into_data().to_vec().expect("f32 log-probabilities");
        let mut sums = vec![0.0f64; b];
        for (lp, r) in logps.iter().zip(&owner) {
            sums[*r] += *lp as f64;
        }
        lls.extend(sums);
    }
    let (mut acc, mut norm, mut all) = (Vec::new(), Vec::new(), Vec::new());
    let mut at = 0;
    for (answer, count) in answers.iter().zip(&counts) {
        let ll = &lls[at..at + count];
        let chars: Vec<f64> = seqs[at..at + count].iter().map(|s| s.3 as f64).collect();
        at += count;
        let best = |score: &dyn Fn(usize) -> f64| (0..*count).max_by(|&a, &b| score(a).total_cmp(&score(b)).then(b.cmp(&a)));
        acc.push((best(&|k| ll[k]) == Some(*answer)) as u8 as f64);
        norm.push((best(&|k| ll[k] / chars[k]) == Some(*answer)) as u8 as f64);
        all.push(ll.to_vec());
    }
    Ok((acc, norm, all))
}

/// One fixed case of a regression set, and what its answer must (not) do.
#[derive(Debug, Clone)]
pub struct Case {
    pub id: String,
    pub row: EvalRow,
    pub regex: Option<Regex>,
    pub not_regex: Option<Regex>,
    /// `Some(true)`: the answer must refuse; `Some(false)`: it must not.
    pub refuse: Option<bool>,
}

impl Case {
    /// The checks the answer fails (empty: it passes).
    pub fn failures(&self, answer: &str) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(re) = &self.regex
            && !re.is_match(answer)
        {
            out.push(format!("does not match /{}/", re.as_str()));
        }
        if let Some(re) = &self.not_regex
            && re.is_match(answer)
        {
            out.push(format!("matches /{}/", re.as_str()));
        }
        match (self.refuse, scores::refuses(answer)) {
            (Some(true), false) => out.push("does not refuse".into()),
            (Some(false), true) => out.push("refuses".into()),
            _ => {}
        }
        out
    }
}

/// Reads a regression set: JSON Lines (or any format the data pipeline reads) of `prompt` (a
/// string or messages), an optional `id`, and at least one of `regex`, `not_regex`, `refuse`.
pub fn read_cases(path: &Path) -> Result<Vec<Case>> {
    let data: DataConfig = serde_json::from_value(serde_json::json!({
        "path": path.display().to_string(), "format": "prompt", "shuffle": false,
    }))
    .expect("a valid data config");
    let key = "regression";
    if std::fs::read_to_string(path).is_ok_and(|t| t.trim().is_empty()) {
        return Err(Error::config(key, format!("{}: no cases", path.display())));
    }
    let rows = read_rows(&data, usize::MAX).map_err(|e| Error::config(key, e.to_string()))?;
    if rows.is_empty() {
        return Err(Error::config(key, format!("{}: no cases", path.display())));
    }
    let mut ids = std::collections::BTreeSet::new();
    rows.into_iter()
        .enumerate()
        .map(|(i, row)| {
            let at = row.at.to_string();
            let pattern = |name: &str| -> Result<Option<Regex>> {
                match row.columns.get(name) {
                    None | Some(Value::Null) => Ok(None),
                    Some(Value::String(p)) => Regex::new(p)
                        .map(Some)
                        .map_err(|e| Error::config(key, format!("{at}: `{name}` is not a valid regular expression: {e}"))),
                    Some(other) => Err(Error::config(key, format!("{at}: `{name}` must be a string, got {other}"))),
                }
            };
            let refuse = match row.columns.get("refuse") {
                None | Some(Value::Null) => None,
                Some(Value::Bool(b)) => Some(*b),
                Some(other) => return Err(Error::config(key, format!("{at}: `refuse` must be true or false, got {other}"))),
            };
            let id = match row.columns.get("id") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => format!("case-{}", i + 1),
            };
            if !ids.insert(id.clone()) {
                return Err(Error::config(key, format!("{at}: a second case with id `{id}`")));
            }
            let (regex, not_regex) = (pattern("regex")?, pattern("not_regex")?);
            if regex.is_none() && not_regex.is_none() && refuse.is_none() {
                return Err(Error::config(
                    key,
                    format!("{at}: the case checks nothing: give `regex`, `not_regex` or `refuse`"),
                ));
            }
            Ok(Case {
                id,
                row,
                regex,
                not_regex,
                refuse,
            })
        })
        .collect()
}

/// A model evaluated: the base alone, or with an adapter.
#[derive(Debug, Clone)]
pub struct Variant {
    pub name: String,
    pub adapter: Option<PathBuf>,
}

impl EvalConfig {
    /// The models evaluated, the base first.
    pub fn variants(&self) -> Vec<Variant> {
        let mut v = Vec::new();
        if self.base {
            v.push(Variant {
                name: "base".into(),
                adapter: None,
            });
        }
        for a in &self.adapters {
            v.push(Variant {
                name: a.display().to_string(),
                adapter: Some(a.clone()),
            });
        }
        v
    }
}

/// Runs `config` on `device`: every variant on the same rows; writes `eval.json`, `eval.md`
/// and `eval_samples.jsonl` to the output directory (and the evaluation into its model card,
/// when it has one). `progress` hears what is being done.
pub fn run<B: Backend>(config: &EvalConfig, device: &B::Device, progress: &dyn Fn(&str)) -> Result<Report> {
    let file = &config.file;
    let in_file = |e: Error| e.in_file(file);
    let loaded = temper_models::load_pretrained::<B>(&config.model, device, DType::F32)?;
    if loaded.model.score.is_some() {
        return Err(Error::config(
            "model",
            format!("{}: a reward model scores sequences and does not generate: use `temper score`", config.model.display()),
        )
        .in_file(file));
    }
    let eos = loaded.eos_token_ids();
    let context = loaded.config.max_position_embeddings;
    let tokenizer = Arc::new(loaded.tokenizer);
    let loaded_model = loaded.model;
    let mut data = config.data.clone();
    data.shuffle = false;
    let max_rows = config.max_rows.unwrap_or(usize::MAX);
    let generating = config.scorers.iter().any(Scorer::generates);
    let choice = config.scorers.iter().find(|s| !s.generates());
    let rows = if generating || choice.is_some() {
        let rows = read_rows(&data, max_rows).map_err(|e| in_file(e.into()))?;
        if rows.is_empty() {
            return Err(in_file(Error::config("data", "no rows to evaluate")));
        }
        check_references(&config.scorers, &rows).map_err(in_file)?;
        rows
    } else {
        Vec::new()
    };
    let cases = config.regression.as_deref().map(read_cases).transpose().map_err(in_file)?;
    let encoder = prompt_encoder(&data, tokenizer.clone()).map_err(in_file)?;
    let encode = |rows: &mut dyn Iterator<Item = &EvalRow>, what: &str| -> Result<Vec<Vec<u32>>> {
        let encoded: Vec<(Vec<u32>, bool)> = rows.map(|r| prompt_ids(&encoder, r)).collect::<Result<_>>().map_err(in_file)?;
        let cut = encoded.iter().filter(|e| e.1).count();
        if cut > 0 {
            progress(&format!(
                "{cut} of {} {what} are longer than data.max_length ({}): their start is cut",
                encoded.len(),
                data.max_length.map_or("none".into(), |m| m.to_string())
            ));
        }
        Ok(encoded.into_iter().map(|e| e.0).collect())
    };
    let prompts = if generating { encode(&mut rows.iter(), "prompts")? } else { Vec::new() };
    let case_prompts = match &cases {
        Some(cases) => encode(&mut cases.iter().map(|c| &c.row), "regression prompts")?,
        None => Vec::new(),
    };
    // The reference each row's samples show: the first reference a scorer compares with.
    let sample_reference = |row: &EvalRow| -> Value {
        match config.scorers.iter().find(|s| s.needs_reference()) {
            Some(s) => reference(row, s).map_or(Value::Null, Value::String),
            None => row.answer.clone().map_or(Value::Null, Value::String),
        }
    };
    let mut report = Report::new(config, rows.len());
    let mut samples = Vec::new();
    for variant in config.variants() {
        let model = match &variant.adapter {
            Some(dir) => temper_peft::load_adapter(loaded_model.clone(), dir)?.0,
            None => loaded_model.clone(),
        };
        if model.score.is_some() {
            return Err(in_file(Error::config(
                "adapters",
                format!("{}: a reward adapter (with a `score` head) does not generate", variant.name),
            )));
        }
        let mut measures: Vec<(String, Measure)> = Vec::new();
        if config.loss != Some(false) {
            progress(&format!("{}: held-out loss", variant.name));
            let batch = config.generation.batch_size;
            match held_out_loss(&model, &data, tokenizer.clone(), batch, max_rows, device).map_err(in_file)? {
                Some(per_row) => {
                    let [loss, perplexity] = loss_measures(&per_row, config.generation.seed);
                    measures.push(("loss".into(), loss));
                    measures.push(("perplexity".into(), perplexity));
                }
                None if config.loss == Some(true) => {
                    return Err(in_file(Error::config(
                        "loss",
                        "the rows have no answers to score (prompts alone or preference pairs): drop `loss: true`",
                    )));
                }
                None => {}
            }
        }
        if generating {
            progress(&format!("{}: generating {} answers", variant.name, rows.len()));
            let answers = generate_answers(&model, &tokenizer, &prompts, &config.generation, &eos, context, device)?;
            let scored = score_answers(&config.scorers, &rows, &answers, config.generation.seed).map_err(in_file)?;
            measures.extend(scored.measures);
            for (i, (row, answer)) in rows.iter().zip(&answers).enumerate() {
                samples.push(serde_json::json!({
                    "row": i, "model": variant.name, "prompt": row.raw_prompt, "reference": sample_reference(row),
                    "output": answer, "scores": scored.rows[i],
                }));
            }
        }
        if let Some(Scorer::Choice { options, answer, name }) = choice {
            progress(&format!("{}: multiple choice", variant.name));
            let (acc, norm, _) = choice_scores(
                &model,
                &tokenizer,
                &encoder,
                &rows,
                options,
                answer,
                config.generation.batch_size,
                context,
                device,
            )
            .map_err(in_file)?;
            let base = name.as_deref().unwrap_or("choice");
            measures.push((base.to_string(), Measure::share(&acc)));
            measures.push((format!("{base}_norm"), Measure::share(&norm)));
        }
        if let Some(cases) = &cases {
            progress(&format!("{}: {} regression cases", variant.name, cases.len()));
            let answers = generate_answers(&model, &tokenizer, &case_prompts, &config.generation, &eos, context, device)?;
            let passed: Vec<f64> = cases.iter().zip(&answers).map(|(c, a)| c.failures(a).is_empty() as u8 as f64).collect();
            measures.push(("regression".into(), Measure::share(&passed)));
            report.add_cases(&variant.name, cases, &answers);
        }
        report.variants.push(VariantReport {
            name: variant.name.clone(),
            adapter: variant.adapter.clone(),
            metrics: measures,
        });
    }
    report.write(config.output_dir(), &samples)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(prompt: &str, answer: Option<&str>, columns: Value) -> EvalRow {
        let file: Arc<Path> = Path::new("rows.jsonl").into();
        EvalRow {
            at: temper_data::Location {
                path: file,
                row: Some(1),
                row_group: None,
            },
            prompt: Content::Text(prompt.into()),
            raw_prompt: Value::String(prompt.into()),
            answer: answer.map(str::to_string),
            columns: columns.as_object().cloned().unwrap_or_default(),
        }
    }

    fn scorers(yaml: &str) -> Vec<Scorer> {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn answers_are_scored_per_row_with_intervals() {
        let rows = vec![
            row("a", Some("#### 1,000"), serde_json::json!({"summary": "the cat sat"})),
            row("b", Some("so 12 = 12\n#### 12"), serde_json::json!({"summary": "a dog"})),
        ];
        let answers = vec!["1000 = 999 + 1\n#### 1000".to_string(), "I think = 13".to_string()];
        let s = scorers(
            "[{type: exact_match}, {type: exact_match, name: first, pattern: '=\\s*(-?\\d+)'}, \
             {type: regex, pattern: '#### \\d+$'}, {type: contains, reference: summary}, {type: rouge, name: r}, \
             {type: refusal}, {type: bleu}, {type: chrf}]",
        );
        let out = score_answers(&s, &rows, &answers, 0).unwrap();
        let get = |m: &str| out.measures.iter().find(|(n, _)| n == m).unwrap().1.clone();
        assert_eq!(out.rows[0]["exact_match"], 1.0);
        assert_eq!(out.rows[1]["exact_match"], 0.0);
        // The first `=` of the first answer is followed by 999: wrong; of the second, 13: wrong.
        assert_eq!((out.rows[0]["first"], out.rows[1]["first"]), (0.0, 0.0));
        // A pattern's capture is compared as text when it is not a number.
        let letters = vec![
            row("q", None, serde_json::json!({"key": "B"})),
            row("q", None, serde_json::json!({"key": "C"})),
        ];
        let s2 = scorers("[{type: exact_match, name: letter, pattern: 'Answer: ([A-D])', reference: key}]");
        let out2 = score_answers(&s2, &letters, &["Answer: B".into(), "Answer: D, or C".into()], 0).unwrap();
        assert_eq!((out2.rows[0]["letter"], out2.rows[1]["letter"]), (1.0, 0.0));
        assert_eq!(get("regex").value, 0.5);
        assert_eq!(get("contains").value, 0.0);
        assert!(out.rows[0].contains_key("r_rouge1") && out.rows[0].contains_key("r_rougeL"));
        let share = get("exact_match");
        assert_eq!((share.value, share.count), (0.5, 2));
        let [lo, hi] = share.ci.unwrap();
        assert!(lo > 0.0 && hi < 1.0 && lo < 0.5 && hi > 0.5);
        assert_eq!(get("refusal").value, 0.0);
        assert!(get("bleu").ci.is_some() && get("chrf").value > 0.0);
        for (_, m) in &out.measures {
            if let Some([lo, hi]) = m.ci {
                assert!(lo <= m.value + 1e-12 && m.value <= hi + 1e-12, "{m:?}");
            }
        }
    }

    #[test]
    fn a_missing_reference_names_the_row_and_column() {
        let rows = vec![row("a", None, serde_json::json!({}))];
        let e = score_answers(&scorers("[{type: exact_match}]"), &rows, &["x".into()], 0).unwrap_err().to_string();
        assert!(e.contains("rows.jsonl") && e.contains("no answer to compare with"), "{e}");
        let e = score_answers(&scorers("[{type: rouge, reference: gold}]"), &rows, &["x".into()], 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no `gold` column"), "{e}");
    }

    #[test]
    fn regression_cases_read_and_check() {
        let dir = std::env::temp_dir().join(format!("temper-cases-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let good = write(
            "good.jsonl",
            concat!(
                r#"{"id": "sum", "prompt": "2+2?", "regex": "4"}"#,
                "\n",
                r#"{"prompt": [{"role": "user", "content": "hack it"}], "refuse": true, "not_regex": "sudo"}"#,
                "\n"
            ),
        );
        let cases = read_cases(&good).unwrap();
        assert_eq!((cases[0].id.as_str(), cases[1].id.as_str()), ("sum", "case-2"));
        assert!(cases[0].failures("it is 4").is_empty());
        assert_eq!(cases[0].failures("five"), ["does not match /4/"]);
        assert_eq!(cases[1].failures("sure: sudo rm"), ["matches /sudo/", "does not refuse"]);
        assert!(cases[1].failures("I can't help with that.").is_empty());
        let bad = [
            ("{\"prompt\": \"x\"}\n", "checks nothing"),
            ("{\"prompt\": \"x\", \"regex\": \"(\"}\n", "not a valid regular expression"),
            ("{\"prompt\": \"x\", \"refuse\": \"yes\"}\n", "`refuse` must be true or false"),
            ("{\"id\": 1, \"prompt\": \"x\", \"refuse\": true}\n{\"id\": 1, \"prompt\": \"y\", \"refuse\": true}\n", "second case with id `1`"),
            ("{\"question\": \"x\", \"refuse\": true}\n", "prompt"),
            ("", "no cases"),
        ];
        for (i, (text, want)) in bad.iter().enumerate() {
            let e = read_cases(&write(&format!("bad{i}.jsonl"), text)).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("regression"), "{text}: {e}");
        }
    }

    #[test]
    fn reports_list_regressions_first_and_update_the_card() {
        let case = |id: &str| Case {
            id: id.into(),
            row: row("p", None, serde_json::json!({})),
            regex: Some(Regex::new("ok").unwrap()),
            not_regex: None,
            refuse: None,
        };
        let cases = [case("fine"), case("broken"), case("regressed")];
        let mut report = Report {
            model: "m.gguf".into(),
            data: Value::Null,
            rows: 0,
            generation: Value::Null,
            variants: ["base", "ad"]
                .iter()
                .map(|n| VariantReport {
                    name: n.to_string(),
                    adapter: None,
                    metrics: vec![("exact_match".into(), Measure { value: 0.5, count: 4, ci: Some([0.15, 0.85]) })],
                })
                .collect(),
            cases: Vec::new(),
        };
        report.add_cases("base", &cases, &["ok".into(), "no".into(), "ok".into()]);
        report.add_cases("ad", &cases, &["ok".into(), "no".into(), "no".into()]);
        let order: Vec<&str> = report.ordered_cases().iter().map(|c| c.id.as_str()).collect();
        assert_eq!(order, ["regressed", "broken", "fine"]);
        let md = markdown(&report);
        assert!(md.contains("| exact_match | 4 | 0.500 (0.150–0.850) | 0.500 (0.150–0.850) |"), "{md}");
        assert!(md.contains("| regressed (worse) | pass | FAIL: does not match /ok/ |"), "{md}");
        assert_eq!(report.to_json()["regression"][0]["worse_than_base"], serde_json::json!(["ad"]));
        // The card's evaluation section is replaced, not repeated; other text is kept.
        let dir = std::env::temp_dir().join(format!("temper-card-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("README.md"), "# Card\n\ntext\n").unwrap();
        std::fs::write(dir.join("adapter_config.json"), "{}").unwrap();
        update_model_card(&dir, &md).unwrap();
        update_model_card(&dir, "| new |\n").unwrap();
        let card = std::fs::read_to_string(dir.join("README.md")).unwrap();
        assert_eq!(card.matches("## Evaluation").count(), 1, "{card}");
        assert!(card.starts_with("# Card\n\ntext\n") && card.contains("| new |") && !card.contains("regressed"));
        let empty = dir.join("none");
        std::fs::create_dir_all(&empty).unwrap();
        update_model_card(&empty, &md).unwrap();
        assert!(!empty.join("README.md").exists(), "no card, none written");
        std::fs::write(empty.join("README.md"), "# A project\n").unwrap();
        update_model_card(&empty, &md).unwrap();
        assert_eq!(std::fs::read_to_string(empty.join("README.md")).unwrap(), "# A project\n", "not a training output");
    }
}
