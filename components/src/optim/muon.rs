//! Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"; modded-nanogpt): SGD
//! with Nesterov momentum whose update, for each 2-D hidden matrix, is replaced by the
//! nearest semi-orthogonal matrix (approximately, by a quintic Newton-Schulz iteration), so
//! every direction of the update moves at the same rate. Embeddings, the tied head, norm
//! gains, gates, biases and residual mixing parameters are not hidden matrices: they go to an
//! AdamW group with its own rate and decay. One optimizer entry, two parameter groups.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor};
use registry::{restored, Entry, Optimizer, Param, ParamDoc, Ranks, Role, Spec, Stepper};
use serde::{Deserialize, Serialize};

use super::adamw::{check_adam, AdamW, AdamWState};
use crate::fused::{gram_pays, muon_apply, muon_prepare, newton_schulz_block, row_sum_squares};

/// The quintic's coefficients (modded-nanogpt): chosen to push small singular values up as
/// fast as possible, at the price of leaving them in a band around 1 rather than at 1.
const NS_COEFFS: (f64, f64, f64) = (3.4445, -4.7750, 2.0315);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Muon {
    pub lr: f64,
    pub momentum: f64,
    pub nesterov: bool,
    pub ns_steps: usize,
    pub weight_decay: f64,
    pub adam_lr: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_weight_decay: f64,
}

impl Default for Muon {
    fn default() -> Self {
        Self {
            lr: 0.02,
            momentum: 0.95,
            nesterov: true,
            ns_steps: 5,
            weight_decay: 0.0,
            adam_lr: 3e-3,
            adam_beta1: 0.9,
            adam_beta2: 0.95,
            adam_weight_decay: 0.0,
        }
    }
}

impl Muon {
    pub(crate) fn adam(&self) -> AdamW {
        AdamW {
            lr: self.adam_lr,
            beta1: self.adam_beta1,
            beta2: self.adam_beta2,
            eps: 1e-8,
            weight_decay: self.adam_weight_decay,
        }
    }

    pub(crate) fn check(&self) -> std::result::Result<(), String> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(format!("lr must be positive, got {}", self.lr));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(format!("momentum must be in [0, 1), got {}", self.momentum));
        }
        if self.ns_steps == 0 {
            return Err("ns_steps must be at least 1".into());
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(format!(
                "weight_decay must be >= 0, got {}",
                self.weight_decay
            ));
        }
        let a = self.adam();
        check_adam(a.lr, a.beta1, a.beta2, a.eps, a.weight_decay).map_err(|e| format!("adam_{e}"))
    }
}

impl Spec for Muon {
    fn validate(&self) -> std::result::Result<(), String> {
        self.check()
    }
}

impl Optimizer for Muon {
    fn lr(&self) -> f64 {
        self.lr
    }

    fn build(&self, params: &[Param], compute: DType) -> Result<Box<dyn Stepper>> {
        Ok(Box::new(MuonState::new(self, None, params, compute)?))
    }
}

/// Orthogonalizes `g`, one matrix (rows, cols) or a stack of them (k, rows, cols), each on
/// its own: X = G / |G|_F, then `steps` rounds of X <- a X + (b A + c A^2) X with
/// A = X X^T, on the wide orientation (transposed if rows > cols, so that A is the smaller
/// Gram matrix). The rounds run in `dtype`: bf16 puts them on the tensor cores, as Muon's
/// reference does (the normalization is taken in f32 first). Singular values end in roughly
/// [0.7, 1.2]; singular vectors are G's. Returns f32.
pub fn newton_schulz(g: &Tensor, steps: usize, dtype: DType) -> Result<Tensor> {
    let r = g.rank();
    let (rows, cols) = (g.dim(r - 2)?, g.dim(r - 1)?);
    let tall = rows > cols;
    let mut x = g.to_dtype(DType::F32)?;
    if tall {
        x = x.t()?.contiguous()?;
    }
    let norm = x.sqr()?.sum_keepdim(r - 1)?.sum_keepdim(r - 2)?.sqrt()?;
    x = x.broadcast_div(&(norm + 1e-7)?)?.to_dtype(dtype)?;
    x = rounds(x, steps)?.to_dtype(DType::F32)?;
    if tall {
        x = x.t()?.contiguous()?;
    }
    Ok(x)
}

/// `steps` quintic rounds X <- a X + (b A + c A^2) X on a normalized X (.., R, C), in its
/// dtype. A is the Gram matrix of the smaller side: X X^T when R <= C; for a tall X the same
/// polynomial as X (b A' + c A'^2) with A' = X^T X (X p(X^T X) = p(X X^T) X), so a tall stack
/// needs no transposed copies. Where the long side is at least twice the short, the rounds
/// run two at a time on the Gram matrix (fewer products, the same rounds in exact
/// arithmetic; newton_schulz.rs says why not more than two), otherwise one at a time.
fn rounds(mut x: Tensor, steps: usize) -> Result<Tensor> {
    let r = x.rank();
    for n in blocks(x.dim(r - 2)?, x.dim(r - 1)?, steps) {
        x = newton_schulz_block(&x, n, NS_COEFFS)?;
    }
    Ok(x)
}

/// The blocks [`rounds`] takes `steps` rounds in on a (rows, cols) matrix: of two where the
/// Gram form pays, of one otherwise, the last holding what is left.
fn blocks(rows: usize, cols: usize, steps: usize) -> impl Iterator<Item = usize> {
    let size = if gram_pays(rows, cols) { 2 } else { 1 };
    (0..steps)
        .step_by(size)
        .map(move |done| size.min(steps - done))
}

