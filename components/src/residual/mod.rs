//! Residual schemes. The multi-stream ones (Hc, Mhc) keep the state as (B, T, n, C): n copies
//! of the width-C stream, mixed by small n x n matrices around every sublayer.

pub mod hc;
pub mod laurel;
pub mod mhc;
mod outside;
pub mod prenorm;

use candle_core::{DType, Result, Tensor, D};
use registry::{add_into, Detached, Grads};

use crate::fused::{
    PostMix, PreMix, Sinkhorn, StateGrad, Streams, MAX_STREAMS, SINKHORN_MAX_ITERS,
    SINKHORN_MAX_STREAMS,
};

/// Embedding (B, T, C) -> n identical streams (B, T, n, C), as both HC papers start.
pub(crate) fn replicate(x: &Tensor, n: usize) -> Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    if x.device().is_cuda() {
        let op = Streams {
            spread: true,
            n,
            scale: 1.0,
        };
        return x.contiguous()?.apply_op1(op);
    }
    x.unsqueeze(2)?.broadcast_as((b, t, n, c))?.contiguous()
}

/// (B, T, n, C) -> (B, T, C): the mean of the streams. The papers sum them; the final RMSNorm
/// makes the two equal up to its epsilon, and the mean keeps the stream at the embedding's
/// scale, so an n-stream model at init is the plain residual network exactly.
pub(crate) fn merge(state: &Tensor) -> Result<Tensor> {
    if state.device().is_cuda() {
        let n = state.dim(2)?;
        let op = Streams {
            spread: false,
            n,
            scale: 1.0 / n as f32,
        };
        return state.contiguous()?.apply_op1(op);
    }
    state.mean(2)
}

/// [`replicate`] (`spread`) or [`merge`] outside the graph on the GPU, each the other's
/// backward pass; None on the CPU, whose composites have no such form.
pub(crate) fn streams_outside(x: &Tensor, n: usize, spread: bool) -> Result<Option<Detached>> {
    if !x.device().is_cuda() {
        return Ok(None);
    }
    let scale = if spread { 1.0 } else { 1.0 / n as f32 };
    let op = Streams { spread, n, scale };
    let y = x.contiguous()?.apply_op1_no_bwd(&op)?;
    let back = Streams {
        spread: !spread,
        ..op
    };
    let backward = move |g: &Tensor, into: Option<Tensor>| -> Result<Grads> {
        let dx = g.contiguous()?.apply_op1_no_bwd(&back)?;
        Ok(Grads {
            input: Some(add_into(dx, into)?),
            weights: Vec::new(),
        })
    };
    Ok(Some(Detached {
        y,
        weights: Vec::new(),
        backward: Box::new(backward),
    }))
}

/// The identity outside the graph: the plain residual's expand and reduce.
pub(crate) fn identity_outside(x: &Tensor) -> Detached {
    let backward = |g: &Tensor, into: Option<Tensor>| -> Result<Grads> {
        Ok(Grads {
            input: Some(add_into(g.clone(), into)?),
            weights: Vec::new(),
        })
    };
    Detached {
        y: x.clone(),
        weights: Vec::new(),
        backward: Box::new(backward),
    }
}

/// A hyper-connection's coefficients, as a scheme computes them.
pub(crate) enum Mixing {
    /// pre and post (.., n, 1), res (.., n, n), leading dimensions (B, T) or broadcast from
    /// (1, 1); any dtype.
    Split {
        pre: Tensor,
        res: Tensor,
        post: Tensor,
    },
    /// As the fused mixing ops take them (fused/stream_coef.rs makes them so): pre (B, T, n)
    /// and coef = [res | post] (B, T, n, n + 1), f32, contiguous.
    Packed { pre: Tensor, coef: Tensor },
}

impl Mixing {
    /// The carried mixing res (.., n, n).
    pub(crate) fn res(&self) -> Result<Tensor> {
        match self {
            Mixing::Split { res, .. } => Ok(res.clone()),
            Mixing::Packed { coef, .. } => coef.narrow(D::Minus1, 0, coef.dim(D::Minus1)? - 1),
        }
    }

    /// (pre, res, post) as [`Mixing::Split`] holds them.
    fn split(self) -> Result<(Tensor, Tensor, Tensor)> {
        match self {
            Mixing::Split { pre, res, post } => Ok((pre, res, post)),
            Mixing::Packed { pre, coef } => {
                let n = coef.dim(D::Minus1)? - 1;
                let res = coef.narrow(D::Minus1, 0, n)?;
                let post = coef.narrow(D::Minus1, n, 1)?;
                Ok((pre.unsqueeze(D::Minus1)?, res, post))
            }
        }
    }
}

