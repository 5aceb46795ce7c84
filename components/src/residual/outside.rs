//! A hyper-connection outside the autograd graph (registry's `Detached`), for the trunk
//! (runner/src/trunk.rs): the fused ops of `connect`'s GPU path, run without the graph, and
//! their backward functions called in turn. The state's gradient then passes from the
//! post-mix to the pre-mix to the coefficients' projection as one tensor, each adding its
//! part in its own kernel, where the graph zero-filled and added it (and the gradient store
//! once more for the state as an op's input).

use candle_core::{bail, CustomOp3, DType, Result, Tensor};
use registry::{add_into, Detached, Grads};

use crate::fused::{
    norm_proj_backward, pack_params, stream_coef_backward, CoefPart, MixBwd, NormProj,
    NormProjBwdX, PostMix, PreMix, Scheme, StreamCoef, TokenSums,
};

/// From the coefficients' gradients (dpre (B, T, n), dcoef (B, T, n, n + 1)), the state's
/// gradient from the post-mix and the pre-mix's (pre, dh), whose part of the state's gradient
/// is pre[i] dh for stream i, the state's whole gradient and the coefficients' weights'.
type CoefBackward = Box<
    dyn FnOnce(&Tensor, &Tensor, Tensor, (Tensor, Tensor)) -> Result<(Tensor, Vec<Option<Tensor>>)>
        + Send
        + Sync,
>;

