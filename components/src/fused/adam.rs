//! AdamW's update in place. On CUDA one launch updates every parameter of the model
//! ([`adam_step`], fused.cu `adam_multi`): each weight, its two moments and its gradient are
//! read once and the three written once, with clipping's factor applied to the gradient as it
//! is read. Per parameter, three in-place ops (the two moments, then the weight:
//! [`AdamUpdate`]) do the same arithmetic; they are the CPU's reference for the kernel. As a
//! composite the update is some fifteen kernels and as many new tensors a parameter, and the
//! clipping a pass of its own over every gradient.

use candle_core::{bail, CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};

use super::{cpu_f32s, cpu_f32s_mut};

/// One in-place update of an f32 tensor (see fused.cu `adam_update`):
/// `FirstMoment`: m = p0 m + p1 g; `SecondMoment`: v = p0 v + p1 g^2;
/// `Weight`: w = p0 w - p1 (m / p2) / (sqrt(v / p3) + p4).
#[derive(Clone, Copy, Debug)]
pub struct AdamUpdate {
    pub what: AdamPart,
    pub p: [f32; 5],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdamPart {
    FirstMoment = 0,
    SecondMoment = 1,
    Weight = 2,
}

impl AdamUpdate {
    fn cpu(&self, dst: &mut [f32], a: &[f32], b: Option<&[f32]>) {
        let p = self.p;
        for (i, d) in dst.iter_mut().enumerate() {
            *d = match (self.what, b) {
                (AdamPart::FirstMoment, _) => p[0] * *d + p[1] * a[i],
                (AdamPart::SecondMoment, _) => p[0] * *d + p[1] * a[i] * a[i],
                (AdamPart::Weight, Some(b)) => {
                    p[0] * *d - p[1] * (a[i] / p[2]) / ((b[i] / p[3]).sqrt() + p[4])
                }
                (AdamPart::Weight, None) => unreachable!("checked by the caller"),
            };
        }
    }
}

impl InplaceOp2 for AdamUpdate {
    fn name(&self) -> &'static str {
        "adam-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        if self.what == AdamPart::Weight {
            bail!("the weight update takes both moments");
        }
        let a = cpu_f32s(s2, l2, "adam update")?.to_vec();
        self.cpu(cpu_f32s_mut(s1, l1, "adam update")?, &a, None);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        if self.what == AdamPart::Weight {
            bail!("the weight update takes both moments");
        }
        super::cuda::adam_update(s1, l1, (s2, l2), None, self.what as i32, self.p)
    }
}

impl InplaceOp3 for AdamUpdate {
    fn name(&self) -> &'static str {
        "adam-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let (a, b) = (
            cpu_f32s(s2, l2, "adam update")?.to_vec(),
            cpu_f32s(s3, l3, "adam update")?.to_vec(),
        );
        self.cpu(cpu_f32s_mut(s1, l1, "adam update")?, &a, Some(&b));
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        super::cuda::adam_update(s1, l1, (s2, l2), Some((s3, l3)), self.what as i32, self.p)
    }
}

/// One AdamW step's numbers, as [`adam_step`] applies them: m = b1 m + (1 - b1) s g,
/// v = b2 v + (1 - b2) (s g)^2, w = d w - lr (m / bias1) / (sqrt(v / bias2) + eps), with
/// s = `grad_scale` (clipping's factor) and d = `decay` for the parameters that decay, 1
/// for the others.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    pub beta1: f32,
    pub beta2: f32,
    pub lr: f32,
    pub bias1: f32,
    pub bias2: f32,
    pub eps: f32,
    pub decay: f32,
    pub grad_scale: f32,
}

/// One parameter of [`adam_step`]: its weight and moments (f32, contiguous, updated in
/// place), its gradient (f32) and whether it decays.
pub struct AdamSlot<'a> {
    pub w: &'a Tensor,
    pub m: &'a Tensor,
    pub v: &'a Tensor,
    pub g: &'a Tensor,
    pub decays: bool,
}

/// The AdamW update of every slot in place. On CUDA, with every tensor f32 on one device,
/// one launch for all of them (cuda.rs `adam_multi`); otherwise, per slot, the gradient
/// scaled and the three [`AdamUpdate`] ops, the same arithmetic.
pub fn adam_step(slots: &[AdamSlot], h: &AdamStep) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Some(first) = slots.first() {
        let all_f32_here = slots.iter().all(|s| {
            [s.w, s.m, s.v, s.g].iter().all(|t| {
                t.device().same_device(first.w.device()) && t.dtype() == candle_core::DType::F32
            })
        });
        if first.w.device().is_cuda() && all_f32_here {
            return multi_on_cuda(slots, h);
        }
    }
    for s in slots {
        let g = match h.grad_scale {
            1.0 => s.g.contiguous()?,
            f => (s.g * f as f64)?.contiguous()?,
        };
        let part = |what, p| AdamUpdate { what, p };
        let (b1, b2) = (h.beta1, h.beta2);
        s.m.inplace_op2(
            &g,
            &part(AdamPart::FirstMoment, [b1, 1.0 - b1, 0.0, 0.0, 0.0]),
        )?;
        s.v.inplace_op2(
            &g,
            &part(AdamPart::SecondMoment, [b2, 1.0 - b2, 0.0, 0.0, 0.0]),
        )?;
        let decay = if s.decays { h.decay } else { 1.0 };
        let p = [decay, h.lr, h.bias1, h.bias2, h.eps];
        s.w.inplace_op3(s.m, s.v, &part(AdamPart::Weight, p))?;
    }
    Ok(())
}

/// [`adam_step`] on CUDA: the slots' storages, held for the launch, and their pointers.
#[cfg(feature = "cuda")]
fn multi_on_cuda(slots: &[AdamSlot], h: &AdamStep) -> Result<()> {
    use candle_core::Storage;
    let gradients: Vec<Tensor> = slots
        .iter()
        .map(|s| s.g.contiguous())
        .collect::<Result<_>>()?;
    let mut guards = Vec::with_capacity(4 * slots.len());
    for (s, g) in slots.iter().zip(&gradients) {
        for t in [s.w, s.m, s.v, g] {
            guards.push(t.storage_and_layout());
        }
    }
    let mut parts = Vec::with_capacity(slots.len());
    for (four, s) in guards.chunks(4).zip(slots) {
        let mut p = Vec::with_capacity(4);
        for (storage, layout) in four {
            let Storage::Cuda(c) = &**storage else {
                bail!("adam step: a tensor on a GPU without GPU storage");
            };
            p.push((c, *layout));
        }
        parts.push(super::cuda::AdamParts {
            w: p[0],
            m: p[1],
            v: p[2],
            g: p[3],
            decays: s.decays,
        });
    }
    super::cuda::adam_multi(&parts, h)
}
