//! The compute of a trial, counted from its components: forward FLOPs per token (every
//! sublayer's matrix products, attention's context-dependent term, the residual scheme's
//! projections and mixing, the tied head), training FLOPs per token (forward and backward:
//! three times the forward), tokens seen and the trial's training FLOPs. Comparisons at
//! equal compute rest on these numbers; the README states the formula.

use registry::Dims;

use crate::spec::{Cell, TrainSpec};

/// A trial's compute.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Budget {
    /// Forward FLOPs per token.
    pub forward_per_token: f64,
    /// Training FLOPs per token: forward and backward (the backward pass does two products
    /// for each of the forward's: gradients of the inputs and of the weights).
    pub train_per_token: f64,
    /// Tokens the trial trains on: steps x global batch x seq_len.
    pub tokens: u64,
    /// train_per_token x tokens.
    pub train_flops: f64,
}

/// Forward FLOPs per token of a model of `cell` at `dims`: per block the attention, the FFN
/// and the residual scheme around each of the two, and the head's 2 C V.
pub fn forward_per_token(cell: &Cell, dims: &Dims) -> f64 {
    let block = cell.attention.flops(dims) + cell.ffn.flops(dims) + 2.0 * cell.residual.flops(dims);
    dims.n_layers as f64 * block + 2.0 * (dims.d_model * dims.vocab) as f64
}

/// Parameters of a model of `cell` at `dims`, counted from the components: the tied embedding
/// (V C), per block two RMSNorm gains, the attention, the FFN and the residual scheme around
/// each sublayer, and the final norm's gain. `sweep` checks it against the built model.
pub fn params(cell: &Cell, dims: &Dims) -> results::ParamCount {
    let c = dims.d_model;
    let block = 2 * c
        + cell.attention.params(dims)
        + cell.ffn.params(dims)
        + 2 * cell.residual.params(dims);
    let embedding = (dims.vocab * c) as u64;
    results::ParamCount {
        total: embedding + (dims.n_layers * block + c) as u64,
        embedding,
    }
}

