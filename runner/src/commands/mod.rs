//! One file per subcommand: its `Args` (clap derive; doc comments are the help) and `exec`.

pub mod list;
pub mod report;
pub mod run;
pub mod worker;
