//! The GPT-style decoder assembled from a trial's components: tied token embedding, the
//! residual scheme's stream, n_layers blocks of (attention, FFN) each behind its own
//! RMSNorm, a final RMSNorm and the tied output head.

use std::collections::HashSet;
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor};
use components::fused::{cross_entropy_rows, embedding};
use components::nn::RmsNorm;
use registry::{Detached, Dims, Init, Param, ParamBuilder, Role, Stream, Sublayer};

use crate::amplification::{rms, Amplification};
use crate::spec::Cell;
use crate::trunk::{local, loss_outside, reshaped, trunk, BlockFn, Model, Sink, Step};
use results::ParamCount;

struct Block {
    attn_norm: RmsNorm,
    attn: Box<dyn Sublayer>,
    ffn_norm: RmsNorm,
    ffn: Box<dyn Sublayer>,
}

pub struct Gpt {
    wte: Tensor,
    /// Shared with the recomputed blocks' backward passes (recompute.rs), which run after
    /// the forward pass that built them.
    stream: Arc<dyn Stream>,
    blocks: Vec<Arc<Block>>,
    norm_f: RmsNorm,
    params: Arc<Vec<Param>>,
    /// The dtype of matmuls and activations; parameters stay f32 and are cast where used.
    compute: DType,
    /// Rebuild each block's activations in the backward pass instead of keeping them.
    recompute: bool,
    /// Run the blocks outside the autograd graph, as one node of it (trunk.rs).
    outside: bool,
    /// The trunk's parameter gradients, until [`Gpt::gradients`] collects them.
    sink: Sink,
}

impl Gpt {
    pub fn new(cell: &Cell, dims: &Dims, p: &ParamBuilder) -> Result<Self> {
        let wte = p.tensor(
            "wte",
            (dims.vocab, dims.d_model),
            Init::Normal { std: 0.02 },
            Role::Embedding,
        )?;
        let stream: Arc<dyn Stream> = cell.residual.build(dims, &p.pp("residual"))?.into();
        let blocks = (0..dims.n_layers)
            .map(|l| {
                let b = p.pp(format!("blocks.{l}"));
                Ok(Arc::new(Block {
                    attn_norm: RmsNorm::new(dims.d_model, &b.pp("attn_norm"))?,
                    attn: cell.attention.build(dims, &b.pp("attn"))?,
                    ffn_norm: RmsNorm::new(dims.d_model, &b.pp("ffn_norm"))?,
                    ffn: cell.ffn.build(dims, &b.pp("ffn"))?,
                }))
            })
            .collect::<Result<Vec<_>>>()?;
        let norm_f = RmsNorm::new(dims.d_model, &p.pp("norm_f"))?;
        // SWEEP_TRUNK_GRAPH=1 keeps the GPU's blocks in the graph of ops, for comparing the
        // two paths' losses and speed (BENCHMARKS.md).
        let outside = wte.device().is_cuda() && std::env::var_os("SWEEP_TRUNK_GRAPH").is_none();
        Ok(Self {
            wte,
            stream,
            blocks,
            norm_f,
            params: Arc::new(p.params()),
            compute: DType::F32,
            recompute: false,
            outside,
            sink: Sink::default(),
        })
    }

    /// With `on`, each block's activations are rebuilt in the backward pass (trunk.rs): less
    /// memory for one more forward pass a step.
    pub fn recomputing(mut self, on: bool) -> Self {
        self.recompute = on;
        self
    }

    /// With `on`, the blocks run outside the autograd graph as one node of it (trunk.rs), as
    /// they do by default on a GPU; off, every op of theirs is a node (the CPU's default).
    pub fn outside_the_graph(mut self, on: bool) -> Self {
        self.outside = on;
        self
    }

