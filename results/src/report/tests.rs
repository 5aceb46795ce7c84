//! The report on a small hand-made results DB: every statistic is worked out here by hand or
//! by a second formula, not read back from the code under test.

use std::path::PathBuf;

use super::plot::{self, Kind, XAxis, PALETTE};
use super::stats::two_sided_p_by_quadrature;
use super::*;
use crate::{NewTrial, Status, Store};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sweep-report-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Configurations are written as `key=value;key=value` in the trials' config column, and
/// flattened back by splitting.
fn flatten(config: &str) -> Vec<(String, String)> {
    config
        .split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

const PRENORM: &str = "residual=PreNorm;train.steps=100";
const HC_STATIC: &str = "residual=Hc;residual.streams=4;residual.dynamic=false;train.steps=100";
const HC_DYNAMIC: &str = "residual=Hc;residual.streams=4;residual.dynamic=true;train.steps=100";
const MHC: &str = "residual=Mhc;residual.streams=4;train.steps=100";

/// One trial: its final status and the val/bpb of its evaluations at steps 50 and 100.
struct T {
    config: &'static str,
    seed: u64,
    status: Status,
    bpb: &'static [f64],
    amplification: bool,
}

/// PreNorm: 2 done seeds (3.4, 3.6) and one running; Hc static: 2 done (2.9, 3.1) and one
/// diverged; Hc dynamic: 3 done (3.0, 3.2, 3.4) and one failed; Mhc: one queued seed.
fn trials() -> Vec<T> {
    let t = |config, seed, status, bpb, amplification| T {
        config,
        seed,
        status,
        bpb,
        amplification,
    };
    vec![
        t(PRENORM, 0, Status::Done, &[4.0, 3.4], true),
        t(HC_STATIC, 0, Status::Done, &[3.5, 2.9], true),
        t(HC_DYNAMIC, 0, Status::Done, &[3.6, 3.0], false),
        t(MHC, 0, Status::Queued, &[], false),
        t(PRENORM, 1, Status::Done, &[4.1, 3.6], true),
        t(HC_STATIC, 1, Status::Done, &[3.4, 3.1], true),
        t(HC_DYNAMIC, 1, Status::Done, &[3.7, 3.2], false),
        // Running: its latest BPB (1.0) is not final and must not enter the statistics.
        t(PRENORM, 2, Status::Running, &[1.0], false),
        t(HC_STATIC, 2, Status::Diverged, &[f64::NAN], false),
        t(HC_DYNAMIC, 2, Status::Done, &[3.9, 3.4], false),
        t(HC_DYNAMIC, 3, Status::Failed, &[], false),
    ]
}

fn make_db(name: &str) -> (PathBuf, Store) {
    let dir = temp_dir(name);
    let path = dir.join("r.db");
    let mut s = Store::open(&path).unwrap();
    let sweep = s.begin_sweep("res", "res.ron", "Sweep()", "test").unwrap();
    for (i, t) in trials().iter().enumerate() {
        let id = format!("t{i}");
        s.register_trial(
            sweep,
            i,
            &NewTrial {
                id: &id,
                seed: t.seed,
                label: "",
                config: t.config,
            },
        )
        .unwrap();
        if t.status == Status::Queued {
            continue;
        }
        s.start_trial(&id, "cpu", "test", None).unwrap();
        for (k, &b) in t.bpb.iter().enumerate() {
            let step = 50 * (k as u64 + 1);
            s.record(&id, step, "val/bpb", b).unwrap();
            // val/loss proportional to BPB, lowest at the last evaluation.
            s.record(&id, step, "val/loss", b * 0.7).unwrap();
            s.record(&id, step, "train/loss", b * 0.72).unwrap();
            s.record(&id, step, "tokens_per_s", 1000.0 * (k + 1) as f64)
                .unwrap();
            if t.amplification {
                let g: f64 = if t.config == PRENORM { 1.0 } else { 1.5 };
                for l in 0..4 {
                    let v = g.powi(l + 1);
                    s.record(&id, step, &format!("amax/fwd/composite/l{l}"), v)
                        .unwrap();
                    s.record(&id, step, &format!("amax/bwd/composite/l{l}"), v)
                        .unwrap();
                }
                s.record(&id, step, "amax/fwd", g.powi(4)).unwrap();
                s.record(&id, step, "amax/bwd", g.powi(4)).unwrap();
            }
        }
        if t.status != Status::Running {
            s.finish_trial(&id, t.status, None, 1.0).unwrap();
        } else {
            s.flush().unwrap();
        }
    }
    (path, s)
}

fn report(store: &Store, baseline: Option<&str>) -> crate::Result<Report> {
    let trials = load(store, 1, &flatten)?;
    let sel = baseline.map(Selector::parse).transpose()?;
    summarize("res", trials, sel.as_ref(), None)
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() < tol
}

#[test]
fn seeds_collapse_into_configurations_with_hand_computed_statistics() {
    let (_, store) = make_db("stats");
    let r = report(&store, None).unwrap();
    // residual.streams is 4 for both Hc kinds, so it is no column; train.steps never varies.
    assert_eq!(r.columns, ["residual", "residual.dynamic"]);
    let names: Vec<&str> = r.rows.iter().map(|r| r.name.as_str()).collect();
    // Sorted by mean BPB: Hc static 3.0, Hc dynamic 3.2, PreNorm 3.5; Mhc has none.
    assert_eq!(
        names,
        ["Hc dynamic=false", "Hc dynamic=true", "PreNorm", "Mhc"]
    );
    let [hs, hd, pre, mhc] = &r.rows[..] else {
        panic!("four rows")
    };
    assert_eq!(pre.values, ["PreNorm", "-"]);

    // Hc static: 2.9, 3.1 -> mean 3.0, s = sqrt(0.02) = 0.141421, t(0.975, 1) = 12.706205,
    // half width 12.706205 * 0.141421 / sqrt 2 = 1.270620.
    let b = hs.bpb.unwrap();
    assert_eq!(b.n, 2);
    assert!(close(b.mean, 3.0, 1e-12));
    assert!(close(b.std.unwrap(), 0.02f64.sqrt(), 1e-12));
    let (lo, hi) = b.ci95.unwrap();
    assert!(close(lo, 3.0 - 1.270620, 1e-5) && close(hi, 3.0 + 1.270620, 1e-5));
    // Hc dynamic: 3.0, 3.2, 3.4 -> mean 3.2, s = 0.2, half width 4.302653 * 0.2 / sqrt 3.
    let b = hd.bpb.unwrap();
    assert_eq!(b.n, 3);
    assert!(close(b.mean, 3.2, 1e-12) && close(b.std.unwrap(), 0.2, 1e-12));
    assert!(close(b.ci95.unwrap().1 - 3.2, 0.496827, 1e-5));
    // PreNorm: the running seed's 1.0 is left out: 3.4, 3.6 -> 3.5.
    assert_eq!(pre.bpb.unwrap().n, 2);
    assert!(close(pre.bpb.unwrap().mean, 3.5, 1e-12));
    assert_eq!(mhc.bpb, None);

    let counts = |r: &Row| {
        let c = r.counts;
        (c.done, c.diverged, c.failed, c.running, c.queued)
    };
    assert_eq!(counts(hs), (2, 1, 0, 0, 0));
    assert_eq!(counts(hd), (3, 0, 1, 0, 0));
    assert_eq!(counts(pre), (2, 0, 0, 1, 0));
    assert_eq!(counts(mhc), (0, 0, 0, 0, 1));

    // Best val/loss is each done seed's lowest (0.7 x its last BPB), averaged: 0.7 x 3.0.
    assert!(close(hs.best_val_loss.unwrap(), 2.1, 1e-12));
    // Composite gains: 1.5^4 for Hc static, 1 for PreNorm; none recorded for Hc dynamic.
    assert!(close(hs.amax_fwd.unwrap(), 5.0625, 1e-12));
    assert_eq!((pre.amax_fwd, hd.amax_bwd), (Some(1.0), None));
    // Median throughput of each trial (1000 and 2000 logged: the upper middle, 2000), also
    // over the running seed (1000).
    assert!(close(
        pre.tokens_per_s.unwrap(),
        (2000.0 + 2000.0 + 1000.0) / 3.0,
        1e-9
    ));
}

#[test]
fn the_baseline_comparison_matches_welch_by_hand() {
    let (_, store) = make_db("baseline");
    let r = report(&store, Some("residual=PreNorm")).unwrap();
    let by_name = |n: &str| r.rows.iter().find(|r| r.name == n).unwrap();
    assert_eq!(by_name("PreNorm").vs_baseline, Some(VsBaseline::IsBaseline));
    assert_eq!(by_name("Mhc").vs_baseline, Some(VsBaseline::NoMatch));

    // Hc static (2.9, 3.1) vs PreNorm (3.4, 3.6): equal variances and n = 2 give df = 2,
    // where P(|T| > t) = 1 - t / sqrt(2 + t^2); t = 0.5 / sqrt(0.02/2 + 0.02/2) = 3.535534.
    let Some(VsBaseline::Diff { diff, test, .. }) = &by_name("Hc dynamic=false").vs_baseline else {
        panic!("compared")
    };
    let t: f64 = 0.5 / 0.02f64.sqrt();
    let test = test.unwrap();
    assert!(close(*diff, -0.5, 1e-12));
    assert!(close(test.df, 2.0, 1e-9));
    assert!(close(test.p, 1.0 - t / (2.0 + t * t).sqrt(), 1e-9));
    let half = 4.302653 * 0.02f64.sqrt();
    assert!(close(test.ci95.0, -0.5 - half, 1e-5) && close(test.ci95.1, -0.5 + half, 1e-5));

    // Hc dynamic (3.0, 3.2, 3.4) vs PreNorm: va = 0.04/3, vb = 0.02/2; Welch-Satterthwaite
    // df and the p-value by numerical integration of the t density.
    let Some(VsBaseline::Diff { diff, test, .. }) = &by_name("Hc dynamic=true").vs_baseline else {
        panic!("compared")
    };
    let test = test.unwrap();
    let (va, vb) = (0.04 / 3.0, 0.01);
    let df = (va + vb) * (va + vb) / (va * va / 2.0 + vb * vb / 1.0);
    assert!(close(*diff, -0.3, 1e-12));
    assert!(close(test.df, df, 1e-9));
    let p = two_sided_p_by_quadrature(0.3 / (va + vb).sqrt(), df);
    assert!(close(test.p, p, 1e-6), "{} vs {p}", test.p);
}

#[test]
fn baseline_selectors_match_values_and_refuse_what_they_cannot_match() {
    let (_, store) = make_db("selectors");
    // A parameter selects one Hc kind; the other Hc kind and PreNorm compare with it.
    let r = report(&store, Some("residual=Hc, residual.dynamic=false")).unwrap();
    let pre = r.rows.iter().find(|r| r.name == "PreNorm").unwrap();
    assert!(matches!(
        pre.vs_baseline,
        Some(VsBaseline::Diff { diff, .. }) if close(diff, 0.5, 1e-12)
    ));
    // Numbers match by value: 1e2 is 100.
    let r = report(&store, Some("residual=PreNorm train.steps=1e2")).unwrap();
    assert!(r
        .rows
        .iter()
        .any(|r| r.vs_baseline == Some(VsBaseline::IsBaseline)));

    let err = |sel: &str| report(&store, Some(sel)).unwrap_err().to_string();
    let e = err("resid=PreNorm");
    assert!(
        e.contains("no `resid`") && e.contains("residual, residual.dynamic"),
        "{e}"
    );
    let e = err("residual=Prenorm");
    assert!(e.contains("residual takes: Hc, Mhc, PreNorm"), "{e}");
    // Two Hc configurations that differ only in a parameter of the selected component.
    let e = err("residual=Hc");
    assert!(e.contains("differ only in residual.dynamic"), "{e}");
    assert!(Selector::parse("residual").is_err());
    assert!(Selector::parse(" , ").is_err());
}

#[test]
fn a_column_appears_when_a_setting_differs_between_runs_of_the_sweep() {
    let (_, store) = make_db("steps");
    let mut trials = load(&store, 1, &flatten).unwrap();
    for t in trials.iter_mut().filter(|t| t.row.seed == 0) {
        for (k, v) in &mut t.factors {
            if k == "train.steps" {
                *v = "200".into();
            }
        }
    }
    let r = summarize("res", trials, None, None).unwrap();
    assert_eq!(r.columns, ["residual", "residual.dynamic", "train.steps"]);
    assert_eq!(r.rows.len(), 7);
}

#[test]
fn every_format_carries_the_same_rows() {
    let (_, store) = make_db("formats");
    let r = report(&store, Some("residual=PreNorm")).unwrap();

    let table = r.render(Format::Table, "r.db");
    assert!(table.starts_with("sweep res: 11 trials in 4 configurations (7 done, 1 diverged, 1 failed, 1 running, 1 queued)"), "{table}");
    let hs = table
        .lines()
        .find(|l| l.starts_with("Hc ") && l.contains("false"))
        .unwrap();
    assert!(
        hs.contains("3.0000") && hs.contains("-0.5000") && hs.contains("2 done, 1 diverged"),
        "{hs}"
    );

    let md = r.render(Format::Markdown, "r.db");
    let header = md.lines().find(|l| l.starts_with("| residual")).unwrap();
    let cols = header.matches('|').count();
    for l in md.lines().filter(|l| l.starts_with('|')) {
        assert_eq!(l.matches('|').count(), cols, "{l}");
    }

    let csv = r.render(Format::Csv, "r.db");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 5);
    let head: Vec<&str> = lines[0].split(',').collect();
    let row: Vec<&str> = lines[1].split(',').collect();
    assert_eq!(head.len(), row.len());
    let field = |name: &str| row[head.iter().position(|h| *h == name).unwrap()];
    assert_eq!(field("residual.dynamic"), "false");
    assert_eq!(field("val_bpb_mean").parse::<f64>().unwrap(), 3.0);
    assert_eq!(field("diverged"), "1");
    assert!(close(field("p_welch").parse().unwrap(), 0.071523, 1e-5));

    let json: serde_json::Value = serde_json::from_str(&r.render(Format::Json, "r.db")).unwrap();
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[0]["config"]["residual.dynamic"], "false");
    assert_eq!(rows[0]["val_bpb"]["n"], 2);
    assert_eq!(rows[0]["vs_baseline"]["baseline"], "PreNorm");
    assert_eq!(rows[2]["vs_baseline"], "baseline");
    assert_eq!(rows[3]["val_bpb"], serde_json::Value::Null);
    assert_eq!(rows[0]["trials"].as_array().unwrap().len(), 3);
}

