//! Causal attention as flash attention (flash.cu): bf16, heads of 64 or 128, on CUDA. Unlike
//! [`super::CausalAttention`], which runs the scores through cuBLAS and writes the
//! (B, H, T, T) scores and probabilities to memory (four times their size a layer, forward
//! and backward), the kernels keep every score tile in registers and skip the key blocks
//! after the queries, so the step's attention costs its causal FLOPs and the read of Q, K, V.
//! Grouped-query heads are read where they are, not widened.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// (Q (B, H, T, hd), K (B, KV, T, hd), V rows (B T, KV hd)), bf16 on a GPU -> rows
/// (B T, H hd).
#[derive(Debug)]
pub struct FlashAttention {
    scale: f64,
    /// The forward pass's log-sum-exp (B, H, T) f32, kept for the backward pass: the one
    /// number per query that lets it recompute the probabilities tile by tile.
    lse: Mutex<Option<Tensor>>,
    /// The kernels, where not the device's fastest (a test's comparison of the two).
    kernels: Option<FlashKernels>,
}

/// Which of flash attention's two sets of kernels runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlashKernels {
    /// flash.cu: mma.sync, on every GPU from sm_80.
    Mma,
    /// flash_sm90.cu: Hopper's warpgroup products (wgmma), on GPUs of compute capability
    /// 9.0 only (their PTX is compute_90a's).
    Wgmma,
}

/// The head dimensions flash.cu has kernels for.
pub const FLASH_HEAD_DIMS: [usize; 2] = [64, 128];

impl FlashAttention {
    pub fn new(scale: f64) -> Self {
        Self {
            scale,
            lse: Mutex::new(None),
            kernels: None,
        }
    }

    /// The same with the given kernels, which the GPU must run (wgmma on compute
    /// capability 9.0 only).
    pub fn with_kernels(scale: f64, kernels: FlashKernels) -> Self {
        Self {
            kernels: Some(kernels),
            ..Self::new(scale)
        }
    }

    /// Whether the kernels take these heads: bf16 on a GPU of a `cuda` build, a head
    /// dimension of [`FLASH_HEAD_DIMS`]. Other cases keep [`super::CausalAttention`].
    pub fn fits(q: &Tensor) -> bool {
        cfg!(feature = "cuda")
            && q.device().is_cuda()
            && q.dtype() == DType::BF16
            && q.dims()
                .last()
                .is_some_and(|hd| FLASH_HEAD_DIMS.contains(hd))
    }
}

/// (b, h, kv, t, hd), checked.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn dims(lq: &Layout, lk: &Layout, lv: &Layout) -> Result<FlashShape> {
    let (b, h, t, hd) = lq.shape().dims4()?;
    let (bk, kv, tk, hdk) = lk.shape().dims4()?;
    let hd_ok = FLASH_HEAD_DIMS.contains(&hd) && hdk == hd;
    if !hd_ok || bk != b || tk != t || kv == 0 || !h.is_multiple_of(kv) {
        bail!(
            "flash attention: Q {:?} and K {:?} are not (B, H, T, hd) and (B, KV, T, hd) with KV dividing H and hd one of {FLASH_HEAD_DIMS:?}",
            lq.dims(),
            lk.dims()
        );
    }
    // V as rows (B T, KV hd) or as (B, T, KV hd): the output takes its leading dimensions.
    if lv.dims().last() != Some(&(kv * hd)) || lv.shape().elem_count() != b * t * kv * hd {
        bail!(
            "flash attention: V {:?}, expected rows [{}, {}] or [{b}, {t}, {}]",
            lv.dims(),
            b * t,
            kv * hd,
            kv * hd
        );
    }
    Ok(FlashShape { b, h, kv, t, hd })
}

/// The sizes [`dims`] checks (the kernels' `FlashDims` under the `cuda` feature).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct FlashShape {
    b: usize,
    h: usize,
    kv: usize,
    t: usize,
    hd: usize,
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("flash attention runs on CUDA only (the CPU uses CausalAttention)")
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
        let FlashShape { b, h, kv, t, hd } = dims(l1, l2, l3)?;
        use candle_core::backend::BackendStorage;
        let kernels = resolve(self.kernels, s1.device())?;
        let d = super::cuda::FlashDims {
            b,
            h,
            kv,
            t,
            hd,
            kernels,
        };
        let (o, lse) = super::cuda::flash_fwd((s1, l1), (s2, l2), (s3, l3), d, self.scale as f32)?;
        let lse = cuda_tensor(lse, (b, h, t));
        *self.lse.lock().expect("the lock is never poisoned") = Some(lse);
        let mut shape = l3.dims().to_vec();
        *shape.last_mut().expect("checked") = h * hd;
        Ok((o, Shape::from(shape)))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(lse) = self.lse.lock().expect("the lock is never poisoned").take() else {
            bail!("flash attention: a backward pass without its forward pass (or a second one)")
        };
        let (dq, dk, dv) = backward(
            [q, k, v, out, &grad.contiguous()?, &lse],
            self.scale,
            self.kernels,
        )?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(feature = "cuda")]
use super::cuda_tensor;

/// The kernels asked for, or else the device's fastest.
#[cfg(feature = "cuda")]
fn resolve(kernels: Option<FlashKernels>, dev: &candle_core::CudaDevice) -> Result<FlashKernels> {
    match kernels {
        Some(k) => Ok(k),
        None => FlashKernels::for_device(dev),
    }
}

/// The three gradients from Q, K, V, the output, its gradient and the log-sum-exp.
#[cfg(feature = "cuda")]
fn backward(
    t: [&Tensor; 6],
    scale: f64,
    kernels: Option<FlashKernels>,
) -> Result<(Tensor, Tensor, Tensor)> {
    use candle_core::backend::BackendStorage;
    use candle_core::Storage;
    let guards = t.map(|x| x.storage_and_layout());
    let mut s = Vec::with_capacity(6);
    for (storage, layout) in &guards {
        let Storage::Cuda(c) = &**storage else {
            bail!("flash attention: a tensor of its backward pass is not on the GPU")
        };
        s.push((c, *layout));
    }
    let FlashShape {
        b,
        h,
        kv,
        t: tok,
        hd,
    } = dims(s[0].1, s[1].1, s[2].1)?;
    let kernels = resolve(kernels, s[0].0.device())?;
    let d = super::cuda::FlashDims {
        b,
        h,
        kv,
        t: tok,
        hd,
        kernels,
    };
    let (dq, dk, dv) = super::cuda::flash_bwd(s[0], s[1], s[2], s[3], s[4], s[5], d, scale as f32)?;
    Ok((
        cuda_tensor(dq, t[0].shape().clone()),
        cuda_tensor(dk, t[1].shape().clone()),
        cuda_tensor(dv, t[2].shape().clone()),
    ))
}

#[cfg(not(feature = "cuda"))]
fn backward(_: [&Tensor; 6], _: f64, _: Option<FlashKernels>) -> Result<(Tensor, Tensor, Tensor)> {
    bail!("flash attention runs on CUDA only")
}