/// Multiply-adds of `steps` rounds on one (rows, cols) matrix as [`rounds`] takes them: for
/// a short side m and a long side k m, a block of n rounds is R (k m^3), n polynomials
/// (m^3 each), n - 1 updates of R (2 m^3) and of Q (m^3), and Q X (k m^3): (2k + 4n - 3) m^3,
/// so (2k + 1) m^3 a plain round and (2k + 5) m^3 a block of two (newton_schulz.rs).
fn rounds_cost(rows: usize, cols: usize, steps: usize) -> f64 {
    let m = rows.min(cols) as f64;
    let k = rows.max(cols) as f64 / m;
    blocks(rows, cols, steps)
        .map(|n| (2.0 * k + 4.0 * n as f64 - 3.0) * m.powi(3))
        .sum()
}

/// The rank that orthogonalizes each group: the costliest first, each to the rank with the
/// least work so far (the lowest on a tie), so the slowest rank's share stays near 1 / world
/// even when the groups differ in size (the 1B model's 16 groups run from 0.2 to 2.1 T
/// multiply-adds; on two ranks the slower one's share is 50.3% this way, 54.4% by turn).
/// The same on every rank, from the shapes alone.
fn owners(costs: &[f64], world: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..costs.len()).collect();
    order.sort_by(|&a, &b| costs[b].total_cmp(&costs[a]));
    let mut load = vec![0.0f64; world.max(1)];
    let mut owner = vec![0; costs.len()];
    for i in order {
        let least = (0..load.len())
            .min_by(|&a, &b| load[a].total_cmp(&load[b]))
            .expect("at least one rank");
        owner[i] = least;
        load[least] += costs[i];
    }
    owner
}

/// The slices (start, length) of a group of `k` matrices that ranks orthogonalize apart: on
/// one rank the whole group (one batched product a round), on several as many slices as
/// ranks (at most one a matrix), as even as they go, so that a group the size of a rank's
/// share does not set the slowest rank's time (the 1B model's three groups of 16 square
/// 2048 x 2048 matrices bound 4 and 8 ranks at 27% and 16% of the work taken whole).
fn slices(k: usize, world: usize) -> Vec<(usize, usize)> {
    let parts = world.clamp(1, k.max(1));
    let (base, extra) = (k / parts, k % parts);
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let len = base + usize::from(i < extra);
            start += len;
            (start - len, len)
        })
        .collect()
}

/// Whether a parameter is trained by the Muon group: 2-D hidden matrices only.
pub(crate) fn takes(p: &Param) -> bool {
    p.role == Role::Hidden && p.var.rank() == 2
}

/// NorMuon's extra state and settings (see normuon.rs).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowNorm {
    pub beta2: f64,
    pub eps: f64,
}

/// Hidden matrices of one shape, updated together: one batched product per Newton-Schulz
/// round for all of them (a 1B model has 24 of each shape: one launch instead of 24, and
/// tensor-core sized work), and no value read back to the host.
struct Group {
    params: Vec<Param>,
    /// Momentum buffers, stacked (k, rows, cols), f32.
    momentum: Tensor,
    /// NorMuon's per-row second moments, stacked (k, rows, 1).
    row_v: Option<Tensor>,
}

/// At most this many f32 values in one group's stack, so the step's transient copies stay
/// small beside the model (64 Mi values, 256 MiB a stack: about 1.5 GiB of temporaries for
/// the group in flight; 16 of the 1B model's 2048 x 2048 matrices, still a batch that fills
/// the GPU).
const GROUP_VALUES: usize = 1 << 26;

/// Muon (or NorMuon, with `row_norm`) over the hidden matrices, AdamW over the rest.
pub(crate) struct MuonState {
    cfg: Muon,
    row_norm: Option<RowNorm>,
    /// The dtype of the Newton-Schulz rounds.
    compute: DType,
    /// The element-wise work through the kernels of fused/muon_step.rs (on CUDA) rather
    /// than candle's composites (the CPU's path and their reference).
    fused: bool,
    groups: Vec<Group>,
    adam: AdamWState,
}

impl MuonState {
    pub(crate) fn new(
        cfg: &Muon,
        row_norm: Option<RowNorm>,
        params: &[Param],
        compute: DType,
    ) -> Result<Self> {
        let (mine, rest): (Vec<Param>, Vec<Param>) = params.iter().cloned().partition(takes);
        // Grouped by shape in first-seen order (deterministic), each group capped in size.
        let mut by_shape: Vec<((usize, usize), Vec<Param>)> = Vec::new();
        for p in mine {
            let shape = p.var.as_tensor().dims2()?;
            let cap = (GROUP_VALUES / (shape.0 * shape.1)).max(1);
            match by_shape
                .iter_mut()
                .find(|(s, members)| *s == shape && members.len() < cap)
            {
                Some((_, members)) => members.push(p),
                None => by_shape.push((shape, vec![p])),
            }
        }
        let groups = by_shape
            .into_iter()
            .map(|((rows, cols), params)| {
                let k = params.len();
                let device = params[0].var.device().clone();
                Ok(Group {
                    momentum: Tensor::zeros((k, rows, cols), DType::F32, &device)?,
                    row_v: match row_norm {
                        Some(_) => Some(Tensor::zeros((k, rows, 1), DType::F32, &device)?),
                        None => None,
                    },
                    params,
                })
            })
            .collect::<Result<_>>()?;
        let fused = params.first().is_some_and(|p| p.var.device().is_cuda());
        Ok(Self {
            cfg: cfg.clone(),
            row_norm,
            compute,
            fused,
            groups,
            adam: AdamWState::new(cfg.adam(), &rest)?,
        })
    }
}

