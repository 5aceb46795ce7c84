//! Charts of a report, each written as PNG and SVG: final BPB per configuration, loss curves,
//! stream amplification over depth, and the zero-shot benchmarks against chance.
//!
//! Every chart is drawn twice by the same code, once per plotters backend. Text is set in
//! DejaVu Sans, embedded through the `dejavu` crate, so a PNG looks the same on every machine
//! and needs no system fonts.

mod amplification;
mod benchmarks;
mod bpb;
mod frontier;
mod loss;
mod streams;

pub use super::frontier::Budget;

use std::error::Error as StdError;
use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::register_font;

use super::Report;
use crate::{Error, Result, Store};

/// Which chart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Bpb,
    Loss,
    Amplification,
    Benchmarks,
    /// The streams' cosine and effective rank over depth (multi-stream residuals).
    Streams,
    /// The metric against a budget (training FLOPs, parameters, GPU hours), a line per family.
    Frontier(Budget),
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Bpb => "bpb",
            Kind::Loss => "loss",
            Kind::Amplification => "amplification",
            Kind::Benchmarks => "benchmarks",
            Kind::Streams => "streams",
            Kind::Frontier(_) => "frontier",
        }
    }
}

/// The x axis of loss curves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XAxis {
    Step,
    /// Training tokens seen: step x batch x seq_len.
    Tokens,
}

/// What one chart wrote.
#[derive(Clone, Debug)]
pub struct Written {
    pub png: PathBuf,
    pub svg: PathBuf,
    /// Lines, or configurations, drawn.
    pub series: usize,
}

/// A chart with its data read, ready to be written. Preparing every requested chart before
/// writing any lets a chart without data fail before anything is written.
pub struct Prepared {
    chart: Box<dyn Chart>,
    stem: String,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("stem", &self.stem)
            .finish()
    }
}

/// Reads the data of chart `kind`; an error when the sweep has none for it.
pub fn prepare(kind: Kind, report: &Report, store: &Store, x: XAxis) -> Result<Prepared> {
    let chart: Box<dyn Chart> = match kind {
        Kind::Bpb => Box::new(bpb::BpbChart::new(report)?),
        Kind::Loss => Box::new(loss::LossChart::new(report, store, x)?),
        Kind::Amplification => Box::new(amplification::AmpChart::new(report, store)?),
        Kind::Benchmarks => Box::new(benchmarks::BenchChart::new(report)?),
        Kind::Streams => Box::new(streams::StreamsChart::new(report, store)?),
        Kind::Frontier(budget) => Box::new(frontier::FrontierChart::new(report, budget)?),
    };
    Ok(Prepared {
        chart,
        stem: format!("{}-{}", file_safe(&report.sweep), kind.name()),
    })
}

impl Prepared {
    /// Writes `<sweep>-<kind>.png` and `.svg` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<Written> {
        save(self.chart.as_ref(), dir, &self.stem)
    }

    /// The chart as SVG text, for pages that hold it inline.
    pub fn svg(&self) -> Result<String> {
        render_svg(self.chart.as_ref(), &self.stem)
    }
}

