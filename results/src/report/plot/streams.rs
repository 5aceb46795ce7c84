//! The streams of a multi-stream residual over depth, at the last evaluation: their mean
//! pairwise cosine similarity and the effective rank of the stream state (runner's
//! streams.rs). Streams that homogenize until the extra ones carry nothing show as a cosine
//! line rising to 1 and a rank line falling to 1, while the loss looks fine.

use plotters::coord::Shift;
use plotters::prelude::*;

use super::amplification::last_by_depth;
use super::{chart_backends, color, label_font, tick_font, titled, Chart, DrawResult};
use crate::report::Report;
use crate::{Error, Result, Store};

const PANELS: [(&str, &str); 2] = [
    ("mean pairwise cosine of the streams", "cosine similarity"),
    (
        "effective rank of the stream state",
        "effective rank (1 to n)",
    ),
];

struct Line {
    name: String,
    color: RGBColor,
    /// Per panel, (depth, value) at each sublayer that recorded one (mean over seeds).
    values: [Vec<(f64, f64)>; 2],
}

pub struct StreamsChart {
    sweep: String,
    lines: Vec<Line>,
}

impl StreamsChart {
    pub fn new(report: &Report, store: &Store) -> Result<Self> {
        let mut lines = Vec::new();
        for (i, row) in report.rows.iter().enumerate() {
            let by_depth = last_by_depth(row, store, ["streams/cos/l", "streams/rank/l"])?;
            if by_depth[0].is_empty() {
                continue;
            }
            let points = |m: &std::collections::BTreeMap<usize, f64>| {
                m.iter().map(|(&k, &v)| ((k + 1) as f64, v)).collect()
            };
            lines.push(Line {
                name: row.name.clone(),
                color: color(i),
                values: [points(&by_depth[0]), points(&by_depth[1])],
            });
        }
        if lines.is_empty() {
            return Err(Error::Input(format!(
                "--plot streams: no trial of sweep {} recorded stream diagnostics \
                 (streams/cos/l*, streams/rank/l*): only multi-stream residuals (Hc, Mhc with \
                 2 or more streams) have them, written at every evaluation by this version",
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
                "{}: the residual streams over depth (last evaluation, mean over seeds)",
                self.sweep
            ),
        )?;
        let depth = self
            .lines
            .iter()
            .flat_map(|l| l.values[0].iter().map(|p| p.0))
            .fold(1.0f64, f64::max);
        let areas = body.split_evenly((1, 2));
        for (d, (area, (desc, y_desc))) in areas.iter().zip(PANELS).enumerate() {
            let (lo, hi) = self
                .lines
                .iter()
                .flat_map(|l| l.values[d].iter().map(|p| p.1))
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                    (a.min(v), b.max(v))
                });
            // Cosine: from below its lowest (or 0) to just above 1; rank: from 1 to the top.
            let (y0, y1) = match d {
                0 => (lo.min(0.0) - 0.05, 1.05),
                _ => (0.9f64.min(lo - 0.1), hi + 0.3),
            };
            let mut chart = ChartBuilder::on(area)
                .caption(desc, label_font())
                .margin(14)
                .x_label_area_size(52)
                .y_label_area_size(70)
                .build_cartesian_2d(0.5f64..depth + 0.5, y0..y1)?;
            chart
                .configure_mesh()
                .x_desc("depth (sublayer: attention and FFN count one each)")
                .y_desc(y_desc)
                .x_labels((depth as usize).min(16))
                .x_label_formatter(&|v| format!("{v:.0}"))
                .label_style(tick_font())
                .axis_desc_style(label_font())
                .light_line_style(WHITE)
                .bold_line_style(RGBColor(215, 215, 215))
                .draw()?;
            for line in &self.lines {
                let c = line.color;
                chart
                    .draw_series(LineSeries::new(line.values[d].clone(), c.stroke_width(2)))?
                    .label(&line.name)
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 24, y)], c.stroke_width(3))
                    });
                chart.draw_series(
                    line.values[d]
                        .iter()
                        .map(|&p| Circle::new(p, 3, c.filled())),
                )?;
            }
            chart
                .configure_series_labels()
                // Homogenized streams put cosines at the top and ranks at the bottom.
                .position(match d {
                    0 => SeriesLabelPosition::LowerLeft,
                    _ => SeriesLabelPosition::UpperRight,
                })
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(180, 180, 180))
                .label_font(tick_font())
                .draw()?;
        }
        root.present()?;
        Ok(())
    }
}

impl Chart for StreamsChart {
    fn size(&self) -> (u32, u32) {
        (1500, 620)
    }

    fn series(&self) -> usize {
        self.lines.len()
    }

    chart_backends!();
}
