//! The registry of `sweep`: the five slots a model is assembled from, the traits a component
//! implements to fill one, and the table of components that register themselves.
//!
//! A component is one file in `components/`: a config struct (its RON parameters, with
//! defaults), an implementation of its slot's trait, and an `inventory::submit!` of an
//! [`Entry`]. Nothing else in the workspace names it; [`lookup`] and [`entries`] find it.

mod detached;
mod entry;
mod params;
mod slots;

pub use detached::{add_into, Backward, Detached, Grads};
pub use entry::{
    entries, lookup, nearest, registry, Component, Config, Entry, LookupError, ParamDoc,
    ParamsError, Parsed, Registry,
};
pub use params::{Init, Param, ParamBuilder, Role};
pub use slots::{
    restored, Attention, Dims, Ffn, Optimizer, Probe, Ranks, Residual, Schedule, Slot, Spec,
    Stepper, Stream, Sublayer,
};

// Re-exported so component files and the runner name one version of each.
pub use candle_core;
pub use inventory;
