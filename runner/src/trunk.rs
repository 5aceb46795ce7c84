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

use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, Var};
use components::fused::{scalar_zero_cpu, Embedding, EmbeddingAdd, EmbeddingBwd, HandOver};
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

/// The blocks on `state` outside the graph: the last state and what the backward pass needs
/// of each block.
fn run_blocks(
    state: &Tensor,
    blocks: usize,
    block: &BlockFn,
    recompute: bool,
) -> Result<(Tensor, Vec<Tape>)> {
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
    Ok((s, tape))
}

/// Hands each step's weights' gradients to the sink, and returns the gradient of the step's
/// input.
fn back_through_step(step: Step, g: &Tensor, sink: &Sink, what: &str) -> Result<Tensor> {
    let Grads { input, weights } = (step.backward)(g, None)?;
    if weights.len() != step.weights.len() {
        bail!(
            "trunk: {what} gave {} weight gradients for {} weights",
            weights.len(),
            step.weights.len()
        );
    }
    for (w, dw) in step.weights.into_iter().zip(weights) {
        if let Some(dw) = dw {
            sink.push(w, dw);
        }
    }
    input
        .ok_or_else(|| candle_core::Error::Msg(format!("trunk: {what} gave its input no gradient")))
}

/// The backward pass through the blocks from the last state's gradient `g` (the caller's
/// own: the steps may write it in place) to the first state's.
fn back_through_blocks(
    tape: Vec<Tape>,
    block: &BlockFn,
    mut g: Tensor,
    sink: &Sink,
) -> Result<Tensor> {
    for (l, kept) in tape.into_iter().enumerate().rev() {
        let steps = match kept {
            Tape::Kept(steps) => steps,
            Tape::Input(input) => block(l, &input)?.1,
        };
        for step in steps.into_iter().rev() {
            g = back_through_step(step, &g, sink, &format!("block {l}"))?;
        }
    }
    Ok(g)
}

/// A gradient of our own: the steps may write the gradient they are handed in place.
fn own(grad: &Tensor) -> Result<Tensor> {
    match grad.is_contiguous() {
        true => grad.copy(),
        false => grad.contiguous(),
    }
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
    let (s, tape) = run_blocks(state, blocks, &block, recompute)?;
    let backward: NodeBackward = Box::new(move |_state, grad| {
        back_through_blocks(tape, &block, own(grad)?, &sink).map(Some)
    });
    state.apply_op1(Node::new("trunk", &s, backward)?)
}

/// The whole loss outside the graph, from the token embedding to the head: what
/// [`loss_outside`] runs.
pub(crate) struct Model<'a> {
    /// The tied embedding and head (V, C), f32.
    pub wte: &'a Tensor,
    /// The tokens' ids (N,) u32 and their (B, T).
    pub ids: &'a Tensor,
    pub shape: (usize, usize),
    /// The blocks' dtype.
    pub compute: DType,
    /// The embedding (B, T, C) to the first state.
    pub expand: &'a dyn Fn(&Tensor) -> Result<Detached>,
    pub blocks: usize,
    pub block: BlockFn,
    pub recompute: bool,
    /// The last state to the summed loss (a scalar), the head's weight among its weights.
    pub head: &'a dyn Fn(&Tensor) -> Result<Detached>,
}

/// The summed loss of `m` as one node of the graph over the embedding's weight: its
/// backward pass runs the head's, the blocks' and the embedding's, and hands every
/// parameter's gradient to `sink` (the embedding's rows added into the tied head's gradient
/// in place), none to the graph.
pub(crate) fn loss_outside(m: Model, sink: Sink) -> Result<Tensor> {
    let (b, t) = m.shape;
    let c = m.wte.dim(1)?;
    let rows = m.wte.detach().apply_op2_no_bwd(m.ids, &Embedding)?;
    let x = rows.reshape((b, t, c))?.to_dtype(m.compute)?;
    let expand = (m.expand)(&x)?;
    let (last, tape) = run_blocks(&expand.y, m.blocks, &m.block, m.recompute)?;
    let head = (m.head)(&last)?;
    let (loss, expand, head): (Tensor, Step, Step) = (head.y.clone(), expand.into(), head.into());
    let (block, ids) = (m.block, m.ids.clone());
    let backward: NodeBackward = Box::new(move |wte, grad| {
        // The head's gradients stay here until the embedding's rows are added to wte's.
        let heads = Sink::default();
        let g = back_through_step(head, grad, &heads, "the head")?;
        let g = back_through_blocks(tape, &block, g, &sink)?;
        let dx = back_through_step(expand, &g, &sink, "the stream's expand")?;
        let rows = dx.to_dtype(DType::F32)?.reshape(((), wte.dim(1)?))?;
        let mut added = false;
        for (w, dw) in heads.drain() {
            if w.id() == wte.id() && !added {
                dw.inplace_op3(&rows, &ids, &EmbeddingAdd)?;
                added = true;
            }
            sink.push(w, dw);
        }
        if !added {
            let dense = rows.apply_op2_no_bwd(&ids, &EmbeddingBwd { vocab: wte.dim(0)? })?;
            sink.push(wte.clone(), dense);
        }
        Ok(None)
    });
    m.wte.apply_op1(Node::new("model", &loss, backward)?)
}

/// The backward pass of a [`Node`]: from its input and its output's gradient, the input's.
type NodeBackward = Box<dyn FnOnce(&Tensor, &Tensor) -> Result<Option<Tensor>> + Send + Sync>;

/// A result computed outside the graph, handed over once as a custom op's output, with the
/// backward pass that takes its gradient on: the trunk's node and the whole loss's.
struct Node {
    name: &'static str,
    out: HandOver,
    backward: Mutex<Option<NodeBackward>>,
}

impl Node {
    fn new(name: &'static str, out: &Tensor, backward: NodeBackward) -> Result<Self> {
        Ok(Node {
            name,
            out: HandOver::new(out)?,
            backward: Mutex::new(Some(backward)),
        })
    }
}

impl CustomOp1 for Node {
    fn name(&self) -> &'static str {
        self.name
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
        let taken = self
            .backward
            .lock()
            .expect("the lock is never poisoned")
            .take();
        match taken {
            Some(backward) => backward(x, grad),
            None => bail!("{}: a second backward pass", self.name),
        }
    }
}

/// `x` reshaped to `shape` outside the graph; the gradient reshaped back.
pub(crate) fn reshaped(x: &Tensor, shape: (usize, usize)) -> Result<Detached> {
    let back = x.shape().clone();
    let backward: Backward = Box::new(move |g, into| {
        Ok(Grads {
            input: Some(add_into(g.reshape(back)?, into)?),
            weights: Vec::new(),
        })
    });
    Ok(Detached {
        y: x.reshape(shape)?,
        weights: Vec::new(),
        backward,
    })
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
