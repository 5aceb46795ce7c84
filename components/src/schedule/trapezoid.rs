//! Warmup-stable-decay ("WSD", trapezoidal; Hu et al. 2024, MiniCPM, arXiv 2404.06395; the
//! modded-nanogpt and Goedel-mHC-1B schedule): linear warmup, a constant plateau at the peak,
//! then a linear cooldown to `final_frac` of the peak over the last `cooldown` fraction.
//! Unlike cosine, the plateau's checkpoints can be cooled down later at any length.

use registry::{Entry, ParamDoc, Schedule, Spec};
use serde::{Deserialize, Serialize};

use super::cosine::warmup_steps;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Trapezoid {
    pub warmup: f64,
    pub cooldown: f64,
    pub final_frac: f64,
}

impl Default for Trapezoid {
    fn default() -> Self {
        Self {
            warmup: 0.05,
            cooldown: 0.2,
            final_frac: 0.0,
        }
    }
}

impl Spec for Trapezoid {
    fn validate(&self) -> Result<(), String> {
        for (name, v) in [("warmup", self.warmup), ("cooldown", self.cooldown)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!(
                    "{name} is a fraction of the run in [0, 1], got {v}"
                ));
            }
        }
        if self.warmup + self.cooldown > 1.0 {
            return Err(format!(
                "warmup + cooldown = {} leaves no room: they are fractions of one run",
                self.warmup + self.cooldown
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

impl Schedule for Trapezoid {
    fn factor(&self, step: usize, total: usize) -> f64 {
        let warm = warmup_steps(self.warmup, total);
        if step < warm {
            return (step + 1) as f64 / warm as f64;
        }
        let cool = (self.cooldown * total as f64).round() as usize;
        let cool_start = total.saturating_sub(cool);
        if step < cool_start || cool == 0 {
            return 1.0;
        }
        // Step cool_start is still at the peak; the last step reaches final_frac.
        let progress = ((step - cool_start + 1) as f64 / cool as f64).min(1.0);
        1.0 - (1.0 - self.final_frac) * progress
    }
}

inventory::submit! {
    Entry::schedule::<Trapezoid>(
        "Trapezoid",
        "warmup, constant at the peak, linear cooldown (WSD)",
        &[
            ParamDoc { name: "warmup", doc: "fraction of the steps spent warming up linearly" },
            ParamDoc { name: "cooldown", doc: "fraction of the steps of the final linear decay" },
            ParamDoc { name: "final_frac", doc: "the rate at the end, as a fraction of the peak" },
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_at_chosen_steps() {
        let s = Trapezoid {
            warmup: 0.1,
            cooldown: 0.2,
            final_frac: 0.0,
        };
        // 100 steps: warmup over steps 0..10 (0.1, 0.2, ... 1.0), plateau through step 79,
        // cooldown over steps 80..100 in twentieths: step 80 -> 0.95, 89 -> 0.5, 99 -> 0.
        let want = [
            (0, 0.1),
            (4, 0.5),
            (9, 1.0),
            (10, 1.0),
            (50, 1.0),
            (79, 1.0),
            (80, 0.95),
            (89, 0.5),
            (99, 0.0),
        ];
        for (step, f) in want {
            assert!(
                (s.factor(step, 100) - f).abs() < 1e-12,
                "step {step}: {}",
                s.factor(step, 100)
            );
        }
        let floor = Trapezoid {
            warmup: 0.0,
            cooldown: 0.5,
            final_frac: 0.2,
        };
        // 10 steps, cooldown 5: 0.84, 0.68, 0.52, 0.36, 0.2.
        assert!((floor.factor(0, 10) - 1.0).abs() < 1e-12);
        assert!((floor.factor(5, 10) - 0.84).abs() < 1e-12);
        assert!((floor.factor(9, 10) - 0.2).abs() < 1e-12);
    }

    #[test]
    fn warmup_and_cooldown_must_fit_in_one_run() {
        let err = Trapezoid {
            warmup: 0.6,
            cooldown: 0.5,
            final_frac: 0.0,
        }
        .validate()
        .unwrap_err();
        assert!(err.contains("leaves no room"), "{err}");
    }
}
