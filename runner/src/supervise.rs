//! Worker supervision: each trial trains in a `sweep worker` process of its own, started
//! here, its progress lines turned into the bars, its death (a failed allocation, the
//! out-of-memory killer, a crash) into the trial's cause; and Ctrl-C, which reaches the
//! workers so that they finish their step and give their trials back.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use anyhow::Context;

use crate::progress::Progress;
use crate::spec::Trial;

/// Set by Ctrl-C: the current step finishes, its writes complete, the trial goes back to
/// the queue (its checkpoint kept) and the run exits 130.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The exit status after Ctrl-C (128 + SIGINT), as shells report it.
pub const INTERRUPTED_EXIT: u8 = 130;

/// The running workers' pids, for forwarding Ctrl-C to them.
static WORKERS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn workers() -> std::sync::MutexGuard<'static, Vec<u32>> {
    // A panic while holding the list cannot leave it inconsistent: recover it.
    WORKERS.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn on_ctrl_c() {
    // A second Ctrl-C does not wait for the step: SQLite's transactions keep the DB whole,
    // and the worker dies with this process; the next run resumes its trial.
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        std::process::exit(i32::from(INTERRUPTED_EXIT));
    }
    eprintln!("\ninterrupted: finishing the current step (Ctrl-C again to stop at once)");
    forward_interrupt();
}

/// A signal sent to `sweep run` alone (`kill -INT`, a scheduler) reaches its worker too.
pub fn forward_interrupt() {
    #[cfg(unix)]
    for &pid in workers().iter() {
        use nix::sys::signal::{kill, Signal};
        let _ = kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGINT);
    }
}

/// How a worker ended.
pub enum Ended {
    /// It recorded the trial's outcome; the summary line it sent.
    Finished(String),
    /// Stopped by Ctrl-C or SIGTERM, its trial given back.
    Interrupted,
    /// Killed or crashed before recording an outcome: why, for the trial's error.
    Died(String),
}

/// This process's binary, to start workers with. On Linux `/proc/self/exe`, which stays
/// this very binary even when the file was rebuilt or removed since the sweep started (a
/// path would then name the new binary, or nothing).
fn own_binary() -> anyhow::Result<std::path::PathBuf> {
    let proc = std::path::Path::new("/proc/self/exe");
    if cfg!(target_os = "linux") && proc.exists() {
        return Ok(proc.to_path_buf());
    }
    std::env::current_exe().context("locating the sweep binary for its worker")
}

/// What every worker of a sweep is started with: the sweep file, its `--set` overrides and
/// the results DB.
pub struct Job<'a> {
    pub file: &'a Path,
    pub sets: &'a [String],
    pub db: &'a Path,
}

/// Runs one claimed trial on `device` in a `sweep worker` process, turning its progress lines
/// into the bar of `slot` and its death into a cause.
pub fn supervise(
    job: &Job,
    trial: &Trial,
    device: &str,
    progress: &Progress,
    slot: usize,
) -> anyhow::Result<Ended> {
    let mut cmd = Command::new(own_binary()?);
    cmd.arg("worker")
        .arg(job.file)
        .arg("--db")
        .arg(job.db)
        .args(["--device", device, "--trial", &trial.id])
        .args(["--parent", &std::process::id().to_string()]);
    for set in job.sets {
        cmd.args(["--set", set]);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting a worker process")?;
    let pid = child.id();
    workers().push(pid);
    if INTERRUPTED.load(Ordering::SeqCst) {
        forward_interrupt();
    }
    // The worker's stderr is shown as it comes and its last messages kept for a crash report.
    // A backtrace (RUST_BACKTRACE) is shown but not kept: dozens of lines long, it would push
    // out the message it follows ("memory allocation of N bytes failed").
    let stderr = child.stderr.take().expect("piped");
    let tail = std::thread::spawn(move || {
        let mut tail: Vec<String> = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            if is_message(&line) {
                tail.push(line);
                if tail.len() > 3 {
                    tail.remove(0);
                }
            }
        }
        tail
    });
    let mut summary = String::new();
    let mut failure = None;
    let mut last_bpb = None;
    for line in BufReader::new(child.stdout.take().expect("piped"))
        .lines()
        .map_while(Result::ok)
    {
        let (kind, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        let nums: Vec<f64> = rest.split(' ').filter_map(|x| x.parse().ok()).collect();
        match (kind, nums.as_slice()) {
            ("step", [step, loss]) => progress.step(slot, *step as usize, *loss, last_bpb),
            ("eval", [step, loss, bpb]) => {
                last_bpb = Some(*bpb);
                progress.note(format!("step {step}: val/loss {loss:.4} val/bpb {bpb:.4}"));
            }
            ("line", _) => progress.println(rest.to_string()),
            ("result", _) => summary = rest.to_string(),
            ("fail", _) => failure = Some(rest.to_string()),
            _ => progress.println(line.clone()),
        }
    }
    let status = child.wait().context("waiting for the worker")?;
    workers().retain(|&p| p != pid);
    let tail = tail.join().unwrap_or_default();
    Ok(match status.code() {
        Some(0) => Ended::Finished(summary),
        Some(c) if c == i32::from(INTERRUPTED_EXIT) => Ended::Interrupted,
        _ if INTERRUPTED.load(Ordering::SeqCst) => Ended::Interrupted,
        _ if failure.is_some() => Ended::Died(failure.expect("matched")),
        code => Ended::Died(death(code, &status, &tail)),
    })
}

/// Why a worker died, from its exit status and the last messages it wrote (at most 3).
fn death(code: Option<i32>, status: &std::process::ExitStatus, tail: &[String]) -> String {
    let how = match code {
        Some(c) => format!("exited with status {c}"),
        None => {
            #[cfg(unix)]
            {
                use std::os::unix::process::ExitStatusExt;
                match status.signal() {
                    Some(6) => "was aborted (SIGABRT; a failed memory allocation aborts so)".into(),
                    Some(9) => {
                        "was killed (SIGKILL; the kernel's out-of-memory killer sends it)".into()
                    }
                    Some(11) => "crashed (SIGSEGV)".into(),
                    Some(s) => format!("was killed by signal {s}"),
                    None => "ended without a status".into(),
                }
            }
            #[cfg(not(unix))]
            {
                let _ = status;
                "ended without a status".to_string()
            }
        }
    };
    if tail.is_empty() {
        format!("the worker process training this trial {how}")
    } else {
        format!(
            "the worker process training this trial {how}: {}",
            tail.join(" | ")
        )
    }
}

/// Whether a line of a worker's stderr is a message rather than part of a backtrace (frames
/// and their locations are indented) or its notes.
fn is_message(line: &str) -> bool {
    !(line.is_empty()
        || line.starts_with(char::is_whitespace)
        || line.starts_with("stack backtrace")
        || line.starts_with("note: "))
}
