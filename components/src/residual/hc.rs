//! Hyper-Connections (Zhu et al. 2024, arXiv 2409.19606), unconstrained: n streams H (n x C)
//! around every sublayer, with the sublayer input h = A_m^T H (width connections) and the new
//! state H' = A_r^T H + B^T F(h) (depth connections). Static: A_m, A_r, B are learned. Dynamic:
//! each also gets s * tanh(norm(H) W), W zero-initialized and s starting at 0.01.
//!
//! Initialization for sublayer k: A_r = I, A_m = e_(k mod n), B = 1. With the n streams
//! starting as copies of the embedding, every stream then equals the pre-norm residual stream,
//! so the network is exactly the pre-norm one until training moves the coefficients. Nothing
//! bounds A_r: that is what mHC's constraint fixes, and the amplification metrics show.

use candle_core::{Result, Tensor, D};
use registry::{
    Detached, Dims, Entry, Init, ParamBuilder, ParamDoc, Probe, Residual, Role, Spec, Stream,
};
use serde::{Deserialize, Serialize};

use super::outside::{connect_outside, fixed, projected, Coefficients};
use super::{
    check_streams, connect, identity, merge, replicate, streams_outside, token_mean, Mixing,
};
use crate::fused::{
    norm_proj, norm_proj_ext, pack_params, stream_coefficients, Scheme, StateGrad,
    HC_COEF_MAX_STREAMS, MAX_STREAMS,
};
use crate::nn::NORM_EPS;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Hc {
    pub streams: usize,
    pub dynamic: bool,
}

impl Default for Hc {
    fn default() -> Self {
        Self {
            streams: 4,
            dynamic: false,
        }
    }
}

impl Spec for Hc {
    fn validate(&self) -> std::result::Result<(), String> {
        check_streams(self.streams)
    }
}

/// The input-dependent part of dynamic HC for one sublayer.
struct Dynamic {
    /// (C, n + 2): columns 0 -> A_m, 1 -> B, 2.. -> the n columns of A_r, per stream row.
    w: Tensor,
    s_alpha: Tensor,
    s_beta: Tensor,
}

struct Connection {
    a_m: Tensor, // (n, 1)
    a_r: Tensor, // (n, n)
    b: Tensor,   // (n, 1)
    dynamic: Option<Dynamic>,
}

impl Connection {
    fn new(k: usize, n: usize, dims: &Dims, dynamic: bool, p: &ParamBuilder) -> Result<Self> {
        let home: Vec<f32> = (0..n).map(|i| if i == k % n { 1.0 } else { 0.0 }).collect();
        let dynamic = if dynamic {
            Some(Dynamic {
                w: p.tensor("w", (dims.d_model, n + 2), Init::Const(0.0), Role::Mixing)?,
                s_alpha: p.tensor("s_alpha", 1, Init::Const(0.01), Role::Mixing)?,
                s_beta: p.tensor("s_beta", 1, Init::Const(0.01), Role::Mixing)?,
            })
        } else {
            None
        };
        Ok(Self {
            a_m: p.tensor("a_m", (n, 1), Init::Values(home), Role::Mixing)?,
            a_r: p.tensor("a_r", (n, n), Init::Values(identity(n)), Role::Mixing)?,
            b: p.tensor("b", (n, 1), Init::Const(1.0), Role::Mixing)?,
            dynamic,
        })
    }

    /// The sublayer on `state` outside the graph through the fused ops (residual/outside.rs),
    /// on any device.
    fn outside(&self, state: &Tensor, f: &dyn Fn(&Tensor) -> Result<Detached>) -> Result<Detached> {
        let coefficients = match &self.dynamic {
            Some(d) => {
                let parts = [&d.s_alpha, &d.s_beta, &self.a_m, &self.b, &self.a_r];
                projected(state, &d.w, &parts, Scheme::Hc, NORM_EPS)?
            }
            None => {
                let (b, t, _, _) = state.dims4()?;
                static_coefficients((b, t), &[&self.a_m, &self.a_r, &self.b])?
            }
        };
        connect_outside(state, coefficients, f)
    }

