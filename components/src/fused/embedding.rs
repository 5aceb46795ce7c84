//! The token embedding lookup with a scatter-add backward. candle's `embedding` backward is
//! `index_add`, whose CUDA kernel walks all B T token ids in one thread per channel (one block
//! for the whole batch); here every (token, channel) is a thread adding atomically.

use candle_core::{bail, CpuStorage, CustomOp2, InplaceOp3, Layout, Result, Shape, Tensor};

use super::{cpu_targets, cpu_values};

/// (V, C) f32 weights and (N,) u32 ids -> (N, C) rows.
#[derive(Clone, Copy, Debug)]
pub struct Embedding;

/// (N, C) f32 gradient of the rows and the (N,) ids -> (vocab, C) gradient of the weights.
#[derive(Clone, Copy, Debug)]
pub struct EmbeddingBwd {
    pub vocab: usize,
}

/// In place on the weights' gradient dw (vocab, C) f32: dw[ids[i]] += rows[i] for the (N, C)
/// f32 gradient of the rows and the (N,) ids. The tied head's gradient and the embedding's
/// meet in one tensor, where the embedding's own gradient was a zero-filled (vocab, C) tensor
/// that candle's gradient store then added to the head's.
#[derive(Clone, Copy, Debug)]
pub struct EmbeddingAdd;

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

impl InplaceOp3 for EmbeddingAdd {
    fn name(&self) -> &'static str {
        "embedding-add"
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
        let (vocab, c) = add_dims(l1, l2, l3)?;
        let (rows, _) = cpu_values(s2, l2, self.name())?;
        let ids = cpu_targets(s3, l3)?;
        check(l3, vocab, &ids)?;
        let CpuStorage::F32(dw) = s1 else {
            bail!("embedding-add: the gradient must be f32");
        };
        let dw = &mut dw[l1.start_offset()..];
        for (r, &i) in ids.iter().enumerate() {
            for j in 0..c {
                dw[i as usize * c + j] += rows[r * c + j];
            }
        }
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
        let (_, c) = add_dims(l1, l2, l3)?;
        let n = l3.shape().elem_count();
        super::cuda::embedding_add((s1, l1), (s2, l2), (s3, l3), n, c)
    }
}

/// (vocab, C) of [`EmbeddingAdd`]'s operands, checked: dw (vocab, C) contiguous, rows (N, C),
/// ids (N,).
fn add_dims(ldw: &Layout, lrows: &Layout, lids: &Layout) -> Result<(usize, usize)> {
    let (vocab, c) = ldw.shape().dims2()?;
    let (n, rc) = lrows.shape().dims2()?;
    if rc != c || lids.dims() != [n] || !ldw.is_contiguous() {
        bail!(
            "embedding-add: dw {:?}, rows {:?}, ids {:?} do not fit",
            ldw.dims(),
            lrows.dims(),
            lids.dims()
        );
    }
    Ok((vocab, c))
}
