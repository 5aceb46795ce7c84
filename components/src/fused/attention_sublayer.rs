//! The attention sublayer as one autograd node (node.rs), for flash attention's case (bf16 on
//! CUDA, heads of 64 or 128): the q, k and v projections of the normed input, the heads'
//! layout with QK-norm and RoPE, flash attention, gated attention's gate when there is one,
//! and the output projection. As separate ops each of their outputs is a node whose gradient
//! candle's store zero-fills and adds (about ten a layer of the activations' size, and the
//! input's gradient added once for each of the three projections that read it); here the
//! backward pass calls the same ops' backward functions in turn, sums the input's gradient
//! in place (linear.rs `AddProduct`), and takes each weight's gradient in f32 from one
//! product.

use candle_core::{CustomOp2, CustomOp3, DType, Result, Tensor};
use registry::{add_into, Detached, Grads};

use super::linear::{like, weight_grad};
use super::node::node;
use super::{AddProduct, FlashAttention, FusedLinear, HeadPrep, SigmoidGate};
use crate::nn::rows;

/// The sublayer's weights, (out, in) each, in any float dtype (the f32 masters in training):
/// the projections and, for gated attention, the gate's (C or heads outputs).
pub struct AttentionWeights<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub o: &'a Tensor,
    pub gate: Option<&'a Tensor>,
}

/// How the heads are laid out: the query's and the key's [`HeadPrep`], the RoPE table they
/// take (2, T, hd) f32, and the scores' scale.
pub struct AttentionPlan {
    pub q: HeadPrep,
    pub k: HeadPrep,
    pub table: Tensor,
    pub scale: f64,
}

/// (B, T, C) -> (B, T, C): the sublayer on the normed input `x` (bf16 on a GPU; heads of a
/// size flash attention takes), as one node of the graph.
pub fn attention_sublayer(
    x: &Tensor,
    w: &AttentionWeights,
    plan: &AttentionPlan,
) -> Result<Tensor> {
    node(x, attention_sublayer_detached(x, w, plan)?)
}

/// [`attention_sublayer`] outside the graph: its output and backward pass.
pub fn attention_sublayer_detached(
    x: &Tensor,
    w: &AttentionWeights,
    plan: &AttentionPlan,
) -> Result<Detached> {
    let xd = x.detach().contiguous()?;
    let linear = |input: &Tensor, weight: &Tensor| input.apply_op2_no_bwd(weight, &FusedLinear);
    let (q_lin, k_lin, v) = (linear(&xd, w.q)?, linear(&xd, w.k)?, linear(&xd, w.v)?);
    let q = q_lin.apply_op2_no_bwd(&plan.table, &plan.q)?;
    let k = k_lin.apply_op2_no_bwd(&plan.table, &plan.k)?;
    let flash = FlashAttention::new(plan.scale);
    let a = q.apply_op3_no_bwd(&k, &v, &flash)?; // (B, T, C), the heads side by side
    let logits = w.gate.map(|g| linear(&xd, g)).transpose()?;
    let gated = match &logits {
        Some(l) => a.apply_op2_no_bwd(l, &SigmoidGate)?,
        None => a.clone(),
    };
    let y = linear(&gated, w.o)?;

    let mut weights = vec![w.q, w.k, w.v, w.o];
    weights.extend(w.gate);
    let owned: Vec<Tensor> = weights.iter().map(|t| (*t).clone()).collect();
    let (qp, kp, table) = (plan.q, plan.k, plan.table.clone());
    let backward = move |dy: &Tensor, into: Option<Tensor>| -> Result<Grads> {
        let (wq, wk, wv, wo) = (&owned[0], &owned[1], &owned[2], &owned[3]);
        let dy = rows(dy)?;
        let d_gated = dy.matmul(&like(wo, &xd)?)?.reshape(a.shape())?;
        let d_wo = weight_grad(&dy, &rows(&gated)?, wo.dtype())?;
        let (da, d_logits) = match &logits {
            Some(l) => {
                let (da, dl) = SigmoidGate.bwd(&a, l, &gated, &d_gated)?;
                (da.expect("the gate's value gradient"), dl)
            }
            None => (d_gated, None),
        };
        let (dq, dk, dv) = flash.bwd(&q, &k, &v, &a, &da)?;
        let expect = |g: Option<Tensor>| g.expect("flash attention's three gradients");
        let (dq, dk, dv) = (expect(dq), expect(dk), expect(dv));
        let dq_lin = qp
            .bwd(&q_lin, &table, &q, &dq)?
            .0
            .expect("the heads' gradient");
        let dk_lin = kp
            .bwd(&k_lin, &table, &k, &dk)?
            .0
            .expect("the heads' gradient");
        let x_rows = rows(&xd)?;
        let mut grads = Vec::with_capacity(owned.len());
        // The input's gradient: the query's product (added into `into` when given), then the
        // others added into it.
        let (dq_rows, dk_rows, dv_rows) = (rows(&dq_lin)?, rows(&dk_lin)?, rows(&dv)?);
        let mut readers = vec![(&dk_rows, wk), (&dv_rows, wv)];
        let dx = match into {
            Some(acc) if acc.dtype() == xd.dtype() && acc.dims() == xd.dims() => {
                readers.insert(0, (&dq_rows, wq));
                rows(&acc)?.contiguous()?
            }
            other => {
                let dx = dq_rows.matmul(&like(wq, &xd)?)?;
                add_into(dx, other.map(|a| rows(&a)).transpose()?)?
            }
        };
        let dl_rows = d_logits.as_ref().map(rows).transpose()?;
        if let (Some(d), Some(wg)) = (&dl_rows, owned.get(4)) {
            readers.push((d, wg));
        }
        for (d, weight) in readers {
            dx.inplace_op3(
                &d.contiguous()?,
                &like(weight, &xd)?.contiguous()?,
                &AddProduct,
            )?;
        }
        for (d, weight) in [(&dq_rows, wq), (&dk_rows, wk), (&dv_rows, wv)] {
            grads.push(Some(weight_grad(d, &x_rows, weight.dtype())?));
        }
        grads.push(Some(d_wo));
        if let (Some(d), Some(wg)) = (&dl_rows, owned.get(4)) {
            grads.push(Some(weight_grad(d, &x_rows, wg.dtype())?));
        }
        Ok(Grads {
            input: Some(dx.reshape(xd.shape())?),
            weights: grads,
        })
    };
    let weights = weights.into_iter().cloned().collect();
    Ok(Detached {
        y,
        weights,
        backward: Box::new(backward),
    })
}

/// Whether [`attention_sublayer`] takes this input: bf16 on a GPU of a `cuda` build.
pub fn sublayer_fits(x: &Tensor) -> bool {
    cfg!(feature = "cuda") && x.device().is_cuda() && x.dtype() == DType::BF16
}
