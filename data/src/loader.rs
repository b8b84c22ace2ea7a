//! The pipeline from sources to batches, run on a thread ahead of the trainer.
//!
//! Per epoch: sources (concatenated, or interleaved at random by weight) → a seeded streaming
//! shuffle → sharding by rank (row `i` goes to rank `i % world_size`, so ranks never share a
//! row) → windows of rows, tokenized in parallel → packing or padding → batches. A [`Cursor`]
//! names the next batch as (epoch, window, batch within the window): resuming re-reads the rows
//! of the windows before it without tokenizing them, so a resumed run gets exactly the batches
//! the uninterrupted run would have.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use temper_models::Tokenizer;

use crate::config::{DataConfig, Stopping};
use crate::error::{Error, Location, Result};
use crate::format::{Format, RowFormat, Sample};
use crate::pack::{PackedRow, PreferenceBatch, SftBatch, UnpairedBatch, pack_bfd};
use crate::rollout::{PromptBatch, RolloutBatch};
use crate::source::{DataFile, Record, resolve};
use crate::tokenize::{Encoded, Encoder, PreferenceExample, PromptExample, SftExample, UnpairedExample};

/// The position of the next batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    pub window: u64,
    pub batch: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Batch {
    Sft(SftBatch),
    Preference(PreferenceBatch),
    Unpaired(UnpairedBatch),
    /// Prompts for an online objective to complete (GRPO), from the loader.
    Prompts(PromptBatch),
    /// Completions generated and scored during training (GRPO), made by the trainer.
    Rollout(RolloutBatch),
}

impl Batch {
    /// Real (non-padding) tokens.
    pub fn num_tokens(&self) -> usize {
        match self {
            Batch::Sft(b) => b.num_tokens(),
            Batch::Preference(b) => b.num_tokens(),
            Batch::Unpaired(b) => b.num_tokens(),
            Batch::Prompts(b) => b.num_tokens(),
            Batch::Rollout(b) => b.num_tokens(),
        }
    }

    /// Examples (SFT; a packed row holds several), pairs, or unpaired completions.
    pub fn num_examples(&self) -> usize {
        match self {
            Batch::Sft(b) => b.num_examples(),
            Batch::Preference(b) => b.pairs,
            Batch::Unpaired(b) => b.rows,
            Batch::Prompts(b) => b.prompts.len(),
            Batch::Rollout(b) => b.rows,
        }
    }

    /// The largest token id in the inputs and the labels (padding included), to check against
    /// the model's vocabulary: a label past it would index out of the logits.
    pub fn max_token_id(&self) -> Option<u32> {
        match self {
            Batch::Sft(b) => {
                let labels = b.labels.iter().filter_map(|&l| u32::try_from(l).ok());
                b.input_ids.iter().copied().chain(labels).max()
            }
            Batch::Preference(b) => b.input_ids.iter().max().copied(),
            Batch::Unpaired(b) => b.input_ids.iter().max().copied(),
            Batch::Prompts(b) => b.prompts.iter().flat_map(|p| p.prompt_ids.iter()).max().copied(),
            Batch::Rollout(b) => b.input_ids.iter().max().copied(),
        }
    }

    /// What the loss is averaged over: target tokens (SFT), pairs (preference), completions
    /// (unpaired), or what the rollout's loss type divides by (GRPO; prompts are never a loss's).
    pub fn loss_normaliser(&self) -> usize {
        match self {
            Batch::Sft(b) => b.num_target_tokens(),
            Batch::Preference(b) => b.pairs,
            Batch::Unpaired(b) => b.rows,
            Batch::Prompts(_) => 0,
            Batch::Rollout(b) => b.loss_weight,
        }
    }
}

/// A batch and the cursor that follows it (what a checkpoint saves).
#[derive(Debug, Clone)]
pub struct LoadedBatch {
    pub batch: Batch,
    pub epoch: u64,
    pub next: Cursor,
}

