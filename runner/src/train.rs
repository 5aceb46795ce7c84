//! One trial's training loop: batches, forward, backward, clipping, the optimizer and its
//! schedule, periodic evaluation on the fixed validation subset, and the metrics.

use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use registry::{Dims, Param, ParamBuilder};

use crate::data::{bits_per_byte, Dataset, Split, Tokenizer};
use crate::model::{cross_entropy_sum, loss, Gpt};
use crate::spec::{TrainSpec, Trial};

/// Where a trial's metrics and progress go (the results store and the progress bar).
pub trait Observer {
    fn record(&mut self, step: usize, name: &str, value: f64) -> Result<()>;
    /// Called after every step with the step's training loss.
    fn step(&mut self, _step: usize, _loss: f64) {}
    /// Called after every evaluation.
    fn eval(&mut self, _step: usize, _val_loss: f64, _val_bpb: f64) {}
}

/// How a trial ended, when it ended without an error.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Done {
        val_loss: f64,
        val_bpb: f64,
    },
    /// A loss or the gradient norm became NaN or infinite at `step`.
    Diverged {
        step: usize,
        what: String,
    },
}

/// The fixed validation subset: the same windows for every trial and evaluation.
pub struct ValSet {
    batches: Vec<(Tensor, Tensor)>,
    targets: usize,
    bytes: u64,
}

impl ValSet {
    pub fn new(val: &Split, tok: Tokenizer, train: &TrainSpec, device: &Device) -> Result<Self> {
        let (b, t) = (train.batch, train.seq_len);
        let windows = val.spread(train.eval_batches * b, t + 1);
        let mut batches = Vec::new();
        let mut bytes = 0;
        for chunk in windows.chunks(b * (t + 1)) {
            let (x, y) = split_xy(chunk, b, t);
            bytes += y.iter().map(|&tok_id| tok.byte_len(tok_id)).sum::<u64>();
            batches.push((
                Tensor::from_vec(x, (b, t), device)?,
                Tensor::from_vec(y, (b, t), device)?,
            ));
        }
        Ok(Self {
            targets: batches.len() * b * t,
            batches,
            bytes,
        })
    }

    /// Mean loss in nats per token and bits per byte of the subset.
    pub fn evaluate(&self, model: &Gpt) -> Result<(f64, f64)> {
        let mut nats = 0.0;
        for (x, y) in &self.batches {
            let logits = model.forward(x)?;
            let (b, t, v) = logits.dims3()?;
            let s = cross_entropy_sum(&logits.reshape((b * t, v))?, &y.flatten_all()?)?;
            nats += s.to_scalar::<f32>()? as f64;
        }
        Ok((nats / self.targets as f64, bits_per_byte(nats, self.bytes)))
    }

    /// The batch the amplification metrics are measured on: always the first.
    pub fn probe_batch(&self) -> &Tensor {
        &self.batches[0].0
    }
}

/// Splits `batch` windows of t + 1 tokens into inputs and next-token targets.
fn split_xy(windows: &[u32], batch: usize, t: usize) -> (Vec<u32>, Vec<u32>) {
    let mut x = Vec::with_capacity(batch * t);
    let mut y = Vec::with_capacity(batch * t);
    for w in windows.chunks(t + 1) {
        x.extend_from_slice(&w[..t]);
        y.extend_from_slice(&w[1..]);
    }
    (x, y)
}

/// A trial's model, built from its cell with its seed.
pub fn build(trial: &Trial, dims: &Dims, device: &Device) -> Result<Gpt> {
    Gpt::new(&trial.cell, dims, &ParamBuilder::new(trial.seed, device))
}

/// The gradients of `loss` for `params`, cut from the autograd graph. candle detaches the
/// gradients of intermediate nodes but not those of variables: theirs still reference the
/// step's forward graph, and optimizer state computed from them (m = b m + (1 - b) g) would
/// chain every step's graph to the next, growing memory by the graph's size per step.
pub fn backward(loss: &Tensor, params: &[Param]) -> Result<GradStore> {
    let mut grads = loss.backward()?;
    for p in params {
        if let Some(g) = grads.get(p.var.as_tensor()) {
            let g = g.detach();
            grads.insert(p.var.as_tensor(), g);
        }
    }
    Ok(grads)
}

