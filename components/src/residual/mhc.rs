//! Manifold-constrained Hyper-Connections (Xie et al., arXiv 2512.24880):
//! x_{l+1} = H_res x_l + H_post^T F(H_pre x_l) on n streams x_l (n x C), with coefficients
//! computed per token from x' = RMSNorm(vec(x_l)) over all nC values:
//!   H_pre = sigmoid(a_pre x' phi_pre + b_pre), H_post = 2 sigmoid(a_post x' phi_post + b_post),
//!   H_res = Sinkhorn-Knopp(a_res mat(x' phi_res) + b_res).
//! H_res is doubly stochastic, so its products over depth stay doubly stochastic: the stream
//! can neither blow up nor vanish through the residual path, unlike unconstrained HC.
//!
//! Convention: H_res multiplies the state from the left, stream i of the new state is
//! sum_j H_res[i, j] x_j. Sinkhorn ends on a row normalization, so rows sum to 1 exactly and
//! the forward gain (max row sum) is exactly 1; columns, and so the backward gain, are 1 to
//! the Sinkhorn iteration's convergence.
//!
//! Init: phi = 0 (a_* = 0.01 so phi still gets gradient), b_pre = -3 except +3 on the
//! sublayer's home stream k mod n, b_post = 0 (H_post = 1), b_res = 6 I - 3 (H_res diagonal
//! ~0.993). With identical streams, H_res x = x and the block is the plain residual; the pre
//! weights only scale F's input, which its own RMSNorm removes. Coefficients and Sinkhorn
//! are computed in f32 whatever the activations' dtype.

use candle_core::{Result, Tensor, D};
use registry::{
    Detached, Dims, Entry, Init, ParamBuilder, ParamDoc, Probe, Residual, Role, Spec, Stream,
};
use serde::{Deserialize, Serialize};

use super::outside::{connect_outside, projected};
use super::{
    check_streams, connect, identity, merge, replicate, sinkhorn, streams_outside, token_mean,
    Mixing,
};
use crate::fused::{
    norm_proj, norm_proj_ext, pack_params, stream_coefficients, Scheme, StateGrad,
    MHC_COEF_MAX_STREAMS, NORM_PROJ_MAX_COLS, SINKHORN_MAX_ITERS,
};
use crate::nn::{sigmoid, NORM_EPS};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Mhc {
    pub streams: usize,
    pub sinkhorn_iters: usize,
}

impl Default for Mhc {
    fn default() -> Self {
        Self {
            streams: 4,
            sinkhorn_iters: 20,
        }
    }
}

impl Spec for Mhc {
    fn validate(&self) -> std::result::Result<(), String> {
        check_streams(self.streams)?;
        if self.sinkhorn_iters == 0 {
            return Err("sinkhorn_iters must be at least 1".into());
        }
        Ok(())
    }
}

struct Connection {
    /// (nC, n + n + n^2): the pre, post and res projections side by side.
    phi: Tensor,
    /// (3,): a_pre, a_post, a_res.
    a: Tensor,
    b_pre: Tensor,  // (n,)
    b_post: Tensor, // (n,)
    b_res: Tensor,  // (n, n)
}

struct MhcStream {
    n: usize,
    iters: usize,
    connections: Vec<Connection>,
}

impl MhcStream {
    /// Whether the fused ops take sublayer k's coefficients on this state (on the GPU).
    fn fused(&self, k: usize, state: &Tensor) -> Result<bool> {
        Ok(state.device().is_cuda()
            && self.n <= MHC_COEF_MAX_STREAMS
            && self.iters <= SINKHORN_MAX_ITERS
            && self.connections[k].phi.dim(1)? <= NORM_PROJ_MAX_COLS)
    }

