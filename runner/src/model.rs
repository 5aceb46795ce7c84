//! The GPT-style decoder assembled from a trial's components: tied token embedding, the
//! residual scheme's stream, n_layers blocks of (attention, FFN) each behind its own
//! RMSNorm, a final RMSNorm and the tied output head.

use candle_core::{DType, Result, Tensor, D};
use components::nn::RmsNorm;
use registry::{Dims, Init, Param, ParamBuilder, Role, Stream, Sublayer};

use crate::spec::Cell;

struct Block {
    attn_norm: RmsNorm,
    attn: Box<dyn Sublayer>,
    ffn_norm: RmsNorm,
    ffn: Box<dyn Sublayer>,
}

pub struct Gpt {
    wte: Tensor,
    stream: Box<dyn Stream>,
    blocks: Vec<Block>,
    norm_f: RmsNorm,
    params: Vec<Param>,
}

impl Gpt {
    pub fn new(cell: &Cell, dims: &Dims, p: &ParamBuilder) -> Result<Self> {
        let wte = p.tensor(
            "wte",
            (dims.vocab, dims.d_model),
            Init::Normal { std: 0.02 },
            Role::Embedding,
        )?;
        let stream = cell.residual.build(dims, &p.pp("residual"))?;
        let blocks = (0..dims.n_layers)
            .map(|l| {
                let b = p.pp(format!("blocks.{l}"));
                Ok(Block {
                    attn_norm: RmsNorm::new(dims.d_model, &b.pp("attn_norm"))?,
                    attn: cell.attention.build(dims, &b.pp("attn"))?,
                    ffn_norm: RmsNorm::new(dims.d_model, &b.pp("ffn_norm"))?,
                    ffn: cell.ffn.build(dims, &b.pp("ffn"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm_f = RmsNorm::new(dims.d_model, &p.pp("norm_f"))?;
        Ok(Self {
            wte,
            stream,
            blocks,
            norm_f,
            params: p.params(),
        })
    }

    /// Token ids (B, T) -> logits (B, T, V).
    pub fn forward(&self, idx: &Tensor) -> Result<Tensor> {
        let (b, t) = idx.dims2()?;
        let c = self.wte.dim(1)?;
        let x = self
            .wte
            .embedding(&idx.flatten_all()?)?
            .reshape((b, t, c))?;
        let mut state = self.stream.expand(&x)?;
        for (l, block) in self.blocks.iter().enumerate() {
            let attn = |h: &Tensor| block.attn.forward(&block.attn_norm.forward(h)?);
            state = self.stream.sublayer(2 * l, &state, &attn)?;
            let ffn = |h: &Tensor| block.ffn.forward(&block.ffn_norm.forward(h)?);
            state = self.stream.sublayer(2 * l + 1, &state, &ffn)?;
        }
        let x = self.norm_f.forward(&self.stream.reduce(&state)?)?;
        let logits = x.reshape((b * t, c))?.matmul(&self.wte.t()?)?;
        logits.reshape((b, t, ()))
    }

    pub fn params(&self) -> &[Param] {
        &self.params
    }

    pub fn n_params(&self) -> usize {
        self.params.iter().map(|p| p.var.elem_count()).sum()
    }
}

/// Sum over rows of -log softmax(logits)[target], in f32: logits (N, V), targets (N,) u32.
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_z = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&targets.unsqueeze(1)?, 1)?;
    (log_z - picked)?.sum_all()
}

/// Mean cross-entropy in nats per token; logits (B, T, V), targets (B, T).
pub fn loss(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let sum = cross_entropy_sum(&logits.reshape((b * t, v))?, &targets.flatten_all()?)?;
    sum / (b * t) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cross_entropy_matches_a_hand_worked_case() -> Result<()> {
        // Row 1: logits (0, ln 3) -> p(target 1) = 3/4 -> -ln(3/4) = 0.287682.
        // Row 2: uniform over 2 -> ln 2 = 0.693147. Sum 0.980829.
        let logits = Tensor::new(&[[0f32, 3f32.ln()], [5.0, 5.0]], &Device::Cpu)?;
        let targets = Tensor::new(&[1u32, 0], &Device::Cpu)?;
        let s = cross_entropy_sum(&logits, &targets)?.to_scalar::<f32>()?;
        assert!((s - 0.980_829).abs() < 1e-5, "{s}");
        Ok(())
    }
}

#[cfg(test)]
mod grad_tests {
    use super::*;
    use crate::spec::Cell;
    use candle_core::Device;
    use registry::{Component, Slot};
    use std::sync::Arc;

    /// Every registered component of `slot`, with default parameters.
    fn all(slot: Slot) -> Vec<Component> {
        registry::entries()
            .unwrap()
            .into_iter()
            .filter(|e| e.slot == slot)
            .map(|e| e.parse("").unwrap().component)
            .collect()
    }

    #[test]
    fn every_parameter_of_every_combination_gets_a_finite_nonzero_gradient() -> Result<()> {
        let dims = Dims {
            d_model: 16,
            n_layers: 2,
            vocab: 32,
            seq_len: 8,
        };
        let optimizer = match &all(Slot::Optimizer)[0] {
            Component::Optimizer(o) => o.clone(),
            _ => unreachable!(),
        };
        let schedule = match &all(Slot::Schedule)[0] {
            Component::Schedule(s) => s.clone(),
            _ => unreachable!(),
        };
        let ids: Vec<u32> = (0..2 * 9).map(|i| (i * 7 + 3) % 32).collect();
        let batch = Tensor::from_vec(ids, (2, 9), &Device::Cpu)?;
        let (x, y) = (batch.narrow(1, 0, 8)?, batch.narrow(1, 1, 8)?);
        let mut checked = 0;
        for attention in all(Slot::Attention) {
            for ffn in all(Slot::Ffn) {
                for residual in all(Slot::Residual) {
                    let (Component::Attention(a), Component::Ffn(f), Component::Residual(r)) =
                        (&attention, &ffn, &residual)
                    else {
                        unreachable!()
                    };
                    let cell = Cell {
                        attention: Arc::clone(a),
                        ffn: Arc::clone(f),
                        residual: Arc::clone(r),
                        optimizer: optimizer.clone(),
                        schedule: schedule.clone(),
                    };
                    let model = Gpt::new(&cell, &dims, &ParamBuilder::new(0, &Device::Cpu))?;
                    // One step first, so parameters that start at zero by design (gates,
                    // low-rank branches) have moved and every path carries gradient.
                    let mut opt = optimizer.build(model.params())?;
                    opt.step(&loss(&model.forward(&x)?, &y)?.backward()?, 1e-2)?;
                    let grads = loss(&model.forward(&x)?, &y)?.backward()?;
                    for p in model.params() {
                        let g = grads
                            .get(p.var.as_tensor())
                            .unwrap_or_else(|| panic!("{cell:?}: no gradient for {}", p.name));
                        let n = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
                        assert!(
                            n.is_finite() && n > 0.0,
                            "{cell:?}: {} has |g|^2 = {n}",
                            p.name
                        );
                    }
                    checked += 1;
                }
            }
        }
        assert!(checked >= 2, "only {checked} combinations");
        Ok(())
    }
}
