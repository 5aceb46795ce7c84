mod core;
pub mod mha;

pub use self::core::{AttentionShape, CausalSelfAttention};
