//! The blocks between the embedding and the final norm as one node of the autograd graph.
//!
//! candle's gradient store zero-fills and then adds the first gradient of every node, so in
//! a graph of ops each activation-sized tensor costs the backward pass a fill and an add of
//! its size: the stream state alone, read by the residual's sum and the sublayer's norm,
//! took four such adds a sublayer, and every weight one more. Here the sublayers run outside
//! the graph as [`Detached`] steps (registry/src/detached.rs) and the graph keeps one node,
//! from the stream state after the embedding to the state after the last block. Its backward
//! pass calls the steps' backward passes in reverse, handing each the state's gradient once;
//! the weights' gradients go to a [`Sink`] that the step reads (`Gpt::gradients`).
//!
//! A sublayer or scheme without a detached form of its own runs under a graph of its own
//! ([`local`]), which costs what the whole graph did. With `train.recompute: Blocks` the node
//! keeps each block's input only and runs the block again in the backward pass, its
//! activations alive for one block at a time (candle has no gradient checkpointing).

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, Var};
use components::fused::{scalar_zero_cpu, HandOver};
use registry::{add_into, Backward, Detached, Grads};

/// One sublayer's backward pass and the weights whose gradients it gives.
pub(crate) struct Step {
    pub weights: Vec<Tensor>,
    pub backward: Backward,
}

impl From<Detached> for Step {
    fn from(d: Detached) -> Self {
        Step {
            weights: d.weights,
            backward: d.backward,
        }
    }
}

/// Block `l` on a state, outside the graph: the next state and the block's steps in order.
pub(crate) type BlockFn = Arc<dyn Fn(usize, &Tensor) -> Result<(Tensor, Vec<Step>)> + Send + Sync>;

/// Parameter gradients of the trunk's steps, for the step to put beside the graph's.
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

/// What the trunk keeps of a block for the backward pass.
enum Tape {
    /// Its steps, with the activations they hold.
    Kept(Vec<Step>),
    /// Its input only: the block runs again in the backward pass.
    Input(Tensor),
}

/// `blocks` blocks on `state` as one node of the graph; `recompute` keeps each block's input
/// instead of its activations.
pub(crate) fn trunk(
    state: &Tensor,
    blocks: usize,
    block: BlockFn,
    recompute: bool,
    sink: Sink,
) -> Result<Tensor> {
    let mut s = state.detach();
    let mut tape = Vec::with_capacity(blocks);
    for l in 0..blocks {
        let (next, steps) = block(l, &s)?;
        tape.push(match recompute {
            true => Tape::Input(s),
            false => Tape::Kept(steps),
        });
        s = next;
    }
    let op = Trunk {
        out: HandOver::new(&s)?,
        tape: Mutex::new(Some(tape)),
        block,
        sink,
    };
    state.apply_op1(op)
}

struct Trunk {
    /// The last block's output, handed over once as the op's output.
    out: HandOver,
    tape: Mutex<Option<Vec<Tape>>>,
    block: BlockFn,
    sink: Sink,
}

impl CustomOp1 for Trunk {
    fn name(&self) -> &'static str {
        "trunk"
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

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let Some(tape) = self.tape.lock().expect("the lock is never poisoned").take() else {
            bail!("trunk: a second backward pass");
        };
        // A copy of our own: the steps may write the gradient they are handed in place.
        let mut g = match grad.is_contiguous() {
            true => grad.copy()?,
            false => grad.contiguous()?,
        };
        for (l, kept) in tape.into_iter().enumerate().rev() {
            let steps = match kept {
                Tape::Kept(steps) => steps,
                Tape::Input(input) => (self.block)(l, &input)?.1,
            };
            for step in steps.into_iter().rev() {
                let Grads { input, weights } = (step.backward)(&g, None)?;
                if weights.len() != step.weights.len() {
                    bail!(
                        "trunk: block {l} gave {} weight gradients for {} weights",
                        weights.len(),
                        step.weights.len()
                    );
                }
                for (w, dw) in step.weights.into_iter().zip(weights) {
                    if let Some(dw) = dw {
                        self.sink.push(w, dw);
                    }
                }
                g = match input {
                    Some(d) => d,
                    None => bail!("trunk: block {l} gave the stream state no gradient"),
                };
            }
        }
        Ok(Some(g))
    }
}

/// `f` on `x` under a graph of its own: its output and a backward pass that seeds that graph
/// with the output's gradient and reads the input's and the weights' (every variable the
/// graph reaches) from it.
pub(crate) fn local(f: &dyn Fn(&Tensor) -> Result<Tensor>, x: &Tensor) -> Result<Detached> {
    let input = Var::from_tensor(&x.detach())?;
    let y = f(input.as_tensor())?;
    let weights: Vec<Tensor> = y
        .sorted_nodes()
        .into_iter()
        .filter(|t| t.is_variable() && t.id() != input.as_tensor().id())
        .cloned()
        .collect();
    let out = y.detach();
    let vars = weights.clone();
    let backward: Backward = Box::new(move |dy, into| {
        let grads = y
            .apply_op1(Seed(Mutex::new(Some(dy.detach()))))?
            .backward()?;
        let dx = grads.get(input.as_tensor()).map(Tensor::detach);
        let input = match (dx, into) {
            (Some(dx), into) => Some(add_into(dx, into)?),
            (None, into) => into,
        };
        let weights = vars
            .iter()
            .map(|w| grads.get(w).map(Tensor::detach))
            .collect();
        Ok(Grads { input, weights })
    });
    Ok(Detached {
        y: out,
        weights,
        backward,
    })
}

/// A scalar standing for sum(y * g) whose backward pass hands y exactly the gradient g: the
/// seed of a [`local`] graph's backward pass. (Computing the sum itself, as a product and
/// candle's reduction, cost a millisecond a block at the 1B shape, and its backward two more
/// passes over the state.)
struct Seed(Mutex<Option<Tensor>>);

impl CustomOp1 for Seed {
    fn name(&self) -> &'static str {
        "trunk-seed"
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
            None => bail!("trunk: a local graph's seed ran twice"),
        }
    }
}
