//! One file per subcommand: its `Args` (clap derive; doc comments are the help) and `exec`.

pub mod bench;
pub mod eval;
pub mod export;
pub mod list;
pub mod merge;
pub mod prepare;
mod recorded;
pub mod report;
pub mod run;
pub mod slurm;
pub mod verify;
pub mod worker;
