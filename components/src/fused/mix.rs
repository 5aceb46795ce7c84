//! The multi-stream residual's mixing around a sublayer (residual/mod.rs `connect`), per token
//! with n streams of C channels: h = sum_i pre_i s_i before the sublayer, and
//! y_j = sum_i res_ji s_i + post_j out after it. As batched n x n matrix products these are
//! B T tiny GEMMs each (and their gradients as many more); here one pass over the state each.
//! Coefficients are f32; the state and the sublayer's output are in the compute dtype.

#[cfg(feature = "cuda")]
use candle_core::backend::BackendStorage;
use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::{cpu_storage, cpu_values};

/// Most streams the kernels take (they keep a token's n values in registers).
pub const MAX_STREAMS: usize = 8;

/// The gradient of a sublayer's n-stream state, which three ops read: the post-mix (its
/// carried part), the pre-mix and the coefficients' normed projection (norm_proj.rs). Left
/// to autograd, each op's state-sized part is zero-filled and added by candle's gradient
/// store; shared through this cell, the post-mix leaves its part here, the pre-mix adds its
/// own in its kernel, and the projection adds the last and returns the sum, once. Their
/// backward passes run in that order: the post-mix's output is downstream of the pre-mix's
/// (through the sublayer), and both read the projection's coefficients. The projection must
/// therefore be in the graph whenever the cell is used (mHC's and Hc dynamic's coefficients).
#[derive(Clone, Debug, Default)]
pub struct StateGrad(Arc<Mutex<Option<Tensor>>>);

impl StateGrad {
    pub fn put(&self, grad: Tensor) {
        *self.0.lock().expect("the lock is never poisoned") = Some(grad);
    }

    pub(super) fn take(&self) -> Option<Tensor> {
        self.0.lock().expect("the lock is never poisoned").take()
    }
}

/// (state (.., n, C), pre (.., n) f32) -> h (.., C). With `acc`, the state's gradient goes
/// to the cell (see [`StateGrad`]).
#[derive(Clone, Debug, Default)]
pub struct PreMix {
    pub acc: Option<StateGrad>,
}

/// (state (.., n, C), coef (.., n, n + 1) f32 = [res | post], out (.., C)) -> (.., n, C).
/// With `acc`, the state's gradient goes to the cell (see [`StateGrad`]).
#[derive(Clone, Debug, Default)]
pub struct PostMix {
    pub acc: Option<StateGrad>,
}

/// The backward pieces, each one output: see `bwd` of the two ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MixBwd {
    /// (pre, dh) -> dstate.
    PreState,
    /// (pre, dh, add) -> add + dstate.
    PreStateAdd,
    /// (state, dh) -> dpre (f32).
    PrePre,
    /// (coef, dy) -> [dstate | dout], flat: every token's dstate (.., n, C), then every
    /// token's dout (.., C), so that each is a contiguous piece (a strided view's gradient
    /// costs candle's gradient store a strided add, five times a contiguous one here).
    PostStateOut,
    /// (state, out, dy) -> dcoef (.., n, n + 1) f32.
    PostCoef,
}

/// (tokens, n, c) of a state layout.
pub(super) fn state_dims(l: &Layout) -> Result<(usize, usize, usize)> {
    let d = l.dims();
    if d.len() < 2 {
        bail!("stream mixing: the state needs (.., n, C), got {d:?}");
    }
    let (n, c) = (d[d.len() - 2], d[d.len() - 1]);
    if n == 0 || n > MAX_STREAMS || c == 0 {
        bail!("stream mixing: {n} streams of {c} channels (at most {MAX_STREAMS} streams)");
    }
    Ok((l.shape().elem_count() / (n * c), n, c))
}

fn with_last(l: &Layout, drop: usize, add: &[usize]) -> Shape {
    let d = l.dims();
    let mut v = d[..d.len() - drop].to_vec();
    v.extend_from_slice(add);
    Shape::from(v)
}

