//! Zero-shot benchmarks, one panel per task: each configuration's accuracy at the end of
//! training (acc_norm where the task has it), mean with its 95% interval and every seed,
//! and the task's chance level as a dashed line: at small scale most of what there is to
//! see is how far above chance a configuration gets.

use plotters::coord::Shift;
use plotters::prelude::*;

use super::bpb::{dots_width, draw_dots, legend, Item};
use super::{chart_backends, Chart, DrawResult};
use crate::report::Report;
use crate::{Error, Result, Status};

struct Panel {
    metric: String,
    chance: Option<f64>,
    items: Vec<Item>,
}

pub struct BenchChart {
    sweep: String,
    panels: Vec<Panel>,
}

impl BenchChart {
    pub fn new(report: &Report) -> Result<Self> {
        let mut panels = Vec::new();
        for metric in report.bench_headlines() {
            let items: Vec<Item> = report
                .rows
                .iter()
                .filter_map(|r| {
                    let s = r.summary(&metric)?;
                    Some(Item {
                        name: legend(r),
                        mean: s.mean,
                        ci: s.ci95,
                        seeds: r
                            .trials
                            .iter()
                            .filter(|t| t.row.status == Status::Done)
                            .filter_map(|t| t.finals.get(&metric).copied())
                            .collect(),
                    })
                })
                .collect();
            let task = metric.split('/').nth(1).unwrap_or_default();
            panels.push(Panel {
                chance: report.chance.get(task).copied(),
                metric,
                items,
            });
        }
        if panels.is_empty() {
            return Err(Error::Input(format!(
                "--plot benchmarks: no trial of sweep {} has benchmark results; list \
                 `benchmarks: [...]` in the sweep file, or score finished trials with \
                 `sweep eval`",
                report.sweep
            )));
        }
        Ok(Self {
            sweep: report.sweep.clone(),
            panels,
        })
    }

    fn draw<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>) -> DrawResult
    where
        DB::ErrorType: 'static,
    {
        let areas = root.split_evenly((self.panels.len(), 1));
        for (p, area) in self.panels.iter().zip(&areas) {
            let task = p.metric.trim_start_matches("bench/").replace('/', " ");
            draw_dots(
                area,
                &format!("{}: {task}", self.sweep),
                &format!("{task} (higher is better): dot = mean, bar = 95% CI, circles = seeds"),
                &p.items,
                p.chance.map(|c| (c, Some("chance"))),
            )?;
        }
        root.present()?;
        Ok(())
    }
}

impl Chart for BenchChart {
    fn size(&self) -> (u32, u32) {
        let rows = self.panels.iter().map(|p| p.items.len()).max().unwrap_or(1) as u32;
        let width = self
            .panels
            .iter()
            .map(|p| dots_width(&p.items))
            .max()
            .unwrap_or(1200);
        (width, self.panels.len() as u32 * (170 + 46 * rows).max(300))
    }

    fn series(&self) -> usize {
        self.panels.len()
    }

    chart_backends!();
}
