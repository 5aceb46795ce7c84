//! What `sweep run` shows while it trains: a bar of the sweep's steps with its ETA and one
//! per device for its current trial on a terminal; plain lines otherwise, for logs.

use std::io::IsTerminal;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Bars on a terminal (the sweep's steps with ETA, one per device for its current trial);
/// plain lines otherwise, for logs.
pub struct Progress {
    multi: MultiProgress,
    total: ProgressBar,
    trials: Vec<ProgressBar>,
    tty: bool,
}

impl Progress {
    pub fn new(total_steps: usize, steps: usize, devices: &[String]) -> Self {
        let tty = std::io::stderr().is_terminal();
        let target = if tty {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let multi = MultiProgress::with_draw_target(target);
        let total = multi.add(ProgressBar::new(total_steps as u64));
        total.set_style(
            ProgressStyle::with_template(
                "sweep  [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} steps, ETA {eta}",
            )
            .expect("valid template"),
        );
        let trials = devices
            .iter()
            .map(|_| {
                let bar = multi.add(ProgressBar::new(steps as u64));
                bar.set_style(
                    ProgressStyle::with_template("{prefix} step {pos}/{len} {msg}")
                        .expect("valid template"),
                );
                bar
            })
            .collect();
        Self {
            multi,
            total,
            trials,
            tty,
        }
    }

    pub fn start(&self, slot: usize, prefix: &str) {
        let bar = &self.trials[slot];
        bar.reset();
        bar.set_prefix(prefix.to_string());
        bar.set_message("");
        if !self.tty {
            eprintln!("{prefix}");
        }
    }

    pub fn step(&self, slot: usize, step: usize, loss: f64, bpb: Option<f64>) {
        let bar = &self.trials[slot];
        bar.set_position(step as u64);
        self.total.inc(1);
        let bpb = bpb
            .map(|b| format!(" | val/bpb {b:.3}"))
            .unwrap_or_default();
        bar.set_message(format!("| loss {loss:.4}{bpb}"));
    }

    pub fn note(&self, line: String) {
        if !self.tty {
            eprintln!("  {line}");
        }
    }

    pub fn println(&self, line: String) {
        if self.tty {
            let _ = self.multi.println(line);
        } else {
            eprintln!("{line}");
        }
    }

    pub fn finish(&self) {
        self.trials.iter().for_each(ProgressBar::finish_and_clear);
        self.total.finish_and_clear();
    }
}
