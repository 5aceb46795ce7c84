//! `sweep bench FILE`: how fast each configuration of a sweep file trains on a device:
//! tokens/s, model FLOPs utilization, median step time and peak device memory. Every cell of
//! the grid is timed once (its first seed) with the file's train settings; nothing is
//! recorded in a results DB.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;

use crate::commands::run::parse_device;
use crate::data::Dataset;
use crate::error::{exit, InputError};
use crate::gpu;
use crate::spec::{Sweep, Trial};
use crate::train::{self, Phases};

/// Time training steps of each configuration of a sweep file.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The sweep file (RON): its model, train settings (batch, seq_len, precision) and grid.
    pub file: PathBuf,
    /// Where to train: cpu, or cuda / cuda:N in a build with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
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
    params: u64,
    step_s: f64,
    tokens_per_s: f64,
    mfu: Option<f64>,
    peak_bytes: Option<u64>,
    loss: (f64, f64),
    phases: Vec<(&'static str, f64)>,
}

pub fn exec(args: Args) -> anyhow::Result<u8> {
    if args.steps == 0 {
        return Err(InputError::new("--steps must be at least 1").into());
    }
    let sweep = Sweep::load(&args.file, &args.sets)?;
    let device = parse_device(&args.device)?;
    gpu::prepare(&device)?;
    let data = Dataset::load(&sweep.data, &sweep.source, sweep.train.seq_len)?;
    let name = gpu::describe(&device);
    let peak = args.peak_tflops.or_else(|| dense_bf16_peak(&name));
    let dims = sweep.dims();
    let spec = &sweep.train;
    let tokens = spec.batch * spec.seq_len;
    println!(
        "sweep bench {}: {name}; d_model {}, n_layers {}, vocab {}, batch {} x seq {} = {tokens} \
         tokens/step, {:?}; {} warm-up + {} timed steps{}",
        args.file.display(),
        dims.d_model,
        dims.n_layers,
        dims.vocab,
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
    let mut failed = 0;
    let cells = sweep.trials.iter().filter(|t| t.seed == sweep.seeds[0]);
    for trial in cells {
        let label = if trial.label.is_empty() {
            "-"
        } else {
            &trial.label
        };
        match time(&args, &sweep, trial, &data, &device, peak) {
            Ok(t) => {
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
                                1e3 * s / args.steps as f64,
                                100.0 * s / total
                            )
                        })
                        .collect();
                    println!("|   phases per step | {} |||||", parts.join(", "));
                }
            }
            Err(e) => {
                failed += 1;
                println!("| {label} | failed: {e:#} ||||||");
            }
        }
    }
    Ok(if failed > 0 { exit::FAILED } else { exit::OK })
}

/// Trains `trial` for warm-up and timed steps; each step ends with a synchronization, so the
/// median is the step's wall time on the device.
fn time(
    args: &Args,
    sweep: &Sweep,
    trial: &Trial,
    data: &Dataset,
    device: &Device,
    peak: Option<f64>,
) -> anyhow::Result<Timing> {
    let spec = &sweep.train;
    let dims = sweep.dims();
    let model = train::build(trial, &dims, spec.precision, device).context("building")?;
    let mut opt = trial.cell.optimizer.build(model.params())?;
    let mut rng = train::sampler(trial.seed);
    let (b, t) = (spec.batch, spec.seq_len);
    let mut step = |phases: Option<&mut Phases>| -> anyhow::Result<f64> {
        let (x, y) = train::batch(data, &mut rng, b, t, device)?;
        match train::step_on(&model, opt.as_mut(), &x, &y, spec.grad_clip, 1.0, phases)? {
            Ok((loss, _)) => Ok(loss),
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
    let mut phases = Phases::new(device);
    if args.phases {
        for _ in 0..args.steps {
            phases.start()?;
            step(Some(&mut phases))?;
        }
    }
    times.sort_by(f64::total_cmp);
    let step_s = times[times.len() / 2];
    let tokens_per_s = (b * t) as f64 / step_s;
    let params = model.param_count().total;
    // FLOPs per token as DESIGN.md counts them: 6 N for the weights' matmuls (forward and
    // backward) plus 12 L d T for the attention scores and their use.
    let flops = 6.0 * params as f64 + 12.0 * (dims.n_layers * dims.d_model * t) as f64;
    Ok(Timing {
        params,
        step_s,
        tokens_per_s,
        mfu: peak.map(|p| flops * tokens_per_s / (p * 1e12)),
        peak_bytes: gpu::peak_bytes(device),
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
