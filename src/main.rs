use anyhow::Result;
use clap::{Parser, Subcommand};
use temper::backend::{DeviceSpec, dispatch};
use temper::data::DataCommand;
use temper::eval::EvalArgs;
use temper::export::ExportArgs;
use temper::generate::GenerateArgs;
use temper::launch::LaunchArgs;
use temper::merge::MergeArgs;
use temper::push::PushArgs;
use temper::review::ReviewArgs;
use temper::score::ScoreArgs;
use temper::train::TrainArgs;

/// Fine-tuning and preference training of language models.
#[derive(Parser)]
#[command(name = "temper", version)]
struct Cli {
    /// cpu, cuda, cuda:N or wgpu (default: cpu, or the job's `device` for `train`).
    #[arg(long, global = true)]
    device: Option<DeviceSpec>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune a model as a YAML job file describes (see configs/).
    Train(TrainArgs),
    /// Look at a job's data as the trainer will see it.
    #[command(subcommand)]
    Data(DataCommand),
    /// Generate text from a prompt.
    Generate(GenerateArgs),
    /// Evaluate a model and its adapters on held-out rows: loss, scores of generated answers,
    /// multiple choice, a regression set (eval.json, eval.md, eval_samples.jsonl).
    Eval(EvalArgs),
    /// Compare two models' answers on a local page; choices become DPO and KTO data.
    Review(ReviewArgs),
    /// Score rows with a reward model (JSON lines: each pair's chosen and rejected scores).
    Score(ScoreArgs),
    /// Fold a LoRA adapter into its base model and write a Hugging Face model directory.
    Merge(MergeArgs),
    /// Write an adapter in another tool's format (llama.cpp GGUF).
    Export(ExportArgs),
    /// Publish a folder (a training output) to a Hugging Face Hub repository.
    Push(PushArgs),
    /// Train on several devices or machines: one `temper train` worker per device.
    Launch(LaunchArgs),
}

fn main() {
    // Before any thread starts: it sets an environment variable.
    temper_launch::prepare_process();
    keep_freed_memory();
    // Errors are for users: the whole cause chain on one line, no backtrace.
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let device = cli.device.unwrap_or(DeviceSpec::Cpu);
    match cli.command {
        Command::Train(args) => temper::train::run(args, cli.device),
        Command::Data(cmd) => temper::data::run(cmd),
        Command::Eval(args) => temper::eval::run(args, cli.device),
        Command::Review(args) => temper::review::run(args),
        Command::Generate(args) => dispatch(device, args).map_err(anyhow::Error::msg)?,
        Command::Merge(args) => dispatch(device, args).map_err(anyhow::Error::msg)?,
        Command::Score(args) => dispatch(device, args).map_err(anyhow::Error::msg)?,
        Command::Export(args) => temper::export::run(args),
        Command::Push(args) => temper::push::run(args),
        Command::Launch(args) => temper::launch::run(args, cli.device),
    }
}

/// glibc hands large freed blocks back to the kernel (munmap, heap trimming), and the next
/// training step faults them in again as zeroed pages: 11% of a LoRA step on the CPU was
/// `clear_page`. Raising the mmap and trim thresholds keeps that memory for reuse: 80 -> 111
/// tokens/s with the same peak RSS (benches/RESULTS.md). glibc reads its tunables only at
/// startup, hence the re-exec; a user's own GLIBC_TUNABLES is left alone.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        const KEY: &str = "GLIBC_TUNABLES";
        if std::env::var_os(KEY).is_some() {
            return;
        }
        let Ok(exe) = std::env::current_exe() else { return };
        // exec only returns on failure; then run as we are.
        let _ = std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env(
                KEY,
                "glibc.malloc.mmap_threshold=2147483647:glibc.malloc.trim_threshold=2147483647",
            )
            .exec();
    }
}