/// One hyper-connection around sublayer `f`, the step HC and mHC share:
/// x' = res x + post F(pre^T x) on the stream axis of x (B, T, n, C). Matmuls, not broadcast
/// multiply-and-sum: candle's CPU reductions over a size-n axis are far slower. The
/// coefficients are cast to the state's dtype. `acc`: the state's gradient cell shared with
/// the coefficients' normed projection (fused/mix.rs `StateGrad`), for the schemes whose
/// coefficients come from it.
pub(crate) fn connect(
    state: &Tensor,
    mixing: Mixing,
    f: &dyn Fn(&Tensor) -> Result<Tensor>,
    acc: Option<&StateGrad>,
) -> Result<Tensor> {
    let (b, t, n, _) = state.dims4()?;
    if state.device().is_cuda() && n <= MAX_STREAMS {
        // Fused on the GPU (fused/mix.rs): coefficients per token in f32, [res | post].
        let per_token = |x: &Tensor, cols: usize| -> Result<Tensor> {
            x.to_dtype(DType::F32)?
                .broadcast_as((b, t, n, cols))?
                .contiguous()
        };
        let (pre, coef) = match mixing {
            Mixing::Packed { pre, coef } => (pre, coef),
            Mixing::Split { pre, res, post } => (
                per_token(&pre, 1)?.squeeze(3)?,
                Tensor::cat(&[per_token(&res, n)?, per_token(&post, 1)?], 3)?,
            ),
        };
        let state = state.contiguous()?;
        let h = state.apply_op2(&pre, PreMix { acc: acc.cloned() })?;
        let out = f(&h)?.contiguous()?;
        return state.apply_op3(&coef, &out, PostMix { acc: acc.cloned() });
    }
    let (pre, res, post) = mixing.split()?;
    let dtype = state.dtype();
    let h = pre
        .to_dtype(dtype)?
        .transpose(2, 3)?
        .broadcast_matmul(state)?; // (B, T, 1, C)
    let out = f(&h.squeeze(2)?)?.unsqueeze(2)?;
    let carried = res.to_dtype(dtype)?.broadcast_matmul(state)?;
    carried + post.to_dtype(dtype)?.broadcast_matmul(&out)?
}

/// Forward FLOPs per token of one hyper-connection's mixing on n streams of width C: the
/// read-out pre (n -> 1), the carried state res (n -> n) and the write-back post (1 -> n).
pub(crate) fn mixing_flops(n: usize, dims: &registry::Dims) -> f64 {
    let (n, c) = (n as f64, dims.d_model as f64);
    2.0 * c * (n + n * n + n)
}

/// Per-token n x n maps (.., n, n) averaged over the tokens: (n, n).
pub(crate) fn token_mean(maps: &Tensor, n: usize) -> Result<Tensor> {
    maps.reshape(((), n, n))?.mean(0)
}

/// The number of streams must be at least 1.
pub(crate) fn check_streams(n: usize) -> std::result::Result<(), String> {
    if n == 0 {
        Err("streams must be at least 1 (1 is the plain residual)".into())
    } else {
        Ok(())
    }
}

/// The n x n identity, row-major.
pub(crate) fn identity(n: usize) -> Vec<f32> {
    (0..n * n)
        .map(|i| if i / n == i % n { 1.0 } else { 0.0 })
        .collect()
}

/// Sinkhorn-Knopp projection of logits (..., n, n) onto the doubly stochastic matrices:
/// exp, then `iters` rounds of normalizing columns, then rows; in f32. Rows sum to 1 to
/// rounding after the last round; columns converge with `iters`.
///
/// The first round runs in the log domain (subtracting log-sum-exps), which needs no
/// exp(logits - max): that underflows to an all-zero column, and 0/0, for widely spread
/// logits. After it every column holds an entry of at least 1/n^2 (its log-sum-exp was 0, so
/// its largest entry was at least -ln n, and the row step subtracts at most ln n), so the
/// remaining rounds divide plain sums, which never vanish. Those sums are products with 0/1
/// matrices: one small matrix product instead of a reduction over a size-n axis, which
/// candle's CPU backend runs an order of magnitude slower.
pub fn sinkhorn(logits: &Tensor, iters: usize) -> Result<Tensor> {
    let dims = logits.dims().to_vec();
    let n = dims[dims.len() - 1];
    if logits.device().is_cuda() && n <= SINKHORN_MAX_STREAMS && iters <= SINKHORN_MAX_ITERS {
        // One thread per token on the GPU (fused/sinkhorn.rs), the same arithmetic.
        let l = logits.to_dtype(DType::F32)?.contiguous()?;
        return l.apply_op1(Sinkhorn { iters });
    }
    let l = logits.to_dtype(DType::F32)?.reshape(((), n, n))?;
    let l = l.broadcast_sub(&log_sum_exp(&l, D::Minus2)?)?;
    let l = l.broadcast_sub(&log_sum_exp(&l, D::Minus1)?)?;
    let mut m = l.exp()?.reshape(((), n * n))?;
    if iters > 1 {
        let (same_col, same_row) = spread_sums(n, logits.device())?;
        for _ in 1..iters {
            m = (&m / m.matmul(&same_col)?)?;
            m = (&m / m.matmul(&same_row)?)?;
        }
    }
    m.reshape(dims)
}

