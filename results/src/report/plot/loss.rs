//! Validation and training loss against step (or tokens): one line per configuration, the
//! mean over its seeds, in a band from the lowest to the highest seed.

use std::collections::BTreeMap;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::{
    chart_backends, color, label_font, padded, tick_font, titled, Chart, DrawResult, XAxis,
};
use crate::report::{Curves, Report};
use crate::{Error, Result, Store};

const METRICS: [(&str, &str); 2] = [
    ("val/loss", "validation loss"),
    ("train/loss", "training loss"),
];

struct Line {
    name: String,
    color: RGBColor,
    /// (x, mean, lowest seed, highest seed).
    points: Vec<(f64, f64, f64, f64)>,
}

pub struct LossChart {
    sweep: String,
    x: XAxis,
    /// One set of lines per metric.
    panels: Vec<Vec<Line>>,
}

impl LossChart {
    pub fn new(report: &Report, store: &Store, x: XAxis) -> Result<Self> {
        let mut panels: Vec<Vec<Line>> = METRICS.iter().map(|_| Vec::new()).collect();
        for (i, row) in report.rows.iter().enumerate() {
            let scale = match x {
                XAxis::Step => 1.0,
                XAxis::Tokens => tokens_per_step(row)?,
            };
            let curves: Vec<Curves> = row
                .trials
                .iter()
                .map(|t| Curves::read(store, &t.row.id, &["val/loss", "train/loss"], &[]))
                .collect::<Result<_>>()?;
            for (panel, (metric, _)) in panels.iter_mut().zip(METRICS) {
                let mut by_step: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
                for c in &curves {
                    for &(step, v) in c.get(metric) {
                        by_step.entry(step).or_default().push(v);
                    }
                }
                if by_step.is_empty() {
                    continue;
                }
                let points = by_step
                    .into_iter()
                    .map(|(step, vs)| {
                        let mean = vs.iter().sum::<f64>() / vs.len() as f64;
                        let lo = vs.iter().copied().fold(f64::INFINITY, f64::min);
                        let hi = vs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        (step as f64 * scale, mean, lo, hi)
                    })
                    .collect();
                panel.push(Line {
                    name: row.name.clone(),
                    color: color(i),
                    points,
                });
            }
        }
        if panels.iter().all(Vec::is_empty) {
            return Err(Error::Input(format!(
                "--plot loss: no trial of sweep {} has logged a loss yet; plot again once \
                 training has started",
                report.sweep
            )));
        }
        Ok(Self {
            sweep: report.sweep.clone(),
            x,
            panels,
        })
    }

    fn draw<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>) -> DrawResult
    where
        DB::ErrorType: 'static,
    {
        let body = titled(
            &root,
            &format!(
                "{}: loss, mean over seeds (band: lowest to highest seed)",
                self.sweep
            ),
        )?;
        let areas = body.split_evenly((1, self.panels.len()));
        for ((area, lines), (_, desc)) in areas.iter().zip(&self.panels).zip(METRICS) {
            self.panel(area, lines, desc)?;
        }
        root.present()?;
        Ok(())
    }

    fn panel<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        lines: &[Line],
        desc: &str,
    ) -> DrawResult
    where
        DB::ErrorType: 'static,
    {
        let all = || lines.iter().flat_map(|l| l.points.iter());
        let x_max = all().map(|p| p.0).fold(0.0, f64::max).max(1.0);
        let y_min = all().map(|p| p.2).fold(f64::INFINITY, f64::min);
        // The first tenth of training (loss falling from ln(vocab)) would squeeze the part
        // worth comparing into a sliver; the axis starts above the rest, earlier points are
        // cut at its top.
        let y_top = all()
            .filter(|p| p.0 >= 0.1 * x_max)
            .map(|p| p.3)
            .fold(f64::NEG_INFINITY, f64::max);
        let y_top = if y_top.is_finite() {
            y_top
        } else {
            all().map(|p| p.3).fold(f64::NEG_INFINITY, f64::max)
        };
        let (y0, y1) = if y_min.is_finite() {
            padded(y_min, y_top, 0.05)
        } else {
            (0.0, 1.0)
        };
        let clip = |v: f64| v.clamp(y0, y1);

        let mut chart = ChartBuilder::on(area)
            .caption(desc, label_font())
            .margin(14)
            .x_label_area_size(52)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..x_max * 1.02, y0..y1)?;
        chart
            .configure_mesh()
            .x_desc(match self.x {
                XAxis::Step => "training step",
                XAxis::Tokens => "training tokens",
            })
            .y_desc("loss (nats per token)")
            .x_label_formatter(&|v| compact(*v))
            .label_style(tick_font())
            .axis_desc_style(label_font())
            .light_line_style(RGBColor(246, 246, 246))
            .bold_line_style(RGBColor(215, 215, 215))
            .draw()?;

        for line in lines {
            let c = line.color;
            if line.points.iter().any(|p| p.3 > p.2) {
                let upper = line.points.iter().map(|p| (p.0, clip(p.3)));
                let lower = line.points.iter().rev().map(|p| (p.0, clip(p.2)));
                chart.draw_series([Polygon::new(
                    upper.chain(lower).collect::<Vec<_>>(),
                    c.mix(0.12).filled(),
                )])?;
            }
            chart
                .draw_series(LineSeries::new(
                    line.points.iter().map(|p| (p.0, clip(p.1))),
                    c.stroke_width(2),
                ))?
                .label(&line.name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], c.stroke_width(3)));
        }
        if !lines.is_empty() {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(180, 180, 180))
                .label_font(tick_font())
                .draw()?;
        }
        Ok(())
    }
}

impl Chart for LossChart {
    fn size(&self) -> (u32, u32) {
        (1500, 620)
    }

    fn series(&self) -> usize {
        self.panels.iter().map(Vec::len).max().unwrap_or(0)
    }

    chart_backends!();
}

/// Tokens per optimizer step from the configuration (`train.batch` x `train.seq_len`).
fn tokens_per_step(row: &crate::report::Row) -> Result<f64> {
    let get = |k: &str| row.factor(k).and_then(|v| v.parse::<f64>().ok());
    match (get("train.batch"), get("train.seq_len")) {
        (Some(b), Some(t)) => Ok(b * t),
        _ => Err(Error::Input(format!(
            "--x tokens: configuration {} records no train.batch and train.seq_len; use --x step",
            row.name
        ))),
    }
}

/// 1200 -> 1.2k, 3500000 -> 3.5M: tick labels that fit.
fn compact(v: f64) -> String {
    let a = v.abs();
    let (x, suffix) = if a >= 1e9 {
        (v / 1e9, "G")
    } else if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e4 {
        (v / 1e3, "k")
    } else {
        return format!("{v:.0}");
    };
    let digits = format!("{x:.2}");
    format!(
        "{}{suffix}",
        digits.trim_end_matches('0').trim_end_matches('.')
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn compact_tick_labels() {
        assert_eq!(super::compact(1200.0), "1200");
        assert_eq!(super::compact(20_000.0), "20k");
        assert_eq!(super::compact(1_536_000.0), "1.54M");
        assert_eq!(super::compact(2.5e9), "2.5G");
    }
}
