//! Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"; modded-nanogpt): SGD
//! with Nesterov momentum whose update, for each 2-D hidden matrix, is replaced by the
//! nearest semi-orthogonal matrix (approximately, by a quintic Newton-Schulz iteration), so
//! every direction of the update moves at the same rate. Embeddings, the tied head, norm
//! gains, gates, biases and residual mixing parameters are not hidden matrices: they go to an
//! AdamW group with its own rate and decay. One optimizer entry, two parameter groups.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor};
use registry::{restored, Entry, Optimizer, Param, ParamDoc, Role, Spec, Stepper};
use serde::{Deserialize, Serialize};

use super::adamw::{check_adam, AdamW, AdamWState};

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

    fn build(&self, params: &[Param]) -> Result<Box<dyn Stepper>> {
        Ok(Box::new(MuonState::new(self, None, params)?))
    }
}

/// Orthogonalizes `g` (rows x cols): X = G / |G|_F, then `steps` rounds of
/// X <- a X + (b A + c A^2) X with A = X X^T, on the wide orientation (transposed if
/// rows > cols, so that A is the smaller Gram matrix). Singular values end in roughly
/// [0.7, 1.2]; singular vectors are G's.
pub fn newton_schulz(g: &Tensor, steps: usize) -> Result<Tensor> {
    let (a, b, c) = NS_COEFFS;
    let (rows, cols) = g.dims2()?;
    let tall = rows > cols;
    let mut x = g.to_dtype(DType::F32)?;
    if tall {
        x = x.t()?.contiguous()?;
    }
    x = (&x / (frobenius(&x)? + 1e-7))?;
    for _ in 0..steps {
        let gram = x.matmul(&x.t()?)?;
        let poly = ((&gram * b)? + (gram.matmul(&gram)? * c)?)?;
        x = ((&x * a)? + poly.matmul(&x)?)?;
    }
    if tall {
        x = x.t()?.contiguous()?;
    }
    Ok(x)
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

struct MatrixSlot {
    param: Param,
    momentum: Tensor,
    /// NorMuon's per-row second moment (rows, 1).
    row_v: Option<Tensor>,
}

/// Muon (or NorMuon, with `row_norm`) over the hidden matrices, AdamW over the rest.
pub(crate) struct MuonState {
    cfg: Muon,
    row_norm: Option<RowNorm>,
    matrices: Vec<MatrixSlot>,
    adam: AdamWState,
}

impl MuonState {
    pub(crate) fn new(cfg: &Muon, row_norm: Option<RowNorm>, params: &[Param]) -> Result<Self> {
        let (mine, rest): (Vec<Param>, Vec<Param>) = params.iter().cloned().partition(takes);
        let matrices = mine
            .into_iter()
            .map(|param| {
                let w = param.var.as_tensor();
                Ok(MatrixSlot {
                    momentum: w.zeros_like()?.to_dtype(DType::F32)?,
                    row_v: match row_norm {
                        Some(_) => Some(Tensor::zeros((w.dim(0)?, 1), DType::F32, w.device())?),
                        None => None,
                    },
                    param,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            row_norm,
            matrices,
            adam: AdamWState::new(cfg.adam(), &rest)?,
        })
    }
}

/// NorMuon's step on an orthogonalized update `o` (rows, cols): updates the row second
/// moment v <- b2 v + (1 - b2) mean_row(o^2) and returns o / sqrt(v), before any rescale.
pub(crate) fn normalize_rows(o: &Tensor, v: &Tensor, n: RowNorm) -> Result<(Tensor, Tensor)> {
    let v = ((v * n.beta2)? + (o.sqr()?.mean_keepdim(1)? * (1.0 - n.beta2))?)?;
    let normed = o.broadcast_div(&(v.sqrt()? + n.eps)?)?;
    Ok((normed, v))
}

fn frobenius(t: &Tensor) -> Result<f64> {
    Ok(t.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64)
}

impl Stepper for MuonState {
    fn step(&mut self, grads: &GradStore, factor: f64) -> Result<()> {
        let c = &self.cfg;
        let lr = c.lr * factor;
        for s in &mut self.matrices {
            let Some(g) = grads.get(s.param.var.as_tensor()) else {
                continue;
            };
            let g = g.to_dtype(DType::F32)?;
            s.momentum = ((&s.momentum * c.momentum)? + &g)?;
            let u = if c.nesterov {
                (&g + (&s.momentum * c.momentum)?)?
            } else {
                s.momentum.clone()
            };
            let mut o = newton_schulz(&u, c.ns_steps)?;
            if let (Some(n), Some(v)) = (self.row_norm, s.row_v.as_mut()) {
                let (normed, v2) = normalize_rows(&o, v, n)?;
                *v = v2;
                // Back to the orthogonalized update's overall size: only the balance between
                // rows changes.
                let scale = frobenius(&o)? / frobenius(&normed)?.max(1e-30);
                o = (normed * scale)?;
            }
            let (rows, cols) = o.dims2()?;
            let shape_scale = (rows as f64 / cols as f64).max(1.0).sqrt();
            let mut w = s.param.var.as_tensor().to_dtype(DType::F32)?;
            if c.weight_decay > 0.0 {
                w = (w * (1.0 - lr * c.weight_decay))?;
            }
            let w = (w - (o * (lr * shape_scale))?)?;
            s.param.var.set(&w.to_dtype(s.param.var.dtype())?)?;
        }
        self.adam.step(grads, factor)
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = self.adam.state()?;
        for s in &self.matrices {
            out.push((format!("{}.momentum", s.param.name), s.momentum.clone()));
            if let Some(v) = &s.row_v {
                out.push((format!("{}.row_v", s.param.name), v.clone()));
            }
        }
        Ok(out)
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        self.adam.load_state(state)?;
        for s in &mut self.matrices {
            s.momentum = restored(state, &format!("{}.momentum", s.param.name), &s.momentum)?;
            if let Some(v) = s.row_v.as_mut() {
                *v = restored(state, &format!("{}.row_v", s.param.name), v)?;
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
    use crate::nn::randn;
    use candle_core::{Device, Var};

    /// Eigenvalues of a symmetric matrix by cyclic Jacobi rotations, in f64: an independent
    /// route to singular values (those of X are the square roots of eig(X X^T)).
    fn symmetric_eigenvalues(mut a: Vec<Vec<f64>>) -> Vec<f64> {
        let n = a.len();
        for _ in 0..100 {
            let off: f64 = (0..n)
                .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
                .map(|(i, j)| a[i][j] * a[i][j])
                .sum();
            if off < 1e-22 {
                break;
            }
            for p in 0..n {
                for q in p + 1..n {
                    if a[p][q].abs() < 1e-300 {
                        continue;
                    }
                    let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                    let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                    let t = if theta == 0.0 { 1.0 } else { t };
                    let (c, s) = (1.0 / (t * t + 1.0).sqrt(), t / (t * t + 1.0).sqrt());
                    for k in 0..n {
                        let (akp, akq) = (a[k][p], a[k][q]);
                        a[k][p] = c * akp - s * akq;
                        a[k][q] = s * akp + c * akq;
                    }
                    for k in 0..n {
                        let (apk, aqk) = (a[p][k], a[q][k]);
                        a[p][k] = c * apk - s * aqk;
                        a[q][k] = s * apk + c * aqk;
                    }
                }
            }
        }
        (0..n).map(|i| a[i][i]).collect()
    }

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
    fn jacobi_finds_hand_worked_eigenvalues() {
        // [[2, 1], [1, 2]] has eigenvalues 1 and 3.
        let mut e = symmetric_eigenvalues(vec![vec![2.0, 1.0], vec![1.0, 2.0]]);
        e.sort_by(f64::total_cmp);
        assert!(
            (e[0] - 1.0).abs() < 1e-12 && (e[1] - 3.0).abs() < 1e-12,
            "{e:?}"
        );
    }

    #[test]
    fn a_rank_one_matrix_follows_the_scalar_quintic() -> Result<()> {
        // G = [3 4] has one singular value, 5; normalized it is 1, and five rounds of
        // s <- a s + b s^3 + c s^5 take 1 to 0.701, 1.11362, 0.720706, 1.089974, 0.696436.
        let g = Tensor::new(&[[3f32, 4.0]], &Device::Cpu)?;
        let o = newton_schulz(&g, 5)?.to_vec2::<f32>()?;
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
            let after = singular_values(&newton_schulz(&g, 5)?)?;
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
        let mut opt = cfg.build(&params)?;
        let gw = randn(5, (3, 6), 1.0)?;
        let loss = ((hidden.as_tensor() * &gw)?.sum_all()?
            + (gain.as_tensor() * Tensor::new(&[2f32, -3.0], &dev)?)?.sum_all()?)?;
        let w0 = hidden.as_tensor().copy()?;
        opt.step(&loss.backward()?, 0.5)?;
        // First step: momentum = g and the Nesterov update (1 + mu) g, which Newton-Schulz
        // normalizes away; wide matrix, so no shape scale. Rate 0.1 x 0.5.
        let want = (w0 - (newton_schulz(&gw, 5)? * 0.05)?)?;
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
}
