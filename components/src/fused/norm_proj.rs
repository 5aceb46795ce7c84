//! mHC's coefficient projection (residual/mhc.rs) as DeepSeek's kernels do it: the logits
//! z = rms(x) phi of every token's n C state values, with the row's sum of squares taken
//! beside the product and applied after it, z = r (x phi), r = 1 / sqrt(mean(x^2) + eps).
//! The state is read once in its own dtype. The composite casts the (B T, n C) state to
//! f32, normalizes it and multiplies: three state-sized f32 tensors a sublayer, two of them
//! kept for the backward pass (about 26 GB at the Goedel-1B shape), and as many again in
//! gradients.
//!
//! The op's output is z_ext = [z | r] (N, M + 1): the backward pass needs r and z, and an
//! op has one output; [`norm_proj`] hands the model z alone.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::{cpu_storage, cpu_values, StateGrad};

/// Most logits a token the kernels take (mHC's 2n + n^2 for n up to 6).
pub const NORM_PROJ_MAX_COLS: usize = 64;

/// (x (N, K) f32 or bf16, phi (K, M) f32) -> z_ext (N, M + 1) f32 = [r (x phi) | r].
/// With `acc`, the backward pass adds x's gradient to the state gradient the sublayer's
/// mixing ops left there and hands autograd the sum (see [`StateGrad`]).
#[derive(Clone, Debug)]
pub struct NormProj {
    pub eps: f32,
    pub acc: Option<StateGrad>,
}

/// (x, phi, dzz (N, 2 (M + 1)) = [dz_ext | z_ext]) -> dx (N, K) in x's dtype, plus `add`
/// (x's shape and dtype) where given, and plus the pre-mix's part of the state's gradient
/// where `premix` = (pre (tokens, n) f32, dh (tokens, C) in x's dtype) is given, x holding
/// tokens n C values: pre[t][i] dh[t][ch] at x's flat index (t n + i) C + ch (mix.rs
/// `MixBwd::PreState`, folded into this pass over the state rather than one of its own),
/// whichever rows the projection takes: mHC's of n C, dynamic HC's of C.
#[derive(Clone, Debug, Default)]
pub struct NormProjBwdX {
    pub add: Option<Tensor>,
    pub premix: Option<(Tensor, Tensor)>,
}

/// (x, dzz) -> dphi (K, M) f32.
#[derive(Clone, Copy, Debug)]
pub struct NormProjBwdPhi;

/// z = rms(x) phi over rows of K = phi's rows consecutive values of `x` ((N, K), or any
/// shape whose trailing axes make K: mHC passes its (B, T, n, C) state as it is, rows of
/// n C), f32 whatever x's dtype: (N, M). One op on CUDA, the composite (f32 copy, RMSNorm,
/// matmul) on the CPU. On the GPU the state is not reshaped to rows first: the reshape would
/// be a node whose state-sized gradient candle zero-fills and adds.
///
/// `acc`: the state's gradient shared with the sublayer's mixing ops (CUDA only).
pub fn norm_proj(x: &Tensor, phi: &Tensor, eps: f64, acc: Option<&StateGrad>) -> Result<Tensor> {
    let (k, m) = phi.dims2()?;
    if x.device().is_cuda() && m <= NORM_PROJ_MAX_COLS {
        return norm_proj_ext(x, phi, eps, acc)?.narrow(1, 0, m);
    }
    let rows = x.reshape(((), k))?;
    super::rms_norm(&rows.to_dtype(DType::F32)?, None, eps)?.matmul(&phi.to_dtype(DType::F32)?)
}

/// The op's whole output z_ext = [z | r] (N, M + 1) on any device (M at most
/// [`NORM_PROJ_MAX_COLS`]), for readers that take z from its rows as they are (stream_coef.rs).
pub fn norm_proj_ext(
    x: &Tensor,
    phi: &Tensor,
    eps: f64,
    acc: Option<&StateGrad>,
) -> Result<Tensor> {
    let phi = phi.to_dtype(DType::F32)?.contiguous()?;
    let op = NormProj {
        eps: eps as f32,
        acc: acc.cloned(),
    };
    x.contiguous()?.apply_op2(&phi, op)
}

/// (N, K, M): rows of x, phi's (K, M), checked against each other.
fn dims(lx: &Layout, lphi: &Layout) -> Result<(usize, usize, usize)> {
    let &[k, m] = lphi.dims() else {
        bail!("norm-proj: phi must be (K, M), got {:?}", lphi.dims());
    };
    let (count, last) = (lx.shape().elem_count(), *lx.dims().last().unwrap_or(&0));
    let rows_fit = k > 0 && last > 0 && count % k == 0 && k % last == 0;
    if !rows_fit || m == 0 || m > NORM_PROJ_MAX_COLS {
        bail!(
            "norm-proj: x {:?} is not rows of phi's K for phi {:?} (M at most {NORM_PROJ_MAX_COLS})",
            lx.dims(),
            lphi.dims()
        );
    }
    Ok((count / k, k, m))
}

