//! NorMuon (Li et al. 2025, arXiv 2510.05491): Muon whose orthogonalized update is
//! additionally balanced across rows. Newton-Schulz equalizes the singular values but leaves
//! some neurons (rows) with much larger updates than others; NorMuon keeps a per-row second
//! moment v <- b2 v + (1 - b2) mean_row(O^2), divides O by sqrt(v), and rescales the result to
//! O's Frobenius norm, so the step size is Muon's and only its distribution over rows changes.

use candle_core::{DType, Result};
use registry::{Entry, Optimizer, Param, ParamDoc, Spec, Stepper};
use serde::{Deserialize, Serialize};

use super::muon::{Muon, MuonState, RowNorm};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NorMuon {
    pub lr: f64,
    pub momentum: f64,
    pub nesterov: bool,
    pub ns_steps: usize,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub adam_lr: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_weight_decay: f64,
}

impl Default for NorMuon {
    fn default() -> Self {
        let m = Muon::default();
        Self {
            lr: m.lr,
            momentum: m.momentum,
            nesterov: m.nesterov,
            ns_steps: m.ns_steps,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: m.weight_decay,
            adam_lr: m.adam_lr,
            adam_beta1: m.adam_beta1,
            adam_beta2: m.adam_beta2,
            adam_weight_decay: m.adam_weight_decay,
        }
    }
}

impl NorMuon {
    fn muon(&self) -> Muon {
        Muon {
            lr: self.lr,
            momentum: self.momentum,
            nesterov: self.nesterov,
            ns_steps: self.ns_steps,
            weight_decay: self.weight_decay,
            adam_lr: self.adam_lr,
            adam_beta1: self.adam_beta1,
            adam_beta2: self.adam_beta2,
            adam_weight_decay: self.adam_weight_decay,
        }
    }

    fn row_norm(&self) -> RowNorm {
        RowNorm {
            beta2: self.beta2,
            eps: self.eps,
        }
    }
}

impl Spec for NorMuon {
    fn validate(&self) -> std::result::Result<(), String> {
        self.muon().check()?;
        if !(0.0..1.0).contains(&self.beta2) {
            return Err(format!("beta2 must be in [0, 1), got {}", self.beta2));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(format!("eps must be positive, got {}", self.eps));
        }
        Ok(())
    }
}

impl Optimizer for NorMuon {
    fn lr(&self) -> f64 {
        self.lr
    }

    fn build(&self, params: &[Param], compute: DType) -> Result<Box<dyn Stepper>> {
        Ok(Box::new(MuonState::new(
            &self.muon(),
            Some(self.row_norm()),
            params,
            compute,
        )?))
    }
}

inventory::submit! {
    Entry::optimizer::<NorMuon>(
        "NorMuon",
        "Muon with per-row second-moment normalization of the orthogonalized update",
        &[
            ParamDoc { name: "lr", doc: "peak rate of the hidden matrices (Muon group)" },
            ParamDoc { name: "momentum", doc: "momentum coefficient" },
            ParamDoc { name: "nesterov", doc: "Nesterov momentum" },
            ParamDoc { name: "ns_steps", doc: "Newton-Schulz iterations" },
            ParamDoc { name: "beta2", doc: "decay of the per-row second moment" },
            ParamDoc { name: "eps", doc: "added to sqrt(v)" },
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
    use super::super::muon::{newton_schulz, normalize_rows};
    use super::*;
    use crate::nn::randn;
    use candle_core::{Device, Tensor};

    fn row_rms(t: &Tensor) -> Result<Vec<f32>> {
        t.sqr()?.mean(1)?.sqrt()?.to_vec1::<f32>()
    }

    #[test]
    fn update_rows_have_equal_rms_before_the_final_rescale() -> Result<()> {
        // Rows of very different scale, orthogonalized: Newton-Schulz leaves their RMS
        // unequal; after the first row normalization (v = (1 - b2) mean_row(O^2)) every row
        // has RMS 1 / sqrt(1 - b2).
        let scales = Tensor::new(&[[0.1f32], [1.0], [5.0], [0.5], [2.0], [1.5]], &Device::Cpu)?;
        let g = randn(3, (6, 24), 1.0)?.broadcast_mul(&scales)?;
        let o = newton_schulz(&g, 5, DType::F32)?;
        let before = row_rms(&o)?;
        let spread = before.iter().cloned().fold(f32::MIN, f32::max)
            / before.iter().cloned().fold(f32::MAX, f32::min);
        assert!(spread > 1.05, "rows already balanced: {before:?}");
        let n = RowNorm {
            beta2: 0.95,
            eps: 1e-12,
        };
        let v0 = Tensor::zeros((6, 1), DType::F32, &Device::Cpu)?;
        let (normed, v) = normalize_rows(&o, &v0, n)?;
        let want = 1.0 / (1.0f32 - 0.95).sqrt();
        for r in row_rms(&normed)? {
            assert!((r - want).abs() < 1e-4 * want, "{r} vs {want}");
        }
        // v is the running mean square: (1 - b2) times each row's mean square.
        let ms: Vec<f32> = before.iter().map(|r| 0.05 * r * r).collect();
        for (a, b) in v.flatten_all()?.to_vec1::<f32>()?.iter().zip(ms) {
            assert!((a - b).abs() < 1e-6 * b.max(1e-3), "{a} vs {b}");
        }
        Ok(())
    }
}