/// The compute of a trial of `cell` trained as `train` says.
pub fn budget(cell: &Cell, dims: &Dims, train: &TrainSpec) -> Budget {
    let forward = forward_per_token(cell, dims);
    let tokens = (train.steps * train.global_batch() * train.seq_len) as u64;
    Budget {
        forward_per_token: forward,
        train_per_token: 3.0 * forward,
        tokens,
        train_flops: 3.0 * forward * tokens as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Source, Sweep};

    /// The cells of `grid` at d_model 64, 2 layers, context 16, bytes (vocab 256), 10 steps
    /// of 4 x 16 tokens.
    fn sweep(grid: &str) -> Sweep {
        let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/data/tinyshakespeare/input.txt");
        let text = format!(
            "Sweep(name: \"f\", seeds: [0], data: Text(path: {:?}), \
             train: (steps: 10, batch: 4, seq_len: 16), model: (d_model: 64, n_layers: 2), \
             grid: {grid})",
            data.display()
        );
        Sweep::from_source(Source::from_text(std::path::Path::new("f.ron"), text)).unwrap()
    }

    fn forward(grid: &str) -> f64 {
        let s = sweep(grid);
        forward_per_token(&s.trials[0].cell, &s.trials[0].dims)
    }

    // Hand counts at C = 64, T = 16, V = 256, 2 layers; 2 FLOPs per multiply-add.
    // Gqa(heads 4, kv_heads 2): head dim 16, K/V width 32; q and o 64 x 64, k and v 64 x 32:
    // 2 (4096 + 2048 + 2048 + 4096) = 24,576; scores and values over (16 + 1) / 2 = 8.5 keys:
    // 2 x 2 x 64 x 8.5 = 2,176. Attention 26,752.
    const GQA: f64 = 26_752.0;
    // SwiGlu (mult 8/3): hidden round(64 x 8/3 / 8) x 8 = 168; 3 matrices: 6 x 64 x 168.
    const SWIGLU: f64 = 64_512.0;
    // The tied head: 2 x 64 x 256.
    const HEAD: f64 = 32_768.0;

    #[test]
    fn the_plain_stack_counts_as_by_hand() {
        let f = forward(
            "(attention: [Gqa(heads: 4, kv_heads: 2)], ffn: [SwiGlu], residual: [PreNorm])",
        );
        assert_eq!(f, 2.0 * (GQA + SWIGLU) + HEAD); // 215,296
        let s = sweep("(attention: [Gqa(heads: 4, kv_heads: 2)], ffn: [SwiGlu])");
        let b = budget(&s.trials[0].cell, &s.trials[0].dims, &s.train);
        assert_eq!(b.tokens, 10 * 4 * 16);
        assert_eq!(b.train_per_token, 3.0 * f);
        assert_eq!(b.train_flops, 3.0 * f * 640.0);
    }

    #[test]
    fn each_residual_kind_adds_its_mixing_and_projections() {
        let with = |residual: &str| {
            forward(&format!(
                "(attention: [Gqa(heads: 4, kv_heads: 2)], ffn: [SwiGlu], residual: [{residual}])"
            )) - (2.0 * (GQA + SWIGLU) + HEAD)
        };
        // 4 sublayers. Hc(4) static: pre 4, res 16, post 4 multiply-adds a channel:
        // 2 x 64 x 24 = 3,072 each.
        assert_eq!(with("Hc(streams: 4)"), 4.0 * 3_072.0);
        // dynamic: each of the 4 normed stream rows projected to 4 + 2 coefficients: + 2 x 4 x
        // 64 x 6 = 3,072.
        assert_eq!(with("Hc(streams: 4, dynamic: true)"), 4.0 * 6_144.0);
        // Mhc(4): the mixing, and phi (4 x 64 -> 8 + 16): 2 x 256 x 24 = 12,288.
        assert_eq!(with("Mhc(streams: 4)"), 4.0 * (3_072.0 + 12_288.0));
        // Laurel(rank 8): B A x, 64 -> 8 -> 64: 2 x 2 x 64 x 8 = 2,048.
        assert_eq!(with("Laurel(rank: 8)"), 4.0 * 2_048.0);
        assert_eq!(with("PreNorm"), 0.0);
    }

    #[test]
    fn attention_kinds_and_ffns_count_as_by_hand() {
        let with = |attention: &str, ffn: &str| {
            forward(&format!(
                "(attention: [{attention}], ffn: [{ffn}], residual: [PreNorm])"
            ))
        };
        // Mha(4): k and v as wide as q: 2 x 4 x 4096 + 2,176.
        let mha = 2.0 * 4.0 * 4096.0 + 2_176.0;
        assert_eq!(with("Mha(heads: 4)", "SwiGlu"), 2.0 * (mha + SWIGLU) + HEAD);
        // The gate's projection: 64 -> 64 (elementwise) or 64 -> 4 heads.
        let gated = |gate: &str| {
            with(
                &format!("GatedGqa(heads: 4, kv_heads: 2, gate: {gate})"),
                "SwiGlu",
            ) - (2.0 * (GQA + SWIGLU) + HEAD)
        };
        assert_eq!(gated("Elementwise"), 2.0 * 8_192.0);
        assert_eq!(gated("Headwise"), 2.0 * 512.0);
        // Two-matrix MLPs, mult 4: hidden 256, 2 x 2 x 64 x 256 = 65,536.
        for ffn in ["Gelu(mult: 4.0)", "Relu2(mult: 4.0)"] {
            assert_eq!(
                with("Gqa(heads: 4, kv_heads: 2)", ffn),
                2.0 * (GQA + 65_536.0) + HEAD
            );
        }
    }

    #[test]
    fn counted_parameters_equal_the_built_models() {
        // Every component kind; the count from the components against the model's tensors.
        for grid in [
            "(attention: [Gqa(heads: 4, kv_heads: 2)], ffn: [SwiGlu], residual: [PreNorm])",
            "(attention: [Mha(heads: 4, qk_norm: true)], ffn: [Gelu], residual: [Hc(streams: 4)])",
            "(attention: [GatedGqa(heads: 4, kv_heads: 1)], ffn: [Relu2], residual: [Hc(streams: 2, dynamic: true)])",
            "(attention: [GatedGqa(heads: 4, kv_heads: 2, gate: Headwise)], ffn: [SwiGlu], residual: [Mhc(streams: 4)])",
            "(attention: [Gqa(heads: 2, kv_heads: 2)], ffn: [Gelu], residual: [Laurel(rank: 8, rw: true)])",
            "(attention: [Gqa(heads: 2, kv_heads: 1)], ffn: [Relu2], residual: [Laurel(rw: true, rank: 0)])",
        ] {
            let s = sweep(grid);
            let t = &s.trials[0];
            let model =
                crate::train::build(t, &t.dims, s.train.precision, &candle_core::Device::Cpu)
                    .unwrap();
            assert_eq!(params(&t.cell, &t.dims), model.param_count(), "{grid}");
        }
    }

    #[test]
    fn matmul_flops_are_twice_the_matrix_weights_plus_attention_and_head() {
        // A second count, from the built model: every hidden matrix is used once per token
        // in a plain stack, so its projections cost 2 FLOPs per weight.
        for grid in [
            "(attention: [Gqa(heads: 4, kv_heads: 2)], ffn: [SwiGlu])",
            "(attention: [GatedGqa(heads: 4, kv_heads: 1)], ffn: [Relu2])",
            "(attention: [Mha(heads: 2)], ffn: [Gelu])",
        ] {
            let s = sweep(grid);
            let dims = s.trials[0].dims.clone();
            let model = crate::train::build(
                &s.trials[0],
                &dims,
                s.train.precision,
                &candle_core::Device::Cpu,
            )
            .unwrap();
            let matrices: usize = model
                .params()
                .iter()
                .filter(|p| p.var.rank() == 2 && p.name.starts_with("blocks."))
                .map(|p| p.var.elem_count())
                .sum();
            let attention = 2.0 * 2.0 * 64.0 * 8.5 * 2.0;
            let f = forward_per_token(&s.trials[0].cell, &dims);
            assert_eq!(f, 2.0 * matrices as f64 + attention + HEAD, "{grid}");
        }
    }
}