fn cpu_fwd(x: &[f32], phi: &[f32], n: usize, k: usize, m: usize, eps: f32) -> Vec<f32> {
    let mut z = vec![0f32; n * (m + 1)];
    for t in 0..n {
        let row = &x[t * k..][..k];
        let r = 1.0 / (row.iter().map(|v| v * v).sum::<f32>() / k as f32 + eps).sqrt();
        let out = &mut z[t * (m + 1)..][..m + 1];
        for (c, &v) in row.iter().enumerate() {
            for j in 0..m {
                out[j] += v * phi[c * m + j];
            }
        }
        for o in &mut out[..m] {
            *o *= r;
        }
        out[m] = r;
    }
    z
}

/// Per token: r and -r^2 s / K, s = sum_j dz_j z_j, from dzz.
fn token_coefs(dzz: &[f32], t: usize, k: usize, m: usize) -> (f32, f32) {
    let row = &dzz[t * 2 * (m + 1)..][..2 * (m + 1)];
    let r = row[2 * m + 1];
    let s: f32 = (0..m).map(|j| row[j] * row[m + 1 + j]).sum();
    (r, -r * r * s / k as f32)
}

fn cpu_bwd_x(x: &[f32], phi: &[f32], dzz: &[f32], n: usize, k: usize, m: usize) -> Vec<f32> {
    let mut dx = vec![0f32; n * k];
    for t in 0..n {
        let (r, c1) = token_coefs(dzz, t, k, m);
        let dz = &dzz[t * 2 * (m + 1)..][..m];
        for c in 0..k {
            let p: f32 = (0..m).map(|j| dz[j] * phi[c * m + j]).sum();
            dx[t * k + c] = r * p + c1 * x[t * k + c];
        }
    }
    dx
}

fn cpu_bwd_phi(x: &[f32], dzz: &[f32], n: usize, k: usize, m: usize) -> Vec<f32> {
    let mut dphi = vec![0f32; k * m];
    for t in 0..n {
        let row = &dzz[t * 2 * (m + 1)..][..2 * (m + 1)];
        let r = row[2 * m + 1];
        for c in 0..k {
            let v = x[t * k + c] * r;
            for j in 0..m {
                dphi[c * m + j] += v * row[j];
            }
        }
    }
    dphi
}

impl CustomOp2 for NormProj {
    fn name(&self) -> &'static str {
        "norm-proj"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, k, m) = dims(l1, l2)?;
        let (x, _) = cpu_values(s1, l1, self.name())?;
        let (phi, _) = cpu_values(s2, l2, self.name())?;
        let z = cpu_fwd(&x, &phi, n, k, m, self.eps);
        Ok((CpuStorage::F32(z), Shape::from((n, m + 1))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, k, m) = dims(l1, l2)?;
        let z = super::cuda::norm_proj_fwd(s1, l1, s2, l2, n, k, m, self.eps)?;
        Ok((z, Shape::from((n, m + 1))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        phi: &Tensor,
        z_ext: &Tensor,
        dz_ext: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Upstream of the sublayer's mixing ops, this op's backward pass runs last: it adds
        // their part of the state's gradient and returns the whole.
        let add = self.acc.as_ref().and_then(StateGrad::take);
        let (dx, dphi) =
            norm_proj_backward(x, phi, z_ext, dz_ext, NormProjBwdX { add, premix: None })?;
        Ok((Some(dx), Some(dphi)))
    }
}

/// The normed projection's gradients (dx, dphi) from its input x, phi (f32), its output
/// z_ext and that output's gradient, dx with what `into` adds (see [`NormProjBwdX`]).
pub fn norm_proj_backward(
    x: &Tensor,
    phi: &Tensor,
    z_ext: &Tensor,
    dz_ext: &Tensor,
    into: NormProjBwdX,
) -> Result<(Tensor, Tensor)> {
    // r's own column of dz_ext is zero: only z leaves the op (see `norm_proj`).
    let dzz = Tensor::cat(&[dz_ext, z_ext], 1)?.contiguous()?;
    let dx = x.apply_op3_no_bwd(phi, &dzz, &into)?;
    let dphi = x.apply_op2_no_bwd(&dzz, &NormProjBwdPhi)?;
    Ok((dx, dphi))
}

/// M from dzz (N, 2 (M + 1)), checked against x's N rows.
fn dzz_cols(n: usize, lx: &Layout, ldzz: &Layout) -> Result<usize> {
    match ldzz.dims() {
        &[n2, w] if n == n2 && w >= 4 && w % 2 == 0 => Ok(w / 2 - 1),
        b => bail!("norm-proj backward: x {:?} and dzz {b:?}", lx.dims()),
    }
}

impl CustomOp3 for NormProjBwdX {
    fn name(&self) -> &'static str {
        "norm-proj-bwd-x"
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
        let (n, k, m) = dims(l1, l2)?;
        if dzz_cols(n, l1, l3)? != m {
            bail!("norm-proj backward: dzz {:?} for M = {m}", l3.dims());
        }
        let (x, dtype) = cpu_values(s1, l1, self.name())?;
        let (phi, _) = cpu_values(s2, l2, self.name())?;
        let (dzz, _) = cpu_values(s3, l3, self.name())?;
        let mut dx = cpu_bwd_x(&x, &phi, &dzz, n, k, m);
        if let Some(add) = &self.add {
            check_add(add, l1)?;
            let add = add.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            dx.iter_mut().zip(add).for_each(|(d, a)| *d += a);
        }
        if let Some((pre, dh)) = &self.premix {
            let (ns, cs) = check_premix(pre, dh, n * k)?;
            let values = |t: &Tensor| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>();
            let (pre, dh) = (values(pre)?, values(dh)?);
            for (e, d) in dx.iter_mut().enumerate() {
                *d += pre[e / cs] * dh[e / (ns * cs) * cs + e % cs];
            }
        }
        Ok((cpu_storage(dx, dtype), l1.shape().clone()))
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
        let (n, k, m) = dims(l1, l2)?;
        if dzz_cols(n, l1, l3)? != m {
            bail!("norm-proj backward: dzz {:?} for M = {m}", l3.dims());
        }
        if let Some(add) = &self.add {
            check_add(add, l1)?;
        }
        let (streams, channels) = match &self.premix {
            Some((pre, dh)) => check_premix(pre, dh, n * k)?,
            None => (0, 0),
        };
        // Both checks above require contiguous inputs; the storages below must be the GPU's.
        let given: Vec<&Tensor> = self
            .add
            .iter()
            .chain(self.premix.iter().flat_map(|(p, h)| [p, h]))
            .collect();
        let guards: Vec<_> = given.iter().map(|t| t.storage_and_layout()).collect();
        let mut parts = Vec::with_capacity(3);
        for (storage, layout) in &guards {
            let candle_core::Storage::Cuda(st) = &**storage else {
                bail!("norm-proj backward: an input to add is not on the GPU");
            };
            parts.push((st, *layout));
        }
        let add = self.add.as_ref().map(|_| parts[0]);
        let skip = usize::from(add.is_some());
        let premix = self.premix.as_ref().map(|_| super::cuda::PreMixPart {
            pre: parts[skip],
            dh: parts[skip + 1],
            streams,
            channels,
        });
        let dx = super::cuda::norm_proj_bwd_x(s1, l1, s2, l2, s3, l3, add, premix, n, k, m)?;
        Ok((dx, l1.shape().clone()))
    }
}

