//! The components of `sweep`, one file each. Every file holds a config struct (the RON
//! parameters and their defaults), the slot trait implementation, an `inventory::submit!`
//! of its registry entry, and its tests. Nothing outside the file lists it.
//!
//! The `sweep` binary must name this crate (`use components as _;`) or the linker drops the
//! entries; a test in the runner asserts the registry holds them.

pub mod fused;
pub mod linalg;
pub mod nn;

mod attention;
mod ffn;
mod optim;
mod residual;
mod schedule;

pub use attention::{
    gated_gqa::{Gate, GatedGqa},
    gqa::Gqa,
    mha::Mha,
};
pub use ffn::{gelu::Gelu, relu2::Relu2, swiglu::SwiGlu};
pub use optim::{
    adamw::AdamW,
    muon::{newton_schulz, Muon},
    normuon::NorMuon,
};
pub use residual::{hc::Hc, laurel::Laurel, mhc::Mhc, prenorm::PreNorm, sinkhorn};
pub use schedule::{cosine::Cosine, trapezoid::Trapezoid};
