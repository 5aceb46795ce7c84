//! Loss spikes: a training step whose loss exceeds the running median of the steps before it
//! by more than [`MARGIN`] (10%). The seed credits gated attention with preventing bf16 loss
//! spikes; a trial counts its spikes (`train/spikes`, cumulative, at every logged step) so
//! that a report can show them.
//!
//! The median is over the last [`WINDOW`] steps' losses, and a step is judged only once
//! [`MIN_SEEN`] have been seen: early training falls fast, so a step is then below its
//! window's median, never a spike. The window and the count travel in the checkpoint, so a
//! resumed trial counts as an uninterrupted one does.

use serde::{Deserialize, Serialize};

/// How far above the running median a loss must be to count (relative), and the steps
/// whose losses the median is taken over: the report states the same rule.
pub use results::report::{SPIKE_MARGIN as MARGIN, SPIKE_WINDOW as WINDOW};
/// Steps seen before any is judged.
pub const MIN_SEEN: usize = 16;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Spikes {
    /// The last WINDOW losses, oldest first.
    pub window: Vec<f64>,
    pub count: u64,
}

impl Spikes {
    /// Judges the step's loss against the window, then adds it; true for a spike.
    pub fn push(&mut self, loss: f64) -> bool {
        let spike = self.window.len() >= MIN_SEEN
            && loss.is_finite()
            && loss > (1.0 + MARGIN) * median(&self.window);
        if spike {
            self.count += 1;
        }
        if self.window.len() == WINDOW {
            self.window.remove(0);
        }
        self.window.push(loss);
        spike
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    match n % 2 {
        1 => s[n / 2],
        _ => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jump_above_the_running_median_counts_and_a_falling_loss_never_does() {
        let mut s = Spikes::default();
        // A loss falling from 10 by 1% a step: each step is below its window's median.
        let mut loss = 10.0;
        for _ in 0..200 {
            assert!(!s.push(loss));
            loss *= 0.99;
        }
        assert_eq!(s.count, 0);
        // The window now holds the last 64 values; its median is that of steps 136..200.
        let m = median(&s.window);
        assert!(!s.push(m * 1.09), "9% above the median is noise");
        assert!(s.push(m * 1.2), "20% above is a spike");
        assert_eq!(s.count, 1);
        assert_eq!(s.window.len(), WINDOW);
    }

    #[test]
    fn nothing_is_judged_before_enough_steps_and_the_median_is_by_hand() {
        let mut s = Spikes::default();
        for _ in 0..MIN_SEEN - 1 {
            s.push(1.0);
        }
        assert!(!s.push(100.0), "15 steps seen: not judged yet");
        assert!(s.push(100.0), "16 seen, median 1: judged");
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
