//! Final val/bpb per configuration: the mean with its 95% interval, every seed as a dot.
//! Configurations run down the y axis, best at the top, so long names stay readable.

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{chart_backends, color, label_font, padded, tick_font, title_font, Chart, DrawResult};
use crate::report::{Report, Row, VsBaseline};
use crate::{Error, Result};

/// A configuration's name in a chart, the baseline marked.
pub(super) fn legend(r: &Row) -> String {
    if r.vs_baseline == Some(VsBaseline::IsBaseline) {
        format!("{} (baseline)", r.name)
    } else {
        r.name.clone()
    }
}

/// One configuration's dot: its mean, 95% interval and seeds.
pub(super) struct Item {
    pub name: String,
    pub mean: f64,
    pub ci: Option<(f64, f64)>,
    pub seeds: Vec<f64>,
}

pub struct BpbChart {
    sweep: String,
    items: Vec<Item>,
    /// The mean of the one baseline configuration, drawn as a vertical line.
    baseline: Option<f64>,
}

impl BpbChart {
    pub fn new(report: &Report) -> Result<Self> {
        let items: Vec<Item> = report
            .rows
            .iter()
            .filter_map(|r| {
                let s = r.bpb?;
                Some(Item {
                    name: legend(r),
                    mean: s.mean,
                    ci: s.ci95,
                    seeds: r.bpb_seeds.iter().map(|(_, v)| *v).collect(),
                })
            })
            .collect();
        if items.is_empty() {
            return Err(Error::Input(format!(
                "--plot bpb: no configuration of sweep {} has a finished seed yet ({}); plot \
                 again when a trial is done",
                report.sweep,
                report.headline("").trim_end_matches("; ")
            )));
        }
        let baselines: Vec<f64> = report
            .rows
            .iter()
            .filter(|r| r.vs_baseline == Some(VsBaseline::IsBaseline))
            .filter_map(|r| r.bpb.map(|s| s.mean))
            .collect();
        Ok(Self {
            sweep: report.sweep.clone(),
            items,
            baseline: (baselines.len() == 1).then(|| baselines[0]),
        })
    }

    fn draw<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>) -> DrawResult
    where
        DB::ErrorType: 'static,
    {
        let line = self.baseline.map(|b| (b, None));
        draw_dots(
            &root,
            &format!("{}: final val/bpb per configuration", self.sweep),
            "val/bpb, bits per byte (lower is better): dot = mean, bar = 95% CI, circles = seeds",
            &self.items,
            line,
        )?;
        root.present()?;
        Ok(())
    }
}

/// The pixels the configuration names take left of the axis: 9 a character (the tick font's
/// widest average), at least 80. The charts widen by what this takes beyond 560, so that a
/// long name is never cut.
pub(super) fn names_width(items: &[Item]) -> u32 {
    let longest = items
        .iter()
        .map(|it| it.name.chars().count())
        .max()
        .unwrap_or(0) as u32;
    (longest * 9 + 20).max(80)
}

/// A dot chart's width: 1200, and what its names need beyond 560.
pub(super) fn dots_width(items: &[Item]) -> u32 {
    1200 + names_width(items).saturating_sub(560)
}

/// Configurations down the y axis (the first on top), each a dot at its mean with its 95%
/// interval and its seeds; `line` a dashed vertical line (the baseline's mean, a chance
/// level) with an optional label.
pub(super) fn draw_dots<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    caption: &str,
    x_desc: &str,
    items: &[Item],
    line: Option<(f64, Option<&str>)>,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let n = items.len();
    let values = items.iter().flat_map(|it| {
        let (lo, hi) = it.ci.unwrap_or((it.mean, it.mean));
        it.seeds.iter().copied().chain([lo, hi, it.mean])
    });
    let (lo, hi) = values
        .chain(line.map(|(v, _)| v))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    let (x0, x1) = padded(lo, hi, 0.08);
    // The first configuration on top: item i sits at y = n - 1 - i.
    let names: Vec<&str> = items.iter().rev().map(|it| it.name.as_str()).collect();

    let mut chart = ChartBuilder::on(root)
        .caption(caption, title_font())
        .margin(18)
        .x_label_area_size(60)
        .y_label_area_size(names_width(items))
        .build_cartesian_2d(x0..x1, -0.6f64..n as f64 - 0.4)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        // Configuration names are drawn below, one per row, not at numeric ticks.
        .y_labels(0)
        .disable_y_mesh()
        .label_style(tick_font())
        .axis_desc_style(label_font())
        .light_line_style(RGBColor(246, 246, 246))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()?;

    // Text goes on `root` in its own pixels; the chart's coordinates are the backend's.
    let (bx, by) = root.get_base_pixel();
    let at = |x: f64, y: f64| {
        let (px, py) = chart.backend_coord(&(x, y));
        (px - bx, py - by)
    };
    let name_style = tick_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Right, VPos::Center));
    for (y, name) in names.iter().enumerate() {
        let (px, py) = at(x0, y as f64);
        root.draw(&Text::new(
            name.to_string(),
            (px - 10, py),
            name_style.clone(),
        ))?;
    }
    let label_at = line.map(|(v, _)| at(v, n as f64 - 0.4));
    if let Some((v, label)) = line {
        chart.draw_series(DashedLineSeries::new(
            [(v, -0.6), (v, n as f64 - 0.4)],
            6,
            4,
            RGBColor(120, 120, 120).stroke_width(1),
        ))?;
        if let (Some(label), Some((px, py))) = (label, label_at) {
            let style = tick_font()
                .color(&RGBColor(90, 90, 90))
                .pos(Pos::new(HPos::Left, VPos::Top));
            root.draw(&Text::new(label.to_string(), (px + 4, py + 2), style))?;
        }
    }
    for (i, it) in items.iter().enumerate() {
        let c = color(i);
        let y = (n - 1 - i) as f64;
        if let Some((lo, hi)) = it.ci {
            chart.draw_series([ErrorBar::new_horizontal(
                y,
                lo,
                it.mean,
                hi,
                c.stroke_width(2),
                14,
            )])?;
        }
        // Seeds spread a little in y so that equal values stay visible.
        let m = it.seeds.len();
        chart.draw_series(it.seeds.iter().enumerate().map(|(k, &v)| {
            let dy = (k as f64 - (m as f64 - 1.0) / 2.0) * 0.1;
            Circle::new((v, y + dy), 4, c.stroke_width(1))
        }))?;
        chart.draw_series([Circle::new((it.mean, y), 6, c.filled())])?;
    }
    Ok(())
}

impl Chart for BpbChart {
    fn size(&self) -> (u32, u32) {
        (
            dots_width(&self.items),
            (170 + 46 * self.items.len() as u32).max(380),
        )
    }

    fn series(&self) -> usize {
        self.items.len()
    }

    chart_backends!();
}
