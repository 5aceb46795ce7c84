//! Data-parallel training: one trial on several devices (ranks), one thread per rank.
//!
//! Every rank holds the whole model, trains on its own slice of each global batch, and the
//! gradients are averaged over the ranks before the optimizer step, so that every rank takes
//! the same step and the weights stay identical. The exchange goes through a [`Group`]: NCCL
//! between GPUs (`nccl.rs`, under the `cuda` feature), shared memory between threads on the
//! CPU (`local.rs`; tests and CPU runs), or nothing for a single rank.
//!
//! A rank that fails ends the trial: the others are told (CPU) or given up on after a grace
//! period (GPU: a rank waiting in an NCCL collective for a peer that is gone never returns), and
//! a collective that waits longer than the timeout ends it too. [`run_ranks`] reports either
//! way; what stuck threads cannot return is handed to the caller's `abandon`.

mod local;
#[cfg(feature = "cuda")]
mod nccl;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor};
use registry::Param;

use crate::devices::device_of;
use crate::error::InputError;

pub use local::Hub;

/// How the ranks of one trial exchange tensors. Every rank calls the same collectives in
/// the same order; each returns the same value on every rank.
pub trait Group {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// The element-wise sum over the ranks of `t`, a vector of f32.
    fn sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Rank `root`'s `t` (any shape, f32) on every rank.
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;
}

/// A group as the optimizers see it (registry's `Ranks`): Muon shares its orthogonalizations
/// out over the ranks.
pub struct AsRanks<'a>(pub &'a dyn Group);

impl registry::Ranks for AsRanks<'_> {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world(&self) -> usize {
        self.0.world()
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        self.0.broadcast(t, root)
    }
}

/// A trial on one device: nothing to exchange.
pub struct Solo;

impl Group for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn broadcast(&self, t: &Tensor, _root: usize) -> Result<Tensor> {
        Ok(t.clone())
    }
}

/// Gradients travel in buckets of at most this many f32 values (32 MiB): one collective per
/// bucket instead of one per parameter (~150 for GPT-2 small, each with its own latency), and
/// a bounded extra buffer instead of a copy of every gradient at once.
pub const BUCKET_ELEMS: usize = 8 << 20;

/// Replaces the gradient of every parameter with `scale` times its sum over the ranks (the
/// mean over ranks and micro-batches when `scale` is 1 / (ranks x micro-batches)).
///
/// Parameters are packed into buckets in their order, which is the same on every rank. candle
/// computes every gradient in one `backward()` call and has no hook as each is ready, so the
/// exchange follows the backward pass instead of overlapping it; the buckets go out back to
/// back on the device's stream.
pub fn average_gradients(
    grads: &mut GradStore,
    params: &[Param],
    group: &dyn Group,
    scale: f64,
    bucket_elems: usize,
) -> Result<()> {
    if group.world() == 1 {
        if scale != 1.0 {
            crate::train::scale_grads(grads, params, scale)?;
        }
        return Ok(());
    }
    let with_grad: Vec<&Param> = params
        .iter()
        .filter(|p| grads.get(p.var.as_tensor()).is_some())
        .collect();
    let mut start = 0;
    while start < with_grad.len() {
        // At least one parameter per bucket, however large.
        let mut end = start + 1;
        let mut elems = with_grad[start].var.elem_count();
        while end < with_grad.len() && elems + with_grad[end].var.elem_count() <= bucket_elems {
            elems += with_grad[end].var.elem_count();
            end += 1;
        }
        let bucket = &with_grad[start..end];
        let flat: Vec<Tensor> = bucket
            .iter()
            .map(|p| {
                let g = grads.get(p.var.as_tensor()).expect("filtered");
                g.to_dtype(DType::F32)?.flatten_all()
            })
            .collect::<Result<_>>()?;
        let summed = (group.sum(&Tensor::cat(&flat, 0)?)? * scale)?;
        let mut offset = 0;
        for p in bucket {
            let n = p.var.elem_count();
            let g = summed
                .narrow(0, offset, n)?
                .reshape(p.var.shape())?
                .to_dtype(p.var.dtype())?;
            grads.insert(p.var.as_tensor(), g);
            offset += n;
        }
        start = end;
    }
    Ok(())
}

/// Makes every rank's weights rank 0's: the ranks build the same weights from the trial's
/// seed already, and this makes sure of it whatever a device does differently.
pub fn share_weights(params: &[Param], group: &dyn Group) -> Result<()> {
    if group.world() == 1 {
        return Ok(());
    }
    for p in params {
        let w = p.var.as_tensor().to_dtype(DType::F32)?;
        p.var
            .set(&group.broadcast(&w, 0)?.to_dtype(p.var.dtype())?)?;
    }
    Ok(())
}