    /// The mixing for one state: h = A_m^T H, H' = A_r^T H + B^T F(h), so pre = a_m, res =
    /// a_r^T and post = b, with leading (B, T) dimensions when dynamic and (1, 1) when
    /// static. Dynamic on the GPU: two ops over the projection's logits (fused/stream_coef.rs).
    fn coefficients(&self, state: &Tensor, acc: Option<&StateGrad>) -> Result<Mixing> {
        let lift = |t: &Tensor| t.unsqueeze(0)?.unsqueeze(0);
        let (a_m, a_r, b) = (lift(&self.a_m)?, lift(&self.a_r)?, lift(&self.b)?);
        let Some(d) = &self.dynamic else {
            let res = a_r.transpose(2, 3)?;
            return Ok(Mixing::Split {
                pre: a_m,
                res,
                post: b,
            });
        };
        let (bs, t, n, _) = state.dims4()?;
        if state.device().is_cuda() && n <= HC_COEF_MAX_STREAMS {
            // z_ext (B T n, n + 3) as it is: a token's n stream rows side by side.
            let z = norm_proj_ext(state, &d.w, NORM_EPS, acc)?;
            let z = z.reshape((bs * t, ()))?;
            let p = pack_params(&[&d.s_alpha, &d.s_beta, &self.a_m, &self.b, &self.a_r])?;
            let (pre, coef) = stream_coefficients(&z, &p, (bs, t, n), Scheme::Hc)?;
            return Ok(Mixing::Packed { pre, coef });
        }
        // Coefficients in f32 whatever the activations' dtype (`connect` casts them): each
        // stream row's RMSNorm and projection.
        let z = norm_proj(state, &d.w, NORM_EPS, acc)?
            .tanh()?
            .reshape((bs, t, n, n + 2))?;
        let alpha = |x: Tensor| x.broadcast_mul(&d.s_alpha);
        let a_r = alpha(z.narrow(D::Minus1, 2, n)?)?.broadcast_add(&a_r)?;
        Ok(Mixing::Split {
            pre: alpha(z.narrow(D::Minus1, 0, 1)?)?.broadcast_add(&a_m)?,
            res: a_r.transpose(2, 3)?,
            post: z
                .narrow(D::Minus1, 1, 1)?
                .broadcast_mul(&d.s_beta)?
                .broadcast_add(&b)?,
        })
    }
}

/// Static HC's coefficients outside the graph from [a_m (n, 1), a_r (n, n), b (n, 1)]:
/// pre = a_m and coef = [a_r^T | b] (residual/mod.rs `connect`) for every token, and
/// their gradients from the tokens' sums by hand.
pub(crate) fn static_coefficients(
    tokens: (usize, usize),
    weights: &[&Tensor; 3],
) -> Result<Coefficients> {
    let [a_m, a_r, b] = *weights;
    let n = a_m.dim(0)?;
    let pre1 = a_m.detach().flatten_all()?;
    let coef1 = Tensor::cat(&[&a_r.detach().t()?, &b.detach()], 1)?;
    let grads = move |dpre: &Tensor, dcoef: &Tensor| -> Result<Vec<Option<Tensor>>> {
        Ok(vec![
            Some(dpre.reshape((n, 1))?),
            Some(dcoef.narrow(1, 0, n)?.t()?.contiguous()?),
            Some(dcoef.narrow(1, n, 1)?.contiguous()?),
        ])
    };
    fixed(tokens, weights, (pre1, coef1), Box::new(grads))
}

struct HcStream {
    n: usize,
    connections: Vec<Connection>,
}

impl Stream for HcStream {
    fn expand(&self, x: &Tensor) -> Result<Tensor> {
        replicate(x, self.n)
    }