/// The pre-mix's part must be pre (tokens, n) f32 and dh (tokens, C), contiguous, for x's
/// `count` = tokens n C values: (n, C).
fn check_premix(pre: &Tensor, dh: &Tensor, count: usize) -> Result<(usize, usize)> {
    let (ns, cs) = (pre.dims().last(), dh.dims().last());
    let (ns, cs) = (ns.copied().unwrap_or(0), cs.copied().unwrap_or(0));
    let fits = ns > 0
        && cs > 0
        && pre.elem_count() * cs == count
        && dh.elem_count() * ns == count
        && pre.dtype() == DType::F32;
    if !fits || !pre.is_contiguous() || !dh.is_contiguous() {
        bail!(
            "norm-proj backward: pre {:?} ({:?}) and dh {:?} are not a pre-mix of {count} values",
            pre.dims(),
            pre.dtype(),
            dh.dims()
        );
    }
    Ok((ns, cs))
}

/// The gradient to add must have x's shape and dtype, contiguous.
fn check_add(add: &Tensor, lx: &Layout) -> Result<()> {
    if add.dims() != lx.dims() || !add.is_contiguous() {
        bail!(
            "norm-proj backward: a gradient {:?} to add to x {:?}",
            add.dims(),
            lx.dims()
        );
    }
    Ok(())
}

/// (N, K, M) of the phi gradient's inputs x (rows of K) and dzz (N, 2 (M + 1)).
fn bwd_phi_dims(lx: &Layout, ldzz: &Layout) -> Result<(usize, usize, usize)> {
    let (n, count) = (*ldzz.dims().first().unwrap_or(&0), lx.shape().elem_count());
    if n == 0 || count % n != 0 {
        bail!(
            "norm-proj backward: x {:?} and dzz {:?}",
            lx.dims(),
            ldzz.dims()
        );
    }
    Ok((n, count / n, dzz_cols(n, lx, ldzz)?))
}

impl CustomOp2 for NormProjBwdPhi {
    fn name(&self) -> &'static str {
        "norm-proj-bwd-phi"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, k, m) = bwd_phi_dims(l1, l2)?;
        let (x, _) = cpu_values(s1, l1, self.name())?;
        let (dzz, _) = cpu_values(s2, l2, self.name())?;
        Ok((
            CpuStorage::F32(cpu_bwd_phi(&x, &dzz, n, k, m)),
            Shape::from((k, m)),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, k, m) = bwd_phi_dims(l1, l2)?;
        let dphi = super::cuda::norm_proj_bwd_phi(s1, l1, s2, l2, n, k, m)?;
        Ok((dphi, Shape::from((k, m))))
    }
}