    /// The gradients of `loss` for the parameters, cut from the graph (`train::backward`),
    /// with those the trunk's backward pass produced put beside them.
    pub fn gradients(&self, loss: &Tensor) -> Result<GradStore> {
        let mut grads = match crate::train::backward(loss, &self.params) {
            Ok(grads) => grads,
            Err(e) => {
                // What a failed backward pass left in the sink is no step's gradient.
                self.sink.drain();
                return Err(e);
            }
        };
        let known: HashSet<_> = self.params.iter().map(|p| p.var.as_tensor().id()).collect();
        for (var, g) in self.sink.drain() {
            if !known.contains(&var.id()) {
                candle_core::bail!(
                    "a trunk step gave a gradient for a tensor that is not a parameter of \
                     the model (a detached copy of one?), shape {:?}",
                    var.dims()
                );
            }
            // Contiguous from the start of its storage, as the gradient store's own are: the
            // multi-tensor kernels (the norm, AdamW) take each gradient as one run of values.
            let g = match g.is_contiguous() && g.layout().start_offset() == 0 {
                true => g,
                false => g.force_contiguous()?,
            };
            let total = match grads.get(&var) {
                Some(a) => (a + g)?,
                None => g,
            };
            grads.insert(&var, total);
        }
        Ok(grads)
    }

    /// Computes in `dtype` (bf16 for mixed precision) from the embedding on; the logits are
    /// returned in it too, and the loss takes them to f32.
    pub fn computing_in(mut self, dtype: DType) -> Self {
        self.compute = dtype;
        self
    }

    /// Token ids (B, T) -> logits (B T, V): the loss takes them in this shape, and every
    /// reshape of them would cost the backward pass a copy of the largest tensor of the step.
    pub fn logits(&self, idx: &Tensor) -> Result<Tensor> {
        let (x, head) = self.head_input(idx)?;
        x.matmul(&head.to_dtype(self.compute)?.t()?)
    }

    /// The logits (N, V) of the positions `rows` (N,) u32 of the rows (B T) of `idx` only:
    /// scoring a continuation needs a few positions of each sequence, and the head over the
    /// whole vocabulary is most of a small model's work.
    pub fn logits_at(&self, idx: &Tensor, rows: &Tensor) -> Result<Tensor> {
        let (x, head) = self.head_input(idx)?;
        x.index_select(rows, 0)?
            .matmul(&head.to_dtype(self.compute)?.t()?)
    }

    /// The final hidden states as rows (B T, C) and the output head's f32 weight (V, C), which
    /// the fused loss casts inside (no cast node, whose gradient would be zero-filled, added
    /// and cast once more over the vocabulary's 100M values at the 1B shape).
    fn head_input(&self, idx: &Tensor) -> Result<(Tensor, Tensor)> {
        let state = match self.outside || self.recompute {
            true => self.trunk_outside(idx)?,
            false => self.trunk(idx, &mut |_, _, _| Ok(()))?.1,
        };
        let x = self.norm_f.forward(&self.stream.reduce(&state)?)?;
        let (b, t, c) = x.dims3()?;
        Ok((x.reshape((b * t, c))?, self.wte.clone()))
    }

    /// Mean cross-entropy in nats per token of next tokens `targets` (B, T) given `idx`.
    pub fn loss(&self, idx: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let targets = targets.flatten_all()?;
        if self.outside || self.recompute {
            return self.loss_outside(idx, &targets);
        }
        let sum = if idx.device().is_cuda() {
            // The logits never reach the autograd graph (see fused::linear_cross_entropy_sum);
            // the CPU keeps the composite, whose numbers the README reports.
            let (x, head) = self.head_input(idx)?;
            components::fused::linear_cross_entropy_sum(&x, &head, &targets)?
        } else {
            cross_entropy_sum(&self.logits(idx)?, &targets)?
        };
        sum / targets.elem_count() as f64
    }