/// NorMuon's step on orthogonalized updates `o` ((rows, cols), or stacked (k, rows, cols)):
/// updates the row second moments v <- b2 v + (1 - b2) mean_row(o^2) and returns o / sqrt(v),
/// before any rescale. The definition as written: the step folds it into one factor per row,
/// and the tests hold the step to this.
#[cfg(test)]
pub(crate) fn normalize_rows(o: &Tensor, v: &Tensor, n: RowNorm) -> Result<(Tensor, Tensor)> {
    let last = o.rank() - 1;
    let v = ((v * n.beta2)? + (o.sqr()?.mean_keepdim(last)? * (1.0 - n.beta2))?)?;
    let normed = o.broadcast_div(&(v.sqrt()? + n.eps)?)?;
    Ok((normed, v))
}

/// One group's orthogonalized update before it is shared: the matrices present, the new
/// momentum, and the update of each of its [`slices`], on the rank that computed it.
struct Prepared {
    present: Vec<bool>,
    momentum: Tensor,
    o: Vec<Option<Tensor>>,
}

impl MuonState {
    /// The step, with the groups' orthogonalizations shared out over `ranks` (each group cut
    /// into [`slices`], each slice to one rank, balanced by their products' cost: [`owners`])
    /// and their results broadcast: every rank ends with the same update, the single-rank
    /// one, having run about 1 / world of the Newton-Schulz work. The momentum, a pass over
    /// each stack, is kept on every rank.
    fn step_on(
        &mut self,
        grads: &GradStore,
        factor: f64,
        grad_scale: f64,
        ranks: Option<&dyn Ranks>,
    ) -> Result<()> {
        let c = self.cfg.clone();
        let lr = c.lr * factor;
        let (rank, world) = ranks.map_or((0, 1), |r| (r.rank(), r.world()));
        // Every group's slices, and the rank of each, in the groups' order.
        let mut units = Vec::new();
        let mut costs = Vec::new();
        for g in &self.groups {
            let (k, rows, cols) = g.momentum.dims3()?;
            let cut = slices(k, world);
            costs.extend(
                cut.iter()
                    .map(|&(_, len)| len as f64 * rounds_cost(rows, cols, c.ns_steps)),
            );
            units.push(cut);
        }
        let mut owned = owners(&costs, world).into_iter();
        let owner: Vec<Vec<usize>> = units
            .iter()
            .map(|cut| owned.by_ref().take(cut.len()).collect())
            .collect();
        // First every group's momentum and this rank's orthogonalizations, so that no rank
        // waits on another's rounds before its own are done; then the exchange and updates.
        let mut prepared = Vec::with_capacity(self.groups.len());
        for (i, group) in self.groups.iter().enumerate() {
            // A matrix without a gradient (unused by the loss) joins the stack with zeros, and
            // keeps its weights and state as they were.
            let present: Vec<Option<Tensor>> = group
                .params
                .iter()
                .map(|p| grads.get(p.var.as_tensor()).cloned())
                .collect();
            let g = present
                .iter()
                .zip(&group.params)
                .map(|(g, p)| match g {
                    Some(g) => g.to_dtype(DType::F32),
                    None => p.var.as_tensor().zeros_like()?.to_dtype(DType::F32),
                })
                .collect::<Result<Vec<_>>>()?;
            let g = Tensor::stack(&g, 0)?;
            // This rank's slices of the stack x, orthogonalized by `ortho`.
            let mine = |x: &Tensor, ortho: &dyn Fn(Tensor) -> Result<Tensor>| {
                units[i]
                    .iter()
                    .zip(&owner[i])
                    .map(|(&(start, len), &o)| match o == rank {
                        true if len == x.dim(0)? => ortho(x.clone()).map(Some),
                        // A slice copied out into a stack of its own, as the batched
                        // rounds (tested on whole stacks) always receive one.
                        true => ortho(x.narrow(0, start, len)?.force_contiguous()?).map(Some),
                        false => Ok(None),
                    })
                    .collect::<Result<Vec<_>>>()
            };
            let (momentum, o) = if self.fused {
                let beta = (c.momentum, c.nesterov);
                let prepared = muon_prepare(&group.momentum, &g, beta, grad_scale, self.compute);
                let (momentum, x) = prepared?;
                let o = mine(&x, &|x| rounds(x, c.ns_steps))?;
                (momentum, o)
            } else {
                let g = match grad_scale {
                    1.0 => g,
                    s => (g * s)?,
                };
                let momentum = ((&group.momentum * c.momentum)? + &g)?;
                let u = if c.nesterov {
                    (&g + (&momentum * c.momentum)?)?
                } else {
                    momentum.clone()
                };
                let o = mine(&u, &|u| newton_schulz(&u, c.ns_steps, self.compute))?;
                (momentum, o)
            };
            let present = present.iter().map(Option::is_some).collect();
            prepared.push(Prepared {
                present,
                momentum,
                o,
            });
        }
        for (i, (group, p)) in self.groups.iter_mut().zip(prepared).enumerate() {
            let o = match ranks {
                Some(r) if world > 1 => {
                    // Each slice's update from its owner on every rank (broadcasts carry f32).
                    let (_, rows, cols) = p.momentum.dims3()?;
                    let dtype = if self.fused { self.compute } else { DType::F32 };
                    let parts =
                        p.o.into_iter()
                            .zip(&units[i])
                            .zip(&owner[i])
                            .map(|((o, &(_, len)), &root)| {
                                let mine = match o {
                                    Some(o) => o.to_dtype(DType::F32)?,
                                    None => {
                                        let shape = (len, rows, cols);
                                        Tensor::zeros(shape, DType::F32, p.momentum.device())?
                                    }
                                };
                                r.broadcast(&mine, root)
                            })
                            .collect::<Result<Vec<_>>>()?;
                    Tensor::cat(&parts, 0)?.to_dtype(dtype)?
                }
                _ => match p.o.into_iter().next().flatten() {
                    Some(o) => o,
                    None => candle_core::bail!("muon: group {i} was orthogonalized nowhere"),
                },
            };
            let present = p.present;
            let momentum = p.momentum;
            let (k, rows, cols) = o.dims3()?;
            let shape_scale = (rows as f64 / cols as f64).max(1.0).sqrt();
            // The update is o times a factor per row, taken from o's row sums of squares in
            // one pass, so that the step makes one more pass over o, not one per operation.
            let mut row_v = None;
            let factor = match (self.row_norm, group.row_v.as_ref()) {
                (Some(n), Some(v)) => {
                    // NorMuon (`normalize_rows`, as the tests check): v <- b2 v + (1 - b2) mean_row(o^2), each
                    // row divided by sqrt(v) + eps, then the whole rescaled back to the
                    // orthogonalized update's size (|o| / |normed|, both from the row sums).
                    let rs = match self.fused {
                        true => row_sum_squares(&o)?,
                        false => o.sqr()?.sum_keepdim(2)?,
                    }; // (k, rows, 1)
                    let v2 = ((v * n.beta2)? + (&rs * ((1.0 - n.beta2) / cols as f64))?)?;
                    let inv = (v2.sqrt()? + n.eps)?.recip()?;
                    let o_norm = rs.sum_keepdim(1)?.sqrt()?;
                    let normed_norm = (&rs * inv.sqr()?)?.sum_keepdim(1)?.sqrt()?;
                    let scale = o_norm.broadcast_div(&normed_norm.maximum(1e-30)?)?;
                    row_v = Some(v2);
                    Some((inv.broadcast_mul(&scale)? * (lr * shape_scale))?)
                }
                _ => None,
            };
            let decay = 1.0 - lr * c.weight_decay;
            if self.fused {
                // The weights updated in place, w = decay w - f o, from o in its dtype.
                let f = match factor {
                    Some(f) => f,
                    None => Tensor::full((lr * shape_scale) as f32, (k, rows, 1), o.device())?,
                };
                for (j, param) in group.params.iter().enumerate() {
                    if present[j] {
                        muon_apply(param.var.as_tensor(), &o.get(j)?, &f.get(j)?, decay)?;
                    }
                }
            } else {
                let o = match factor {
                    Some(f) => o.broadcast_mul(&f)?,
                    None => (o * (lr * shape_scale))?,
                };
                for (j, param) in group.params.iter().enumerate() {
                    if !present[j] {
                        continue;
                    }
                    let mut w = param.var.as_tensor().to_dtype(DType::F32)?;
                    if c.weight_decay > 0.0 {
                        w = (w * decay)?;
                    }
                    let w = (w - o.get(j)?)?;
                    param.var.set(&w.to_dtype(param.var.dtype())?)?;
                }
            }
            let all = present.iter().all(|&x| x);
            let keep_old = |new: Tensor, old: &Tensor| -> Result<Tensor> {
                if all {
                    return Ok(new);
                }
                let parts = present
                    .iter()
                    .enumerate()
                    .map(|(j, &has)| if has { new.get(j) } else { old.get(j) })
                    .collect::<Result<Vec<_>>>()?;
                Tensor::stack(&parts, 0)
            };
            group.momentum = keep_old(momentum, &group.momentum)?;
            if let (Some(new), Some(old)) = (row_v, group.row_v.as_ref()) {
                group.row_v = Some(keep_old(new, old)?);
            }
        }
        Ok(())
    }
}