/// How long a collective may wait for the other ranks before the trial is ended, from
/// SWEEP_COLLECTIVE_TIMEOUT_S (seconds; default 600: long enough for rank 0 to evaluate or
/// save a checkpoint of a large model while the others wait).
pub fn collective_timeout() -> std::result::Result<Duration, InputError> {
    match std::env::var("SWEEP_COLLECTIVE_TIMEOUT_S") {
        Err(_) => Ok(Duration::from_secs(600)),
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(s) if s > 0.0 && s.is_finite() => Ok(Duration::from_secs_f64(s)),
            _ => Err(InputError::new(format!(
                "SWEEP_COLLECTIVE_TIMEOUT_S={v}: expected a number of seconds > 0"
            ))),
        },
    }
}

/// The ranks of one trial are all GPUs or all the CPU (NCCL or shared memory between them);
/// `spec` is the `--device` value for the message.
pub fn one_kind(devices: &[String], spec: &str) -> std::result::Result<(), InputError> {
    let on_cpu = devices.iter().filter(|d| *d == "cpu").count();
    if on_cpu > 0 && on_cpu < devices.len() {
        return Err(InputError::new(format!(
            "--device {spec}: the ranks of one trial ({}) are all GPUs or all CPU",
            devices.join(",")
        )));
    }
    Ok(())
}

/// One rank of a trial, as its thread gets it; its number is `group.rank()`.
pub struct Rank {
    pub device: Device,
    pub group: Box<dyn Group>,
}

/// What connects the ranks of one trial, made before their threads start.
enum Fabric {
    Solo,
    Local(Arc<Hub>),
    #[cfg(feature = "cuda")]
    Nccl(nccl::Rendezvous),
}

impl Fabric {
    fn new(devices: &[String], timeout: Duration) -> anyhow::Result<Self> {
        if devices.len() == 1 {
            return Ok(Fabric::Solo);
        }
        one_kind(devices, &devices.join(","))?;
        if devices[0] == "cpu" {
            return Ok(Fabric::Local(Arc::new(Hub::new(devices.len(), timeout))));
        }
        #[cfg(feature = "cuda")]
        return Ok(Fabric::Nccl(nccl::Rendezvous::new(devices.len())?));
        #[cfg(not(feature = "cuda"))]
        unreachable!("device lists with GPUs are refused without the cuda feature")
    }

    /// The group of rank `rank` on `device`, in the rank's own thread.
    fn join(&self, rank: usize, #[allow(unused)] device: &Device) -> Result<Box<dyn Group>> {
        Ok(match self {
            Fabric::Solo => Box::new(Solo),
            Fabric::Local(hub) => Box::new(hub.member(rank)),
            #[cfg(feature = "cuda")]
            Fabric::Nccl(r) => Box::new(r.join(rank, device)?),
        })
    }

    /// Tells the ranks still running that one has failed, where the fabric can.
    fn abort(&self, reason: &str) {
        if let Fabric::Local(hub) = self {
            hub.fail(reason);
        }
    }
}

/// Marks the time of every collective a rank completes, so that a hang shows.
struct Watched {
    inner: Box<dyn Group>,
    beat: Arc<AtomicU64>,
    epoch: Instant,
}

impl Watched {
    fn beat(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.beat.fetch_max(ms, Ordering::Relaxed);
    }
}

impl Group for Watched {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world(&self) -> usize {
        self.inner.world()
    }
    fn sum(&self, t: &Tensor) -> Result<Tensor> {
        let s = self.inner.sum(t)?;
        self.beat();
        Ok(s)
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let b = self.inner.broadcast(t, root)?;
        self.beat();
        Ok(b)
    }
}

const RANK_STACK: usize = 64 << 20;