    /// The mean loss with the whole model outside the graph, one node of it over the
    /// embedding's weight (trunk.rs `loss_outside`): its backward pass gives every gradient
    /// to the sink, none to candle's gradient store. The mean's 1 / tokens is taken inside
    /// the head, where the fused loss writes the logits' gradient already scaled.
    fn loss_outside(&self, idx: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let (b, t) = idx.dims2()?;
        let per_token = 1.0 / targets.elem_count() as f64;
        let c = self.wte.dim(1)?;
        let stream = &*self.stream;
        let expand = |x: &Tensor| -> Result<Detached> {
            match stream.expand_detached(x)? {
                Some(d) => Ok(d),
                None => local(&|x| stream.expand(x), x),
            }
        };
        let head = |s: &Tensor| -> Result<Detached> {
            // On the GPU each part has its detached form; else one graph of their own, the
            // composite (whose numbers the CPU reports).
            if let Some(reduced) = stream.reduce_detached(s)? {
                if let Some(normed) = self.norm_f.detached(&reduced.y)? {
                    let rows = reshaped(&normed.y, (b * t, c))?;
                    let loss = components::fused::linear_cross_entropy_outside(
                        &rows.y, &self.wte, targets, per_token,
                    )?;
                    return Ok(reduced.then(normed).then(rows).then(loss));
                }
            }
            let composite = |s: &Tensor| -> Result<Tensor> {
                let x = self
                    .norm_f
                    .forward(&stream.reduce(s)?)?
                    .reshape((b * t, c))?;
                let sum = if x.device().is_cuda() {
                    components::fused::linear_cross_entropy_sum(&x, &self.wte, targets)?
                } else {
                    let logits = x.matmul(&self.wte.to_dtype(self.compute)?.t()?)?;
                    cross_entropy_sum(&logits, targets)?
                };
                sum * per_token
            };
            local(&composite, s)
        };
        let (stream, blocks) = (self.stream.clone(), self.blocks.clone());
        let block: BlockFn = Arc::new(move |l, s| block_outside(&*stream, &blocks[l], l, s));
        let model = Model {
            wte: &self.wte,
            ids: &idx.flatten_all()?,
            shape: (b, t),
            compute: self.compute,
            expand: &expand,
            blocks: self.blocks.len(),
            block,
            recompute: self.recompute,
            head: &head,
        };
        loss_outside(model, self.sink.clone())
    }

    /// The stream amplification of the residual path on a batch (see [`Amplification`]).
    pub fn amplification(&self, idx: &Tensor) -> Result<Amplification> {
        let mut amp = Amplification::default();
        let (x, _) = self.trunk(idx, &mut |k, before, after| {
            let probe = self.stream.probe(k, before)?;
            amp.push(probe.mixing.as_ref(), rms(after)?)?;
            if after.rank() == 4 {
                if let Some((cos, rank)) = crate::streams::stream_stats(after)? {
                    amp.streams.push((k, cos, rank));
                }
            }
            for (name, v) in probe.extra {
                amp.note(name, v);
            }
            Ok(())
        })?;
        let base = rms(&x)?;
        amp.stream_rms.iter_mut().for_each(|r| *r /= base);
        Ok(amp)
    }

    /// The embedding (B, T, C) of the tokens `idx` (B, T), in the compute dtype.
    fn embed(&self, idx: &Tensor) -> Result<Tensor> {
        let (b, t) = idx.dims2()?;
        let c = self.wte.dim(1)?;
        embedding(&self.wte, &idx.flatten_all()?)?
            .reshape((b, t, c))?
            .to_dtype(self.compute)
    }

    /// Embedding and blocks as a graph of ops: returns the embedding (B, T, C) and the final
    /// stream state. `hook(k, before, after)` sees the state around every sublayer k.
    fn trunk(
        &self,
        idx: &Tensor,
        hook: &mut dyn FnMut(usize, &Tensor, &Tensor) -> Result<()>,
    ) -> Result<(Tensor, Tensor)> {
        let x = self.embed(idx)?;
        let mut state = self.stream.expand(&x)?;
        for (l, block) in self.blocks.iter().enumerate() {
            state = run_block(&*self.stream, block, l, &state, hook)?;
        }
        Ok((x, state))
    }

