//! LAuReL, the Learned Augmented Residual Layer (Menghani et al., arXiv 2411.07501; the
//! residual line of Gemma 3n). The low-rank form (LAuReL-LR) adds a learned rank-r map to the
//! skip path: x + F(x) + B A x, with A (r x C) and B (C x r). The residual-weights form
//! (LAuReL-RW) learns the two scalars of alpha F(x) + beta x; both together are
//! alpha F(x) + beta (x + B A x), the paper's RW+LR.
//!
//! B starts at zero and alpha = beta = 1, so the layer starts as the plain residual; A is
//! random so that B gets gradient from the first step.

use candle_core::{Result, Tensor};
use registry::{Dims, Entry, Init, ParamBuilder, ParamDoc, Probe, Residual, Role, Spec, Stream};
use serde::{Deserialize, Serialize};

use crate::nn::{cast_like, INIT_STD};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Laurel {
    pub rank: usize,
    pub rw: bool,
}

impl Default for Laurel {
    fn default() -> Self {
        Self { rank: 8, rw: false }
    }
}

impl Spec for Laurel {
    fn validate(&self) -> std::result::Result<(), String> {
        if self.rank == 0 && !self.rw {
            return Err(
                "rank 0 without rw is the plain residual: use PreNorm, or set rw: true \
                 for LAuReL-RW alone"
                    .into(),
            );
        }
        Ok(())
    }

    fn check(&self, dims: &Dims) -> std::result::Result<(), String> {
        if self.rank >= dims.d_model {
            return Err(format!(
                "rank = {} must be below d_model = {} (a low-rank map)",
                self.rank, dims.d_model
            ));
        }
        Ok(())
    }
}

struct Connection {
    /// (A (r, C), B (C, r)), absent for rank 0.
    low_rank: Option<(Tensor, Tensor)>,
    /// (alpha, beta), each (1,), present in the RW form.
    weights: Option<(Tensor, Tensor)>,
}

impl Connection {
    /// The skip path x (+ B A x), times beta in the RW form.
    fn skip(&self, x: &Tensor) -> Result<Tensor> {
        let mut s = x.clone();
        if let Some((a, b)) = &self.low_rank {
            let (a, b) = (cast_like(a, x)?, cast_like(b, x)?);
            s = (s + x.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)?)?;
        }
        match &self.weights {
            Some((_, beta)) => s.broadcast_mul(&cast_like(beta, x)?),
            None => Ok(s),
        }
    }
}

struct LaurelStream {
    connections: Vec<Connection>,
}

impl Stream for LaurelStream {
    fn expand(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }

    fn sublayer(
        &self,
        k: usize,
        state: &Tensor,
        f: &dyn Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let c = &self.connections[k];
        let out = match &c.weights {
            Some((alpha, _)) => f(state)?.broadcast_mul(&cast_like(alpha, state)?)?,
            None => f(state)?,
        };
        c.skip(state)? + out
    }

    fn reduce(&self, state: &Tensor) -> Result<Tensor> {
        Ok(state.clone())
    }

    /// The skip path is the channel map beta (I + B A), the same for every token.
    fn probe(&self, k: usize, state: &Tensor) -> Result<Probe> {
        let width = state.dim(candle_core::D::Minus1)?;
        let eye = Tensor::eye(width, state.dtype(), state.device())?;
        // skip() maps row vectors (x M^T); the left-multiplying map is its transpose.
        let m = self.connections[k].skip(&eye)?.t()?.contiguous()?;
        Ok(Probe {
            mixing: Some(m),
            extra: Vec::new(),
        })
    }
}

impl Residual for Laurel {
    fn build(&self, dims: &Dims, p: &ParamBuilder) -> Result<Box<dyn Stream>> {
        let (c, r) = (dims.d_model, self.rank);
        let connections = (0..dims.n_sublayers())
            .map(|k| {
                let p = p.pp(k);
                let low_rank = if r > 0 {
                    Some((
                        p.tensor("a", (r, c), Init::Normal { std: INIT_STD }, Role::Mixing)?,
                        p.tensor("b", (c, r), Init::Const(0.0), Role::Mixing)?,
                    ))
                } else {
                    None
                };
                let weights = if self.rw {
                    Some((
                        p.tensor("alpha", 1, Init::Const(1.0), Role::Mixing)?,
                        p.tensor("beta", 1, Init::Const(1.0), Role::Mixing)?,
                    ))
                } else {
                    None
                };
                Ok(Connection { low_rank, weights })
            })
            .collect::<Result<_>>()?;
        Ok(Box::new(LaurelStream { connections }))
    }

    /// The rank-r map B A x (C -> r -> C); the RW form's scalars are element-wise.
    fn flops(&self, dims: &Dims) -> f64 {
        2.0 * 2.0 * (dims.d_model * self.rank) as f64
    }

    /// A (r x C) and B (C x r); the RW form's alpha and beta.
    fn params(&self, dims: &Dims) -> usize {
        2 * self.rank * dims.d_model + if self.rw { 2 } else { 0 }
    }
}

inventory::submit! {
    Entry::residual::<Laurel>(
        "Laurel",
        "LAuReL: x + F(x) + B A x (low rank), optionally alpha F(x) + beta x (RW)",
        &[
            ParamDoc { name: "rank", doc: "rank r of the learned skip map B A (0: none)" },
            ParamDoc { name: "rw", doc: "learn the scalars alpha (sublayer) and beta (skip)" },
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_probe_is_the_map_the_skip_path_applies() -> Result<()> {
        // C = 2, r = 1: A = [1 2], B = [3 0]^T -> B A = [[3, 6], [0, 0]], M = I + B A =
        // [[4, 6], [0, 1]]. With F = 0, x = (1, 1) goes to M x = (10, 1).
        let dims = Dims {
            d_model: 2,
            n_layers: 1,
            vocab: 2,
            seq_len: 1,
        };
        let p = ParamBuilder::new(0, &Device::Cpu);
        let s = Laurel { rank: 1, rw: false }.build(&dims, &p)?;
        for q in p.params().iter().filter(|q| q.name.starts_with("0.")) {
            let v: &[f32] = if q.name == "0.a" {
                &[1.0, 2.0]
            } else {
                &[3.0, 0.0]
            };
            q.var
                .set(&Tensor::new(v, &Device::Cpu)?.reshape(q.var.shape())?)?;
        }
        let x = Tensor::new(&[[[1f32, 1.0]]], &Device::Cpu)?;
        let y = s.sublayer(0, &x, &|h| h.zeros_like())?;
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![10.0, 1.0]);
        let m = s.probe(0, &x)?.mixing.unwrap();
        assert_eq!(m.to_vec2::<f32>()?, vec![vec![4.0, 6.0], vec![0.0, 1.0]]);
        Ok(())
    }
}
