//! A step's forward and backward passes captured once as a CUDA graph and replayed
//! (`train.graph: Step`).
//!
//! At the widths most sweeps run at (d_model 384, 6 layers) a step is a few milliseconds of
//! GPU work in about a thousand launches, and the host takes longer to issue them than the
//! GPU takes to run them: candle's bookkeeping, the allocation and the launch of each op
//! leave the device idle between kernels. Replayed, the whole pass is one launch whose
//! kernels the GPU runs back to back.
//!
//! The graph holds the model's `loss` and `gradients` on input buffers of its own and ends
//! by copying the loss and every gradient into buffers that outlive it; everything else it
//! allocates it frees again, so it can be launched once per step. The optimizer then runs
//! eagerly on those gradients, as it does without a graph: its scalars (the learning rate,
//! clipping's factor, the bias corrections) change every step and are kernel arguments.
//! The weights are read where they are, so a replay sees the optimizer's in-place updates.
//! The kernels and their order are the eager pass's, so the numbers are its numbers.
//!
//! candle uploads small host vectors (the dims and strides of a strided op) at each launch,
//! which a capture cannot hold; the warm-up pass before the capture runs under candle's
//! upload cache, where the capture then finds every vector.

use candle_core::{backprop::GradStore, bail, Result, Tensor};

use crate::model::Gpt;

/// The captured pass and the buffers it reads and writes.
pub struct Replay {
    #[cfg(feature = "cuda")]
    graph: candle_core::cuda_backend::cudarc::driver::CudaGraph,
    /// The batch's inputs and targets, copied in before each launch.
    x: Tensor,
    y: Tensor,
    /// The mean loss, (1,) f32.
    loss: Tensor,
    /// Every parameter's gradient, written by each launch.
    grads: GradStore,
}

impl Replay {
    /// Captures `model`'s forward and backward passes on batches shaped as `x` and `y`,
    /// after an eager warm-up pass (whose result is dropped). An error leaves the model as
    /// it was, and eager steps run on.
    pub fn capture(model: &Gpt, x: &Tensor, y: &Tensor) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if let candle_core::Device::Cuda(dev) = x.device() {
            return cuda::capture(dev, model, x, y);
        }
        let _ = (model, y);
        bail!(
            "train.graph: Step captures CUDA graphs; the trial runs on {:?} (set train.graph: Off)",
            x.device()
        )
    }

    /// One pass on the batch (x, y): its mean loss, (1,) f32, and the gradients. Both are
    /// the graph's buffers, overwritten by the next call.
    pub fn run(&self, x: &Tensor, y: &Tensor) -> Result<(Tensor, GradStore)> {
        for (into, from, what) in [(&self.x, x, "inputs"), (&self.y, y, "targets")] {
            if into.shape() != from.shape() || into.dtype() != from.dtype() {
                bail!(
                    "a captured step takes {what} {:?} {:?}, not {:?} {:?}",
                    into.dims(),
                    into.dtype(),
                    from.dims(),
                    from.dtype()
                );
            }
            into.slice_set(&from.contiguous()?, 0, 0)?;
        }
        #[cfg(feature = "cuda")]
        self.graph.launch().map_err(candle_core::Error::wrap)?;
        // The caller's store may take other tensors in place of these (the gradients of
        // micro-batches summed, say); the graph's own store keeps its buffers.
        let mut grads = GradStore::default();
        for &id in self.grads.get_ids() {
            let g = self.grads.get_id(id).expect("an id the store listed");
            grads.insert_id(id, g.clone());
        }
        Ok((self.loss.clone(), grads))
    }
}

#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::{CudaDevice, DType, Result, Tensor};

    use super::{Gpt, Replay};

    /// Writes `from` into `into`'s storage (same shape and dtype, `into` contiguous).
    fn copy_into(into: &Tensor, from: &Tensor) -> Result<()> {
        // slice_set works along a dimension; a scalar gets one.
        let (into, from) = (into.flatten_all()?, from.flatten_all()?.contiguous()?);
        into.slice_set(&from, 0, 0)
    }

    pub fn capture(dev: &CudaDevice, model: &Gpt, x: &Tensor, y: &Tensor) -> Result<Replay> {
        let (x, y) = (x.contiguous()?.copy()?, y.contiguous()?.copy()?);
        // The warm-up: candle's kernels loaded, its layout vectors cached, and the
        // gradients' shapes, for buffers of their own.
        let mut grads = {
            let _cache = dev.enable_cuda_graph_htod_cache();
            let l = model.loss(&x, &y)?;
            model.gradients(&l)?
        };
        let ids: Vec<_> = grads.get_ids().copied().collect();
        for &id in &ids {
            let g = grads.get_id(id).expect("an id the store listed");
            let own = Tensor::zeros(g.shape(), g.dtype(), g.device())?;
            grads.insert_id(id, own);
        }
        let loss = Tensor::zeros(1, DType::F32, x.device())?;
        // What the warm-up left in the pool goes back to the driver: the graph reserves its
        // own memory, and both at once would double the step's footprint.
        let device = candle_core::Device::Cuda(dev.clone());
        device.synchronize()?;
        crate::gpu::trim(&device)?;

        let stream = dev.cuda_stream();
        let wrap = candle_core::Error::wrap;
        let _cache = dev.enable_cuda_graph_htod_cache();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(wrap)?;
        // Everything the pass allocates is dropped inside this block, before the capture
        // ends: a graph that keeps an allocation cannot be launched again.
        let captured = (|| -> Result<()> {
            let l = model.loss(&x, &y)?;
            let g = model.gradients(&l)?;
            copy_into(&loss, &l.to_dtype(DType::F32)?)?;
            for &id in &ids {
                let (Some(into), Some(from)) = (grads.get_id(id), g.get_id(id)) else {
                    candle_core::bail!("the captured pass gave other gradients than its warm-up");
                };
                copy_into(into, from)?;
            }
            Ok(())
        })();
        let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        captured?;
        let Some(graph) = ended.map_err(wrap)? else {
            candle_core::bail!("the step's capture gave an empty graph");
        };
        graph.upload().map_err(wrap)?;
        Ok(Replay {
            graph,
            x,
            y,
            loss,
            grads,
        })
    }
}
