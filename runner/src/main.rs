use std::process::ExitCode;

use clap::Parser;
use runner::commands::{
    bench, eval, export, list, merge, prepare, report, run, slurm, verify, worker,
};
use runner::error::{exit, InputError};

/// Architecture sweeps for language models: list component variants in a RON file, train
/// every combination, and find the losses and bits per byte in SQLite.
#[derive(Parser)]
#[command(name = "sweep", version = runner::CODE_VERSION)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    Run(run::Args),
    Report(report::Args),
    Merge(merge::Args),
    Slurm(slurm::Args),
    List(list::Args),
    Bench(bench::Args),
    Eval(eval::Args),
    Export(export::Args),
    Verify(verify::Args),
    Prepare(prepare::Args),
    #[command(hide = true)]
    Worker(worker::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::exec(args),
        Command::Report(args) => report::exec(args),
        Command::Merge(args) => merge::exec(args),
        Command::Slurm(args) => slurm::exec(args),
        Command::Worker(args) => worker::exec(args),
        Command::List(args) => list::exec(args),
        Command::Bench(args) => bench::exec(args),
        Command::Eval(args) => eval::exec(args),
        Command::Export(args) => export::exec(args),
        Command::Verify(args) => verify::exec(args),
        Command::Prepare(args) => prepare::exec(args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<InputError>().is_some() {
                ExitCode::from(exit::INPUT)
            } else {
                ExitCode::from(exit::FAILED)
            }
        }
    }
}