/// Counters over everything the loader has read, shared with the trainer's log.
#[derive(Debug, Default)]
pub struct Stats {
    pub rows: AtomicU64,
    pub bad_rows_skipped: AtomicU64,
    pub dropped_no_target: AtomicU64,
    pub truncated: AtomicU64,
    pub tokens: AtomicU64,
    pub target_tokens: AtomicU64,
    /// Token slots in batches, padding included: `tokens / slots` is the packing efficiency.
    pub slots: AtomicU64,
    pub batches: AtomicU64,
    /// The first few skipped rows' errors, for the log.
    pub skipped_examples: Mutex<Vec<String>>,
}

impl Stats {
    pub fn get(&self, counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct LoaderOptions {
    pub batch_size: usize,
    pub seed: u64,
    pub rank: usize,
    pub world_size: usize,
    /// `None`: epochs without end (the trainer stops at `max_steps`).
    pub epochs: Option<u64>,
    /// KTO's batches: unpaired completions (pairs are split in two), with or without the
    /// mismatched completions of its KL estimate. `None` for every other objective.
    pub unpaired: Option<Unpaired>,
    /// Reward models: pairs longer than `max_length` are dropped, not truncated.
    pub drop_long_pairs: bool,
    /// Online objectives (GRPO): the rows' prompts alone, whatever else the rows hold, in
    /// [`Batch::Prompts`] of `batch_size` prompts.
    pub prompts: bool,
}

impl LoaderOptions {
    /// One pass over the rows in order, in one process, batched as SFT or preference data:
    /// what scoring and evaluation read.
    pub fn one_pass(batch_size: usize) -> Self {
        Self {
            batch_size,
            seed: 0,
            rank: 0,
            world_size: 1,
            epochs: Some(1),
            unpaired: None,
            drop_long_pairs: false,
            prompts: false,
        }
    }
}

/// How KTO batches unpaired completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unpaired {
    /// Add each row's prompt with the previous row's completion (within the micro-batch).
    pub kl: bool,
}

struct PreparedSource {
    files: Vec<DataFile>,
    format: RowFormat,
    columns: Vec<String>,
    weight: Option<f64>,
}

/// Resolved sources, the encoder and the options: everything needed to produce batches.
pub struct Pipeline {
    sources: Vec<PreparedSource>,
    pub encoder: Arc<Encoder>,
    pub config: DataConfig,
    pub options: LoaderOptions,
    pub preference: bool,
    /// The rows are unpaired completions (KTO's data, or pairs split for KTO).
    pub unpaired: bool,
    /// The rows are prompts alone (GRPO's data, or any data with a `prompt` for GRPO).
    pub prompts: bool,
    pad_id: u32,
    pub stats: Arc<Stats>,
}

impl Pipeline {
    /// Resolves the sources and their formats (reading only schemas or first rows), so a wrong
    /// path or a missing column fails before any model is loaded.
    pub fn new(config: &DataConfig, tokenizer: Arc<Tokenizer>, options: LoaderOptions) -> Result<Self> {
        config.validate("data")?;
        if options.batch_size == 0 || options.world_size == 0 || options.rank >= options.world_size {
            return Err(Error::config(
                "data",
                format!(
                    "batch size {} / rank {} of {} is not a valid layout",
                    options.batch_size, options.rank, options.world_size
                ),
            ));
        }
        let mut sources = Vec::new();
        for (i, s) in config.resolved_sources().iter().enumerate() {
            let files = resolve(&s.path, s.split.as_deref().unwrap_or("train"))?;
            let first = files.first().expect("resolve returns at least one file");
            let columns = first.columns()?;
            let renames = s.columns.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            let mut format = RowFormat::resolve(
                s.format.unwrap_or_default(),
                renames,
                &columns,
                &Location::file(&first.path),
            )?;
            // A `label` beside prompt/completion marks KTO's data only for KTO: other objectives
            // read such rows as prompt/completion, as TRL's SFTTrainer does (ignoring `label`).
            if format.format.is_unpaired() && options.unpaired.is_none() && s.format.is_none_or(|f| f == Format::Auto) {
                format.format = Format::PromptCompletion;
            }
            if options.prompts && format.format != Format::Prompt {
                // GRPO completes the prompts itself: completions or answers in the data are
                // columns like any other (for the reward functions).
                if !columns.iter().any(|c| c == format.column_name("prompt")) {
                    return Err(Error::MissingColumn {
                        at: Location::file(&first.path),
                        column: format.column_name("prompt").to_string(),
                        available: columns.join(", "),
                    });
                }
                format.format = Format::Prompt;
            }
            let wanted = format.dataset_columns(&columns);
            sources.push(PreparedSource {
                files,
                columns: wanted,
                format,
                weight: s.weight,
            });
            let kind = |s: &PreparedSource| {
                (
                    s.format.format.is_preference(),
                    s.format.format.is_unpaired(),
                    s.format.format == Format::Prompt,
                )
            };
            if kind(&sources[0]) != kind(&sources[i]) {
                return Err(Error::config(
                    format!("data.sources[{i}]"),
                    "paired preference, unpaired preference, prompt-only and SFT sources cannot be mixed in one job",
                ));
            }
        }
        let format = sources[0].format.format;
        let unpaired = format.is_unpaired() || (format.is_preference() && options.unpaired.is_some());
        let preference = format.is_preference() && !unpaired;
        let prompts = format == Format::Prompt;
        let pad = tokenizer
            .pad_token_id()
            .ok_or_else(|| Error::config("tokenizer", "the tokenizer has neither a pad nor an EOS token"))?;
        let encoder = Encoder::new(
            tokenizer,
            config.encode_options(options.unpaired.is_some(), options.drop_long_pairs),
        )?;
        Ok(Self {
            sources,
            encoder: Arc::new(encoder),
            config: config.clone(),
            options,
            preference,
            unpaired,
            prompts,
            pad_id: pad,
            stats: Arc::new(Stats::default()),
        })
    }