    /// The final stream state with the blocks outside the graph, one node of it (trunk.rs),
    /// recomputed in the backward pass where the model is set to.
    fn trunk_outside(&self, idx: &Tensor) -> Result<Tensor> {
        let state = self.stream.expand(&self.embed(idx)?)?;
        let (stream, blocks) = (self.stream.clone(), self.blocks.clone());
        let f: BlockFn = Arc::new(move |l, s| block_outside(&*stream, &blocks[l], l, s));
        trunk(
            &state,
            self.blocks.len(),
            f,
            self.recompute,
            self.sink.clone(),
        )
    }

    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// Parameters in all, and those of the token embedding (which is also the head).
    pub fn param_count(&self) -> ParamCount {
        let size = |p: &Param| p.var.elem_count() as u64;
        ParamCount {
            total: self.params.iter().map(size).sum(),
            embedding: self
                .params
                .iter()
                .filter(|p| p.role == Role::Embedding)
                .map(size)
                .sum(),
        }
    }
}

/// Sum over rows of -log softmax(logits)[target], in f32: logits (N, V), targets (N,) u32.
/// Block `l` (its attention and FFN sublayers, each behind its norm, through the stream) on
/// `state`; `hook(k, before, after)` around each sublayer k.
fn run_block(
    stream: &dyn Stream,
    block: &Block,
    l: usize,
    state: &Tensor,
    hook: &mut dyn FnMut(usize, &Tensor, &Tensor) -> Result<()>,
) -> Result<Tensor> {
    let attn = |h: &Tensor| block.attn.forward(&block.attn_norm.forward(h)?);
    let ffn = |h: &Tensor| block.ffn.forward(&block.ffn_norm.forward(h)?);
    let mut state = state.clone();
    for (k, f) in [
        (2 * l, &attn as &dyn Fn(&Tensor) -> Result<Tensor>),
        (2 * l + 1, &ffn),
    ] {
        let next = stream.sublayer(k, &state, f)?;
        hook(k, &state, &next)?;
        state = next;
    }
    Ok(state)
}

/// Block `l` on `state` outside the graph: the next state and its two sublayers' steps.
fn block_outside(
    stream: &dyn Stream,
    block: &Block,
    l: usize,
    state: &Tensor,
) -> Result<(Tensor, Vec<Step>)> {
    let mut state = state.clone();
    let mut steps = Vec::with_capacity(2);
    for (k, norm, sub) in [
        (2 * l, &block.attn_norm, &*block.attn),
        (2 * l + 1, &block.ffn_norm, &*block.ffn),
    ] {
        let d = sublayer_outside(stream, k, norm, sub, &state)?;
        state = d.y.clone();
        steps.push(d.into());
    }
    Ok((state, steps))
}

/// Sublayer k (`sub` behind `norm`) on `state` outside the graph: through the residual
/// scheme's and the sublayer's detached forms where they have them, else under a graph of
/// their own (trunk.rs `local`).
fn sublayer_outside(
    stream: &dyn Stream,
    k: usize,
    norm: &RmsNorm,
    sub: &dyn Sublayer,
    state: &Tensor,
) -> Result<Detached> {
    let f = |h: &Tensor| -> Result<Detached> {
        let Some(normed) = norm.detached(h)? else {
            return local(&|x| sub.forward(&norm.forward(x)?), h);
        };
        let body = match sub.detached(&normed.y)? {
            Some(d) => d,
            None => local(&|x| sub.forward(x), &normed.y)?,
        };
        Ok(normed.then(body))
    };
    match stream.sublayer_detached(k, state, &f)? {
        Some(d) => Ok(d),
        None => local(
            &|s| stream.sublayer(k, s, &|h| sub.forward(&norm.forward(h)?)),
            state,
        ),
    }
}

pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    cross_entropy_rows(logits, targets)?.sum_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cross_entropy_matches_a_hand_worked_case() -> Result<()> {
        // Row 1: logits (0, ln 3) -> p(target 1) = 3/4 -> -ln(3/4) = 0.287682.
        // Row 2: uniform over 2 -> ln 2 = 0.693147. Sum 0.980829.
        let logits = Tensor::new(&[[0f32, 3f32.ln()], [5.0, 5.0]], &Device::Cpu)?;
        let targets = Tensor::new(&[1u32, 0], &Device::Cpu)?;
        let s = cross_entropy_sum(&logits, &targets)?.to_scalar::<f32>()?;
        assert!((s - 0.980_829).abs() < 1e-5, "{s}");
        Ok(())
    }
}