    fn sublayer(
        &self,
        k: usize,
        state: &Tensor,
        f: &dyn Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        // Dynamic coefficients come from the normed projection of the state, which then
        // shares the state's gradient buffer with the mixing (fused/mix.rs `StateGrad`);
        // static ones have no such reader.
        let connection = &self.connections[k];
        let acc = connection.dynamic.as_ref().map(|_| StateGrad::default());
        let mixing = connection.coefficients(state, acc.as_ref())?;
        connect(state, mixing, f, acc.as_ref())
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
        // Where `connect` takes the fused ops: on the GPU, within their numbers of streams.
        let limit = match self.connections[k].dynamic {
            Some(_) => HC_COEF_MAX_STREAMS,
            None => MAX_STREAMS,
        };
        if !state.device().is_cuda() || self.n > limit {
            return Ok(None);
        }
        self.connections[k].outside(state, f).map(Some)
    }

    fn probe(&self, k: usize, state: &Tensor) -> Result<Probe> {
        let res = self.connections[k].coefficients(state, None)?.res()?;
        Ok(Probe {
            mixing: Some(token_mean(&res, self.n)?),
            extra: Vec::new(),
        })
    }
}

impl Hc {
    /// The stream state's scheme with its parameters, one connection a sublayer.
    fn stream(&self, dims: &Dims, p: &ParamBuilder) -> Result<HcStream> {
        let connections = (0..dims.n_sublayers())
            .map(|k| Connection::new(k, self.streams, dims, self.dynamic, &p.pp(k)))
            .collect::<Result<_>>()?;
        Ok(HcStream {
            n: self.streams,
            connections,
        })
    }
}

impl Residual for Hc {
    fn build(&self, dims: &Dims, p: &ParamBuilder) -> Result<Box<dyn Stream>> {
        Ok(Box::new(self.stream(dims, p)?))
    }

    /// The width and depth connections on the n streams (pre: n -> 1, res: n -> n, post:
    /// 1 -> n, each over C channels) and, when dynamic, the projection of each normed stream
    /// row to its n + 2 coefficients.
    fn flops(&self, dims: &Dims) -> f64 {
        let (n, c) = (self.streams as f64, dims.d_model as f64);
        let dynamic = if self.dynamic {
            2.0 * n * c * (n + 2.0)
        } else {
            0.0
        };
        super::mixing_flops(self.streams, dims) + dynamic
    }

    /// a_m (n), a_r (n x n), b (n); dynamic: w (C x (n + 2)) and its two scales.
    fn params(&self, dims: &Dims) -> usize {
        let n = self.streams;
        let dynamic = if self.dynamic {
            dims.d_model * (n + 2) + 2
        } else {
            0
        };
        n + n * n + n + dynamic
    }
}

inventory::submit! {
    Entry::residual::<Hc>(
        "Hc",
        "Hyper-Connections: n streams, learned unconstrained width/depth mixing",
        &[
            ParamDoc { name: "streams", doc: "number of residual streams n (1 = plain residual)" },
            ParamDoc { name: "dynamic", doc: "add input-dependent coefficients s * tanh(norm(H) W)" },
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
        // Dynamic and static: the fused ops' CPU arithmetic, detached, against candle's
        // composite under autograd, at parameters away from their initial values.
        let (b, t, n, c) = (2, 3, 3, 8);
        let dims = Dims {
            d_model: c,
            n_layers: 1,
            vocab: 2,
            seq_len: t,
        };
        for dynamic in [true, false] {
            let p = ParamBuilder::new(6, &Device::Cpu);
            let stream = Hc {
                streams: n,
                dynamic,
            }
            .stream(&dims, &p)?;
            scramble(&p)?;
            let outside = |s: &Tensor, f: &dyn Fn(&Tensor) -> Result<Detached>| {
                stream.connections[0].outside(s, f)
            };
            let gap = outside_gap(&stream, &outside, (b, t, n, c))?;
            assert!(gap < 1e-4, "dynamic {dynamic}: {gap}");
        }
        Ok(())
    }
}