    /// Sublayer k outside the graph through the fused ops (residual/outside.rs), on any
    /// device: the projection, the two coefficient ops and the mixing.
    fn outside(
        &self,
        k: usize,
        state: &Tensor,
        f: &dyn Fn(&Tensor) -> Result<Detached>,
    ) -> Result<Detached> {
        let c = &self.connections[k];
        let parts = [&c.a, &c.b_pre, &c.b_post, &c.b_res];
        let scheme = Scheme::Mhc { iters: self.iters };
        let coefficients = projected(state, &c.phi, &parts, scheme, NORM_EPS)?;
        connect_outside(state, coefficients, f)
    }

    /// Per-token coefficients, f32: on the GPU as the fused mixing takes them, from two ops
    /// over the projection's logits (fused/stream_coef.rs); else pre and post (B, T, n, 1) and
    /// res (B, T, n, n) from candle's ops, the arithmetic both paths are tested against.
    fn coefficients(&self, k: usize, state: &Tensor, acc: Option<&StateGrad>) -> Result<Mixing> {
        let c = &self.connections[k];
        let n = self.n;
        let (b, t, _, _) = state.dims4()?;
        if self.fused(k, state)? {
            // The projection's z_ext = [z | r] as it is: the ops read the logits from its rows.
            let z = norm_proj_ext(state, &c.phi, NORM_EPS, acc)?;
            let p = pack_params(&[&c.a, &c.b_pre, &c.b_post, &c.b_res])?;
            let scheme = Scheme::Mhc { iters: self.iters };
            let (pre, coef) = stream_coefficients(&z, &p, (b, t, n), scheme)?;
            return Ok(Mixing::Packed { pre, coef });
        }
        // RMSNorm over each token's n C values and the projection, in f32.
        let z = norm_proj(state, &c.phi, NORM_EPS, acc)?; // (BT, 2n + n^2)
        let a = |i: usize| c.a.narrow(0, i, 1);
        let part = |start: usize, len: usize, i: usize, bias: &Tensor| -> Result<Tensor> {
            z.narrow(D::Minus1, start, len)?
                .broadcast_mul(&a(i)?)?
                .broadcast_add(bias)
        };
        let pre = sigmoid(&part(0, n, 0, &c.b_pre)?)?;
        let post = (sigmoid(&part(n, n, 1, &c.b_post)?)? * 2.0)?;
        let res_logits = part(2 * n, n * n, 2, &c.b_res.flatten_all()?)?;
        let res = sinkhorn(&res_logits.reshape((b * t, n, n))?, self.iters)?;
        Ok(Mixing::Split {
            pre: pre.reshape((b, t, n, 1))?,
            post: post.reshape((b, t, n, 1))?,
            res: res.reshape((b, t, n, n))?,
        })
    }
}

impl Stream for MhcStream {
    fn expand(&self, x: &Tensor) -> Result<Tensor> {
        replicate(x, self.n)
    }

    fn sublayer(
        &self,
        k: usize,
        state: &Tensor,
        f: &dyn Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        // The state's three readers share one gradient buffer (fused/mix.rs `StateGrad`).
        let acc = StateGrad::default();
        let mixing = self.coefficients(k, state, Some(&acc))?;
        connect(state, mixing, f, Some(&acc))
    }

    fn reduce(&self, state: &Tensor) -> Result<Tensor> {
        merge(state)
    }

    fn expand_detached(&self, x: &Tensor) -> Result<Option<Detached>> {
        streams_outside(x, self.n, true)
    }

    fn reduce_detached(&self, state: &Tensor) -> Result<Option<Detached>> {
        streams_outside(state, self.n, false)
    }

    fn sublayer_detached(
        &self,
        k: usize,
        state: &Tensor,
        f: &dyn Fn(&Tensor) -> Result<Detached>,
    ) -> Result<Option<Detached>> {
        match self.fused(k, state)? {
            true => self.outside(k, state, f).map(Some),
            false => Ok(None),
        }
    }

