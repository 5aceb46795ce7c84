//! AdamW's update in place: three kernels a parameter (the two moments, then the weight)
//! instead of about fifteen and as many new tensors. The optimizer steps every parameter
//! tensor of the model each step, so on the GPU its cost is mostly launches.

use candle_core::{bail, CpuStorage, InplaceOp2, InplaceOp3, Layout, Result};

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