impl Stepper for MuonState {
    fn step_scaled(
        &mut self,
        grads: &GradStore,
        factor: f64,
        grad_scale: f64,
        ranks: Option<&dyn Ranks>,
    ) -> Result<()> {
        self.step_on(grads, factor, grad_scale, ranks)?;
        self.adam.step_scaled(grads, factor, grad_scale, None)
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        // Per matrix, under the names a checkpoint has always used.
        let mut out = self.adam.state()?;
        for group in &self.groups {
            for (i, p) in group.params.iter().enumerate() {
                out.push((format!("{}.momentum", p.name), group.momentum.get(i)?));
                if let Some(v) = &group.row_v {
                    out.push((format!("{}.row_v", p.name), v.get(i)?));
                }
            }
        }
        Ok(out)
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        self.adam.load_state(state)?;
        for group in &mut self.groups {
            let restack = |stack: &Tensor, what: &str| -> Result<Tensor> {
                let parts = group
                    .params
                    .iter()
                    .enumerate()
                    .map(|(i, p)| restored(state, &format!("{}.{what}", p.name), &stack.get(i)?))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::stack(&parts, 0)
            };
            group.momentum = restack(&group.momentum, "momentum")?;
            if let Some(v) = &group.row_v {
                group.row_v = Some(restack(v, "row_v")?);
            }
        }
        Ok(())
    }
}

