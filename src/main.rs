use anyhow::Result;
use clap::{Parser, Subcommand};
use temper::backend::{DeviceSpec, dispatch};
use temper::generate::GenerateArgs;

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
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Generate(args) => dispatch(cli.device, args).map_err(anyhow::Error::msg)?,
    }
}