impl CustomOp2 for PreMix {
    fn name(&self) -> &'static str {
        "pre-mix"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (tokens, n, c) = state_dims(l1)?;
        let (s, dtype) = cpu_values(s1, l1, self.name())?;
        let (pre, _) = cpu_values(s2, l2, self.name())?;
        let mut h = vec![0f32; tokens * c];
        for t in 0..tokens {
            for i in 0..n {
                for ch in 0..c {
                    h[t * c + ch] += pre[t * n + i] * s[(t * n + i) * c + ch];
                }
            }
        }
        Ok((cpu_storage(h, dtype), with_last(l1, 2, &[c])))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::MixArg::{F32, T};
        let (tokens, n, c) = state_dims(l1)?;
        let out = super::cuda::mix(
            "premix_fwd",
            s1.dtype(),
            &[T(s1, l1), F32(s2, l2)],
            tokens,
            tokens * c,
            false,
            n,
            c,
        )?;
        Ok((out, with_last(l1, 2, &[c])))
    }

    fn bwd(
        &self,
        s: &Tensor,
        pre: &Tensor,
        _res: &Tensor,
        dh: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dh = dh.contiguous()?;
        let ds = match self.acc.as_ref().and_then(StateGrad::take) {
            Some(add) => pre.apply_op3_no_bwd(&dh, &add, &MixBwd::PreStateAdd)?,
            None => pre.apply_op2_no_bwd(&dh, &MixBwd::PreState)?,
        };
        let dpre = s.apply_op2_no_bwd(&dh, &MixBwd::PrePre)?;
        match &self.acc {
            Some(acc) => {
                acc.put(ds);
                Ok((None, Some(dpre)))
            }
            None => Ok((Some(ds), Some(dpre))),
        }
    }
}

impl CustomOp3 for PostMix {
    fn name(&self) -> &'static str {
        "post-mix"
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
        let (tokens, n, c) = state_dims(l1)?;
        let (s, dtype) = cpu_values(s1, l1, self.name())?;
        let (k, _) = cpu_values(s2, l2, self.name())?;
        let (out, _) = cpu_values(s3, l3, self.name())?;
        let m = n + 1;
        let mut y = vec![0f32; s.len()];
        for t in 0..tokens {
            for j in 0..n {
                for ch in 0..c {
                    let mut acc = k[(t * n + j) * m + n] * out[t * c + ch];
                    for i in 0..n {
                        acc += k[(t * n + j) * m + i] * s[(t * n + i) * c + ch];
                    }
                    y[(t * n + j) * c + ch] = acc;
                }
            }
        }
        Ok((cpu_storage(y, dtype), l1.shape().clone()))
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
        use super::cuda::MixArg::{F32, T};
        let (tokens, n, c) = state_dims(l1)?;
        let args = [T(s1, l1), F32(s2, l2), T(s3, l3)];
        let out = super::cuda::mix(
            "postmix_fwd",
            s1.dtype(),
            &args,
            tokens,
            tokens * n * c,
            false,
            n,
            c,
        )?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        s: &Tensor,
        coef: &Tensor,
        out: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (ds, dcoef, dout) = post_mix_backward(s, coef, out, dy)?;
        match &self.acc {
            Some(acc) => {
                acc.put(ds);
                Ok((None, Some(dcoef), Some(dout)))
            }
            None => Ok((Some(ds), Some(dcoef), Some(dout))),
        }
    }
}

/// The post-mix's gradients (ds, dcoef, dout) from the state, coef, the sublayer's output and
/// dy. On CUDA one kernel reads dy once for all three; elsewhere (and as its reference) the
/// two ops, `PostStateOut` for ds and dout and `PostCoef` for dcoef.
pub(crate) fn post_mix_backward(
    s: &Tensor,
    coef: &Tensor,
    out: &Tensor,
    dy: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dy = dy.contiguous()?;
    let split = s.elem_count();
    #[cfg(feature = "cuda")]
    if s.device().is_cuda() {
        let (tokens, n, c) = state_dims(s.layout())?;
        let coef_shape = with_last(s.layout(), 1, &[n + 1]);
        if dy.dims() != s.dims() || out.elem_count() != tokens * c || coef.shape() != &coef_shape {
            bail!(
                "post-mix backward: state {:?}, coef {:?}, out {:?}, dy {:?}",
                s.dims(),
                coef.dims(),
                out.dims(),
                dy.dims()
            );
        }
        let (coef_c, s_c, out_c) = (coef.contiguous()?, s.contiguous()?, out.contiguous()?);
        let guards = [&coef_c, &s_c, &out_c, &dy].map(|t| t.storage_and_layout());
        let mut parts = Vec::with_capacity(4);
        for (storage, layout) in &guards {
            let candle_core::Storage::Cuda(st) = &**storage else {
                bail!("post-mix backward: an input is not on the GPU");
            };
            parts.push((st, *layout));
        }
        let (g, dcoef) =
            super::cuda::postmix_bwd_all([parts[0], parts[1], parts[2], parts[3]], tokens, n, c)?;
        let g = super::cuda_tensor(g, tokens * (n + 1) * c);
        return Ok((
            g.narrow(0, 0, split)?.reshape(s.shape())?,
            super::cuda_tensor(dcoef, coef.shape().clone()),
            g.narrow(0, split, out.elem_count())?.reshape(out.shape())?,
        ));
    }
    let g = coef.apply_op2_no_bwd(&dy, &MixBwd::PostStateOut)?;
    let ds = g.narrow(0, 0, split)?.reshape(s.shape())?;
    let dout = g.narrow(0, split, out.elem_count())?.reshape(out.shape())?;
    let dcoef = s.apply_op3_no_bwd(out, &dy, &MixBwd::PostCoef)?;
    Ok((ds, dcoef, dout))
}