/// 0/1 matrices (n^2, n^2) over row-major n x n entries: M S gives every entry the sum of its
/// column (S[a, b] = 1 where a and b share a column), M R the sum of its row.
fn spread_sums(n: usize, device: &candle_core::Device) -> Result<(Tensor, Tensor)> {
    let k = n * n;
    let build = |same: &dyn Fn(usize, usize) -> bool| -> Result<Tensor> {
        let v: Vec<f32> = (0..k * k)
            .map(|i| if same(i / k, i % k) { 1.0 } else { 0.0 })
            .collect();
        Tensor::from_vec(v, (k, k), device)
    };
    Ok((
        build(&|a, b| a % n == b % n)?,
        build(&|a, b| a / n == b / n)?,
    ))
}

/// log(sum(exp(x))) along `dim`, kept as a size-1 dimension; the max is detached (it cancels).
fn log_sum_exp(x: &Tensor, dim: D) -> Result<Tensor> {
    let max = x.max_keepdim(dim)?.detach();
    x.broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(dim)?
        .log()?
        .broadcast_add(&max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::randn;
    use candle_core::Device;

    /// Largest |row sum - 1| and |column sum - 1| and the smallest entry of (..., n, n).
    fn sums_err(m: &Tensor) -> Result<(f32, f32, f32)> {
        let row = (m.sum(D::Minus1)? - 1.0)?.abs()?.flatten_all()?.max(0)?;
        let col = (m.sum(D::Minus2)? - 1.0)?.abs()?.flatten_all()?.max(0)?;
        let min = m.flatten_all()?.min(0)?;
        Ok((
            row.to_scalar::<f32>()?,
            col.to_scalar::<f32>()?,
            min.to_scalar::<f32>()?,
        ))
    }

    #[test]
    fn sinkhorn_is_doubly_stochastic_for_random_logits() -> Result<()> {
        // 256 seeded random 4 x 4 logit matrices per spread. Rows sum to 1 to f32 rounding
        // (1e-5) after the last row step, whatever the spread. Columns converge at a rate set
        // by the spread: after 20 rounds the worst of 256 is below 1e-4 at spread 1 and below
        // 0.05 at spread 3 (measured 5e-6 and 0.034); 200 rounds bring spread 3 to 1.2e-3.
        // mHC's logits start at 6 I - 3, a pattern Sinkhorn fixes in one round.
        for (spread, iters, col_tol) in [
            (0.1, 20, 1e-5),
            (1.0, 20, 1e-4),
            (3.0, 20, 0.05),
            (3.0, 200, 5e-3),
            (30.0, 20, f32::INFINITY),
        ] {
            let logits = randn(7, (256, 4, 4), spread)?;
            let (row, col, min) = sums_err(&sinkhorn(&logits, iters)?)?;
            assert!(row < 1e-5, "spread {spread}: row error {row}");
            assert!(
                col < col_tol,
                "spread {spread} x {iters}: column error {col}"
            );
            assert!(
                col.is_finite() && min >= 0.0,
                "spread {spread}: {col} {min}"
            );
        }
        Ok(())
    }

    #[test]
    fn sinkhorn_survives_huge_logits() -> Result<()> {
        // exp(-1000) underflows: the plain iteration would divide 0 by 0 here.
        let logits = Tensor::new(
            &[
                [1000f32, -1000.0, 0.0],
                [0.0, 500.0, -500.0],
                [-800.0, 0.0, 900.0],
            ],
            &Device::Cpu,
        )?;
        let m = sinkhorn(&logits, 20)?;
        let v: Vec<f32> = m.flatten_all()?.to_vec1()?;
        assert!(v.iter().all(|x| x.is_finite() && *x >= 0.0), "{v:?}");
        let (row, _, _) = sums_err(&m)?;
        assert!(row < 1e-5, "row error {row}");
        // The diagonal dominates by hundreds of nats: the projection is the identity.
        let eye = Tensor::new(identity(3), &Device::Cpu)?.reshape((3, 3))?;
        let d = (m - eye)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "{d}");
        Ok(())
    }

    #[test]
    fn sinkhorn_of_a_constant_is_uniform() -> Result<()> {
        let m = sinkhorn(&Tensor::full(7f32, (3, 3), &Device::Cpu)?, 1)?;
        for x in m.flatten_all()?.to_vec1::<f32>()? {
            assert!((x - 1.0 / 3.0).abs() < 1e-6, "{x}");
        }
        Ok(())
    }

    use crate::nn::rms_norm;
    use registry::{Dims, ParamBuilder, Residual, Stream};

    fn dims() -> Dims {
        Dims {
            d_model: 16,
            n_layers: 2,
            vocab: 8,
            seq_len: 5,
        }
    }

    /// Every residual scheme at a few settings, each paired with its name.
    fn schemes() -> Vec<(&'static str, Box<dyn Residual>)> {
        vec![
            ("prenorm", Box::new(prenorm::PreNorm {})),
            ("hc static n4", Box::new(hc::Hc::default())),
            (
                "hc dynamic n4",
                Box::new(hc::Hc {
                    dynamic: true,
                    ..hc::Hc::default()
                }),
            ),
            (
                "hc n1",
                Box::new(hc::Hc {
                    streams: 1,
                    dynamic: true,
                }),
            ),
            ("mhc n4", Box::new(mhc::Mhc::default())),
            (
                "mhc n1",
                Box::new(mhc::Mhc {
                    streams: 1,
                    ..mhc::Mhc::default()
                }),
            ),
            ("laurel", Box::new(laurel::Laurel::default())),
            ("laurel rw", Box::new(laurel::Laurel { rank: 4, rw: true })),
            (
                "laurel rw only",
                Box::new(laurel::Laurel { rank: 0, rw: true }),
            ),
        ]
    }

    /// Fixed sublayers with their own pre-norm, F_k(h) = tanh(norm(h) W_k), one per sublayer.
    fn sublayers(n: usize) -> Result<Vec<Tensor>> {
        (0..n)
            .map(|k| {
                let p = ParamBuilder::new(100 + k as u64, &Device::Cpu);
                p.tensor(
                    "w",
                    (16, 16),
                    registry::Init::Normal { std: 0.5 },
                    registry::Role::Hidden,
                )
            })
            .collect()
    }

    fn run(stream: &dyn Stream, x: &Tensor, ws: &[Tensor]) -> Result<Tensor> {
        let mut state = stream.expand(x)?;
        for (k, w) in ws.iter().enumerate() {
            let f = |h: &Tensor| rms_norm(h)?.broadcast_matmul(w)?.tanh();
            state = stream.sublayer(k, &state, &f)?;
        }
        stream.reduce(&state)
    }

    #[test]
    fn every_scheme_starts_as_the_plain_pre_norm_network() -> Result<()> {
        let x = randn(1, (2, 5, 16), 1.0)?;
        let ws = sublayers(dims().n_sublayers())?;
        // The plain network, written out: x_{k+1} = x_k + F_k(x_k).
        let mut plain = x.clone();
        for w in &ws {
            plain = (&plain + rms_norm(&plain)?.broadcast_matmul(w)?.tanh()?)?;
        }
        for (name, scheme) in schemes() {
            let stream = scheme.build(&dims(), &ParamBuilder::new(1, &Device::Cpu))?;
            let y = run(stream.as_ref(), &x, &ws)?;
            let d = (y - &plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-5, "{name}: max |difference| {d}");
        }
        Ok(())
    }

    #[test]
    fn gradients_reach_every_mixing_parameter() -> Result<()> {
        let x = randn(1, (2, 5, 16), 1.0)?;
        let ws = sublayers(dims().n_sublayers())?;
        let probe = randn(2, (2, 5, 16), 1.0)?;
        for (name, scheme) in schemes() {
            let p = ParamBuilder::new(2, &Device::Cpu);
            let stream = scheme.build(&dims(), &p)?;
            // Move every parameter off its initial value first: at init some gradients are
            // zero by construction (tanh(0 W) with W = 0 leaves its scale without gradient).
            for (i, q) in p.params().iter().enumerate() {
                let t = q.var.as_tensor();
                q.var.set(&(t + randn(i as u64, t.shape(), 0.05)?)?)?;
            }
            let loss = (run(stream.as_ref(), &x, &ws)? * &probe)?.sum_all()?;
            let grads = loss.backward()?;
            for q in p.params() {
                if name == "mhc n1" && q.name.ends_with("b_res") {
                    continue; // one stream: Sinkhorn of a 1 x 1 matrix is 1, whatever b_res
                }
                let g = grads
                    .get(q.var.as_tensor())
                    .unwrap_or_else(|| panic!("{name}: no gradient for {}", q.name));
                let n = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
                assert!(
                    n.is_finite() && n > 0.0,
                    "{name}: {} has |g|^2 = {n}",
                    q.name
                );
            }
        }
        Ok(())
    }
}