/// The palette entries present as exact pixels of an RGB PNG.
fn palette_in_png(path: &std::path::Path, size: (u32, u32)) -> Vec<usize> {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), size);
    assert_eq!(info.color_type, png::ColorType::Rgb);
    let pixels: std::collections::HashSet<[u8; 3]> =
        buf.chunks(3).map(|p| [p[0], p[1], p[2]]).collect();
    (0..6)
        .filter(|&i| {
            let c = PALETTE[i];
            pixels.contains(&[c.0, c.1, c.2])
        })
        .collect()
}

/// The palette entries an SVG strokes or fills with.
fn palette_in_svg(svg: &str) -> Vec<usize> {
    (0..6)
        .filter(|&i| {
            let c = PALETTE[i];
            let hex = format!("\"#{:02X}{:02X}{:02X}\"", c.0, c.1, c.2);
            svg.contains(&format!("stroke={hex}")) || svg.contains(&format!("fill={hex}"))
        })
        .collect()
}

#[test]
fn every_chart_writes_a_png_and_an_svg_with_one_colour_per_series() {
    let (_, mut store) = make_db("plots");
    // The two Hc configurations' done seeds recorded stream diagnostics at 4 sublayers.
    for id in ["t1", "t5", "t2", "t6", "t9"] {
        for l in 0..4 {
            store
                .record(id, 100, &format!("streams/cos/l{l}"), 0.9 - 0.1 * l as f64)
                .unwrap();
            store
                .record(id, 100, &format!("streams/rank/l{l}"), 1.5 + 0.5 * l as f64)
                .unwrap();
        }
    }
    store.flush().unwrap();
    let r = report(&store, Some("residual=PreNorm")).unwrap();
    let dir = temp_dir("plots-out");
    // Rows: 0 Hc static, 1 Hc dynamic, 2 PreNorm, 3 Mhc (no data). Colours follow the rows.
    for (kind, expected) in [
        (Kind::Bpb, vec![0, 1, 2]),
        (Kind::Loss, vec![0, 1, 2]),
        (Kind::Amplification, vec![0, 2]),
        (Kind::Streams, vec![0, 1]),
    ] {
        let chart = plot::prepare(kind, &r, &store, XAxis::Step).unwrap();
        let w = chart.save(&dir).unwrap();
        assert_eq!(w.series, expected.len(), "{kind:?}");
        assert_eq!(w.png, dir.join(format!("res-{}.png", kind.name())));
        let size = if kind == Kind::Bpb {
            (1200, 380)
        } else {
            (1500, 620)
        };
        assert_eq!(palette_in_png(&w.png, size), expected, "{kind:?} png");
        let svg = std::fs::read_to_string(&w.svg).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(palette_in_svg(&svg), expected, "{kind:?} svg");
        for i in &expected {
            let name = r.rows[*i].name.as_str();
            assert!(svg.contains(name), "{kind:?}: {name} not labelled");
        }
    }
    // No temporary files are left beside the charts.
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn charts_without_data_are_refused() {
    let dir = temp_dir("nodata");
    let mut s = Store::open(&dir.join("r.db")).unwrap();
    let sweep = s.begin_sweep("res", "res.ron", "", "test").unwrap();
    s.register_trial(
        sweep,
        0,
        &NewTrial {
            id: "a",
            seed: 0,
            label: "",
            config: PRENORM,
        },
    )
    .unwrap();
    s.start_trial("a", "cpu", "test", None).unwrap();
    s.flush().unwrap();
    let r = report(&s, None).unwrap();
    for kind in [Kind::Bpb, Kind::Loss, Kind::Amplification, Kind::Streams] {
        let e = plot::prepare(kind, &r, &s, XAxis::Step).unwrap_err();
        assert!(matches!(e, crate::Error::Input(_)), "{kind:?}: {e}");
        assert!(
            e.to_string().contains(&format!("--plot {}", kind.name())),
            "{e}"
        );
    }
    // A loss chart against tokens needs the batch shape.
    s.record("a", 10, "train/loss", 3.0).unwrap();
    s.flush().unwrap();
    let r = report(&s, None).unwrap();
    let e = plot::prepare(Kind::Loss, &r, &s, XAxis::Tokens).unwrap_err();
    assert!(e.to_string().contains("--x tokens"), "{e}");
}

/// Two families of three sizes on known lines of val/bpb against log10 training FLOPs: the
/// baseline B at 10^9, 10^10, 10^11 FLOPs on y = 12 - log10(x), family A at 10^9.5, 10^10.5
/// (inside B's range) and 10^12 (outside) on y = 11.8 - log10(x); two seeds each, at the
/// mean -/+ 0.1.
fn frontier_db(name: &str) -> Store {
    let dir = temp_dir(name);
    let mut s = Store::open(&dir.join("f.db")).unwrap();
    let sweep = s.begin_sweep("front", "f.ron", "Sweep()", "test").unwrap();
    let points = [
        ("B", 16, 9.0, 12.0),
        ("B", 32, 10.0, 12.0),
        ("B", 64, 11.0, 12.0),
        ("A", 16, 9.5, 11.8),
        ("A", 32, 10.5, 11.8),
        ("A", 64, 12.0, 11.8),
    ];
    let mut i = 0;
    for (ffn, d, log_x, top) in points {
        for (seed, dy) in [(0, -0.1), (1, 0.1)] {
            let id = format!("t{i}");
            // A's sizes are a scale axis's named shapes: a family leaves either out.
            let config = match ffn {
                "A" => format!("ffn={ffn};model.scale=s{d}"),
                _ => format!("ffn={ffn};model.d_model={d}"),
            };
            s.register_trial(
                sweep,
                i,
                &NewTrial {
                    id: &id,
                    seed,
                    label: "",
                    config: &config,
                },
            )
            .unwrap();
            s.start_trial(&id, "cpu", "test", None).unwrap();
            s.set_compute(&id, 1.0, 1, 10f64.powf(log_x)).unwrap();
            s.record(&id, 100, "val/bpb", top - log_x + dy).unwrap();
            s.finish_trial(&id, Status::Done, None, 1.0).unwrap();
            i += 1;
        }
    }
    s
}

#[test]
fn the_difference_at_equal_compute_is_the_gap_between_known_lines() {
    let s = frontier_db("frontier");
    let trials = load(&s, 1, &flatten).unwrap();
    let sel = Selector::parse("ffn=B").unwrap();
    let r = summarize("front", trials, Some(&sel), None).unwrap();
    let eq = frontier::at_equal_compute(&r);
    assert_eq!(eq.len(), 1);
    let e = &eq[0];
    assert_eq!(
        (e.family.as_str(), e.baseline.as_str(), e.sizes),
        ("A", "B", 2)
    );
    // A lies 0.2 below B everywhere; the point at 10^12 is outside B's range.
    assert!((e.diff + 0.2).abs() < 1e-12, "{}", e.diff);
    // Each mean's variance: sd 0.1414 over 2 seeds -> 0.01. At 10^9.5 and 10^10.5 B is
    // interpolated halfway: 0.25 x 0.01 x 2 = 0.005; each difference 0.015; the mean of two
    // 0.0075. Student t with 1 degree of freedom: 12.7062 standard errors.
    let half = 12.706_204_736 * 0.0075f64.sqrt();
    let (lo, hi) = e.ci95.unwrap();
    assert!(
        (lo - (-0.2 - half)).abs() < 1e-6 && (hi - (-0.2 + half)).abs() < 1e-6,
        "{lo} {hi}"
    );
    // The table says it under the rows; the frontier chart has one line per family.
    let text = r.render(Format::Table, "f.db");
    assert!(
        text.contains("At equal training FLOPs, A minus B"),
        "{text}"
    );
    let chart = plot::prepare(Kind::Frontier(plot::Budget::Flops), &r, &s, XAxis::Step).unwrap();
    let w = chart.save(&temp_dir("frontier-plot")).unwrap();
    assert_eq!(w.series, 2);
}

#[test]
fn interpolation_is_linear_in_log_budget() {
    let p = |x: f64, mean: f64| frontier::Point {
        x,
        mean,
        var: Some(0.04),
        n: 3,
    };
    let base = [p(10.0, 1.0), p(1000.0, 3.0)];
    // log10 100 is halfway between 1 and 3: the mean halfway, the variance (1/4 + 1/4) 0.04.
    let (m, v) = frontier::interpolate(&base, 100.0).unwrap();
    assert!((m - 2.0).abs() < 1e-12 && (v.unwrap() - 0.02).abs() < 1e-12);
    assert_eq!(frontier::interpolate(&base, 10.0), Some((1.0, Some(0.04))));
    assert_eq!(frontier::interpolate(&base, 5.0), None);
    assert_eq!(frontier::interpolate(&base, 2000.0), None);
}

#[test]
fn loss_spikes_get_a_column_only_when_a_trial_had_one() {
    let (_, mut s) = make_db("spikes");
    let r = report(&s, None).unwrap();
    assert!(!r.has_spikes());
    assert!(!r.render(Format::Table, "db").contains("spikes"));
    // Hc dynamic's three done seeds counted 1, 2 and 6 spikes (the last value of each trial
    // counts): mean 3.0; PreNorm's done seeds counted none.
    for (id, counts) in [("t2", [0.0, 1.0]), ("t6", [2.0, 2.0]), ("t9", [4.0, 6.0])] {
        for (k, c) in counts.iter().enumerate() {
            s.record(id, 50 * (k as u64 + 1), "train/spikes", *c)
                .unwrap();
        }
    }
    for id in ["t0", "t4"] {
        s.record(id, 100, "train/spikes", 0.0).unwrap();
    }
    s.flush().unwrap();
    let r = report(&s, None).unwrap();
    assert!(r.has_spikes());
    let (header, rows, _) = r.table();
    let col = header
        .iter()
        .position(|h| h == "spikes")
        .expect("a spikes column");
    let value = |needle: &str| -> String {
        let i = r
            .rows
            .iter()
            .position(|row| row.name.contains(needle))
            .unwrap();
        rows[i][col].clone()
    };
    assert_eq!(value("dynamic=true"), "3.0");
    assert_eq!(value("PreNorm"), "0.0");
    assert!(r.notes().contains("more than 10%"));
}

#[test]
fn stacks_matched_at_a_scale_are_compared_within_it_whatever_their_widths() {
    let dir = temp_dir("scaled-baseline");
    let mut s = Store::open(&dir.join("s.db")).unwrap();
    let sweep = s.begin_sweep("scaled", "s.ron", "Sweep()", "test").unwrap();
    // (ffn, scale, the width `match` solved, val/bpb of seeds 0 and 1)
    let cells = [
        ("A", "S", 448, [1.70, 1.80]),
        ("B", "S", 480, [2.00, 2.10]),
        ("A", "L", 736, [1.60, 1.70]),
        ("B", "L", 784, [2.20, 2.30]),
    ];
    let mut i = 0;
    for (ffn, scale, d, bpb) in cells {
        for (seed, v) in bpb.into_iter().enumerate() {
            let id = format!("t{i}");
            let config = format!("ffn={ffn};model.scale={scale};model.d_model={d}");
            let trial = NewTrial {
                id: &id,
                seed: seed as u64,
                label: "",
                config: &config,
            };
            s.register_trial(sweep, i, &trial).unwrap();
            s.start_trial(&id, "cpu", "test", None).unwrap();
            s.record(&id, 100, "val/bpb", v).unwrap();
            s.finish_trial(&id, Status::Done, None, 1.0).unwrap();
            i += 1;
        }
    }
    let trials = load(&s, 1, &flatten).unwrap();
    let sel = Selector::parse("ffn=B").unwrap();
    let r = summarize("scaled", trials, Some(&sel), None).unwrap();
    let diff_at = |scale: &str| {
        let row = r
            .rows
            .iter()
            .find(|r| r.factor("ffn") == Some("A") && r.factor("model.scale") == Some(scale))
            .unwrap();
        match &row.vs_baseline {
            Some(VsBaseline::Diff { diff, .. }) => *diff,
            other => panic!("{scale}: {other:?}"),
        }
    };
    // Each A against the B of its own scale: means 1.75 - 2.05 and 1.65 - 2.25.
    assert!(close(diff_at("S"), -0.30, 1e-12), "{}", diff_at("S"));
    assert!(close(diff_at("L"), -0.60, 1e-12), "{}", diff_at("L"));
}