#[cfg(test)]
mod grad_tests {
    use super::*;
    use crate::spec::Cell;
    use candle_core::Device;
    use registry::{Component, Slot};
    use std::sync::Arc;

    /// Every registered component of `slot`, with default parameters.
    fn all(slot: Slot) -> Vec<Component> {
        registry::entries()
            .unwrap()
            .into_iter()
            .filter(|e| e.slot == slot)
            .map(|e| e.parse("").unwrap().component)
            .collect()
    }

    /// Every (attention, FFN, residual) combination, with the first registered optimizer and
    /// schedule.
    fn every_cell() -> Vec<Cell> {
        let optimizer = match &all(Slot::Optimizer)[0] {
            Component::Optimizer(o) => o.clone(),
            _ => unreachable!(),
        };
        let schedule = match &all(Slot::Schedule)[0] {
            Component::Schedule(s) => s.clone(),
            _ => unreachable!(),
        };
        let mut cells = Vec::new();
        for attention in all(Slot::Attention) {
            for ffn in all(Slot::Ffn) {
                for residual in all(Slot::Residual) {
                    let (Component::Attention(a), Component::Ffn(f), Component::Residual(r)) =
                        (&attention, &ffn, &residual)
                    else {
                        unreachable!()
                    };
                    cells.push(Cell {
                        attention: Arc::clone(a),
                        ffn: Arc::clone(f),
                        residual: Arc::clone(r),
                        optimizer: optimizer.clone(),
                        schedule: schedule.clone(),
                    });
                }
            }
        }
        cells
    }