/// Drawn the same way on any backend. Implementations get a white canvas with the fonts
/// registered.
trait Chart {
    fn size(&self) -> (u32, u32);
    fn series(&self) -> usize;
    fn draw_png(&self, root: DrawingArea<BitMapBackend<'_>, Shift>) -> DrawResult;
    fn draw_svg(&self, root: DrawingArea<SVGBackend<'_>, Shift>) -> DrawResult;
}

/// The two backend methods of [`Chart`] call one generic `draw`.
macro_rules! chart_backends {
    () => {
        fn draw_png(
            &self,
            root: plotters::drawing::DrawingArea<
                plotters::prelude::BitMapBackend<'_>,
                plotters::coord::Shift,
            >,
        ) -> super::DrawResult {
            self.draw(root)
        }
        fn draw_svg(
            &self,
            root: plotters::drawing::DrawingArea<
                plotters::prelude::SVGBackend<'_>,
                plotters::coord::Shift,
            >,
        ) -> super::DrawResult {
            self.draw(root)
        }
    };
}
use chart_backends;

type DrawResult = std::result::Result<(), Box<dyn StdError>>;

fn save(chart: &dyn Chart, dir: &Path, stem: &str) -> Result<Written> {
    fonts();
    let (w, h) = chart.size();
    let plot_err = |e: Box<dyn StdError>| Error::Plot(format!("{stem}: {e}"));

    let mut rgb = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(e.into()))?;
        chart.draw_png(root.clone()).map_err(plot_err)?;
        root.present().map_err(|e| plot_err(e.into()))?;
    }
    let mut png_bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png_bytes, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc
            .write_header()
            .map_err(|e| Error::Plot(format!("{stem}.png: {e}")))?;
        writer
            .write_image_data(&rgb)
            .map_err(|e| Error::Plot(format!("{stem}.png: {e}")))?;
    }

    let svg = render_svg(chart, stem)?;

    std::fs::create_dir_all(dir).map_err(|e| Error::Io {
        path: dir.display().to_string(),
        source: e,
    })?;
    let png_path = dir.join(format!("{stem}.png"));
    let svg_path = dir.join(format!("{stem}.svg"));
    write_atomic(&png_path, &png_bytes)?;
    write_atomic(&svg_path, svg.as_bytes())?;
    Ok(Written {
        png: png_path,
        svg: svg_path,
        series: chart.series(),
    })
}

/// The chart as SVG text.
fn render_svg(chart: &dyn Chart, stem: &str) -> Result<String> {
    fonts();
    let plot_err = |e: Box<dyn StdError>| Error::Plot(format!("{stem}: {e}"));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, chart.size()).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(e.into()))?;
        chart.draw_svg(root.clone()).map_err(plot_err)?;
        root.present().map_err(|e| plot_err(e.into()))?;
    }
    Ok(svg)
}

/// Writes `bytes` to `path` as the charts are written: whole or not at all.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io {
            path: dir.display().to_string(),
            source: e,
        })?;
    }
    write_atomic(path, bytes)
}

/// Written beside the target and renamed over it: a reader never sees half a file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |e| Error::Io {
        path: path.display().to_string(),
        source: e,
    };
    let tmp = path.with_extension(format!(
        "{}.tmp{}",
        path.extension().and_then(|e| e.to_str()).unwrap_or(""),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}

fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

const FONT: &str = "sans-serif";

fn fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The embedded fonts are valid TrueType files; a failure here is a broken build.
        let _ = register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
        let _ = register_font(FONT, FontStyle::Bold, dejavu::sans::bold());
    });
}

/// Splits a title band off the top of `root` and writes `title` in it; the rest is returned.
fn titled<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
) -> std::result::Result<DrawingArea<DB, Shift>, Box<dyn StdError>>
where
    DB::ErrorType: 'static,
{
    let (band, body) = root.split_vertically(50);
    band.titled(title, title_font())?;
    Ok(body)
}

fn title_font() -> FontDesc<'static> {
    (FONT, 24, FontStyle::Bold).into_font()
}

fn label_font() -> FontDesc<'static> {
    (FONT, 18).into_font()
}

fn tick_font() -> FontDesc<'static> {
    (FONT, 15).into_font()
}

/// Okabe-Ito's colour-blind-safe palette (yellow moved last: weak on white), then darker
/// tones; cycles beyond 10 configurations.
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(0, 0, 0),
    RGBColor(153, 51, 51),
    RGBColor(102, 102, 102),
    RGBColor(200, 180, 0),
];

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// `[lo, hi]` widened by `frac` of its span on each side (and made non-empty).
fn padded(lo: f64, hi: f64, frac: f64) -> (f64, f64) {
    let span = if hi > lo {
        hi - lo
    } else {
        lo.abs().max(1.0) * 0.1
    };
    (lo - frac * span, hi + frac * span)
}
