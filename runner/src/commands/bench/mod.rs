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
use crate::spec::{Sweep, Trial};
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
    let timeout = parallel::collective_timeout()?;
    let data = Dataset::load(&sweep.data, &sweep.source, sweep.train.seq_len)?;
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
        let body = |rank: Rank| time(&args, &sweep, trial, &data, rank);
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
    args: &Args,
    sweep: &Sweep,
    trial: &Trial,
    data: &Dataset,
    rank: Rank,
) -> anyhow::Result<Timing> {
    let (spec, device, group) = (&sweep.train, &rank.device, rank.group.as_ref());
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
    let mut step = |phases: Option<&mut Phases>| -> anyhow::Result<f64> {
        let micro = train::micro_batches(data, &mut rng, spec, group, device)?;
        let this = Step {
            micro: &micro,
            clip: spec.grad_clip,
            factor: 1.0,
            stop: &|| false,
        };
        match train::step_on(&model, opt.as_mut(), group, this, phases)? {
            Ok(done) => Ok(done.loss),
            Err(what) => anyhow::bail!("diverged: {what}"),
        }
    };
    for _ in 0..args.warmup {
        step(None)?;
    }
    device.synchronize()?;
    let mut times = Vec::with_capacity(args.steps);
    let mut losses = Vec::with_capacity(args.steps);
    for _ in 0..args.steps {
        let started = Instant::now();
        losses.push(step(None)?);
        device.synchronize()?;
        times.push(started.elapsed().as_secs_f64());
    }
    let peak_bytes = gpu::peak_bytes(device);
    let mut phases = Phases::new(device);
    if args.phases {
        for _ in 0..args.steps {
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
    fn known_gpus_have_their_datasheet_peak() {
        assert_eq!(dense_bf16_peak("cuda:0 NVIDIA H100 80GB HBM3"), Some(989.0));
        assert_eq!(dense_bf16_peak("cuda:1 NVIDIA H200"), Some(989.0));
        assert_eq!(dense_bf16_peak("cpu"), None);
    }
}