    fn probe(&self, k: usize, state: &Tensor) -> Result<Probe> {
        let res = self.coefficients(k, state, None)?.res()?;
        let err = |dim: D| -> Result<f32> {
            (res.sum(dim)? - 1.0)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()
        };
        let sum_err = err(D::Minus1)?.max(err(D::Minus2)?);
        Ok(Probe {
            mixing: Some(token_mean(&res, self.n)?),
            extra: vec![("mhc/sum_err", sum_err as f64)],
        })
    }
}

impl Mhc {
    /// The stream state's scheme with its parameters, one connection a sublayer.
    fn stream(&self, dims: &Dims, p: &ParamBuilder) -> Result<MhcStream> {
        let n = self.streams;
        let connections = (0..dims.n_sublayers())
            .map(|k| {
                let p = p.pp(k);
                let b_pre = (0..n)
                    .map(|i| if i == k % n { 3.0 } else { -3.0 })
                    .collect();
                let b_res = identity(n).into_iter().map(|d| 6.0 * d - 3.0).collect();
                Ok(Connection {
                    phi: p.tensor(
                        "phi",
                        (n * dims.d_model, 2 * n + n * n),
                        Init::Const(0.0),
                        Role::Mixing,
                    )?,
                    a: p.tensor("a", 3, Init::Const(0.01), Role::Mixing)?,
                    b_pre: p.tensor("b_pre", n, Init::Values(b_pre), Role::Mixing)?,
                    b_post: p.tensor("b_post", n, Init::Const(0.0), Role::Mixing)?,
                    b_res: p.tensor("b_res", (n, n), Init::Values(b_res), Role::Mixing)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(MhcStream {
            n,
            iters: self.sinkhorn_iters,
            connections,
        })
    }
}

impl Residual for Mhc {
    fn build(&self, dims: &Dims, p: &ParamBuilder) -> Result<Box<dyn Stream>> {
        Ok(Box::new(self.stream(dims, p)?))
    }

    /// The mixing of the n streams as Hc's, and phi projecting the normed state (n C) to
    /// the 2n + n^2 coefficient logits (Sinkhorn's rounds on n x n are element-wise).
    fn flops(&self, dims: &Dims) -> f64 {
        let (n, c) = (self.streams as f64, dims.d_model as f64);
        super::mixing_flops(self.streams, dims) + 2.0 * n * c * (2.0 * n + n * n)
    }

    /// phi (n C x (2n + n^2)), a (3), b_pre and b_post (n), b_res (n x n).
    fn params(&self, dims: &Dims) -> usize {
        let n = self.streams;
        n * dims.d_model * (2 * n + n * n) + 3 + 2 * n + n * n
    }
}

inventory::submit! {
    Entry::residual::<Mhc>(
        "Mhc",
        "manifold-constrained Hyper-Connections: doubly stochastic stream mixing (Sinkhorn)",
        &[
            ParamDoc { name: "streams", doc: "number of residual streams n (1 = plain residual)" },
            ParamDoc { name: "sinkhorn_iters", doc: "Sinkhorn-Knopp rounds (columns, then rows)" },
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::residual::outside::check::{outside_gap, scramble};
    use candle_core::Device;

    #[test]
    fn the_sublayer_outside_the_graph_matches_the_composite() -> Result<()> {
        // The fused ops' CPU arithmetic, detached, against candle's composite under autograd
        // (Sinkhorn's rounds by ops), at parameters away from their initial values; the
        // weights' gradients found by the tensors the detached form names.
        let (b, t, n, c) = (2, 3, 4, 8);
        let dims = Dims {
            d_model: c,
            n_layers: 1,
            vocab: 2,
            seq_len: t,
        };
        let p = ParamBuilder::new(5, &Device::Cpu);
        let stream = Mhc {
            streams: n,
            sinkhorn_iters: 20,
        }
        .stream(&dims, &p)?;
        scramble(&p)?;
        let outside = |s: &Tensor, f: &dyn Fn(&Tensor) -> Result<Detached>| stream.outside(0, s, f);
        let gap = outside_gap(&stream, &outside, (b, t, n, c))?;
        assert!(gap < 1e-4, "{gap}");
        Ok(())
    }
}
