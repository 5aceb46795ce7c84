//! The token embedding lookup with a scatter-add backward. candle's `embedding` backward is
//! `index_add`, whose CUDA kernel walks all B T token ids in one thread per channel (one block
//! for the whole batch); here every (token, channel) is a thread adding atomically.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::{cpu_targets, cpu_values};

/// (V, C) f32 weights and (N,) u32 ids -> (N, C) rows.
#[derive(Clone, Copy, Debug)]
pub struct Embedding;

/// (N, C) f32 gradient of the rows and the (N,) ids -> (vocab, C) gradient of the weights.
#[derive(Clone, Copy, Debug)]
pub struct EmbeddingBwd {
    pub vocab: usize,
}

fn check(l_ids: &Layout, vocab: usize, ids: &[u32]) -> Result<()> {
    if l_ids.dims().len() != 1 {
        bail!("embedding: ids must be 1-D, got {:?}", l_ids.dims());
    }
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        bail!("embedding: id {bad} outside the vocabulary of {vocab}");
    }
    Ok(())
}

impl CustomOp2 for Embedding {
    fn name(&self) -> &'static str {
        "embedding"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (w, _) = cpu_values(s1, l1, self.name())?;
        let (vocab, c) = l1.shape().dims2()?;
        let ids = cpu_targets(s2, l2)?;
        check(l2, vocab, &ids)?;
        let out = ids
            .iter()
            .flat_map(|&i| w[i as usize * c..][..c].iter().copied())
            .collect();
        Ok((CpuStorage::F32(out), Shape::from((ids.len(), c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (_, c) = l1.shape().dims2()?;
        let n = l2.shape().elem_count();
        Ok((
            super::cuda::embedding_fwd(s1, l1, s2, l2, n, c)?,
            Shape::from((n, c)),
        ))
    }

    fn bwd(
        &self,
        w: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let op = EmbeddingBwd { vocab: w.dim(0)? };
        let dw = grad.contiguous()?.apply_op2_no_bwd(ids, &op)?;
        Ok((Some(dw), None))
    }
}

impl CustomOp2 for EmbeddingBwd {
    fn name(&self) -> &'static str {
        "embedding-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (dout, _) = cpu_values(s1, l1, self.name())?;
        let (n, c) = l1.shape().dims2()?;
        let ids = cpu_targets(s2, l2)?;
        check(l2, self.vocab, &ids)?;
        let mut dw = vec![0f32; self.vocab * c];
        for (r, &i) in ids.iter().enumerate().take(n) {
            for j in 0..c {
                dw[i as usize * c + j] += dout[r * c + j];
            }
        }
        Ok((CpuStorage::F32(dw), Shape::from((self.vocab, c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, c) = l1.shape().dims2()?;
        Ok((
            super::cuda::embedding_bwd(s1, l1, s2, l2, n, c, self.vocab)?,
            Shape::from((self.vocab, c)),
        ))
    }
}
