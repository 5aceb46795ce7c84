//! Gated attention's gate, y sigmoid(g), as one kernel each way. As a composite (sigmoid as
//! 0.5 (1 + tanh(g / 2)), then the product) it is four kernels forward and some fifteen
//! backward over the (B T, C) attention output, each backward node's gradient zero-filled and
//! added by candle's gradient store.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::{cpu_storage, cpu_values};

/// (y (.., C), g (.., C / group)) -> y sigmoid(g) (.., C): each gate logit scales `group`
/// consecutive values of y (1: elementwise; a head's width: headwise). Both in one dtype.
#[derive(Clone, Copy, Debug)]
pub struct SigmoidGate;

/// (y, g, dout) -> [dy | dg], flat: dy (.., C) then dg (.., C / group), each a contiguous
/// piece.
#[derive(Clone, Copy, Debug)]
pub struct SigmoidGateBwd;

/// (gates, group): the number of gate logits and the values each one scales, checked.
fn dims(ly: &Layout, lg: &Layout) -> Result<(usize, usize)> {
    let (n, gates) = (ly.shape().elem_count(), lg.shape().elem_count());
    let (dy, dg) = (ly.dims(), lg.dims());
    let lead = |d: &[usize]| d[..d.len().saturating_sub(1)].to_vec();
    if gates == 0 || n % gates != 0 || dy.len() != dg.len() || lead(dy) != lead(dg) {
        bail!("sigmoid gate: values {dy:?} and gate logits {dg:?} do not fit");
    }
    Ok((gates, n / gates))
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl CustomOp2 for SigmoidGate {
    fn name(&self) -> &'static str {
        "sigmoid-gate"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, group) = dims(l1, l2)?;
        let (y, dtype) = cpu_values(s1, l1, self.name())?;
        let (g, _) = cpu_values(s2, l2, self.name())?;
        let out = y
            .iter()
            .enumerate()
            .map(|(i, &v)| v * sigmoid(g[i / group]))
            .collect();
        Ok((cpu_storage(out, dtype), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (gates, group) = dims(l1, l2)?;
        let out = super::cuda::sigmoid_gate((s1, l1), (s2, l2), None, gates, group)?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        g: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = y.apply_op3_no_bwd(g, &grad.contiguous()?, &SigmoidGateBwd)?;
        let dy = both.narrow(0, 0, y.elem_count())?.reshape(y.shape())?;
        let dg = both
            .narrow(0, y.elem_count(), g.elem_count())?
            .reshape(g.shape())?;
        Ok((Some(dy), Some(dg)))
    }
}

impl CustomOp3 for SigmoidGateBwd {
    fn name(&self) -> &'static str {
        "sigmoid-gate-bwd"
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
        let (gates, group) = dims(l1, l2)?;
        let (y, dtype) = cpu_values(s1, l1, self.name())?;
        let (g, _) = cpu_values(s2, l2, self.name())?;
        let (d, _) = cpu_values(s3, l3, self.name())?;
        let n = gates * group;
        let mut out = vec![0f32; n + gates];
        let (dy, dg) = out.split_at_mut(n);
        for k in 0..gates {
            // d(y s)/dg = y s (1 - s), summed over the values the gate scales.
            let s = sigmoid(g[k]);
            let mut acc = 0.0;
            for i in k * group..(k + 1) * group {
                dy[i] = d[i] * s;
                acc += d[i] * y[i];
            }
            dg[k] = acc * s * (1.0 - s);
        }
        Ok((cpu_storage(out, dtype), Shape::from(n + gates)))
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
        let (gates, group) = dims(l1, l2)?;
        let out = super::cuda::sigmoid_gate((s1, l1), (s2, l2), Some((s3, l3)), gates, group)?;
        Ok((out, Shape::from(gates * group + gates)))
    }
}
