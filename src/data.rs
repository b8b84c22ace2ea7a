//! `temper data inspect`: what the trainer will see, before a GPU-hour is spent on it.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use temper_data::{Cursor, Encoded, IGNORE_INDEX, LoaderOptions, Pipeline};
use temper_trainer::Job;

#[derive(Debug, Clone, clap::Args)]
pub struct InspectArgs {
    /// The job's YAML file.
    pub config: PathBuf,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Examples to print.
    #[arg(long, short = 'n', default_value_t = 3)]
    pub examples: usize,
    /// Count over at most this many batches (default: one whole epoch).
    #[arg(long)]
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum DataCommand {
    /// Print rendered, tokenized examples with the masked part marked, and counts.
    Inspect(InspectArgs),
}

pub fn run(cmd: DataCommand) -> Result<()> {
    let DataCommand::Inspect(args) = cmd;
    let mut job = Job::load(&args.config, &args.set)?;
    job.resolve_hub_ids()?;
    let objective = job.objective.clone();
    let job = &job.config;
    let (_, tokenizer) = temper_models::load_config_and_tokenizer(&job.model.path)?;
    let tokenizer = Arc::new(tokenizer);
    let options = LoaderOptions {
        seed: job.training.seed,
        ..objective.loader_options(objective.loader_rows(&job.training))
    };
    let pipeline = Arc::new(Pipeline::new(&job.data, tokenizer.clone(), options)?);
    println!("Text in ⟦…⟧ is masked (no loss); the rest is trained on.\n");
    for (i, (_, encoded)) in pipeline.preview(args.examples)?.iter().enumerate() {
        match encoded {
            Encoded::Sft(x) => {
                let targets = x.labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
                println!(
                    "── example {i}: {} tokens, {targets} targets{}",
                    x.input_ids.len(),
                    if x.truncated { ", truncated" } else { "" }
                );
                println!(
                    "{}\n",
                    marked(&tokenizer, &x.input_ids, |t| x.labels[t] == IGNORE_INDEX)?
                );
            }
            Encoded::Preference(p) => {
                println!(
                    "── pair {i}: prompt {} tokens, chosen {}, rejected {}",
                    p.prompt_ids.len(),
                    p.chosen_ids.len(),
                    p.rejected_ids.len()
                );
                println!("prompt:   {:?}", tokenizer.decode(&p.prompt_ids, false)?);
                println!("chosen:   {:?}", tokenizer.decode(&p.chosen_ids, false)?);
                println!("rejected: {:?}\n", tokenizer.decode(&p.rejected_ids, false)?);
            }
            Encoded::Unpaired(u) => unpaired_example(&tokenizer, i, u)?,
            Encoded::UnpairedPair(c, r) => {
                unpaired_example(&tokenizer, i, c)?;
                unpaired_example(&tokenizer, i, r)?;
            }
            Encoded::Prompt(p) => {
                let mut columns: Vec<&str> = p.columns.keys().map(String::as_str).collect();
                columns.sort_unstable();
                println!(
                    "── prompt {i}: {} tokens{}; columns for the rewards: {}",
                    p.prompt_ids.len(),
                    if p.truncated { ", truncated" } else { "" },
                    if columns.is_empty() { "none".into() } else { columns.join(", ") }
                );
                println!("{:?}\n", tokenizer.decode(&p.prompt_ids, false)?);
            }
            Encoded::Dropped => println!("── example {i}: dropped (no target token left after truncation)\n"),
        }
    }
    let loader = pipeline.clone().spawn(Cursor::default());
    let stats = loader.stats.clone();
    let started = std::time::Instant::now();
    for (n, b) in loader.enumerate() {
        b?;
        if args.limit.is_some_and(|l| n + 1 >= l) {
            break;
        }
    }
    let g = |c: &std::sync::atomic::AtomicU64| stats.get(c);
    let (tokens, slots) = (g(&stats.tokens), g(&stats.slots));
    println!("rows read           {}", g(&stats.rows));
    println!("bad rows skipped    {}", g(&stats.bad_rows_skipped));
    println!("rows truncated      {}", g(&stats.truncated));
    println!("rows dropped        {} (no target token)", g(&stats.dropped_no_target));
    println!(
        "batches             {} of {} rows",
        g(&stats.batches),
        job.training.micro_batch_size
    );
    println!("tokens              {tokens} ({} targets)", g(&stats.target_tokens));
    println!(
        "padding efficiency  {:.1}% of batch slots hold tokens{}",
        100.0 * tokens as f64 / slots.max(1) as f64,
        if job.data.packing { " (packed)" } else { "" }
    );
    println!(
        "read + tokenize     {:.0} tokens/s",
        tokens as f64 / started.elapsed().as_secs_f64()
    );
    for e in stats.skipped_examples.lock().expect("not poisoned").iter() {
        println!("skipped: {e}");
    }
    Ok(())
}

fn unpaired_example(tokenizer: &temper_models::Tokenizer, i: usize, u: &temper_data::UnpairedExample) -> Result<()> {
    println!(
        "── example {i} ({}): prompt {} tokens, completion {}",
        if u.desirable { "desirable" } else { "undesirable" },
        u.prompt_ids.len(),
        u.completion_ids.len()
    );
    println!("prompt:     {:?}", tokenizer.decode(&u.prompt_ids, false)?);
    println!("completion: {:?}\n", tokenizer.decode(&u.completion_ids, false)?);
    Ok(())
}

/// Decodes `ids`, wrapping runs of masked tokens in ⟦…⟧.
fn marked(tokenizer: &temper_models::Tokenizer, ids: &[u32], masked: impl Fn(usize) -> bool) -> Result<String> {
    let mut out = String::new();
    let mut start = 0;
    while start < ids.len() {
        let m = masked(start);
        let mut end = start;
        while end < ids.len() && masked(end) == m {
            end += 1;
        }
        let text = tokenizer.decode(&ids[start..end], false)?;
        if m {
            out.push_str(&format!("⟦{text}⟧"));
        } else {
            out.push_str(&text);
        }
        start = end;
    }
    Ok(out)
}
