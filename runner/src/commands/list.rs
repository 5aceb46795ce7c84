//! `sweep list [SLOT]`: every registered component with its summary and parameters.

use std::fmt::Write;

use registry::{Entry, Slot};

use crate::error::{exit, InputError};
use crate::spec::raw;

/// List registered components and their parameters with defaults.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Only this slot: attention, ffn, residual, optimizer or schedule.
    pub slot: Option<String>,
}

pub fn exec(args: Args) -> anyhow::Result<u8> {
    let slot = match &args.slot {
        None => None,
        Some(s) => Some(Slot::from_key(s).ok_or_else(|| {
            let keys: Vec<&str> = Slot::ALL.iter().map(|s| s.key()).collect();
            InputError::new(format!("unknown slot `{s}`; slots: {}", keys.join(", ")))
        })?),
    };
    let entries = registry::entries().map_err(InputError::new)?;
    print!("{}", render(&entries, slot));
    Ok(exit::OK)
}

/// The listing as text.
pub fn render(entries: &[&'static Entry], only: Option<Slot>) -> String {
    let mut out = String::new();
    for slot in Slot::ALL {
        if only.is_some_and(|o| o != slot) {
            continue;
        }
        let _ = writeln!(out, "{slot}");
        for e in entries.iter().filter(|e| e.slot == slot) {
            let _ = writeln!(out, "  {:<12} {}", e.name, e.summary);
            let defaults = e.defaults();
            let defaults = raw::fields(&defaults).unwrap_or_default();
            for (name, value) in &defaults {
                let doc = e
                    .params
                    .iter()
                    .find(|p| p.name == name)
                    .map_or("", |p| p.doc);
                let _ = writeln!(out, "      {:<24} {doc}", format!("{name}: {value}"));
            }
        }
        out.push('\n');
    }
    out
}