inventory::submit! {
    Entry::optimizer::<Muon>(
        "Muon",
        "Newton-Schulz-orthogonalized Nesterov momentum for hidden matrices, AdamW for the rest",
        &[
            ParamDoc { name: "lr", doc: "peak rate of the hidden matrices (Muon group)" },
            ParamDoc { name: "momentum", doc: "momentum coefficient" },
            ParamDoc { name: "nesterov", doc: "Nesterov momentum" },
            ParamDoc { name: "ns_steps", doc: "Newton-Schulz iterations" },
            ParamDoc { name: "weight_decay", doc: "decoupled decay of the hidden matrices" },
            ParamDoc { name: "adam_lr", doc: "peak rate of the AdamW group (embeddings, gains, gates, mixing)" },
            ParamDoc { name: "adam_beta1", doc: "AdamW group first-moment decay" },
            ParamDoc { name: "adam_beta2", doc: "AdamW group second-moment decay" },
            ParamDoc { name: "adam_weight_decay", doc: "AdamW group decay (embeddings and gates only)" },
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::symmetric_eigenvalues;
    use crate::nn::randn;
    use candle_core::{Device, Var};

    fn singular_values(x: &Tensor) -> Result<Vec<f64>> {
        let x = x.to_dtype(DType::F64)?;
        let (r, c) = x.dims2()?;
        let gram = if r <= c {
            x.matmul(&x.t()?)?
        } else {
            x.t()?.matmul(&x)?
        };
        Ok(symmetric_eigenvalues(gram.to_vec2::<f64>()?)
            .into_iter()
            .map(|e| e.max(0.0).sqrt())
            .collect())
    }

    #[test]
    fn a_rank_one_matrix_follows_the_scalar_quintic() -> Result<()> {
        // G = [3 4] has one singular value, 5; normalized it is 1, and five rounds of
        // s <- a s + b s^3 + c s^5 take 1 to 0.701, 1.11362, 0.720706, 1.089974, 0.696436.
        let g = Tensor::new(&[[3f32, 4.0]], &Device::Cpu)?;
        let o = newton_schulz(&g, 5, DType::F32)?.to_vec2::<f32>()?;
        let s = 0.696_436_4f32;
        assert!(
            (o[0][0] - 0.6 * s).abs() < 1e-5 && (o[0][1] - 0.8 * s).abs() < 1e-5,
            "{o:?}"
        );
        Ok(())
    }

    #[test]
    fn singular_values_land_in_the_quintics_band() -> Result<()> {
        // Wide and tall (the transposed path) random matrices with a spread of singular
        // values: afterwards all lie in about [0.7, 1.2].
        for (seed, shape) in [(1u64, (16usize, 48usize)), (2, (48, 16)), (3, (32, 40))] {
            let g = randn(seed, shape, 1.0)?;
            let before = singular_values(&g)?;
            let after = singular_values(&newton_schulz(&g, 5, DType::F32)?)?;
            assert_eq!(after.len(), shape.0.min(shape.1));
            let (lo, hi) = after
                .iter()
                .fold((f64::MAX, f64::MIN), |(l, h), &s| (l.min(s), h.max(s)));
            assert!(lo > 0.65 && hi < 1.2, "{shape:?}: [{lo}, {hi}]");
            let ratio = before.iter().cloned().fold(f64::MIN, f64::max)
                / before.iter().cloned().fold(f64::MAX, f64::min);
            assert!(
                ratio > 2.0,
                "{shape:?}: input too well conditioned ({ratio})"
            );
        }
        Ok(())
    }

    #[test]
    fn hidden_matrices_take_the_muon_step_and_the_rest_adamw() -> Result<()> {
        let dev = Device::Cpu;
        let hidden = Var::from_tensor(&randn(4, (3, 6), 1.0)?)?;
        let gain = Var::new(&[1f32, 1.0], &dev)?;
        let params = [
            Param {
                name: "w".into(),
                var: hidden.clone(),
                role: Role::Hidden,
            },
            Param {
                name: "g".into(),
                var: gain.clone(),
                role: Role::Gain,
            },
        ];
        let cfg = Muon {
            lr: 0.1,
            adam_lr: 0.01,
            ..Muon::default()
        };
        let mut opt = cfg.build(&params, DType::F32)?;
        let gw = randn(5, (3, 6), 1.0)?;
        let loss = ((hidden.as_tensor() * &gw)?.sum_all()?
            + (gain.as_tensor() * Tensor::new(&[2f32, -3.0], &dev)?)?.sum_all()?)?;
        let w0 = hidden.as_tensor().copy()?;
        opt.step(&loss.backward()?, 0.5)?;
        // First step: momentum = g and the Nesterov update (1 + mu) g, which Newton-Schulz
        // normalizes away; wide matrix, so no shape scale. Rate 0.1 x 0.5.
        let want = (w0 - (newton_schulz(&gw, 5, DType::F32)? * 0.05)?)?;
        let d = (hidden.as_tensor() - want)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-6, "{d}");
        // Adam's first step moves each entry by its rate against the gradient's sign.
        let g = gain.as_tensor().to_vec1::<f32>()?;
        assert!(
            (g[0] - 0.995).abs() < 1e-6 && (g[1] - 1.005).abs() < 1e-6,
            "{g:?}"
        );
        Ok(())
    }

    #[test]
    fn a_clipping_factor_is_the_step_on_scaled_gradients() -> Result<()> {
        // Muon and NorMuon (both groups: a hidden matrix and a gain) given clipping's factor s
        // take the steps they take on the gradients times s, over two steps (the second
        // carries momentum and NorMuon's row statistics).
        let optimizers: [Box<dyn Optimizer>; 2] = [
            Box::new(Muon::default()),
            Box::new(crate::optim::normuon::NorMuon::default()),
        ];
        for opt in optimizers {
            let make = || -> Result<Vec<Param>> {
                Ok(vec![
                    Param {
                        name: "w".into(),
                        var: Var::from_tensor(&randn(6, (4, 8), 1.0)?)?,
                        role: Role::Hidden,
                    },
                    Param {
                        name: "g".into(),
                        var: Var::from_tensor(&randn(7, 4, 1.0)?)?,
                        role: Role::Gain,
                    },
                ])
            };
            let (a, b) = (make()?, make()?);
            let (mut sa, mut sb) = (opt.build(&a, DType::F32)?, opt.build(&b, DType::F32)?);
            for (step, seed) in [(0, 8u64), (1, 9)] {
                let grads_of = |ps: &[Param], scale: f64| -> Result<GradStore> {
                    let mut loss = Tensor::new(0f32, &Device::Cpu)?;
                    for (i, p) in ps.iter().enumerate() {
                        let w = (randn(seed + 10 * i as u64, p.var.shape(), 1.0)? * scale)?;
                        loss = (loss + (p.var.as_tensor() * w)?.sum_all()?)?;
                    }
                    loss.backward()
                };
                sa.step_scaled(&grads_of(&a, 1.0)?, 1.0, 0.3, None)?;
                sb.step(&grads_of(&b, 0.3)?, 1.0)?;
                for (x, y) in a.iter().zip(&b) {
                    let d = (x.var.as_tensor() - y.var.as_tensor())?
                        .abs()?
                        .max_all()?
                        .to_scalar::<f32>()?;
                    assert!(d < 1e-6, "step {step}, {}: {d}", x.name);
                }
            }
        }
        Ok(())
    }

    fn rel_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        let d = (a - b)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        let n = b.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        Ok(d / n)
    }

    #[test]
    fn a_stack_is_orthogonalized_matrix_by_matrix() -> Result<()> {
        // Each matrix of a stack, wide or tall (the transposed path), comes out as it does
        // alone: the batched products and per-matrix norms do not mix the matrices.
        for (seed, shape) in [(7u64, (8usize, 20usize)), (8, (20, 8))] {
            let mats = (0..3)
                .map(|i| randn(seed * 10 + i, shape, 1.0 + i as f64))
                .collect::<Result<Vec<_>>>()?;
            let stacked = newton_schulz(&Tensor::stack(&mats, 0)?, 5, DType::F32)?;
            for (i, m) in mats.iter().enumerate() {
                let alone = newton_schulz(m, 5, DType::F32)?;
                let d = rel_diff(&stacked.get(i)?, &alone)?;
                assert!(d < 1e-6, "{shape:?} matrix {i}: {d}");
            }
        }
        Ok(())
    }

    #[test]
    fn bf16_rounds_agree_with_f32_to_bf16_rounding() -> Result<()> {
        // bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 2e-3 an operation). The
        // quintic does not converge to a point: it throws each singular value around a band
        // [0.7, 1.2], so rounding moves where a value lands inside it, and bf16 ends a few
        // percent (measured 4-6%) from f32 while staying in the band. Not more than 10%.
        let g = randn(11, (2, 32, 96), 1.0)?;
        let lo = newton_schulz(&g, 5, DType::BF16)?;
        let hi = newton_schulz(&g, 5, DType::F32)?;
        let d = rel_diff(&lo, &hi)?;
        assert!(d > 0.0 && d < 0.1, "{d}");
        for i in 0..2 {
            let sv = singular_values(&lo.get(i)?)?;
            let (a, b) = sv
                .iter()
                .fold((f64::MAX, f64::MIN), |(l, h), &s| (l.min(s), h.max(s)));
            assert!(a > 0.6 && b < 1.25, "[{a}, {b}]");
        }
        Ok(())
    }

    #[test]
    fn bf16_blocks_of_two_stay_in_the_band_where_one_block_of_five_leaves_it() -> Result<()> {
        // A wide matrix whose singular values fall by e^-1 every 10 (from about 0.45 to 3e-5
        // after normalization), as momentum matrices often are: in bf16 the smallest
        // eigenvalues of X X^T sit under its rounding. The rounds taken in blocks of two on
        // the Gram matrix (what `rounds` does at this 1:4 shape) land as near the f32 rounds
        // as plain bf16 rounds do (measured here 0.075-0.081 against 0.082-0.087, in a
        // float emulation of bf16) and inside the band; all five rounds in one block let a
        // rounded-negative eigenvalue grow by about 12 a round and leave the band (singular
        // values 20-70).
        let decay = Tensor::arange(0f32, 64.0, &Device::Cpu)?
            .affine(-0.1, 0.0)?
            .exp()?;
        let g = randn(21, (64, 64), 1.0)?
            .broadcast_mul(&decay.unsqueeze(0)?)?
            .matmul(&randn(22, (64, 256), 1.0)?)?;
        let hi = newton_schulz(&g, 5, DType::F32)?;
        let lo = newton_schulz(&g, 5, DType::BF16)?;
        let d = rel_diff(&lo, &hi)?;
        let sv = singular_values(&lo)?;
        let top = sv.iter().cloned().fold(0.0, f64::max);
        assert!(d < 0.12 && top < 1.22, "blocks of two: {d}, top {top}");
        let x = (&g / g.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64)?;
        let one = newton_schulz_block(&x.to_dtype(DType::BF16)?, 5, NS_COEFFS)?;
        let one_top = singular_values(&one.to_dtype(DType::F32)?)?
            .into_iter()
            .fold(0.0, f64::max);
        eprintln!("bf16 blocks of two: {d:.3} from f32, top {top:.3}; one block: {one_top:.1}");
        assert!(one_top > 2.0, "one block of five: top {one_top}");
        Ok(())
    }

    #[test]
    fn the_rounds_cost_what_their_products_count() {
        // By hand, m = 2048: a square matrix's five plain rounds are 5 x 3 m^3; an FFN
        // matrix (1:4, either way up) takes two blocks of two and one plain round,
        // 2 x 13 + 9 = 35 m^3 (five plain rounds would be 45).
        let m3 = 2048f64.powi(3);
        assert_eq!(blocks(2048, 8192, 5).collect::<Vec<_>>(), vec![2, 2, 1]);
        assert_eq!(blocks(2048, 8192, 4).collect::<Vec<_>>(), vec![2, 2]);
        assert_eq!(blocks(2048, 2048, 3).collect::<Vec<_>>(), vec![1, 1, 1]);
        assert_eq!(rounds_cost(2048, 2048, 5), 15.0 * m3);
        assert_eq!(rounds_cost(2048, 8192, 5), 35.0 * m3);
        assert_eq!(rounds_cost(8192, 2048, 5), 35.0 * m3);
        assert_eq!(rounds_cost(2048, 3072, 4), 4.0 * 4.0 * m3);
    }

    #[test]
    fn groups_go_to_ranks_by_cost_not_by_turn() {
        // [4, 1, 4, 1] on two ranks: by turn rank 0 would take both 4s (8 against 2); by
        // cost each rank takes a 4 and a 1 (5 and 5).
        assert_eq!(owners(&[4.0, 1.0, 4.0, 1.0], 2), vec![0, 0, 1, 1]);
        // The costliest first, ties to the lowest rank: 3 -> 0, 3 -> 1, then 2 -> 0, 2 -> 1,
        // 2 -> 0 (loads 7 and 5).
        assert_eq!(owners(&[2.0, 3.0, 2.0, 3.0, 2.0], 2), vec![0, 0, 1, 1, 0]);
        // One rank takes everything; more ranks than groups leave some idle.
        assert_eq!(owners(&[1.0, 2.0], 1), vec![0, 0]);
        assert_eq!(owners(&[1.0, 2.0], 4), vec![1, 0]);
    }

    #[test]
    fn a_group_is_cut_into_as_many_even_slices_as_ranks() {
        assert_eq!(slices(5, 1), vec![(0, 5)]);
        assert_eq!(slices(5, 2), vec![(0, 3), (3, 2)]);
        assert_eq!(slices(16, 3), vec![(0, 6), (6, 5), (11, 5)]);
        // Never an empty slice: at most one a matrix.
        assert_eq!(slices(2, 8), vec![(0, 1), (1, 1)]);
    }

    /// The slowest rank's share of the 1B model's Newton-Schulz work (24 layers: 48 square
    /// (2048, 2048) Q and O matrices in groups of 16, the 48 K and V (512, 2048) in one, 24
    /// (8192, 2048) and 24 (2048, 8192) FFN matrices in groups of 4), each group cut into
    /// `slices` or taken whole.
    fn slowest_share_at_1b(world: usize, cut: bool) -> f64 {
        let mut groups = vec![(16, 2048, 2048); 3];
        groups.push((48, 512, 2048));
        groups.extend([(4, 8192, 2048); 6]);
        groups.extend([(4, 2048, 8192); 6]);
        let costs: Vec<f64> = groups
            .iter()
            .flat_map(|&(k, rows, cols)| {
                let parts = if cut { slices(k, world) } else { vec![(0, k)] };
                parts
                    .into_iter()
                    .map(move |(_, len)| len as f64 * rounds_cost(rows, cols, 5))
            })
            .collect();
        let mut load = vec![0.0; world];
        for (c, o) in costs.iter().zip(owners(&costs, world)) {
            load[o] += c;
        }
        load.iter().cloned().fold(0.0, f64::max) / costs.iter().sum::<f64>()
    }

    #[test]
    fn slices_share_the_1b_models_rounds_nearly_evenly() {
        for (world, whole, sliced) in [(2, 0.503, 0.5), (4, 0.27, 0.25), (8, 0.16, 0.125)] {
            let (a, b) = (
                slowest_share_at_1b(world, false),
                slowest_share_at_1b(world, true),
            );
            eprintln!("{world} ranks: whole groups {a:.4}, slices {b:.4}");
            assert!(
                (a - whole).abs() < 0.005,
                "{world} ranks, whole groups: {a}"
            );
            assert!(b < sliced * 1.02, "{world} ranks, slices: {b}");
        }
    }

    #[test]
    fn grouped_matrices_each_take_their_own_step() -> Result<()> {
        // Three matrices of one shape (one group), one of another, one with no gradient:
        // after two NorMuon steps each equals the update worked out for it alone (momentum,
        // Nesterov, Newton-Schulz, row normalization, rescale, shape scale), and the one
        // without a gradient is untouched. Both ways: candle's composites, and the kernels'
        // ops of fused/muon_step.rs (their CPU implementations) with the rounds of a tall
        // matrix on its X^T X side.
        for fused in [false, true] {
            grouped_step(fused)?;
        }
        Ok(())
    }

    fn grouped_step(fused: bool) -> Result<()> {
        let dev = Device::Cpu;
        let shapes = [(6usize, 10usize), (6, 10), (10, 4), (6, 10), (6, 10)];
        let vars = shapes
            .iter()
            .enumerate()
            .map(|(i, &s)| randn(20 + i as u64, s, 1.0).and_then(|t| Var::from_tensor(&t)))
            .collect::<Result<Vec<_>>>()?;
        let params: Vec<Param> = vars
            .iter()
            .enumerate()
            .map(|(i, v)| Param {
                name: format!("w{i}"),
                var: v.clone(),
                role: Role::Hidden,
            })
            .collect();
        let cfg = Muon {
            lr: 0.1,
            ..Muon::default()
        };
        let n = RowNorm {
            beta2: 0.9,
            eps: 1e-8,
        };
        let mut opt = MuonState::new(&cfg, Some(n), &params, DType::F32)?;
        opt.fused = fused;
        assert_eq!(opt.groups.len(), 2);
        let w0: Vec<Tensor> = vars
            .iter()
            .map(|v| v.as_tensor().copy())
            .collect::<Result<_>>()?;
        let mut mom: Vec<Tensor> = w0.iter().map(|w| w.zeros_like()).collect::<Result<_>>()?;
        let mut rv: Vec<Tensor> = shapes
            .iter()
            .map(|s| Tensor::zeros((s.0, 1), DType::F32, &dev))
            .collect::<Result<_>>()?;
        let mut want = w0.clone();
        for step in 0..2u64 {
            // The loss sum(w_i * G_i) over all but the last matrix: its gradient is G_i.
            let gs: Vec<Tensor> = shapes
                .iter()
                .enumerate()
                .map(|(i, &s)| randn(40 + 10 * step + i as u64, s, 1.0))
                .collect::<Result<_>>()?;
            let mut loss = Tensor::zeros((), DType::F32, &dev)?;
            for i in 0..4 {
                loss = (loss + (vars[i].as_tensor() * &gs[i])?.sum_all()?)?;
            }
            opt.step(&loss.backward()?, 1.0)?;
            for i in 0..4 {
                mom[i] = ((&mom[i] * 0.95)? + &gs[i])?;
                let u = (&gs[i] + (&mom[i] * 0.95)?)?;
                let o = newton_schulz(&u, 5, DType::F32)?;
                let (normed, v) = normalize_rows(&o, &rv[i], n)?;
                rv[i] = v;
                let f = |t: &Tensor| -> Result<f32> { t.sqr()?.sum_all()?.sqrt()?.to_scalar() };
                let o = (&normed * (f(&o)? / f(&normed)?) as f64)?;
                let scale = (shapes[i].0 as f64 / shapes[i].1 as f64).max(1.0).sqrt();
                want[i] = (&want[i] - (o * (0.1 * scale))?)?;
            }
        }
        for (i, v) in vars.iter().enumerate() {
            let d = (v.as_tensor() - &want[i])?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(d < 1e-5, "fused {fused}, matrix {i}: {d}");
        }
        Ok(())
    }

    /// On a GPU: the stacked bf16 rounds against the f32 ones on the CPU, at the 1B model's
    /// shapes (tall and wide), and f32 on the GPU against the CPU.
    #[cfg(feature = "cuda")]
    #[test]
    fn newton_schulz_on_the_gpu_matches_the_cpu() -> Result<()> {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("skipped: no CUDA device");
            return Ok(());
        };
        for shape in [(3usize, 512usize, 2048usize), (2, 2048, 512)] {
            let g = randn(5, shape, 1.0)?;
            let cpu = newton_schulz(&g, 5, DType::F32)?;
            let g_gpu = g.to_device(&gpu)?;
            let f32_gpu = newton_schulz(&g_gpu, 5, DType::F32)?.to_device(&Device::Cpu)?;
            let bf16_gpu = newton_schulz(&g_gpu, 5, DType::BF16)?.to_device(&Device::Cpu)?;
            let (d32, d16) = (rel_diff(&f32_gpu, &cpu)?, rel_diff(&bf16_gpu, &cpu)?);
            eprintln!("newton-schulz {shape:?}: f32 gpu {d32:.2e}, bf16 gpu {d16:.2e}");
            assert!(d32 < 1e-4, "{shape:?} f32: {d32}");
            // Within the quintic's band, as on the CPU (bf16_rounds_agree_with_f32...).
            assert!(d16 < 0.1, "{shape:?} bf16: {d16}");
        }
        Ok(())
    }
}
