//! The frontier: the report's metric (val/bpb unless `--metric` says) against training
//! FLOPs, parameters or GPU hours on a log axis, one line per configuration family across
//! its sizes (the configurations that differ only in `model.*`: d_model, n_layers), each
//! size a point with its 95% interval and its seeds. Whether a gain is the architecture or
//! the budget shows as whether one family's line lies below the other's at equal x.

use std::collections::BTreeMap;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::{chart_backends, color, label_font, padded, tick_font, titled, Chart, DrawResult};
use crate::report::frontier::{family, Budget};
use crate::report::Report;
use crate::{Error, Result, Status};

struct Point {
    x: f64,
    mean: f64,
    ci: Option<(f64, f64)>,
    seeds: Vec<f64>,
}

struct Line {
    name: String,
    points: Vec<Point>,
}

pub struct FrontierChart {
    sweep: String,
    metric: String,
    budget: Budget,
    lines: Vec<Line>,
}

impl FrontierChart {
    pub fn new(report: &Report, budget: Budget) -> Result<Self> {
        let mut by_family: BTreeMap<String, Vec<Point>> = BTreeMap::new();
        let mut order: Vec<String> = Vec::new();
        for r in &report.rows {
            let (Some(x), Some(s)) = (budget.of(r), r.summary(&report.metric)) else {
                continue;
            };
            let name = family(report, r);
            if !order.contains(&name) {
                order.push(name.clone());
            }
            let seeds = r
                .trials
                .iter()
                .filter(|t| t.row.status == Status::Done)
                .filter_map(|t| match report.metric.as_str() {
                    "val/bpb" => t.final_bpb,
                    m => t.finals.get(m).copied(),
                })
                .collect();
            by_family.entry(name).or_default().push(Point {
                x,
                mean: s.mean,
                ci: s.ci95,
                seeds,
            });
        }
        let lines: Vec<Line> = order
            .into_iter()
            .map(|name| {
                let mut points = by_family.remove(&name).unwrap_or_default();
                points.sort_by(|a, b| a.x.total_cmp(&b.x));
                Line { name, points }
            })
            .collect();
        if lines.is_empty() {
            return Err(Error::Input(format!(
                "--plot frontier: no configuration of sweep {} has a finished seed with {} and \
                 its {} recorded yet (training FLOPs are recorded by this version of sweep)",
                report.sweep,
                report.metric,
                match budget {
                    Budget::Flops => "training FLOPs",
                    Budget::Params => "parameter count",
                    Budget::GpuHours => "wall-clock time",
                }
            )));
        }
        Ok(Self {
            sweep: report.sweep.clone(),
            metric: report.metric.clone(),
            budget,
            lines,
        })
    }

    fn draw<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>) -> DrawResult
    where
        DB::ErrorType: 'static,
    {
        let body = titled(
            &root,
            &format!(
                "{}: {} against {}",
                self.sweep,
                self.metric,
                self.budget.describe()
            ),
        )?;
        let points = self.lines.iter().flat_map(|l| &l.points);
        let (x0, x1) = points
            .clone()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
                (a.min(p.x), b.max(p.x))
            });
        let ys = points.flat_map(|p| {
            let (lo, hi) = p.ci.unwrap_or((p.mean, p.mean));
            p.seeds.iter().copied().chain([lo, hi])
        });
        let (y0, y1) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
        let (y0, y1) = padded(y0, y1, 0.08);
        // A decade's room around a single x.
        let (x0, x1) = if x1 > x0 {
            (x0 / 1.25, x1 * 1.25)
        } else {
            (x0 / 3.0, x1 * 3.0)
        };
        let mut chart = ChartBuilder::on(&body)
            .margin(18)
            .x_label_area_size(60)
            .y_label_area_size(80)
            .build_cartesian_2d(
                (x0..x1).log_scale().with_key_points(log_ticks(x0, x1)),
                y0..y1,
            )?;
        chart
            .configure_mesh()
            .x_desc(self.budget.describe())
            .y_desc(format!(
                "{}: dot = mean, bar = 95% CI, circles = seeds",
                self.metric
            ))
            .x_label_formatter(&|v| format!("{v:.1e}"))
            .label_style(tick_font())
            .axis_desc_style(label_font())
            .light_line_style(RGBColor(246, 246, 246))
            .bold_line_style(RGBColor(215, 215, 215))
            .draw()?;
        for (i, line) in self.lines.iter().enumerate() {
            let c = color(i);
            chart
                .draw_series(LineSeries::new(
                    line.points.iter().map(|p| (p.x, p.mean)),
                    c.stroke_width(2),
                ))?
                .label(line.name.clone())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(3)));
            for p in &line.points {
                if let Some((lo, hi)) = p.ci {
                    chart.draw_series([ErrorBar::new_vertical(
                        p.x,
                        lo,
                        p.mean,
                        hi,
                        c.stroke_width(2),
                        10,
                    )])?;
                }
                chart.draw_series(
                    p.seeds
                        .iter()
                        .map(|&v| Circle::new((p.x, v), 4, c.stroke_width(1))),
                )?;
                chart.draw_series([Circle::new((p.x, p.mean), 6, c.filled())])?;
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.9))
            .border_style(RGBColor(200, 200, 200))
            .label_font(tick_font())
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
        root.present()?;
        Ok(())
    }
}

impl Chart for FrontierChart {
    fn size(&self) -> (u32, u32) {
        (1200, 760)
    }

    fn series(&self) -> usize {
        self.lines.len()
    }

    chart_backends!();
}

/// Tick values for a log axis over [lo, hi]: 1, 2 and 5 times each power of ten inside it,
/// or every integer multiple where that leaves fewer than three (plotters' own log axis marks
/// powers of ten only, so a span inside one decade, as two sizes of one study are, had none).
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let within = |steps: &[f64]| -> Vec<f64> {
        let (first, last) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
        (first..=last)
            .flat_map(|e| steps.iter().map(move |m| m * 10f64.powi(e)))
            .filter(|v| *v >= lo && *v <= hi)
            .collect()
    };
    let coarse = within(&[1.0, 2.0, 5.0]);
    match coarse.len() {
        0..=2 => within(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]),
        _ => coarse,
    }
}

#[cfg(test)]
mod tests {
    use super::log_ticks;

    #[test]
    fn a_span_inside_one_decade_still_gets_ticks() {
        // The Goedel study's two sizes: 2.7e15 and 7.5e15 training FLOPs, padded by 1.25.
        let ticks = log_ticks(2.7e15 / 1.25, 7.5e15 * 1.25);
        let want = [3e15, 4e15, 5e15, 6e15, 7e15, 8e15, 9e15];
        assert_eq!(ticks.len(), want.len(), "{ticks:?}");
        for (t, w) in ticks.iter().zip(want) {
            assert!((t / w - 1.0).abs() < 1e-12, "{ticks:?}");
        }
        // Over several decades: 1, 2 and 5 of each.
        let wide = log_ticks(1.5e6, 3e8);
        assert_eq!(wide.len(), 7, "{wide:?}");
        assert!((wide[0] / 2e6 - 1.0).abs() < 1e-12 && (wide[6] / 2e8 - 1.0).abs() < 1e-12);
    }
}