impl MixBwd {
    /// The kernel's name (fused.cu), also the op's.
    fn kernel(self) -> &'static str {
        match self {
            MixBwd::PreState => "premix_bwd_s",
            MixBwd::PreStateAdd => "premix_bwd_sa",
            MixBwd::PrePre => "premix_bwd_pre",
            MixBwd::PostStateOut => "postmix_bwd_g",
            MixBwd::PostCoef => "postmix_bwd_coef",
        }
    }
}

/// (tokens, n, c) from the shapes of the backward's first two inputs.
fn bwd_dims(op: MixBwd, l1: &Layout, l2: &Layout) -> Result<(usize, usize, usize)> {
    match op {
        // (pre (.., n), dh (.., C)) and (coef (.., n, n+1), dy (.., n, C)).
        MixBwd::PreState | MixBwd::PreStateAdd => {
            let n = *l1.dims().last().unwrap_or(&0);
            let c = *l2.dims().last().unwrap_or(&0);
            Ok((l2.shape().elem_count() / c.max(1), n, c))
        }
        MixBwd::PostStateOut => state_dims(l2),
        // (state (.., n, C), ..).
        MixBwd::PrePre | MixBwd::PostCoef => state_dims(l1),
    }
}

impl CustomOp2 for MixBwd {
    fn name(&self) -> &'static str {
        self.kernel()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (tokens, n, c) = bwd_dims(*self, l1, l2)?;
        let (a, _) = cpu_values(s1, l1, self.kernel())?;
        let (d, dtype) = cpu_values(s2, l2, self.kernel())?;
        Ok(match self {
            MixBwd::PreState => {
                let mut ds = vec![0f32; tokens * n * c];
                for t in 0..tokens {
                    for i in 0..n {
                        for ch in 0..c {
                            ds[(t * n + i) * c + ch] = a[t * n + i] * d[t * c + ch];
                        }
                    }
                }
                let mut shape = l2.dims().to_vec();
                shape.insert(shape.len() - 1, n);
                (cpu_storage(ds, dtype), Shape::from(shape))
            }
            MixBwd::PrePre => {
                let mut dpre = vec![0f32; tokens * n];
                for t in 0..tokens {
                    for i in 0..n {
                        for ch in 0..c {
                            dpre[t * n + i] += a[(t * n + i) * c + ch] * d[t * c + ch];
                        }
                    }
                }
                (CpuStorage::F32(dpre), with_last(l1, 1, &[]))
            }
            MixBwd::PostStateOut => {
                let m = n + 1;
                let mut g = vec![0f32; tokens * m * c];
                let (ds, dout) = g.split_at_mut(tokens * n * c);
                for t in 0..tokens {
                    for i in 0..m {
                        let row = match i < n {
                            true => &mut ds[(t * n + i) * c..][..c],
                            false => &mut dout[t * c..][..c],
                        };
                        for j in 0..n {
                            for ch in 0..c {
                                row[ch] += a[(t * n + j) * m + i] * d[(t * n + j) * c + ch];
                            }
                        }
                    }
                }
                (cpu_storage(g, dtype), Shape::from(tokens * m * c))
            }
            MixBwd::PostCoef | MixBwd::PreStateAdd => {
                bail!("{} takes three inputs", self.kernel())
            }
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::MixArg::{F32, T};
        let (tokens, n, c) = bwd_dims(*self, l1, l2)?;
        let name = self.kernel();
        Ok(match self {
            MixBwd::PreState => {
                let mut shape = l2.dims().to_vec();
                shape.insert(shape.len() - 1, n);
                let args = [F32(s1, l1), T(s2, l2)];
                let out =
                    super::cuda::mix(name, s2.dtype(), &args, tokens, tokens * n * c, false, n, c)?;
                (out, Shape::from(shape))
            }
            MixBwd::PrePre => {
                let args = [T(s1, l1), T(s2, l2)];
                let out =
                    super::cuda::mix(name, s1.dtype(), &args, tokens, tokens * n, true, n, c)?;
                (out, with_last(l1, 1, &[]))
            }
            MixBwd::PostStateOut => {
                let args = [F32(s1, l1), T(s2, l2)];
                let out = super::cuda::mix(
                    name,
                    s2.dtype(),
                    &args,
                    tokens,
                    tokens * (n + 1) * c,
                    false,
                    n,
                    c,
                )?;
                (out, Shape::from(tokens * (n + 1) * c))
            }
            MixBwd::PostCoef | MixBwd::PreStateAdd => {
                bail!("{} takes three inputs", self.kernel())
            }
        })
    }
}

impl CustomOp3 for MixBwd {
    fn name(&self) -> &'static str {
        self.kernel()
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
        if *self == MixBwd::PreStateAdd {
            // add + pre (x) dh, in the state's shape: the two-input op's ds, then the sum.
            let (ds, shape) = CustomOp2::cpu_fwd(&MixBwd::PreState, s1, l1, s2, l2)?;
            let (ds, dtype) = cpu_values(&ds, &Layout::contiguous(&shape), self.kernel())?;
            let (add, _) = cpu_values(s3, l3, self.kernel())?;
            if add.len() != ds.len() {
                bail!(
                    "{}: {:?} to add to {:?}",
                    self.kernel(),
                    l3.dims(),
                    shape.dims()
                );
            }
            let sum = ds.iter().zip(&add).map(|(a, b)| a + b).collect();
            return Ok((cpu_storage(sum, dtype), shape));
        }
        if *self != MixBwd::PostCoef {
            bail!("{} takes two inputs", self.kernel());
        }
        let (tokens, n, c) = state_dims(l1)?;
        let (s, _) = cpu_values(s1, l1, self.kernel())?;
        let (out, _) = cpu_values(s2, l2, self.kernel())?;
        let (dy, _) = cpu_values(s3, l3, self.kernel())?;
        let m = n + 1;
        let mut dk = vec![0f32; tokens * n * m];
        for t in 0..tokens {
            for j in 0..n {
                for ch in 0..c {
                    let d = dy[(t * n + j) * c + ch];
                    for i in 0..n {
                        dk[(t * n + j) * m + i] += d * s[(t * n + i) * c + ch];
                    }
                    dk[(t * n + j) * m + n] += d * out[t * c + ch];
                }
            }
        }
        Ok((CpuStorage::F32(dk), with_last(l1, 1, &[m])))
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
        use super::cuda::MixArg::{F32, T};
        if *self == MixBwd::PreStateAdd {
            let (tokens, n, c) = bwd_dims(*self, l1, l2)?;
            if l3.shape().elem_count() != tokens * n * c {
                bail!(
                    "{}: {:?} to add for {tokens} x {n} x {c}",
                    self.kernel(),
                    l3.dims()
                );
            }
            let mut shape = l2.dims().to_vec();
            shape.insert(shape.len() - 1, n);
            let args = [F32(s1, l1), T(s2, l2), T(s3, l3)];
            let dtype = s2.dtype();
            let out = super::cuda::mix(
                self.kernel(),
                dtype,
                &args,
                tokens,
                tokens * n * c,
                false,
                n,
                c,
            )?;
            return Ok((out, Shape::from(shape)));
        }
        if *self != MixBwd::PostCoef {
            bail!("{} takes two inputs", self.kernel());
        }
        let (tokens, n, c) = state_dims(l1)?;
        let args = [T(s1, l1), T(s2, l2), T(s3, l3)];
        let out = super::cuda::mix(
            self.kernel(),
            s1.dtype(),
            &args,
            tokens,
            tokens * n * (n + 1),
            true,
            n,
            c,
        )?;
        Ok((out, with_last(l1, 1, &[n + 1])))
    }
}
