//! `sweep bench FILE`: how fast each configuration of a sweep file trains on a device:
//! tokens/s, model FLOPs utilization, median step time and peak device memory. Every cell of
//! the grid is timed once (its first seed) with the file's train settings; nothing is
//! recorded in a results DB. With `--gpus-per-trial N` each configuration trains
//! data-parallel on the N devices of `--device`, and tokens/s counts all of them. With
//! `--attention` it times the attention kernels alone instead (attention.rs).

mod attention;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;

use crate::data::Dataset;
use crate::devices::parse_devices;
use crate::error::{exit, InputError};
use crate::gpu;
use crate::parallel::{self, Rank};
use crate::spec::{Sweep, TrainSpec, Trial};
use crate::train::{self, Phases, Step};

/// Time training steps of each configuration of a sweep file.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The sweep file (RON): its model, train settings (batch, seq_len, precision) and grid.
    #[arg(required_unless_present = "attention")]
    pub file: Option<PathBuf>,
    /// Time the causal attention kernels alone at B,H,KV,T,HD (bf16, on a GPU): flash
    /// attention and the cuBLAS op it replaces, forward and backward, in TFLOP/s.
    #[arg(long, value_name = "B,H,KV,T,HD", conflicts_with = "file")]
    pub attention: Option<String>,
    /// Where to train: cpu, or cuda / cuda:N in a build with the `cuda` feature; a list
    /// (cuda:0,1) with --gpus-per-trial.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Train data-parallel on N devices (sets train.gpus_per_trial; --device lists N).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub gpus_per_trial: Option<u16>,
    /// Steps timed per configuration.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Steps run before timing (kernel loading, the allocator's pool filling up).
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Override a field of the sweep file, as `sweep run --set`. Repeatable.
    #[arg(long = "set", value_name = "PATH=RON")]
    pub sets: Vec<String>,
    /// Also time forward, loss, backward, gradient norm and optimizer apart, synchronizing
    /// the device between them (a few steps more, timed separately).
    #[arg(long)]
    pub phases: bool,
    /// The device's dense bf16 peak in TFLOP/s, for MFU [default: 989 on H100 and H200].
    #[arg(long, value_name = "TFLOPS")]
    pub peak_tflops: Option<f64>,
    /// Find each configuration's largest batch (at the file's seq_len) whose training steps
    /// fit in the device's memory, instead of timing the file's batch: batches double from
    /// 1 until one runs out of memory, then the gap is bisected; each try is one warm-up and
    /// one timed step. One device.
    #[arg(long, conflicts_with_all = ["phases", "gpus_per_trial"])]
    pub largest_batch: bool,
    /// Train as if the device had only GIB free: the rest of its free memory is held for the
    /// bench's duration (an 80 GB card has about 79 GiB free). One device.
    #[arg(long, value_name = "GIB")]
    pub memory_gib: Option<f64>,
}

/// How many steps a configuration trains for, and whether its phases are timed.
#[derive(Clone, Copy)]
struct Counts {
    warmup: usize,
    steps: usize,
    phases: bool,
}

