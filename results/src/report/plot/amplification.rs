//! Composite Amax gain against depth (mHC paper, figure 3 style): how much the residual path
//! alone can amplify the stream (forward) and the gradient (backward) from the embedding to
//! each sublayer, at the last evaluation, on a log scale where the plain residual is 1.

use std::collections::BTreeMap;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::{chart_backends, color, label_font, tick_font, titled, Chart, DrawResult};
use crate::report::{Curves, Report};
use crate::{Error, Result, Status, Store};

const DIRECTIONS: [(&str, &str); 2] = [
    ("fwd", "forward: largest row sum of the composite map"),
    ("bwd", "backward: largest column sum of the composite map"),
];

struct Line {
    name: String,
    color: RGBColor,
    /// Per direction, the gain after sublayer 1, 2, ... (mean over seeds).
    gains: [Vec<f64>; 2],
}

pub struct AmpChart {
    sweep: String,
    lines: Vec<Line>,
}

impl AmpChart {
    pub fn new(report: &Report, store: &Store) -> Result<Self> {
        let mut lines = Vec::new();
        for (i, row) in report.rows.iter().enumerate() {
            let [fwd, bwd] =
                last_by_depth(row, store, ["amax/fwd/composite/l", "amax/bwd/composite/l"])?;
            if fwd.is_empty() {
                continue;
            }
            lines.push(Line {
                name: row.name.clone(),
                color: color(i),
                gains: [fwd.into_values().collect(), bwd.into_values().collect()],
            });
        }
        if lines.is_empty() {
            return Err(Error::Input(format!(
                "--plot amplification: no trial of sweep {} recorded amplification metrics \
                 (amax/*/composite/l*); they are written at every evaluation by this version \
                 of sweep, so rerun the sweep or wait for its first evaluation",
                report.sweep
            )));
        }
        Ok(Self {
            sweep: report.sweep.clone(),
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
                "{}: stream amplification over depth (last evaluation, mean over seeds)",
                self.sweep
            ),
        )?;
        let all = self
            .lines
            .iter()
            .flat_map(|l| l.gains.iter().flatten().copied());
        let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
        // Always the line at 1 (the plain residual), with some room below it.
        let y0 = (lo.min(1.0) * 0.7).max(1e-3);
        let y1 = (hi.max(1.0) * 1.6).max(3.0);
        let depth = self
            .lines
            .iter()
            .map(|l| l.gains[0].len())
            .max()
            .unwrap_or(1);

        let areas = body.split_evenly((1, 2));
        for (d, (area, (_, desc))) in areas.iter().zip(DIRECTIONS).enumerate() {
            let mut chart = ChartBuilder::on(area)
                .caption(desc, label_font())
                .margin(14)
                .x_label_area_size(52)
                .y_label_area_size(70)
                .build_cartesian_2d(0.5f64..depth as f64 + 0.5, (y0..y1).log_scale())?;
            chart
                .configure_mesh()
                .x_desc("depth (sublayer: attention and FFN count one each)")
                .y_desc("composite Amax gain (x, log scale)")
                .x_labels(depth.min(16))
                .x_label_formatter(&|v| format!("{v:.0}"))
                .y_label_formatter(&|v| format!("{v}"))
                .label_style(tick_font())
                .axis_desc_style(label_font())
                .light_line_style(WHITE)
                .bold_line_style(RGBColor(215, 215, 215))
                .draw()?;
            // Earlier lines are wider, so that a line hidden under a later one with the same
            // values (Mhc and PreNorm, both at 1) still shows at its edges.
            let n = self.lines.len();
            for (i, line) in self.lines.iter().enumerate() {
                let c = line.color;
                let extra = if n > 1 {
                    3.0 * (n - 1 - i) as f64 / (n - 1) as f64
                } else {
                    0.0
                };
                let (width, radius) = (2 + extra.round() as u32, 3 + extra.round() as i32);
                let points: Vec<(f64, f64)> = line.gains[d]
                    .iter()
                    .enumerate()
                    .map(|(k, &g)| ((k + 1) as f64, g.max(y0)))
                    .collect();
                chart
                    .draw_series(LineSeries::new(points.clone(), c.stroke_width(width)))?
                    .label(&line.name)
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 24, y)], c.stroke_width(3))
                    });
                chart.draw_series(points.iter().map(|&p| Circle::new(p, radius, c.filled())))?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(180, 180, 180))
                .label_font(tick_font())
                .draw()?;
        }
        root.present()?;
        Ok(())
    }
}

/// For each metric family `<prefix><depth>` (e.g. `amax/fwd/composite/l3`), its last value
/// at each depth, the mean over the row's finished seeds (or, while none has finished, its
/// running ones).
pub(super) fn last_by_depth<const N: usize>(
    row: &crate::report::Row,
    store: &Store,
    prefixes: [&str; N],
) -> Result<[BTreeMap<usize, f64>; N]> {
    let done = row.trials.iter().any(|t| t.row.status == Status::Done);
    let mut per_depth: [BTreeMap<usize, Vec<f64>>; N] = std::array::from_fn(|_| BTreeMap::new());
    for t in row
        .trials
        .iter()
        .filter(|t| t.row.status == Status::Done || (!done && t.row.status == Status::Running))
    {
        let c = Curves::read(store, &t.row.id, &[], &prefixes)?;
        for (d, prefix) in prefixes.iter().enumerate() {
            for (name, points) in &c.series {
                let Some(depth) = name.strip_prefix(prefix).and_then(|l| l.parse().ok()) else {
                    continue;
                };
                if let Some(&(_, v)) = points.last() {
                    per_depth[d].entry(depth).or_default().push(v);
                }
            }
        }
    }
    Ok(per_depth.map(|m| {
        m.into_iter()
            .map(|(k, vs)| (k, vs.iter().sum::<f64>() / vs.len() as f64))
            .collect()
    }))
}

impl Chart for AmpChart {
    fn size(&self) -> (u32, u32) {
        (1500, 620)
    }

    fn series(&self) -> usize {
        self.lines.len()
    }

    chart_backends!();
}