/// The L2 norm of all gradients together.
pub fn grad_norm(grads: &GradStore, params: &[Param]) -> Result<f64> {
    let mut sq = 0.0;
    for p in params {
        if let Some(g) = grads.get(p.var.as_tensor()) {
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    Ok(sq.sqrt())
}

fn scale_grads(grads: &mut GradStore, params: &[Param], factor: f64) -> Result<()> {
    for p in params {
        if let Some(g) = grads.get(p.var.as_tensor()) {
            let scaled = (g * factor)?;
            grads.insert(p.var.as_tensor(), scaled);
        }
    }
    Ok(())
}

/// Trains `model` for `spec.steps` steps.
pub fn train(
    trial: &Trial,
    model: &Gpt,
    spec: &TrainSpec,
    data: &Dataset,
    val: &ValSet,
    device: &Device,
    obs: &mut dyn Observer,
) -> Result<Outcome> {
    let (b, t) = (spec.batch, spec.seq_len);
    // The data order depends on the seed only, not on the cell: cells of one seed see the
    // same batches, so their differences are the components'.
    let mut rng = StdRng::seed_from_u64(trial.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xda7a);
    let params = model.params();
    let mut opt = trial.cell.optimizer.build(params)?;
    let peak = trial.cell.optimizer.lr();
    let eval_every = spec.eval_every();

    let (mut loss_sum, mut loss_n, mut train_time) = (0.0, 0usize, 0.0);
    for step in 0..spec.steps {
        let started = Instant::now();
        let factor = trial.cell.schedule.factor(step, spec.steps);
        let lr = peak * factor;
        let (x, y) = split_xy(&data.train.sample(&mut rng, b, t + 1), b, t);
        let x = Tensor::from_vec(x, (b, t), device)?;
        let y = Tensor::from_vec(y, (b, t), device)?;
        let l = loss(&model.forward(&x)?, &y)?;
        let lv = l.to_scalar::<f32>()? as f64;
        if !lv.is_finite() {
            return Ok(Outcome::Diverged {
                step: step + 1,
                what: format!("train/loss is {lv}"),
            });
        }
        let mut grads = backward(&l, params)?;
        let gn = grad_norm(&grads, params)?;
        if !gn.is_finite() {
            return Ok(Outcome::Diverged {
                step: step + 1,
                what: format!("grad_norm is {gn}"),
            });
        }
        if spec.grad_clip > 0.0 && gn > spec.grad_clip {
            scale_grads(&mut grads, params, spec.grad_clip / gn)?;
        }
        opt.step(&grads, factor)?;
        train_time += started.elapsed().as_secs_f64();
        loss_sum += lv;
        loss_n += 1;
        obs.step(step + 1, lv);

        let last = step + 1 == spec.steps;
        if (step + 1) % spec.log_every == 0 || last {
            let s = step + 1;
            obs.record(s, "train/loss", loss_sum / loss_n as f64)?;
            obs.record(s, "lr", lr)?;
            obs.record(s, "grad_norm", gn)?;
            obs.record(
                s,
                "tokens_per_s",
                (loss_n * b * t) as f64 / train_time.max(1e-9),
            )?;
            (loss_sum, loss_n, train_time) = (0.0, 0, 0.0);
        }
        if (step + 1) % eval_every == 0 || last {
            let (vl, bpb) = val.evaluate(model)?;
            obs.record(step + 1, "val/loss", vl)?;
            obs.record(step + 1, "val/bpb", bpb)?;
            for (name, v) in model.amplification(val.probe_batch())?.metrics() {
                obs.record(step + 1, &name, v)?;
            }
            obs.eval(step + 1, vl, bpb);
            if !vl.is_finite() {
                return Ok(Outcome::Diverged {
                    step: step + 1,
                    what: format!("val/loss is {vl}"),
                });
            }
            if last {
                return Ok(Outcome::Done {
                    val_loss: vl,
                    val_bpb: bpb,
                });
            }
        }
    }
    unreachable!("the last step always evaluates")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;
    use registry::Role;

    #[test]
    fn gradients_handed_to_the_optimizer_carry_no_graph() -> Result<()> {
        // w * x with x derived from w: d/dw = x + w, built from tracked tensors.
        let var = Var::new(&[1f32, 2.0], &Device::Cpu)?;
        let x = (var.as_tensor() * 3.0)?;
        let loss = (var.as_tensor() * &x)?.sum_all()?;
        let raw = loss.backward()?;
        assert!(
            raw.get(var.as_tensor()).unwrap().track_op(),
            "candle now detaches variable gradients itself; backward() can go"
        );
        let p = Param {
            name: "w".into(),
            var: var.clone(),
            role: Role::Hidden,
        };
        let g = backward(&loss, &[p])?;
        let g = g.get(var.as_tensor()).unwrap();
        assert!(!g.track_op());
        assert_eq!(g.to_vec1::<f32>()?, vec![6.0, 12.0]);
        Ok(())
    }
}