/// Runs `body` for every device of `devices` (one rank each, in a thread of its own) and
/// returns what each returned, by rank, or the first failure as `rank R (DEVICE): why`.
///
/// When a rank fails and the others do not end within a grace period, or no collective
/// completes on any rank for `timeout`, the threads still running cannot be stopped (an NCCL
/// kernel waits on the GPU for a peer that is gone): `abandon` is called with the reason and
/// must not return (the worker reports it and exits, which frees the GPUs).
pub fn run_ranks<T: Send>(
    devices: &[String],
    timeout: Duration,
    body: &(dyn Fn(Rank) -> anyhow::Result<T> + Sync),
    abandon: &dyn Fn(&str) -> std::convert::Infallible,
) -> anyhow::Result<std::result::Result<Vec<T>, String>> {
    let world = devices.len();
    let fabric = Fabric::new(devices, timeout)?;
    let epoch = Instant::now();
    let beat = Arc::new(AtomicU64::new(0));
    let grace = timeout.min(Duration::from_secs(10));
    let results: Mutex<Vec<Option<T>>> = Mutex::new((0..world).map(|_| None).collect());
    let (done, ended) = mpsc::channel::<(usize, std::result::Result<(), String>)>();
    let failure = std::thread::scope(|scope| {
        for (rank, name) in devices.iter().enumerate() {
            let (fabric, beat, results, done) = (&fabric, beat.clone(), &results, done.clone());
            std::thread::Builder::new()
                .name(format!("rank {rank}"))
                // Far more stack than a spawned thread's 2 MiB: candle's backward pass
                // walks the graph recursively, as deep as the model is.
                .stack_size(RANK_STACK)
                .spawn_scoped(scope, move || {
                    let run = || -> anyhow::Result<T> {
                        let device = device_of(name)?;
                        crate::gpu::prepare(&device)?;
                        let group = fabric.join(rank, &device)?;
                        let group = Box::new(Watched {
                            inner: group,
                            beat,
                            epoch,
                        });
                        body(Rank { device, group })
                    };
                    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run));
                    let out = match out {
                        Ok(Ok(v)) => {
                            results.lock().unwrap_or_else(|e| e.into_inner())[rank] = Some(v);
                            Ok(())
                        }
                        // The first line: candle appends its backtrace to the message
                        // when RUST_BACKTRACE is set.
                        Ok(Err(e)) => Err(format!(
                            "rank {rank} ({name}): {}",
                            format!("{e:#}").lines().next().unwrap_or_default()
                        )),
                        Err(p) => Err(format!("rank {rank} ({name}): panic: {}", panic_text(&p))),
                    };
                    // Reported before the others are told, so that the cause comes before
                    // the failures it causes among the reports.
                    let why = out.as_ref().err().cloned();
                    let _ = done.send((rank, out));
                    if let Some(why) = why {
                        fabric.abort(&why);
                    }
                })
                .expect("starting a rank thread");
        }
        drop(done);
        let mut first_failure: Option<(String, Instant)> = None;
        let mut running = world;
        while running > 0 {
            match ended.recv_timeout(Duration::from_millis(200)) {
                Ok((_, out)) => {
                    running -= 1;
                    if let Err(why) = out {
                        first_failure.get_or_insert((why, Instant::now()));
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if running == 0 {
                break;
            }
            if let Some((why, at)) = &first_failure {
                if at.elapsed() > grace {
                    match abandon(&format!(
                        "{why} (the {running} rank(s) that did not end with it were stopped)"
                    )) {}
                }
            } else if world > 1 {
                let last = Duration::from_millis(beat.load(Ordering::Relaxed));
                let quiet = epoch.elapsed().saturating_sub(last);
                // A backstop for ranks that cannot time out themselves (in an NCCL kernel);
                // later than theirs, so that a rank that can says where it waited.
                if quiet > timeout + grace {
                    match abandon(&format!(
                        "no collective completed on any of the {world} ranks for {:.0} s \
                         (SWEEP_COLLECTIVE_TIMEOUT_S): a rank hung",
                        quiet.as_secs_f64()
                    )) {}
                }
            }
        }
        first_failure.map(|(why, _)| why)
    });
    Ok(match failure {
        Some(why) => Err(why),
        None => Ok(results
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .into_iter()
            .map(|r| r.expect("every rank returned"))
            .collect()),
    })
}

pub fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Failures on purpose, for the tests of what a failing rank does to its trial:
/// SWEEP_INJECT_FAULT=RANK:STEP:KIND makes rank RANK, at step STEP, return an error
/// (`error`), panic (`panic`), hang (`hang`) or see a NaN loss (`nan`).
pub fn injected_fault(rank: usize, step: usize) -> Option<&'static str> {
    static FAULT: std::sync::OnceLock<Option<(usize, usize, String)>> = std::sync::OnceLock::new();
    let fault = FAULT.get_or_init(|| {
        let v = std::env::var("SWEEP_INJECT_FAULT").ok()?;
        let mut it = v.split(':');
        let r = it.next()?.parse().ok()?;
        let s = it.next()?.parse().ok()?;
        Some((r, s, it.next()?.to_string()))
    });
    match fault {
        Some((r, s, kind)) if *r == rank && *s == step => Some(kind.as_str()),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
