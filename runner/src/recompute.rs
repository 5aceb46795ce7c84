//! Recomputation (`train.recompute: Blocks`): each block's forward pass runs outside the
//! autograd graph, which keeps only the block's input and output; the backward pass runs the
//! block again on its input, with autograd, to take its gradients. The activations of one
//! block at a time are alive instead of every block's, for one more forward pass a step
//! (candle has no gradient checkpointing; an op whose backward reruns its forward gives it).
//!
//! The op hands autograd the gradient of its input only; the parameters' gradients of the
//! rerun go to a [`Sink`], which the step adds to the graph's (`Gpt::gradients`).

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, Var};
use components::fused::{scalar_zero_cpu, HandOver};
use registry::Param;

/// A block: the stream state before it to the state after it.
pub(crate) type BlockFn = Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// Parameter gradients of the recomputed blocks, for the step to add to the graph's.
#[derive(Clone, Default)]
pub(crate) struct Sink(Arc<Mutex<Vec<(Tensor, Tensor)>>>);

impl Sink {
    /// The (variable, gradient) pairs collected since the last drain.
    pub(crate) fn drain(&self) -> Vec<(Tensor, Tensor)> {
        std::mem::take(&mut *self.0.lock().expect("the lock is never poisoned"))
    }

    fn push(&self, var: Tensor, grad: Tensor) {
        self.0
            .lock()
            .expect("the lock is never poisoned")
            .push((var, grad));
    }
}

/// `block` applied to `state` with its activations rebuilt in the backward pass.
pub(crate) fn checkpointed(
    block: BlockFn,
    state: &Tensor,
    params: Arc<Vec<Param>>,
    sink: Sink,
) -> Result<Tensor> {
    // Run outside the graph: detached from the input, and the output detached in turn, so
    // that the block's intermediate tensors are freed as soon as it returns.
    let out = block(&state.detach())?;
    let op = Checkpoint {
        block,
        out: HandOver::new(&out)?,
        params,
        sink,
    };
    state.apply_op1(op)
}

struct Checkpoint {
    block: BlockFn,
    /// The forward pass's result, handed over once as the op's output.
    out: HandOver,
    params: Arc<Vec<Param>>,
    sink: Sink,
}

impl CustomOp1 for Checkpoint {
    fn name(&self) -> &'static str {
        "recompute"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.out.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.out.cuda()
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // The block again, from its input as a variable of its own, under autograd: the
        // gradient of sum(y * grad) is the chain rule's for the input and every parameter.
        let input = Var::from_tensor(&x.detach())?;
        let y = (self.block)(input.as_tensor())?;
        let grads = y
            .apply_op1(Seed(Mutex::new(Some(grad.detach()))))?
            .backward()?;
        for p in self.params.iter() {
            if let Some(g) = grads.get(p.var.as_tensor()) {
                self.sink.push(p.var.as_tensor().clone(), g.detach());
            }
        }
        Ok(grads.get(input.as_tensor()).map(Tensor::detach))
    }
}

/// A scalar standing for sum(y * g) whose backward pass hands y exactly the gradient g: the
/// seed of a recomputed block's backward pass. (Computing the sum itself, as a product and
/// candle's reduction, cost a millisecond a block at the 1B shape, and its backward two more
/// passes over the state.)
struct Seed(Mutex<Option<Tensor>>);

impl CustomOp1 for Seed {
    fn name(&self) -> &'static str {
        "recompute-seed"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok(scalar_zero_cpu())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        components::fused::scalar_zero_cuda(s)
    }

    fn bwd(&self, _y: &Tensor, _res: &Tensor, _grad: &Tensor) -> Result<Option<Tensor>> {
        match self.0.lock().expect("the lock is never poisoned").take() {
            Some(g) => Ok(Some(g)),
            None => bail!("recompute: the seed's backward pass ran twice"),
        }
    }
}
