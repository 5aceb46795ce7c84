//! The MLP down(act(up x)) as one op, two-matrix or gated (SwiGLU: down(silu(g x) (u x)),
//! with the gate's and the up projection's weights stacked as one (2 H, C) matrix so that both
//! are one GEMM). Its hidden activations, several times the width of the model, are
//! temporaries of the op: the backward pass recomputes them (one GEMM and the activation)
//! instead of keeping them, and neither they nor the rows around them become nodes of candle's
//! autograd graph, whose every gradient is zero-filled and added. The weights come in as the
//! f32 masters and are cast inside, so neither their casts nor the transposes a composite
//! linear layer makes join the graph either (see linear.rs).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};

use registry::{add_into, Detached, Grads};

use super::linear::{as_dtype, like, weight_grad};
use super::node::node;
use super::{Activation, ActivationBwd, AddProduct, Kind};

/// (x (.., C), w_up (H, C) or, gated, (2 H, C), w_down (C, H)) -> (.., C) in x's dtype; the
/// weights in any float dtype (their gradients come back in it).
#[derive(Clone, Copy, Debug)]
pub struct FusedMlp(pub Kind);

/// (rows, c, hidden), checked.
fn dims(lx: &Layout, lu: &Layout, ld: &Layout, gated: bool) -> Result<(usize, usize, usize)> {
    let c = *lx.dims().last().unwrap_or(&0);
    let (up_rows, cu) = lu.shape().dims2()?;
    let hidden = if gated { up_rows / 2 } else { up_rows };
    if c == 0 || cu != c || ld.dims() != [c, hidden] || (gated && up_rows % 2 != 0) {
        bail!(
            "fused MLP: x {:?}, up {:?}, down {:?} do not fit",
            lx.dims(),
            lu.dims(),
            ld.dims()
        );
    }
    Ok((lx.shape().elem_count() / c, c, hidden))
}

/// up, activation, down on either backend's storage.
fn forward<S: BackendStorage>(
    (x, lx): (&S, &Layout),
    (up, lu): (&S, &Layout),
    (down, ld): (&S, &Layout),
    gated: bool,
    act: impl Fn(&S, &Layout) -> Result<S>,
) -> Result<S> {
    let (rows, c, hidden) = dims(lx, lu, ld, gated)?;
    let up_rows = lu.dims()[0];
    let (mut up_cast, mut down_cast) = (None, None);
    let (up, lu) = as_dtype(up, lu, x.dtype(), &mut up_cast)?;
    let (down, ld) = as_dtype(down, ld, x.dtype(), &mut down_cast)?;
    let lx2 = Layout::contiguous_with_offset((rows, c), lx.start_offset());
    let h = x.matmul(up, (1, rows, up_rows, c), &lx2, &lu.transpose(0, 1)?)?;
    let a = act(&h, &Layout::contiguous((rows, up_rows)))?;
    let la = Layout::contiguous((rows, hidden));
    a.matmul(down, (1, rows, c, hidden), &la, &ld.transpose(0, 1)?)
}

