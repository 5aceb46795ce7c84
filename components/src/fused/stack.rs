//! Two f32 weights stacked along their first axis and cast to bf16 in one pass: SwiGLU's gate
//! and up projections as the one (2 H, C) matrix of its GEMM (mlp.rs). Two casts and a
//! concatenation wrote the bf16 stack twice and read it once more: 137 us a layer at the 1B
//! shape, where the one pass takes 35.

use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use super::{cpu_storage, cpu_values};

/// (a (Ra, C) f32, b (Rb, C) f32) -> [a; b] (Ra + Rb, C) bf16.
#[derive(Clone, Copy, Debug)]
pub struct StackCast;

/// The stack's shape, checked.
fn stacked(la: &Layout, lb: &Layout) -> Result<Shape> {
    let (da, db) = (la.dims(), lb.dims());
    if da.len() != 2 || db.len() != 2 || da[1] != db[1] {
        bail!("stack-cast: {da:?} and {db:?} do not stack");
    }
    Ok(Shape::from((da[0] + db[0], da[1])))
}

impl CustomOp2 for StackCast {
    fn name(&self) -> &'static str {
        "stack-cast"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = stacked(l1, l2)?;
        let (mut a, _) = cpu_values(s1, l1, self.name())?;
        let (b, _) = cpu_values(s2, l2, self.name())?;
        a.extend(b);
        Ok((cpu_storage(a, DType::BF16), shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let shape = stacked(l1, l2)?;
        if s1.dtype() != DType::F32 || s2.dtype() != DType::F32 {
            bail!(
                "stack-cast: f32 weights, got {:?} and {:?}",
                s1.dtype(),
                s2.dtype()
            );
        }
        Ok((super::cuda::stack_cast(s1, l1, s2, l2)?, shape))
    }
}

/// [a; b] in `dtype`, outside the graph: the op for f32 weights going to bf16, a
/// concatenation of casts otherwise.
pub fn stack_as(a: &Tensor, b: &Tensor, dtype: DType) -> Result<Tensor> {
    if dtype == DType::BF16 && a.dtype() == DType::F32 && b.dtype() == DType::F32 {
        return a
            .contiguous()?
            .apply_op2_no_bwd(&b.contiguous()?, &StackCast);
    }
    Tensor::cat(
        &[&a.detach().to_dtype(dtype)?, &b.detach().to_dtype(dtype)?],
        0,
    )
}