/// One configuration's measurements.
struct Timing {
    /// Rank 0's device, as the trial record names it.
    device: String,
    params: u64,
    step_s: f64,
    tokens_per_s: f64,
    mfu: Option<f64>,
    peak_bytes: Option<u64>,
    loss: (f64, f64),
    phases: Vec<(&'static str, f64)>,
}

pub fn exec(mut args: Args) -> anyhow::Result<u8> {
    if args.steps == 0 {
        return Err(InputError::new("--steps must be at least 1").into());
    }
    let Some(file) = args.file.clone() else {
        let shape = args
            .attention
            .as_deref()
            .expect("clap asks for a file or --attention");
        return attention::exec(shape, &args.device, args.steps, args.warmup);
    };
    if let Some(n) = args.gpus_per_trial {
        args.sets.push(format!("train.gpus_per_trial={n}"));
    }
    let sweep = Sweep::load(&file, &args.sets)?;
    let devices = parse_devices(&args.device)?;
    let spec = &sweep.train;
    if devices.len() != spec.gpus_per_trial {
        return Err(InputError::new(format!(
            "--device {}: lists {} device(s) for train.gpus_per_trial = {}; list one per rank \
             (e.g. --device cuda:0,1 --gpus-per-trial 2)",
            args.device,
            devices.len(),
            spec.gpus_per_trial
        ))
        .into());
    }
    let one_device = |flag: &str| -> Result<(), InputError> {
        match devices.len() {
            1 => Ok(()),
            n => Err(InputError::new(format!(
                "{flag} measures one device; --device {} lists {n}",
                args.device
            ))),
        }
    };
    // One device for the whole bench where it measures one (each new device object loads
    // the kernels again).
    let single = match args.memory_gib.is_some() || args.largest_batch {
        true => {
            let flag = match args.largest_batch {
                true => "--largest-batch",
                false => "--memory-gib",
            };
            one_device(flag)?;
            if !devices[0].starts_with("cuda") {
                // A CPU does not report running out of memory: the process is killed.
                return Err(InputError::new(format!(
                    "{flag} measures a GPU's memory: give --device cuda (or cuda:N), not {}",
                    devices[0]
                ))
                .into());
            }
            let device = crate::devices::device_of(&devices[0])?;
            gpu::prepare(&device)?;
            Some(device)
        }
        false => None,
    };
    let _held = match (args.memory_gib, &single) {
        (Some(gib), Some(device)) => {
            if !(gib.is_finite() && gib > 0.0) {
                return Err(InputError::new(format!(
                    "--memory-gib {gib}: give the memory to leave free in GiB, e.g. 79"
                ))
                .into());
            }
            let hold = gpu::hold_all_but(device, (gib * (1u64 << 30) as f64) as u64)
                .with_context(|| format!("--memory-gib {gib}"))?;
            eprintln!(
                "holding {:.1} GiB of {}: {gib} GiB stay free",
                hold.bytes() as f64 / (1u64 << 30) as f64,
                devices[0]
            );
            Some(hold)
        }
        _ => None,
    };
    let data = Dataset::load(&sweep.data, &sweep.source, sweep.train.seq_len)?;
    if let (true, Some(device)) = (args.largest_batch, &single) {
        return largest_batches(&args, &sweep, &data, device);
    }
    let timeout = parallel::collective_timeout()?;
    let tokens = spec.global_batch() * spec.seq_len;
    let mut header_shown = false;
    let mut failed = 0;
    let cells = sweep.trials.iter().filter(|t| t.seed == sweep.seeds[0]);
    for trial in cells {
        let label = if trial.label.is_empty() {
            "-"
        } else {
            &trial.label
        };
        let counts = Counts {
            warmup: args.warmup,
            steps: args.steps,
            phases: args.phases,
        };
        let body = |rank: Rank| time(counts, spec, trial, &data, rank);
        let abandon = |why: &str| -> std::convert::Infallible {
            println!("| {label} | failed: {why} ||||||");
            std::process::exit(i32::from(exit::FAILED))
        };
        let timed = match parallel::run_ranks(&devices, timeout, &body, &abandon) {
            Ok(Ok(mut by_rank)) => Ok(by_rank.swap_remove(0)),
            Ok(Err(why)) => Err(anyhow::anyhow!(why)),
            Err(e) => Err(e),
        };
        let name = match (&timed, devices.len()) {
            (Ok(t), 1) => t.device.clone(),
            (Ok(t), n) => format!("{} ({n} ranks: {})", t.device, devices.join(",")),
            (Err(_), _) => devices.join(","),
        };
        let peak = args.peak_tflops.or_else(|| dense_bf16_peak(&name));
        if !header_shown {
            print_header(&args, &sweep, &name, tokens, peak);
            header_shown = true;
        }
        match timed {
            Ok(mut t) => {
                let flops = flops_per_token(t.params, &trial.dims, spec.seq_len);
                t.mfu = peak.map(|p| flops * t.tokens_per_s / (p * 1e12 * devices.len() as f64));
                print_row(label, &t, args.steps);
            }
            Err(e) => {
                failed += 1;
                println!("| {label} | failed: {e:#} ||||||");
            }
        }
    }
    Ok(if failed > 0 { exit::FAILED } else { exit::OK })
}

/// The table's title line and head.
fn print_header(args: &Args, sweep: &Sweep, name: &str, tokens: usize, peak: Option<f64>) {
    let spec = &sweep.train;
    let shape = match &sweep.shapes[..] {
        [m] if m.d_model == 0 => format!("d_model matched per cell, n_layers {}", m.n_layers),
        [m] => format!("d_model {}, n_layers {}", m.d_model, m.n_layers),
        many => {
            let all: Vec<String> = many
                .iter()
                .map(|m| format!("{} x {}", m.d_model, m.n_layers))
                .collect();
            format!("d_model x n_layers {}", all.join(", "))
        }
    };
    let ranks = match spec.gpus_per_trial {
        1 => String::new(),
        n => format!(" x {n} ranks"),
    };
    let accum = match spec.grad_accum {
        1 => String::new(),
        k => format!(" x {k} micro-batches"),
    };
    println!(
        "sweep bench {}: {name}; {shape}, vocab {}, batch {}{accum}{ranks} x seq \
         {} = {tokens} tokens/step, {:?}; {} warm-up + {} timed steps{}",
        args.file
            .as_deref()
            .map(|f| f.display().to_string())
            .unwrap_or_default(),
        sweep.vocab(),
        spec.batch,
        spec.seq_len,
        spec.precision,
        args.warmup,
        args.steps,
        match peak {
            Some(p) => format!("; MFU against {p} TFLOP/s"),
            None => "; no MFU (unknown peak: --peak-tflops)".into(),
        },
    );
    println!();
    println!(
        "| configuration | params | tokens/s | MFU | step (median) | peak memory | loss first -> last |"
    );
    println!("|---|---|---|---|---|---|---|");
}

/// One configuration's row (and its phases).
fn print_row(label: &str, t: &Timing, steps: usize) {
    println!(
        "| {label} | {:.1}M | {:.0} | {} | {:.1} ms | {} | {:.3} -> {:.3} |",
        t.params as f64 / 1e6,
        t.tokens_per_s,
        t.mfu.map_or("-".into(), |m| format!("{:.1}%", 100.0 * m)),
        1e3 * t.step_s,
        t.peak_bytes.map_or("-".into(), |b| format!(
            "{:.1} GiB",
            b as f64 / (1u64 << 30) as f64
        )),
        t.loss.0,
        t.loss.1,
    );
    if !t.phases.is_empty() {
        let total: f64 = t.phases.iter().map(|(_, s)| s).sum();
        let parts: Vec<String> = t
            .phases
            .iter()
            .map(|(n, s)| {
                format!(
                    "{n} {:.1} ms ({:.0}%)",
                    1e3 * s / steps as f64,
                    100.0 * s / total
                )
            })
            .collect();
        println!("|   phases per step | {} |||||", parts.join(", "));
    }
}

/// FLOPs per token as DESIGN.md counts them: 6 N for the weights' matmuls (forward and
/// backward) plus 12 L d T for the attention scores and their use.
fn flops_per_token(params: u64, dims: &registry::Dims, seq_len: usize) -> f64 {
    6.0 * params as f64 + 12.0 * (dims.n_layers * dims.d_model * seq_len) as f64
}

/// Trains `trial` on one rank for warm-up and timed steps; each step ends with a
/// synchronization, so the median is the step's wall time on the device (every rank takes
/// part in every step; rank 0's times and memory are reported). MFU is left to the caller.
fn time(
    counts: Counts,
    spec: &TrainSpec,
    trial: &Trial,
    data: &Dataset,
    rank: Rank,
) -> anyhow::Result<Timing> {
    let (device, group) = (&rank.device, rank.group.as_ref());
    let dims = trial.dims.clone();
    // The device's memory pool outlives a configuration: its peak starts again with each.
    gpu::reset_peak(device)?;
    let model = train::build_for_training(trial, &dims, spec, device).context("building")?;
    parallel::share_weights(model.params(), group)?;
    let mut opt = trial
        .cell
        .optimizer
        .build(model.params(), spec.precision.dtype())?;
    let mut rng = train::sampler(trial.seed);
    let mut graph = train::Captured::new(spec);
    let mut step = |phases: Option<&mut Phases>| -> anyhow::Result<f64> {
        let micro = train::micro_batches(data, &mut rng, spec, group, device)?;
        if let Some(failed) = graph.prepare(&model, &micro) {
            eprintln!("{failed}");
        }
        let this = Step {
            micro: &micro,
            clip: spec.grad_clip,
            factor: 1.0,
            stop: &|| false,
            replay: graph.replay(),
        };
        match train::step_on(&model, opt.as_mut(), group, this, phases)? {
            Ok(done) => Ok(done.loss),
            Err(what) => anyhow::bail!("diverged: {what}"),
        }
    };
    for _ in 0..counts.warmup {
        step(None)?;
    }
    device.synchronize()?;
    // A captured step's warm-up pass ran eagerly beside the memory its graph then reserved;
    // the peak reported is the timed steps'.
    if spec.graph == crate::spec::Graph::Step && counts.warmup > 0 {
        gpu::reset_peak(device)?;
    }
    let mut times = Vec::with_capacity(counts.steps);
    let mut losses = Vec::with_capacity(counts.steps);
    for _ in 0..counts.steps {
        let started = Instant::now();
        losses.push(step(None)?);
        device.synchronize()?;
        times.push(started.elapsed().as_secs_f64());
    }
    let peak_bytes = gpu::peak_bytes(device);
    let mut phases = Phases::new(device);
    if counts.phases {
        for _ in 0..counts.steps {
            phases.start()?;
            step(Some(&mut phases))?;
        }
    }
    times.sort_by(f64::total_cmp);
    let step_s = times[times.len() / 2];
    Ok(Timing {
        device: gpu::describe(device),
        params: model.param_count().total,
        step_s,
        tokens_per_s: (spec.global_batch() * spec.seq_len) as f64 / step_s,
        mfu: None,
        peak_bytes,
        loss: (losses[0], *losses.last().expect("at least one step")),
        phases: phases.spent,
    })
}

/// `--largest-batch`: for each configuration, the largest batch that trains on `device`
/// without running out of memory, with its step time and peak memory.
fn largest_batches(
    args: &Args,
    sweep: &Sweep,
    data: &Dataset,
    device: &candle_core::Device,
) -> anyhow::Result<u8> {
    let seq = sweep.train.seq_len;
    println!(
        "sweep bench {} --largest-batch: {}, seq {seq}{}",
        args.file
            .as_deref()
            .map(|f| f.display().to_string())
            .unwrap_or_default(),
        gpu::describe(device),
        args.memory_gib
            .map_or(String::new(), |g| format!(", {g} GiB free")),
    );
    println!();
    println!("| configuration | largest batch | tokens/step | step | peak memory | first batch that did not fit |");
    println!("|---|---|---|---|---|---|");
    let mut failed = 0;
    for trial in sweep.trials.iter().filter(|t| t.seed == sweep.seeds[0]) {
        let label = if trial.label.is_empty() {
            "-"
        } else {
            &trial.label
        };
        let mut best: Option<(usize, Timing)> = None;
        let fits = |batch: usize| -> anyhow::Result<bool> {
            let spec = TrainSpec {
                batch,
                ..sweep.train.clone()
            };
            let counts = Counts {
                warmup: 1,
                steps: 1,
                phases: false,
            };
            let rank = Rank {
                device: device.clone(),
                group: Box::new(parallel::Solo),
            };
            match time(counts, &spec, trial, data, rank) {
                Ok(t) => {
                    if best.as_ref().is_none_or(|(b, _)| batch > *b) {
                        best = Some((batch, t));
                    }
                    Ok(true)
                }
                Err(e) if out_of_memory(&e) => Ok(false),
                Err(e) => Err(e),
            }
        };
        match largest_fitting(sweep.train.batch, fits) {
            Ok((_, first_failing)) => match best {
                Some((b, t)) => println!(
                    "| {label} | {b} | {} | {:.1} ms | {} | {} |",
                    b * seq,
                    1e3 * t.step_s,
                    t.peak_bytes.map_or("-".into(), |p| format!(
                        "{:.1} GiB",
                        p as f64 / (1u64 << 30) as f64
                    )),
                    first_failing.map_or("none up to the limit".into(), |f| f.to_string()),
                ),
                None => println!("| {label} | none: batch 1 does not fit |||||"),
            },
            Err(e) => {
                failed += 1;
                println!("| {label} | failed: {e:#} |||||");
            }
        }
    }
    Ok(if failed > 0 { exit::FAILED } else { exit::OK })
}

/// The largest batch [`largest_fitting`] tries.
const LARGEST_BATCH: usize = 1 << 16;

/// The largest batch for which `fits` holds, assuming that it holds up to some batch and not
/// beyond, to within an eighth: from `start`, doubling while it fits (up to
/// [`LARGEST_BATCH`]) or halving until it does, then bisecting between the last batch that
/// fit and the first that did not until they are within an eighth of the former (each try is
/// a model built and trained). Returns (the largest seen to fit, if any; the smallest seen
/// not to fit, if any).
fn largest_fitting(
    start: usize,
    mut fits: impl FnMut(usize) -> anyhow::Result<bool>,
) -> anyhow::Result<(Option<usize>, Option<usize>)> {
    let (mut good, mut bad) = (None::<usize>, None::<usize>);
    let mut b = start.clamp(1, LARGEST_BATCH);
    if fits(b)? {
        good = Some(b);
        while b < LARGEST_BATCH {
            b = (2 * b).min(LARGEST_BATCH);
            if !fits(b)? {
                bad = Some(b);
                break;
            }
            good = Some(b);
        }
    } else {
        bad = Some(b);
        while b > 1 {
            b /= 2;
            if fits(b)? {
                good = Some(b);
                break;
            }
            bad = Some(b);
        }
    }
    if let (Some(mut lo), Some(mut hi)) = (good, bad) {
        while hi - lo > (lo / 8).max(1) {
            let mid = lo + (hi - lo) / 2;
            match fits(mid)? {
                true => lo = mid,
                false => hi = mid,
            }
        }
        (good, bad) = (Some(lo), Some(hi));
    }
    Ok((good, bad))
}

/// Whether a training error is the device running out of memory (CUDA's
/// CUDA_ERROR_OUT_OF_MEMORY, as candle and cudarc word it, or cuBLAS failing to allocate its
/// workspace).
fn out_of_memory(e: &anyhow::Error) -> bool {
    let text = format!("{e:#}").to_lowercase();
    ["out_of_memory", "out of memory", "alloc_failed"]
        .iter()
        .any(|what| text.contains(what))
}

/// The dense bf16 tensor-core peak of GPUs whose name says what they are, in TFLOP/s.
fn dense_bf16_peak(name: &str) -> Option<f64> {
    [("H100", 989.0), ("H200", 989.0), ("A100", 312.0)]
        .into_iter()
        .find(|(gpu, _)| name.contains(gpu))
        .map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_batch_is_found_by_doubling_then_bisecting() -> anyhow::Result<()> {
        // Batches up to 37 fit. From 1: 1 to 32 fit, 64 does not, then 48 and 40 do not and
        // 36 does, within an eighth of 40. From 8 the same doubling. From 100: halving to 50
        // (no) and 25 (yes), then 37 fits and 43 and 40 do not: 40 is within an eighth of 37.
        for (start, want, trials) in [
            (
                1,
                (Some(36), Some(40)),
                vec![1, 2, 4, 8, 16, 32, 64, 48, 40, 36],
            ),
            (8, (Some(36), Some(40)), vec![8, 16, 32, 64, 48, 40, 36]),
            (100, (Some(37), Some(40)), vec![100, 50, 25, 37, 43, 40]),
        ] {
            let mut tried = Vec::new();
            let found = largest_fitting(start, |b| {
                tried.push(b);
                Ok(b <= 37)
            })?;
            assert_eq!(found, want, "from {start}");
            assert_eq!(tried, trials, "from {start}");
        }
        // Nothing fits; everything fits up to the limit.
        assert_eq!(largest_fitting(4, |_| Ok(false))?, (None, Some(1)));
        assert_eq!(
            largest_fitting(4, |_| Ok(true))?,
            (Some(LARGEST_BATCH), None)
        );
        // Another error is not a batch that does not fit: it ends the search.
        assert!(largest_fitting(1, |b| match b {
            4 => anyhow::bail!("a broken kernel"),
            _ => Ok(true),
        })
        .is_err());
        Ok(())
    }

    #[test]
    fn out_of_memory_is_told_apart_from_other_errors() {
        let oom = anyhow::anyhow!("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")");
        assert!(out_of_memory(&oom.context("building")));
        assert!(!out_of_memory(&anyhow::anyhow!("shape mismatch in matmul")));
    }

    #[test]
    fn known_gpus_have_their_datasheet_peak() {
        assert_eq!(dense_bf16_peak("cuda:0 NVIDIA H100 80GB HBM3"), Some(989.0));
        assert_eq!(dense_bf16_peak("cuda:1 NVIDIA H200"), Some(989.0));
        assert_eq!(dense_bf16_peak("cpu"), None);
    }
}