impl CustomOp3 for FusedMlp {
    fn name(&self) -> &'static str {
        "mlp"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let act = Activation(self.0);
        let y = forward((s1, l1), (s2, l2), (s3, l3), self.0.gated(), |s, l| {
            Ok(act.cpu_fwd(s, l)?.0)
        })?;
        Ok((y, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let kind = self.0 as i32;
        let y = forward((s1, l1), (s2, l2), (s3, l3), self.0.gated(), |s, l| {
            super::cuda::activation(s, l, None, kind)
        })?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        up: &Tensor,
        down: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (up16, down16) = (like(up, x)?, like(down, x)?);
        let dtypes = (up.dtype(), down.dtype());
        let (dx, d_up, d_down) = backward(self.0, x, (&up16, &down16), grad, dtypes)?;
        Ok((Some(dx), Some(d_up), Some(d_down)))
    }
}

/// The MLP's backward pass from its input x, its weights in x's dtype (up stacked when
/// gated) and the output's gradient: (dx, d_up, d_down), the weights' in `dtypes`. Detached:
/// nothing computed here joins the autograd graph. The hidden activations are recomputed.
fn backward(
    kind: Kind,
    x: &Tensor,
    (up16, down16): (&Tensor, &Tensor),
    grad: &Tensor,
    (up_dtype, down_dtype): (DType, DType),
) -> Result<(Tensor, Tensor, Tensor)> {
    let c = up16.dim(1)?;
    let x2 = x.detach().reshape(((), c))?;
    let dy = grad.detach().reshape(((), c))?;
    let h = x2.matmul(&up16.t()?)?;
    let a = h.apply_op1_no_bwd(&Activation(kind))?;
    let d_down = weight_grad(&dy, &a, down_dtype)?;
    let da = dy.matmul(down16)?;
    let dh = h.apply_op2_no_bwd(&da, &ActivationBwd(kind))?;
    let d_up = weight_grad(&dh, &x2, up_dtype)?;
    let dx = dh.matmul(up16)?.reshape(x.shape())?;
    Ok((dx, d_up, d_down))
}

/// The MLP on `x` outside the graph, with its weights in x's dtype (`up16` stacked when
/// gated) and `weights` the masters they were cast from (`up` as one or, `split`, as the
/// gate's and the up projection's halves), whose gradients come back in `dtypes` (up's,
/// down's). Unlike [`FusedMlp`]'s backward pass, this one keeps the pre-activations h for
/// its backward pass instead of recomputing their GEMM: one GEMM a layer less for h's
/// memory (the activation is still recomputed from h, a pass over it).
fn mlp_detached(
    kind: Kind,
    x: &Tensor,
    (up16, down16): (Tensor, Tensor),
    weights: Vec<Tensor>,
    split: Option<usize>,
    (up_dtype, down_dtype): (DType, DType),
) -> Result<Detached> {
    let xd = x.detach().contiguous()?;
    let c = up16.dim(1)?;
    let x2 = xd.reshape(((), c))?;
    let h = x2.matmul(&up16.t()?)?;
    let y = h
        .apply_op1_no_bwd(&Activation(kind))?
        .matmul(&down16.t()?)?
        .reshape(xd.shape())?;
    let backward = move |dy: &Tensor, into: Option<Tensor>| -> Result<Grads> {
        let dy = dy.detach().reshape(((), c))?;
        let a = h.apply_op1_no_bwd(&Activation(kind))?;
        let d_down = weight_grad(&dy, &a, down_dtype)?;
        let da = dy.matmul(&down16)?;
        let dh = h.apply_op2_no_bwd(&da, &ActivationBwd(kind))?;
        let d_up = weight_grad(&dh, &x2, up_dtype)?;
        let dx = match into {
            Some(acc)
                if x2.dtype() == DType::BF16
                    && acc.dtype() == DType::BF16
                    && acc.dims() == xd.dims() =>
            {
                let acc = acc.reshape(((), c))?.contiguous()?;
                acc.inplace_op3(&dh, &up16, &AddProduct)?;
                acc
            }
            other => add_into(
                dh.matmul(&up16)?,
                other.map(|a| a.reshape(((), c))).transpose()?,
            )?,
        };
        let mut grads = match split {
            Some(hidden) => vec![
                Some(d_up.narrow(0, 0, hidden)?),
                Some(d_up.narrow(0, hidden, hidden)?),
            ],
            None => vec![Some(d_up)],
        };
        grads.push(Some(d_down));
        Ok(Grads {
            input: Some(dx.reshape(xd.shape())?),
            weights: grads,
        })
    };
    Ok(Detached {
        y,
        weights,
        backward: Box::new(backward),
    })
}

/// The two-matrix MLP down(act(up x)) outside the graph, from the f32 masters (or any float
/// dtype: their gradients come back in it).
pub fn mlp_outside(kind: Kind, x: &Tensor, up: &Tensor, down: &Tensor) -> Result<Detached> {
    let casts = (like(up, x)?, like(down, x)?);
    let dtypes = (up.dtype(), down.dtype());
    mlp_detached(kind, x, casts, vec![up.clone(), down.clone()], None, dtypes)
}

/// SwiGLU's MLP down(silu(g x) (u x)) as one node of the graph (node.rs); see
/// [`swiglu_outside`].
pub fn swiglu_mlp(x: &Tensor, gate: &Tensor, up: &Tensor, down: &Tensor) -> Result<Tensor> {
    node(x, swiglu_outside(x, gate, up, down)?)
}

/// SwiGLU's MLP outside the graph over its three weights: the gate's and the up
/// projection's weights stacked in x's dtype, so that both are one GEMM, and the stack's
/// gradient handed back as its two halves. Stacked inside the graph (as [`FusedMlp`]'s one
/// up weight) the f32 masters would be concatenated every step, and each half's gradient
/// zero-filled and added once more.
pub fn swiglu_outside(x: &Tensor, gate: &Tensor, up: &Tensor, down: &Tensor) -> Result<Detached> {
    if gate.dtype() != up.dtype() {
        bail!(
            "SwiGLU: the gate's weight is {:?} and the up projection's {:?}",
            gate.dtype(),
            up.dtype()
        );
    }
    let stacked = super::stack_as(gate, up, x.dtype())?;
    let weights = vec![gate.clone(), up.clone(), down.clone()];
    let dtypes = (gate.dtype(), down.dtype());
    let casts = (stacked, like(down, x)?);
    mlp_detached(Kind::SwiGlu, x, casts, weights, Some(gate.dim(0)?), dtypes)
}
