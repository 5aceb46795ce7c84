//! The `sweep` command as a library: sweep files, data, model assembly, training and the
//! subcommands. `main.rs` only parses arguments and maps errors to exit statuses.

// Linking the components crate is what registers them (their `inventory::submit!` entries
// are dropped by the linker if nothing names the crate).
use components as _;

pub mod amplification;
pub mod benchmarks;
pub mod checkpoint;
pub mod commands;
pub mod data;
pub mod devices;
pub mod error;
pub mod export;
pub mod flops;
pub mod gpu;
pub mod graph;
pub mod memory;
pub mod model;
pub mod owner;
pub mod parallel;
pub mod plan;
pub mod progress;
pub mod spec;
pub mod spikes;
pub mod streams;
pub mod supervise;
pub mod tensor_file;
pub mod train;
mod trunk;

/// `CARGO_PKG_VERSION+git describe`, recorded with every sweep and trial.
pub const CODE_VERSION: &str = env!("SWEEP_CODE_VERSION");

#[cfg(test)]
mod registry_test;
