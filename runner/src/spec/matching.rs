//! `match:`: every cell solves for the width that puts it at a stated budget, so that stacks
//! are compared at equal parameters or equal compute rather than at one shared d_model:
//! `match: Params(non_embedding: 20e6)`, `Params(total: 25e6)`, `Flops(per_token: 1.5e8)`
//! (training FLOPs per token, as `flops.rs` counts them), each with `tolerance` (default 2%).

use registry::Dims;
use serde::{Deserialize, Serialize};

use super::Cell;

/// The budget every cell is matched to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum MatchSpec {
    /// Parameters: `non_embedding` (all but the tied embedding) or `total`.
    Params {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        non_embedding: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        total: Option<f64>,
        #[serde(default = "default_tolerance")]
        tolerance: f64,
    },
    /// Training FLOPs per token (3 x forward).
    Flops {
        per_token: f64,
        #[serde(default = "default_tolerance")]
        tolerance: f64,
    },
}

fn default_tolerance() -> f64 {
    0.02
}

/// Widths are multiples of this (and of what the cell's components need: heads dividing
/// d_model, an even head dimension), so matmuls tile evenly.
pub const WIDTH_STEP: usize = 8;

/// The widest model the solver tries.
const MAX_WIDTH: usize = 1 << 15;

impl MatchSpec {
    /// Checks the values themselves; the message names the field.
    pub fn check(&self) -> Result<(), String> {
        let (target, tolerance) = match self {
            MatchSpec::Params {
                non_embedding,
                total,
                tolerance,
            } => match (non_embedding, total) {
                (Some(n), None) | (None, Some(n)) => (*n, *tolerance),
                _ => return Err(
                    "Params takes one of non_embedding and total, e.g. Params(non_embedding: 20e6)"
                        .into(),
                ),
            },
            MatchSpec::Flops {
                per_token,
                tolerance,
            } => (*per_token, *tolerance),
        };
        if !(target.is_finite() && target > 0.0) {
            return Err(format!("the target must be positive, got {target}"));
        }
        if !(tolerance > 0.0 && tolerance < 1.0) {
            return Err(format!("tolerance must be in (0, 1), got {tolerance}"));
        }
        Ok(())
    }

    fn target(&self) -> f64 {
        match self {
            MatchSpec::Params {
                non_embedding,
                total,
                ..
            } => non_embedding.or(*total).unwrap_or(0.0),
            MatchSpec::Flops { per_token, .. } => *per_token,
        }
    }

    fn tolerance(&self) -> f64 {
        match self {
            MatchSpec::Params { tolerance, .. } | MatchSpec::Flops { tolerance, .. } => *tolerance,
        }
    }

    /// What is matched, for messages: `non-embedding parameters`.
    pub fn what(&self) -> &'static str {
        match self {
            MatchSpec::Params {
                non_embedding: Some(_),
                ..
            } => "non-embedding parameters",
            MatchSpec::Params { .. } => "parameters",
            MatchSpec::Flops { .. } => "training FLOPs per token",
        }
    }

    /// The matched quantity of `cell` at `dims`.
    pub fn measure(&self, cell: &Cell, dims: &Dims) -> f64 {
        match self {
            MatchSpec::Params {
                non_embedding: Some(_),
                ..
            } => {
                let p = crate::flops::params(cell, dims);
                (p.total - p.embedding) as f64
            }
            MatchSpec::Params { .. } => crate::flops::params(cell, dims).total as f64,
            MatchSpec::Flops { .. } => 3.0 * crate::flops::forward_per_token(cell, dims),
        }
    }

    /// The width (a multiple of [`WIDTH_STEP`] the cell's components accept at `template`'s
    /// depth, vocabulary and context) whose measure is nearest the target, if within the
    /// tolerance; otherwise why not.
    pub fn solve(&self, cell: &Cell, template: &Dims) -> Result<usize, String> {
        let target = self.target();
        let at = |d: usize| Dims {
            d_model: d,
            ..template.clone()
        };
        let accepts = |d: usize| {
            let dims = at(d);
            cell.attention.check(&dims).is_ok()
                && cell.ffn.check(&dims).is_ok()
                && cell.residual.check(&dims).is_ok()
        };
        let mut best: Option<(f64, usize)> = None;
        let mut d = WIDTH_STEP;
        while d <= MAX_WIDTH {
            if accepts(d) {
                let m = self.measure(cell, &at(d));
                let off = (m / target - 1.0).abs();
                if best.is_none_or(|(o, _)| off < o) {
                    best = Some((off, d));
                }
                // The measure grows with the width: past the target, wider is only farther.
                if m > target * (1.0 + self.tolerance()) {
                    break;
                }
            }
            d += WIDTH_STEP;
        }
        match best {
            Some((off, d)) if off <= self.tolerance() => Ok(d),
            Some((_, d)) => Err(format!(
                "no width reaches {} {} within {:.1}%: the nearest is d_model {d} ({}, {:+.1}%); \
                 change the target, the tolerance or the components' heads",
                self.what(),
                fmt(target),
                100.0 * self.tolerance(),
                fmt(self.measure(cell, &at(d))),
                100.0 * (self.measure(cell, &at(d)) / target - 1.0),
            )),
            None => Err(format!(
                "no width that is a multiple of {WIDTH_STEP} up to {MAX_WIDTH} suits the cell's \
                 components (heads must divide d_model, with an even head dimension)"
            )),
        }
    }
}

fn fmt(v: f64) -> String {
    format!("{v:.4e}")
}