    /// The token batches are padded with.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    fn window_size(&self) -> usize {
        if self.config.packing && !self.preference && !self.unpaired && !self.prompts {
            self.config.packing_window
        } else {
            self.options.batch_size.saturating_mul(16)
        }
    }

    /// This rank's rows of one epoch, in order.
    pub fn rows(&self, epoch: u64) -> impl Iterator<Item = Result<(usize, Record)>> + Send + use<> {
        let seed = self.options.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let streams: Vec<SourceStream> = self
            .sources
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut files = s.files.clone();
                if self.config.shuffle {
                    files.shuffle(&mut StdRng::seed_from_u64(seed.wrapping_add(i as u64)));
                }
                SourceStream::new(files, s.columns.clone())
            })
            .collect();
        let weights: Option<Vec<f64>> = self
            .sources
            .iter()
            .any(|s| s.weight.is_some())
            .then(|| self.sources.iter().map(|s| s.weight.unwrap_or(1.0)).collect());
        let mixed = Mixed {
            streams,
            weights,
            stopping: self.config.stopping,
            exhausted_once: vec![false; self.sources.len()],
            current: 0,
            rng: StdRng::seed_from_u64(seed),
            done: false,
        };
        let shuffled: Box<dyn Iterator<Item = Result<(usize, Record)>> + Send> = if self.config.shuffle {
            Box::new(Shuffle {
                inner: mixed,
                buffer: Vec::new(),
                size: self.config.shuffle_buffer,
                rng: StdRng::seed_from_u64(seed.wrapping_add(0xB5)),
            })
        } else {
            Box::new(mixed)
        };
        let (rank, world) = (self.options.rank as u64, self.options.world_size as u64);
        // Errors are kept on every rank (they are not rows of one rank).
        let mut index = 0u64;
        shuffled.filter(move |r| match r {
            Ok(_) => {
                let keep = index % world == rank;
                index += 1;
                keep
            }
            Err(_) => true,
        })
    }

    /// Desirable and undesirable rows of one pass over unpaired data (KTO's balance check;
    /// pairs count one of each). Bad rows fail or are skipped as the config says.
    pub fn label_counts(&self) -> Result<(u64, u64)> {
        let (mut desirable, mut undesirable) = (0, 0);
        for row in self.rows(0) {
            let sample = row.and_then(|(src, record)| self.sample(src, &record));
            match sample {
                Ok(Sample::Unpaired { desirable: d, .. }) => {
                    *if d { &mut desirable } else { &mut undesirable } += 1;
                }
                Ok(Sample::Preference { .. }) => {
                    desirable += 1;
                    undesirable += 1;
                }
                Ok(_) => {}
                Err(e) if self.config.skip_bad_rows && e.is_row_error() => {}
                Err(e) => return Err(e),
            }
        }
        Ok((desirable, undesirable))
    }

    /// Reads samples from rows, applying `skip_bad_rows`.
    fn sample(&self, source: usize, record: &Record) -> Result<Sample> {
        self.sources[source].format.sample(record)
    }

    /// Tokenizes one window of rows in parallel; bad rows are skipped or fail, per the config.
    fn encode_window(&self, rows: &[(usize, Record)]) -> Result<Vec<Encoded>> {
        let results: Vec<Result<Encoded>> = rows
            .par_iter()
            .map(|(src, record)| {
                let sample = self.sample(*src, record)?;
                self.encoder.encode(&sample, &record.at)
            })
            .collect();
        let mut out = Vec::with_capacity(results.len());
        for r in results {
            match r {
                Ok(e) => out.push(e),
                Err(e) => self.skip_or_fail(e)?,
            }
        }
        self.stats.rows.fetch_add(rows.len() as u64, Ordering::Relaxed);
        Ok(out)
    }

    fn skip_or_fail(&self, e: Error) -> Result<()> {
        if self.config.skip_bad_rows && e.is_row_error() {
            self.stats.bad_rows_skipped.fetch_add(1, Ordering::Relaxed);
            let mut list = self.stats.skipped_examples.lock().expect("not poisoned");
            if list.len() < 5 {
                list.push(e.to_string());
            }
            Ok(())
        } else {
            Err(e)
        }
    }

    /// Turns one window's encoded rows into batches.
    fn batches(&self, encoded: Vec<Encoded>, seed: u64) -> Vec<Batch> {
        let bs = self.options.batch_size;
        let stats = &self.stats;
        let mut sft: Vec<SftExample> = Vec::new();
        let mut pairs: Vec<PreferenceExample> = Vec::new();
        // Unpaired rows, and the halves of pairs split for KTO: as TRL's
        // `unpair_preference_dataset` orders them, every chosen completion of the window (in
        // order), then every rejected one.
        let (mut unpaired, mut rejected): (Vec<UnpairedExample>, Vec<UnpairedExample>) = (Vec::new(), Vec::new());
        let mut prompts: Vec<PromptExample> = Vec::new();
        for e in encoded {
            match e {
                Encoded::Sft(x) => {
                    if x.truncated {
                        stats.truncated.fetch_add(1, Ordering::Relaxed);
                    }
                    sft.push(x)
                }
                Encoded::Preference(p) => pairs.push(p),
                Encoded::Unpaired(u) => unpaired.push(u),
                Encoded::Prompt(p) => {
                    if p.truncated {
                        stats.truncated.fetch_add(1, Ordering::Relaxed);
                    }
                    prompts.push(p)
                }
                Encoded::UnpairedPair(c, r) => {
                    unpaired.push(c);
                    rejected.push(r);
                }
                Encoded::Dropped => {
                    stats.dropped_no_target.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        unpaired.append(&mut rejected);
        let batches: Vec<Batch> = if self.prompts {
            // Whole batches only, as TRL's sampler drops an incomplete one: every round has the
            // same size on every worker (their rewards are gathered).
            prompts
                .chunks_exact(bs)
                .map(|c| Batch::Prompts(PromptBatch { prompts: c.to_vec() }))
                .collect()
        } else if self.unpaired {
            let kl = self.options.unpaired.is_some_and(|u| u.kl);
            let mut chunks: Vec<&[UnpairedExample]> = unpaired.chunks(bs).collect();
            if kl && chunks.len() > 1 && chunks.last().is_some_and(|c| c.len() == 1) {
                // A row alone would be its own KL pair (its KL term its own reward): it joins
                // the micro-batch before it.
                chunks.pop();
                let start = unpaired.len() - chunks.last().map_or(0, |c| c.len()) - 1;
                chunks.pop();
                chunks.push(&unpaired[start..]);
            }
            chunks
                .into_iter()
                .map(|c| {
                    Batch::Unpaired(UnpairedBatch::collate(
                        c,
                        kl,
                        self.pad_id,
                        self.config.max_length,
                        self.config.pad_to_multiple_of,
                    ))
                })
                .collect()
        } else if self.preference {
            pairs
                .chunks(bs)
                .map(|c| {
                    Batch::Preference(PreferenceBatch::collate(
                        c,
                        self.pad_id,
                        self.config.max_length,
                        self.config.truncation,
                        self.config.pad_to_multiple_of,
                    ))
                })
                .collect()
        } else if self.config.packing {
            let max = self.config.max_length.expect("validated: packing needs max_length");
            let mut rows: Vec<PackedRow> = pack_bfd(sft, max, self.config.packing_strategy);
            if self.config.shuffle {
                // Rows come out of best-fit-decreasing sorted by their longest example.
                rows.shuffle(&mut StdRng::seed_from_u64(seed));
            }
            rows.chunks(bs)
                .map(|c| {
                    let views: Vec<_> = c
                        .iter()
                        .map(|r| (r.input_ids.as_slice(), r.labels.as_slice(), r.seq_lengths.as_slice()))
                        .collect();
                    Batch::Sft(SftBatch::collate(&views, self.pad_id, self.config.pad_to_multiple_of))
                })
                .collect()
        } else {
            sft.chunks(bs)
                .map(|c| {
                    let lens: Vec<[usize; 1]> = c.iter().map(|x| [x.input_ids.len()]).collect();
                    let views: Vec<_> = c
                        .iter()
                        .zip(&lens)
                        .map(|(x, l)| (x.input_ids.as_slice(), x.labels.as_slice(), l.as_slice()))
                        .collect();
                    Batch::Sft(SftBatch::collate(&views, self.pad_id, self.config.pad_to_multiple_of))
                })
                .collect()
        };
        for b in &batches {
            let (tokens, targets, slots) = match b {
                Batch::Sft(b) => (b.num_tokens(), b.num_target_tokens(), b.batch_size * b.seq_len),
                Batch::Preference(b) => (
                    b.num_tokens(),
                    b.completion_mask.iter().filter(|&&m| m == 1).count(),
                    2 * b.pairs * b.seq_len,
                ),
                Batch::Unpaired(b) => (
                    b.num_tokens(),
                    b.completion_mask[..b.rows * b.seq_len]
                        .iter()
                        .filter(|&&m| m == 1)
                        .count(),
                    b.rows * b.seq_len,
                ),
                Batch::Prompts(b) => (b.num_tokens(), 0, b.num_tokens()),
                Batch::Rollout(b) => (b.num_tokens(), 0, b.rows * b.seq_len),
            };
            stats.tokens.fetch_add(tokens as u64, Ordering::Relaxed);
            stats.target_tokens.fetch_add(targets as u64, Ordering::Relaxed);
            stats.slots.fetch_add(slots as u64, Ordering::Relaxed);
            stats.batches.fetch_add(1, Ordering::Relaxed);
        }
        batches
    }

    /// Every row of an epoch was read and none made it into a batch: says where they went.
    fn no_batch_error(&self, epoch: u64) -> Error {
        let st = &self.stats;
        let (rows, dropped, skipped) = (
            st.get(&st.rows),
            st.get(&st.dropped_no_target),
            st.get(&st.bad_rows_skipped),
        );
        let mut why = Vec::new();
        let max = self.config.max_length.map_or("none".to_string(), |m| m.to_string());
        if dropped > 0 && self.options.drop_long_pairs {
            why.push(format!(
                "{dropped} pairs had a side longer than `max_length` ({max}): a reward model scores whole sequences, \
                 so such pairs are dropped, not truncated"
            ));
        } else if dropped > 0 {
            why.push(format!(
                "{dropped} had no token left to train on after truncation (is `max_length` ({max}) shorter than the prompts?)"
            ));
        }
        if skipped > 0 {
            why.push(format!("{skipped} were skipped as bad rows (`skip_bad_rows`)"));
        }
        let examples = st.skipped_examples.lock().expect("not poisoned");
        if let Some(first) = examples.first() {
            why.push(format!("the first skipped: {first}"));
        }
        Error::config(
            "data",
            format!(
                "epoch {epoch} gave no batch for rank {} of {}: every row was dropped ({rows} rows read{}{})",
                self.options.rank,
                self.options.world_size,
                if why.is_empty() { "" } else { "; " },
                why.join("; ")
            ),
        )
    }

    /// Produces batches from `start` on, sending each with the cursor after it; returns when the
    /// epochs are done, on an error (sent), or when the receiver is gone.
    fn produce(&self, start: Cursor, tx: &SyncSender<Result<LoadedBatch>>) {
        let window = self.window_size();
        let mut epoch = start.epoch;
        loop {
            if self.options.epochs.is_some_and(|n| epoch >= n) {
                return;
            }
            let mut rows = self.rows(epoch);
            let mut w = 0u64;
            let mut produced_any = false;
            // Batches sent this epoch. An epoch entered part-way by a resume may rightly have
            // none left; any other epoch without one would repeat forever (every row dropped:
            // prompts longer than `max_length`, or all rows skipped as bad), so it is an error.
            let mut batches_sent = 0u64;
            let entered_part_way = epoch == start.epoch && (start.window, start.batch) != (0, 0);
            loop {
                let resuming = epoch == start.epoch && w < start.window;
                // Capped: the window is a row count from the config, not a size to trust.
                let capacity = if resuming { 0 } else { window.min(1 << 16) };
                let mut chunk: Vec<(usize, Record)> = Vec::with_capacity(capacity);
                let mut taken = 0;
                while taken < window {
                    match rows.next() {
                        None => break,
                        Some(Ok((src, r))) => {
                            taken += 1;
                            if !resuming {
                                chunk.push((src, r));
                            }
                        }
                        Some(Err(e)) => {
                            if let Err(e) = self.skip_or_fail(e) {
                                let _ = tx.send(Err(e));
                                return;
                            }
                        }
                    }
                }
                if taken == 0 {
                    break;
                }
                produced_any = true;
                if resuming {
                    w += 1;
                    continue;
                }
                let encoded = match self.encode_window(&chunk) {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let seed = self.options.seed ^ (epoch << 32) ^ w;
                let batches = self.batches(encoded, seed);
                let n = batches.len() as u64;
                let skip = if epoch == start.epoch && w == start.window {
                    start.batch
                } else {
                    0
                };
                for (i, batch) in batches.into_iter().enumerate().skip(skip as usize) {
                    let i = i as u64;
                    let next = if i + 1 < n {
                        Cursor {
                            epoch,
                            window: w,
                            batch: i + 1,
                        }
                    } else {
                        Cursor {
                            epoch,
                            window: w + 1,
                            batch: 0,
                        }
                    };
                    if tx.send(Ok(LoadedBatch { batch, epoch, next })).is_err() {
                        return;
                    }
                    batches_sent += 1;
                }
                w += 1;
            }
            if !produced_any || (batches_sent == 0 && !entered_part_way) {
                let skipped = self.stats.get(&self.stats.bad_rows_skipped);
                let error = if produced_any || skipped > 0 {
                    self.no_batch_error(epoch)
                } else {
                    Error::config(
                        "data",
                        format!(
                            "epoch {epoch} has no rows for rank {} of {} (is the dataset empty?)",
                            self.options.rank, self.options.world_size
                        ),
                    )
                };
                let _ = tx.send(Err(error));
                return;
            }
            epoch += 1;
        }
    }

    /// Starts the loader thread at `start`.
    pub fn spawn(self: Arc<Self>, start: Cursor) -> DataLoader {
        let (tx, rx) = sync_channel(self.config.prefetch);
        let this = self.clone();
        let handle = std::thread::Builder::new()
            .name("temper-data".into())
            .spawn(move || this.produce(start, &tx))
            .expect("spawning a thread");
        DataLoader {
            rx,
            _handle: handle,
            stats: self.stats.clone(),
        }
    }

    /// The first `n` rows of epoch 0 as samples and their encodings (for `temper data inspect`).
    pub fn preview(&self, n: usize) -> Result<Vec<(Sample, Encoded)>> {
        let mut out = Vec::new();
        for r in self.rows(0).take(n) {
            let (src, record) = r?;
            let sample = self.sample(src, &record)?;
            let encoded = self.encoder.encode(&sample, &record.at)?;
            out.push((sample, encoded));
        }
        Ok(out)
    }
}

/// Batches from the loader thread, in order.
pub struct DataLoader {
    rx: Receiver<Result<LoadedBatch>>,
    _handle: std::thread::JoinHandle<()>,
    pub stats: Arc<Stats>,
}

impl Iterator for DataLoader {
    type Item = Result<LoadedBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        self.rx.recv().ok()
    }
}

/// One source's files read one after another.
struct SourceStream {
    files: Vec<DataFile>,
    columns: Vec<String>,
    next_file: usize,
    rows: Option<Box<dyn Iterator<Item = Result<Record>> + Send>>,
}

impl SourceStream {
    fn new(files: Vec<DataFile>, columns: Vec<String>) -> Self {
        Self {
            files,
            columns,
            next_file: 0,
            rows: None,
        }
    }

    fn restart(&mut self) {
        self.next_file = 0;
        self.rows = None;
    }
}

impl Iterator for SourceStream {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Result<Record>> {
        loop {
            if let Some(rows) = &mut self.rows
                && let Some(r) = rows.next()
            {
                return Some(r);
            }
            let file = self.files.get(self.next_file)?;
            self.next_file += 1;
            match file.rows(Some(&self.columns)) {
                Ok(rows) => self.rows = Some(rows),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// Sources concatenated, or interleaved by weight (as `datasets.interleave_datasets`).
struct Mixed {
    streams: Vec<SourceStream>,
    weights: Option<Vec<f64>>,
    stopping: Stopping,
    exhausted_once: Vec<bool>,
    current: usize,
    rng: StdRng,
    done: bool,
}

impl Iterator for Mixed {
    type Item = Result<(usize, Record)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let Some(weights) = &self.weights else {
            while self.current < self.streams.len() {
                if let Some(r) = self.streams[self.current].next() {
                    return Some(r.map(|r| (self.current, r)));
                }
                self.current += 1;
            }
            self.done = true;
            return None;
        };
        loop {
            let total: f64 = weights.iter().sum();
            let mut pick = self.rng.random::<f64>() * total;
            let mut i = 0;
            while i + 1 < weights.len() && pick >= weights[i] {
                pick -= weights[i];
                i += 1;
            }
            if let Some(r) = self.streams[i].next() {
                return Some(r.map(|r| (i, r)));
            }
            self.exhausted_once[i] = true;
            let stop = match self.stopping {
                Stopping::FirstExhausted => true,
                Stopping::AllExhausted => self.exhausted_once.iter().all(|&e| e),
            };
            if stop {
                self.done = true;
                return None;
            }
            // Oversample: a source that ran out starts again until every source has.
            self.streams[i].restart();
            if self.streams[i].files.is_empty() {
                self.done = true;
                return None;
            }
        }
    }
}

/// A seeded streaming shuffle: a buffer of rows, each output drawn from it at random.
struct Shuffle<I> {
    inner: I,
    buffer: Vec<(usize, Record)>,
    size: usize,
    rng: StdRng,
}

impl<I: Iterator<Item = Result<(usize, Record)>>> Iterator for Shuffle<I> {
    type Item = Result<(usize, Record)>;

    fn next(&mut self) -> Option<Self::Item> {
        while self.buffer.len() < self.size {
            match self.inner.next() {
                Some(Ok(r)) => self.buffer.push(r),
                Some(Err(e)) => return Some(Err(e)),
                None => break,
            }
        }
        if self.buffer.is_empty() {
            return None;
        }
        let j = self.rng.random_range(0..self.buffer.len());
        Some(Ok(self.buffer.swap_remove(j)))
    }
}