    #[test]
    fn the_trunk_outside_the_graph_gives_the_same_loss_and_gradients() -> Result<()> {
        // Every combination, after one step (so zero-initialized parameters carry gradient):
        // the loss and every parameter's gradient with the blocks outside the graph as one
        // node (trunk.rs), kept or recomputed in the backward pass, equal those of the graph
        // of ops (the same ops on the same values; the gradients' sums may run in another
        // order).
        let dims = Dims {
            d_model: 16,
            n_layers: 2,
            vocab: 32,
            seq_len: 8,
        };
        let ids: Vec<u32> = (0..2 * 9).map(|i| (i * 5 + 1) % 32).collect();
        let batch = Tensor::from_vec(ids, (2, 9), &Device::Cpu)?;
        let (x, y) = (batch.narrow(1, 0, 8)?, batch.narrow(1, 1, 8)?);
        for cell in every_cell() {
            let kept = Gpt::new(&cell, &dims, &ParamBuilder::new(1, &Device::Cpu))?;
            assert!(!kept.outside, "the CPU's default is the graph of ops");
            let mut opt = cell.optimizer.build(kept.params(), DType::F32)?;
            opt.step(&kept.gradients(&kept.loss(&x, &y)?)?, 10.0)?;
            let lk = kept.loss(&x, &y)?;
            let gk = kept.gradients(&lk)?;
            for recompute in [false, true] {
                let other = Gpt::new(&cell, &dims, &ParamBuilder::new(1, &Device::Cpu))?
                    .outside_the_graph(true)
                    .recomputing(recompute);
                for (r, k) in other.params().iter().zip(kept.params()) {
                    r.var.set(k.var.as_tensor())?;
                }
                let lr = other.loss(&x, &y)?;
                let gr = other.gradients(&lr)?;
                let what = format!("{cell:?}, recompute {recompute}");
                assert_eq!(
                    lk.to_scalar::<f32>()?,
                    lr.to_scalar::<f32>()?,
                    "{what}: loss"
                );
                // The logits (scoring's path: the blocks as one node, the head in the graph).
                let gap = (kept.logits(&x)? - other.logits(&x)?)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f32>()?;
                assert_eq!(gap, 0.0, "{what}: logits");
                for (k, r) in kept.params().iter().zip(other.params()) {
                    let want = gk.get(k.var.as_tensor()).expect("kept gradient");
                    let got = gr
                        .get(r.var.as_tensor())
                        .unwrap_or_else(|| panic!("{what}: no gradient for {}", r.name));
                    let d = (want - got)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    assert!(d <= 1e-6, "{what}: {} differs by {d}", k.name);
                }
                assert!(
                    other.sink.drain().is_empty(),
                    "{what}: the sink was drained"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn every_parameter_of_every_combination_gets_a_finite_nonzero_gradient() -> Result<()> {
        let dims = Dims {
            d_model: 16,
            n_layers: 2,
            vocab: 32,
            seq_len: 8,
        };
        let ids: Vec<u32> = (0..2 * 9).map(|i| (i * 7 + 3) % 32).collect();
        let batch = Tensor::from_vec(ids, (2, 9), &Device::Cpu)?;
        let (x, y) = (batch.narrow(1, 0, 8)?, batch.narrow(1, 1, 8)?);
        let mut checked = 0;
        for cell in every_cell() {
            let model = Gpt::new(&cell, &dims, &ParamBuilder::new(0, &Device::Cpu))?;
            // One step first, so parameters that start at zero by design (gates,
            // low-rank branches) have moved and every path carries gradient.
            let mut opt = cell
                .optimizer
                .build(model.params(), candle_core::DType::F32)?;
            opt.step(&model.loss(&x, &y)?.backward()?, 10.0)?;
            let l32 = model.loss(&x, &y)?;
            let grads = l32.backward()?;
            for p in model.params() {
                let g = grads
                    .get(p.var.as_tensor())
                    .unwrap_or_else(|| panic!("{cell:?}: no gradient for {}", p.name));
                let n = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
                assert!(
                    n.is_finite() && n > 0.0,
                    "{cell:?}: {} has |g|^2 = {n}",
                    p.name
                );
            }

            // The same weights computing in bf16: the loss agrees to bf16 rounding,
            // and every f32 master weight gets an f32 gradient pointing the same way.
            let half = Gpt::new(&cell, &dims, &ParamBuilder::new(0, &Device::Cpu))?
                .computing_in(DType::BF16);
            for (h, p) in half.params().iter().zip(model.params()) {
                h.var.set(p.var.as_tensor())?;
            }
            let l16 = half.loss(&x, &y)?;
            assert_eq!(l16.dtype(), DType::F32);
            let (a, b) = (l32.to_scalar::<f32>()?, l16.to_scalar::<f32>()?);
            assert!((a - b).abs() < 0.02 * a, "{cell:?}: f32 {a} vs bf16 {b}");
            let g16 = l16.backward()?;
            let norm =
                |g: &Tensor| -> Result<f32> { Ok(g.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt()) };
            let mut largest = 0f32;
            for p in model.params() {
                largest = largest.max(norm(grads.get(p.var.as_tensor()).unwrap())?);
            }
            for (h, p) in half.params().iter().zip(model.params()) {
                let g = g16
                    .get(h.var.as_tensor())
                    .unwrap_or_else(|| panic!("{cell:?}: bf16, no gradient for {}", h.name));
                assert_eq!(g.dtype(), DType::F32, "{}", h.name);
                let reference = grads.get(p.var.as_tensor()).unwrap();
                // Some gradients are zero in exact arithmetic (a scale in front of
                // an RMSNorm): in either precision they are rounding noise.
                if norm(reference)? < 1e-3 * largest {
                    continue;
                }
                let dot = (g * reference)?.sum_all()?.to_scalar::<f32>()?;
                let norms = norm(g)? * norm(reference)?;
                assert!(
                    dot / norms > 0.9,
                    "{cell:?}: bf16 gradient of {} has cosine {} to f32's",
                    h.name,
                    dot / norms
                );
            }
            checked += 1;
        }
        assert!(checked >= 2, "only {checked} combinations");
        Ok(())
    }
}

/// A cell from (name, RON params) per slot, in `Slot::ALL` order.
#[cfg(test)]
pub(crate) fn cell_of(parts: [(&str, &str); 5]) -> Cell {
    use registry::{Component, Slot};
    let mut c: Vec<Component> = Slot::ALL
        .into_iter()
        .zip(parts)
        .map(|(slot, (name, params))| {
            let entry = registry::lookup(slot, name).unwrap();
            entry.parse(params).unwrap().component
        })
        .collect();
    let (
        Some(Component::Schedule(schedule)),
        Some(Component::Optimizer(optimizer)),
        Some(Component::Residual(residual)),
        Some(Component::Ffn(ffn)),
        Some(Component::Attention(attention)),
    ) = (c.pop(), c.pop(), c.pop(), c.pop(), c.pop())
    else {
        unreachable!("Slot::ALL order")
    };
    Cell {
        attention,
        ffn,
        residual,
        optimizer,
        schedule,
    }
}

#[cfg(test)]
mod optimizer_tests {
    use super::*;
    use crate::train::backward;
    use candle_core::Device;
    use registry::Slot;

    #[test]
    fn every_optimizer_fits_a_fixed_batch_and_counts_split() -> Result<()> {
        let dims = Dims {
            d_model: 16,
            n_layers: 2,
            vocab: 32,
            seq_len: 8,
        };
        let ids: Vec<u32> = (0..2 * 9).map(|i| (i * 11 + 5) % 32).collect();
        let batch = Tensor::from_vec(ids, (2, 9), &Device::Cpu)?;
        let (x, y) = (batch.narrow(1, 0, 8)?, batch.narrow(1, 1, 8)?);
        let names: Vec<&str> = registry::entries()
            .unwrap()
            .into_iter()
            .filter(|e| e.slot == Slot::Optimizer)
            .map(|e| e.name)
            .collect();
        assert!(names.len() >= 3, "{names:?}");
        for name in names {
            let cell = cell_of([
                ("GatedGqa", ""),
                ("Relu2", ""),
                ("Mhc", ""),
                (name, ""),
                ("Trapezoid", ""),
            ]);
            let optimizer = cell.optimizer.clone();
            let model = Gpt::new(&cell, &dims, &ParamBuilder::new(0, &Device::Cpu))?;
            let count = model.param_count();
            assert_eq!(count.embedding, 32 * 16);
            assert!(count.total > count.embedding);
            let mut opt = optimizer.build(model.params(), candle_core::DType::F32)?;
            let loss_now = || -> Result<f32> { model.loss(&x, &y)?.to_scalar::<f32>() };
            let first = loss_now()?;
            for _ in 0..30 {
                let l = model.loss(&x, &y)?;
                opt.step(&backward(&l, model.params())?, 3.0)?;
            }
            let last = loss_now()?;
            assert!(last < 0.7 * first, "{name}: loss {first} -> {last}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod amplification_tests {
    use super::*;
    use candle_core::Device;

    fn cell(residual: &str, params: &str) -> Cell {
        cell_of([
            ("Mha", ""),
            ("Gelu", ""),
            (residual, params),
            ("AdamW", ""),
            ("Cosine", ""),
        ])
    }

    fn dims() -> Dims {
        Dims {
            d_model: 16,
            n_layers: 4,
            vocab: 32,
            seq_len: 8,
        }
    }

    /// Sets every parameter whose name ends with `suffix` to `value`.
    fn set_all(model: &Gpt, suffix: &str, value: &Tensor) -> Result<usize> {
        let mut n = 0;
        for p in model.params().iter().filter(|p| p.name.ends_with(suffix)) {
            p.var.set(value)?;
            n += 1;
        }
        Ok(n)
    }

    fn batch() -> Result<Tensor> {
        let ids: Vec<u32> = (0..16).map(|i| (i * 5 + 1) % 32).collect();
        Tensor::from_vec(ids, (2, 8), &Device::Cpu)
    }

    #[test]
    fn the_plain_residual_has_gain_one_and_unit_stream_rms_at_the_embedding() -> Result<()> {
        let model = Gpt::new(
            &cell("PreNorm", ""),
            &dims(),
            &ParamBuilder::new(0, &Device::Cpu),
        )?;
        let amp = model.amplification(&batch()?)?;
        assert_eq!(amp.composite.len(), 8);
        assert!(amp
            .sublayer
            .iter()
            .chain(&amp.composite)
            .all(|g| *g == (1.0, 1.0)));
        // Output projections start at 0.02 / sqrt(2L): the stream barely moves at init.
        assert!(
            amp.stream_rms.iter().all(|r| (r - 1.0).abs() < 0.5),
            "{:?}",
            amp.stream_rms
        );
        Ok(())
    }

    #[test]
    fn unstable_hc_amplifies_where_mhc_stays_at_one() -> Result<()> {
        // A_r = 1.5 I + 0.1 (all entries): every row sums to 1.9, spectral radius 1.9. Eight
        // sublayers compose to 1.9^8 = 169.8 in both directions (the matrix is symmetric).
        let r: Vec<f32> = (0..16)
            .map(|i| if i / 4 == i % 4 { 1.6 } else { 0.1 })
            .collect();
        let r = Tensor::from_vec(r, (4, 4), &Device::Cpu)?;
        let hc = Gpt::new(
            &cell("Hc", "(streams: 4)"),
            &dims(),
            &ParamBuilder::new(0, &Device::Cpu),
        )?;
        assert_eq!(set_all(&hc, ".a_r", &r)?, 8);
        let amp = hc.amplification(&batch()?)?;
        let (f, b) = *amp.composite.last().unwrap();
        assert!((f - 1.9f64.powi(8)).abs() < 0.01 * f, "forward {f}");
        assert!((b - 1.9f64.powi(8)).abs() < 0.01 * b, "backward {b}");
        assert!(amp.stream_rms[7] > 50.0, "{:?}", amp.stream_rms);

        // The same matrix as mHC's residual logits: Sinkhorn projects it onto the doubly
        // stochastic matrices, whose products stay doubly stochastic.
        let mhc = Gpt::new(
            &cell("Mhc", "(streams: 4)"),
            &dims(),
            &ParamBuilder::new(0, &Device::Cpu),
        )?;
        assert_eq!(set_all(&mhc, ".b_res", &r)?, 8);
        let amp = mhc.amplification(&batch()?)?;
        for (f, b) in amp.sublayer.iter().chain(&amp.composite) {
            assert!((f - 1.0).abs() < 1e-5, "forward {f}");
            assert!((b - 1.0).abs() < 1e-4, "backward {b}");
        }
        assert!(amp.extra["mhc/sum_err"] < 1e-5, "{:?}", amp.extra);
        assert!(
            amp.stream_rms.iter().all(|r| *r < 2.0),
            "{:?}",
            amp.stream_rms
        );
        Ok(())
    }

    #[test]
    fn multi_stream_states_record_their_streams_cosine_and_rank() -> Result<()> {
        // At init every stream is the embedding: cosine 1, rank 1. The first sublayer writes
        // its output into all four streams (H_post = 1) and mixes them near the identity, so
        // they stay nearly identical; the plain residual has no streams to compare.
        let mhc = Gpt::new(
            &cell("Mhc", "(streams: 4)"),
            &dims(),
            &ParamBuilder::new(0, &Device::Cpu),
        )?;
        let m = mhc.amplification(&batch()?)?.metrics();
        let get = |name: &str| m.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
        for l in 0..8 {
            let cos = get(&format!("streams/cos/l{l}")).expect("cosine");
            let rank = get(&format!("streams/rank/l{l}")).expect("rank");
            assert!(
                cos > 0.99 && (1.0..1.1).contains(&rank),
                "l{l}: {cos} {rank}"
            );
        }
        assert!(get("stream_rms/max").is_some());
        let plain = Gpt::new(
            &cell("PreNorm", ""),
            &dims(),
            &ParamBuilder::new(0, &Device::Cpu),
        )?;
        let m = plain.amplification(&batch()?)?.metrics();
        assert!(!m.iter().any(|(n, _)| n.starts_with("streams/")));
        Ok(())
    }
}
