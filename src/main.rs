use anyhow::Result;
use clap::{Parser, Subcommand};
use temper::backend::{DeviceSpec, dispatch};
use temper::export::ExportArgs;
use temper::generate::GenerateArgs;
use temper::merge::MergeArgs;

/// Fine-tuning and preference training of language models.
#[derive(Parser)]
#[command(name = "temper", version)]
struct Cli {
    /// cpu, cuda, cuda:N or wgpu.
    #[arg(long, global = true, default_value = "cpu")]
    device: DeviceSpec,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt.
    Generate(GenerateArgs),
    /// Fold a LoRA adapter into its base model and write a Hugging Face model directory.
    Merge(MergeArgs),
    /// Write an adapter in another tool's format (llama.cpp GGUF).
    Export(ExportArgs),
}

fn main() {
    // Errors are for users: the whole cause chain on one line, no backtrace.
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(args) => dispatch(cli.device, args).map_err(anyhow::Error::msg)?,
        Command::Merge(args) => dispatch(cli.device, args).map_err(anyhow::Error::msg)?,
        Command::Export(args) => temper::export::run(args),
    }
}
