//! Linear warmup, then cosine decay to a floor (Loshchilov & Hutter 2017, arXiv 1608.03983;
//! the GPT-3 and nanoGPT schedule). Warmup is a fraction of the run, so the shape is kept when
//! a sweep changes its step budget.

use registry::{Entry, ParamDoc, Schedule, Spec};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Cosine {
    pub warmup: f64,
    pub final_frac: f64,
}

impl Default for Cosine {
    fn default() -> Self {
        Self {
            warmup: 0.05,
            final_frac: 0.1,
        }
    }
}

impl Spec for Cosine {
    fn validate(&self) -> Result<(), String> {
        if !(0.0..1.0).contains(&self.warmup) {
            return Err(format!(
                "warmup is a fraction of the run in [0, 1), got {}",
                self.warmup
            ));
        }
        if !(0.0..=1.0).contains(&self.final_frac) {
            return Err(format!(
                "final_frac must be in [0, 1], got {}",
                self.final_frac
            ));
        }
        Ok(())
    }
}

/// Steps of linear warmup for a fraction of `total` (at least one when the fraction is > 0).
pub(crate) fn warmup_steps(frac: f64, total: usize) -> usize {
    (frac * total as f64).ceil() as usize
}

impl Schedule for Cosine {
    fn factor(&self, step: usize, total: usize) -> f64 {
        let warm = warmup_steps(self.warmup, total);
        if step < warm {
            return (step + 1) as f64 / warm as f64;
        }
        let span = total.saturating_sub(warm).max(1);
        let progress = ((step - warm) as f64 / span as f64).min(1.0);
        let cos = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.final_frac + (1.0 - self.final_frac) * cos
    }
}

inventory::submit! {
    Entry::schedule::<Cosine>(
        "Cosine",
        "linear warmup, then cosine decay to final_frac of the peak",
        &[
            ParamDoc { name: "warmup", doc: "fraction of the steps spent warming up linearly" },
            ParamDoc { name: "final_frac", doc: "the rate at the end, as a fraction of the peak" },
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_at_chosen_steps() {
        let s = Cosine {
            warmup: 0.1,
            final_frac: 0.0,
        };
        // 100 steps: 10 of warmup reaching 1 at step 9, then cos over 90 steps.
        assert!((s.factor(0, 100) - 0.1).abs() < 1e-12);
        assert!((s.factor(4, 100) - 0.5).abs() < 1e-12);
        assert!((s.factor(9, 100) - 1.0).abs() < 1e-12);
        assert!((s.factor(10, 100) - 1.0).abs() < 1e-12);
        assert!((s.factor(55, 100) - 0.5).abs() < 1e-12); // halfway through the decay
        let floor = Cosine {
            warmup: 0.0,
            final_frac: 0.1,
        };
        // progress 1/4: 0.1 + 0.9 * (1 + cos(pi/4)) / 2 = 0.868198
        assert!((floor.factor(25, 100) - 0.868_198).abs() < 1e-6);
        assert!((floor.factor(100, 100) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn warmup_must_be_a_fraction() {
        assert!(Cosine {
            warmup: 1.5,
            final_frac: 0.1
        }
        .validate()
        .is_err());
    }
}