/// From the tokens' summed coefficient gradients (dpre (n,), dcoef (n, n + 1)), the static
/// coefficients' weights'.
pub(crate) type FixedGrads =
    Box<dyn FnOnce(&Tensor, &Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync>;

/// A sublayer's coefficients as the fused mixing takes them, pre (B, T, n) and coef =
/// [res | post] (B, T, n, n + 1), f32, with the weights they come from and the backward pass
/// to those.
pub(crate) struct Coefficients {
    pub pre: Tensor,
    pub coef: Tensor,
    pub weights: Vec<Tensor>,
    pub backward: CoefBackward,
}

/// The gradient of the concatenation of `parts` split back into theirs.
fn unpack(dp: &Tensor, parts: &[Tensor]) -> Result<Vec<Option<Tensor>>> {
    let mut start = 0;
    parts
        .iter()
        .map(|p| {
            let len = p.elem_count();
            let g = dp.narrow(0, start, len)?.reshape(p.shape())?;
            start += len;
            Ok(Some(g.to_dtype(p.dtype())?))
        })
        .collect()
}

/// Coefficients from the normed projection z = rms(state) phi (fused/norm_proj.rs) through the
/// two coefficient ops (fused/stream_coef.rs), the parameters packed from `parts`: mHC's,
/// and dynamic HC's (phi then projects each stream row, and a token's rows sit side by side).
pub(crate) fn projected(
    state: &Tensor,
    phi: &Tensor,
    parts: &[&Tensor],
    scheme: Scheme,
    eps: f64,
) -> Result<Coefficients> {
    let (b, t, n, _) = state.dims4()?;
    let x = state.contiguous()?;
    let phi32 = phi.detach().to_dtype(DType::F32)?.contiguous()?;
    let eps = eps as f32;
    let project = NormProj { eps, acc: None };
    let z = x.apply_op2_no_bwd(&phi32, &project)?; // z_ext = [z | r], rows of phi's K
    let zt = z.reshape((b * t, ()))?; // a token's rows side by side
    let p = pack_params(
        &parts
            .iter()
            .map(|p| p.detach())
            .collect::<Vec<_>>()
            .iter()
            .collect::<Vec<_>>(),
    )?;
    let op = move |part| StreamCoef { scheme, part, n };
    let pre = zt.apply_op2_no_bwd(&p, &op(CoefPart::Pre))?;
    let coef = zt.apply_op2_no_bwd(&p, &op(CoefPart::Res))?;
    let (pre4, coef4) = (pre.reshape((b, t, n))?, coef.reshape((b, t, n, n + 1))?);
    // The parameters' own tensors: the step finds their gradients by them (a detached copy
    // is another tensor).
    let parts: Vec<Tensor> = parts.iter().map(|p| (*p).clone()).collect();
    let mut weights = vec![phi.clone()];
    weights.extend(parts.iter().cloned());
    let phi_dtype = phi.dtype();
    let backward: CoefBackward = Box::new(move |dpre, dcoef, ds, premix| {
        let (dz, dp) = stream_coef_backward(&zt, &p, (scheme, n), dpre, dcoef)?;
        let dz = dz.reshape(z.shape())?;
        // The projection's backward pass adds the mixing's parts of the state's gradient, the
        // post-mix's and the pre-mix's, in its one pass over the state.
        let into = NormProjBwdX {
            add: Some(ds),
            premix: Some(premix),
        };
        let (dx, dphi) = norm_proj_backward(&x, &phi32, &z, &dz, into)?;
        let mut grads = vec![Some(dphi.to_dtype(phi_dtype)?)];
        grads.extend(unpack(&dp, &parts)?);
        Ok((dx, grads))
    });
    Ok(Coefficients {
        pre: pre4,
        coef: coef4,
        weights,
        backward,
    })
}

/// Static coefficients, the same for every token: pre (n,) and coef (n, n + 1), made from
/// `weights` outside the graph, spread over the (B, T) tokens. Their gradients are the
/// tokens' sums, which `grads` takes back to the weights (in their order).
pub(crate) fn fixed(
    (b, t): (usize, usize),
    weights: &[&Tensor],
    (pre1, coef1): (Tensor, Tensor),
    grads: FixedGrads,
) -> Result<Coefficients> {
    let n = pre1.dim(0)?;
    let spread = |x: &Tensor, shape: &[usize]| -> Result<Tensor> {
        x.detach()
            .to_dtype(DType::F32)?
            .broadcast_as(shape)?
            .contiguous()
    };
    let pre = spread(&pre1, &[b, t, n])?;
    let coef = spread(&coef1, &[b, t, n, n + 1])?;
    let backward: CoefBackward = Box::new(move |dpre, dcoef, ds, (pre, dh)| {
        let ds = pre.apply_op3_no_bwd(&dh, &ds, &MixBwd::PreStateAdd)?;
        let dpre1 = dpre.reshape((b * t, n))?.apply_op1_no_bwd(&TokenSums)?;
        let dcoef1 = dcoef
            .reshape((b * t, n * (n + 1)))?
            .apply_op1_no_bwd(&TokenSums)?
            .reshape((n, n + 1))?;
        Ok((ds, grads(&dpre1, &dcoef1)?))
    });
    Ok(Coefficients {
        pre,
        coef,
        weights: weights.iter().map(|w| (*w).clone()).collect(),
        backward,
    })
}

/// x' = res x + post F(pre^T x) on the state (B, T, n, C) outside the graph: the pre-mix,
/// the sublayer `f` (detached), the post-mix, and the backward pass through all three and
/// the coefficients.
pub(crate) fn connect_outside(
    state: &Tensor,
    coefficients: Coefficients,
    f: &dyn Fn(&Tensor) -> Result<Detached>,
) -> Result<Detached> {
    let state = state.contiguous()?;
    let Coefficients {
        pre,
        coef,
        weights: mut all,
        backward: coef_backward,
    } = coefficients;
    let h = state.apply_op2_no_bwd(&pre, &PreMix::default())?;
    let Detached {
        y: out,
        weights,
        backward,
    } = f(&h)?;
    let out = out.contiguous()?;
    let post = PostMix::default();
    let y = state.apply_op3_no_bwd(&coef, &out, &post)?;
    let ours = all.len();
    all.extend(weights);
    let backward = move |g: &Tensor, into: Option<Tensor>| -> Result<Grads> {
        let (ds, dcoef, dout) = post.bwd(&state, &coef, &out, g, g)?;
        let (Some(ds), Some(dcoef), Some(dout)) = (ds, dcoef, dout) else {
            bail!("post-mix: the backward pass gave no gradient");
        };
        let inner = backward(&dout, None)?;
        let Some(dh) = inner.input else {
            bail!("a mixed sublayer gave its input no gradient");
        };
        let dh = dh.contiguous()?;
        let dpre = state.apply_op2_no_bwd(&dh, &MixBwd::PrePre)?;
        let (dstate, mut grads) = coef_backward(&dpre, &dcoef, ds.contiguous()?, (pre, dh))?;
        debug_assert_eq!(grads.len(), ours);
        grads.extend(inner.weights);
        Ok(Grads {
            input: Some(add_into(dstate, into)?),
            weights: grads,
        })
    };
    Ok(Detached {
        y,
        weights: all,
        backward: Box::new(backward),
    })
}

/// Checks for the schemes' detached forms (mhc.rs, hc.rs tests).
#[cfg(test)]
pub(crate) mod check {
    use super::*;
    use crate::nn::randn;
    use candle_core::Var;
    use registry::{ParamBuilder, Stream};

    /// Sets every parameter `p` built to random values, so that none is at a special point.
    pub(crate) fn scramble(p: &ParamBuilder) -> Result<()> {
        for (i, param) in p.params().iter().enumerate() {
            let v = randn(300 + i as u64, param.var.shape().clone(), 0.5)?;
            param.var.set(&(v + param.var.as_tensor())?)?;
        }
        Ok(())
    }

    /// A scheme's detached sublayer 0 on a state, given the detached sublayer body.
    pub(crate) type Outside<'a> =
        &'a dyn Fn(&Tensor, &dyn Fn(&Tensor) -> Result<Detached>) -> Result<Detached>;

    /// Sublayer 0 of `stream` on a random state, by `outside` (the detached form) against
    /// autograd through the stream's `sublayer` (the composite, on the CPU), the sublayer a
    /// weighted copy h w: the largest gap of the next state, the state's gradient and every
    /// weight's, each weight's looked up in the graph by the tensor the detached form names.
    pub(crate) fn outside_gap(
        stream: &dyn Stream,
        outside: Outside,
        (b, t, n, c): (usize, usize, usize, usize),
    ) -> Result<f32> {
        let state = Var::from_tensor(&randn(20, (b, t, n, c), 1.0)?)?;
        let w = Var::from_tensor(&randn(21, c, 1.0)?)?;
        let r = randn(22, (b, t, n, c), 1.0)?;
        let detached = outside(state.as_tensor(), &tests::body(w.as_tensor()))?;
        let wt = w.as_tensor().clone();
        let graph = stream.sublayer(0, state.as_tensor(), &move |h| h.broadcast_mul(&wt))?;
        let grads = (&graph * &r)?.sum_all()?.backward()?;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        let mut worst = diff(&detached.y, &graph)?;
        let weights = detached.weights.clone();
        let got = (detached.backward)(&r, None)?;
        let dstate = got.input.expect("the state's gradient");
        worst = worst.max(diff(
            &dstate,
            grads.get(state.as_tensor()).expect("dstate"),
        )?);
        for (wt, g) in weights.iter().zip(&got.weights) {
            let want = grads
                .get(wt)
                .expect("every weight named is a variable of the composite's graph");
            worst = worst.max(diff(g.as_ref().expect("a weight's gradient"), want)?);
        }
        Ok(worst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::{norm_proj_ext, stream_coefficients, StateGrad};
    use crate::nn::randn;
    use candle_core::Var;

    /// The sublayer both ways: y = h w (w (C,) across the channels), detached by hand.
    pub(crate) fn body(w: &Tensor) -> impl Fn(&Tensor) -> Result<Detached> + '_ {
        move |h: &Tensor| {
            let (h, wd) = (h.detach(), w.detach());
            let y = h.broadcast_mul(&wd)?;
            let backward = move |dy: &Tensor, into: Option<Tensor>| -> Result<Grads> {
                let dh = dy.broadcast_mul(&wd)?;
                let dw = (dy * &h)?.reshape(((), wd.dim(0)?))?.sum(0)?;
                Ok(Grads {
                    input: Some(add_into(dh, into)?),
                    weights: vec![Some(dw)],
                })
            };
            Ok(Detached {
                y,
                weights: vec![w.clone()],
                backward: Box::new(backward),
            })
        }
    }

    /// The largest gap between the detached sublayer's output and gradients (the state's
    /// with `into` added, then every weight's) and autograd's through `graph`, for the
    /// output's gradient r.
    fn gap(
        state: &Var,
        weights: &[&Var],
        detached: Detached,
        graph: &Tensor,
        r: &Tensor,
    ) -> Result<f32> {
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        let grads = (graph * r)?.sum_all()?.backward()?;
        let into = randn(9, state.shape().clone(), 1.0)?;
        let mut worst = diff(&detached.y, graph)?;
        let got = (detached.backward)(r, Some(into.clone()))?;
        let want = (grads.get(state.as_tensor()).expect("the state's gradient") + &into)?;
        worst = worst.max(diff(&got.input.expect("the state's gradient"), &want)?);
        assert_eq!(got.weights.len(), weights.len());
        for (g, w) in got.weights.iter().zip(weights) {
            let want = grads.get(w.as_tensor()).expect("a weight's gradient");
            worst = worst.max(diff(g.as_ref().expect("a weight's gradient"), want)?);
        }
        Ok(worst)
    }

    #[test]
    fn projected_coefficients_outside_the_graph_match_autograd_through_the_same_ops() -> Result<()>
    {
        // mHC (rows of n C) and dynamic HC (rows of C, a token's n side by side), against
        // `connect`'s GPU path written out: the same ops, with the state's shared gradient
        // cell, under candle's autograd (their CPU arithmetic).
        let (b, t, n, c) = (2, 3, 4, 8);
        let v = |seed, shape: &[usize], std| Var::from_tensor(&randn(seed, shape, std)?);
        let state = v(1, &[b, t, n, c], 1.0)?;
        let w = v(2, &[c], 1.0)?;
        let r = randn(3, (b, t, n, c), 1.0)?;
        for scheme in [Scheme::Mhc { iters: 7 }, Scheme::Hc] {
            let (phi, parts) = match scheme {
                Scheme::Mhc { .. } => (
                    v(4, &[n * c, 2 * n + n * n], 0.3)?,
                    vec![
                        v(5, &[3], 0.5)?,
                        v(6, &[n], 1.0)?,
                        v(7, &[n], 1.0)?,
                        v(8, &[n, n], 1.0)?,
                    ],
                ),
                Scheme::Hc => (
                    v(4, &[c, n + 2], 0.3)?,
                    vec![
                        v(5, &[1], 0.5)?,
                        v(6, &[1], 0.5)?,
                        v(7, &[n, 1], 1.0)?,
                        v(8, &[n, 1], 1.0)?,
                        v(10, &[n, n], 1.0)?,
                    ],
                ),
            };
            let part_t: Vec<&Tensor> = parts.iter().map(|p| p.as_tensor()).collect();
            let coefficients = projected(state.as_tensor(), &phi, &part_t, scheme, 1e-6)?;
            let detached = connect_outside(state.as_tensor(), coefficients, &body(&w))?;

            let s = state.as_tensor();
            let acc = StateGrad::default();
            let z = norm_proj_ext(s, &phi, 1e-6, Some(&acc))?.reshape((b * t, ()))?;
            let (pre, coef) = stream_coefficients(&z, &pack_params(&part_t)?, (b, t, n), scheme)?;
            let h = s.apply_op2(
                &pre,
                PreMix {
                    acc: Some(acc.clone()),
                },
            )?;
            let out = h.broadcast_mul(&w)?;
            let graph = s.apply_op3(&coef, &out, PostMix { acc: Some(acc) })?;

            let mut weights = vec![&phi];
            weights.extend(parts.iter());
            weights.push(&w);
            let worst = gap(&state, &weights, detached, &graph, &r)?;
            assert!(worst < 1e-5, "{scheme:?}: {worst}");
        }
        Ok(())
    }

    #[test]
    fn fixed_coefficients_outside_the_graph_match_the_composite() -> Result<()> {
        // Static HC: pre = a_m, res = a_r^T, post = b for every token, against the CPU's
        // composite hyper-connection (`connect` with split coefficients).
        let (b, t, n, c) = (2, 3, 3, 8);
        let v = |seed, shape: &[usize], std| Var::from_tensor(&randn(seed, shape, std)?);
        let state = v(11, &[b, t, n, c], 1.0)?;
        let w = v(12, &[c], 1.0)?;
        let (a_m, a_r, bw) = (
            v(13, &[n, 1], 1.0)?,
            v(14, &[n, n], 1.0)?,
            v(15, &[n, 1], 1.0)?,
        );
        let r = randn(16, (b, t, n, c), 1.0)?;
        let weights = [a_m.as_tensor(), a_r.as_tensor(), bw.as_tensor()];
        let coefficients = super::super::hc::static_coefficients((b, t), &weights)?;
        let detached = connect_outside(state.as_tensor(), coefficients, &body(&w))?;
        let lift = |x: &Tensor| x.unsqueeze(0)?.unsqueeze(0);
        let mixing = super::super::Mixing::Split {
            pre: lift(a_m.as_tensor())?,
            res: lift(a_r.as_tensor())?.transpose(2, 3)?,
            post: lift(bw.as_tensor())?,
        };
        let wt = w.as_tensor().clone();
        let f = move |h: &Tensor| h.broadcast_mul(&wt);
        let graph = super::super::connect(state.as_tensor(), mixing, &f, None)?;
        let worst = gap(&state, &[&a_m, &a_r, &bw, &w], detached, &graph, &r)?;
        assert!(worst < 1e-5, "{worst}");
        Ok(())
    }
}
