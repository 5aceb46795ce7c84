//! The ranks of a trial as threads of one process on the CPU: each collective is a meeting
//! point where the last rank to arrive combines everyone's values, in rank order, so that
//! every rank reads the same bits.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::{bail, DType, Result, Tensor};

use super::Group;

/// Where the ranks of one trial meet.
pub struct Hub {
    world: usize,
    timeout: Duration,
    state: Mutex<Round>,
    changed: Condvar,
}

/// One collective in progress: what each rank brought, then the combined value until every
/// rank has read it.
struct Round {
    arrived: Vec<Option<Vec<f32>>>,
    result: Option<Arc<Vec<f32>>>,
    read: usize,
    failed: Option<String>,
}

impl Hub {
    pub fn new(world: usize, timeout: Duration) -> Self {
        Self {
            world,
            timeout,
            state: Mutex::new(Round {
                arrived: vec![None; world],
                result: None,
                read: 0,
                failed: None,
            }),
            changed: Condvar::new(),
        }
    }

    pub fn member(self: &Arc<Self>, rank: usize) -> Local {
        Local {
            hub: self.clone(),
            rank,
        }
    }

    /// Ends every collective in progress or to come with `reason`.
    pub fn fail(&self, reason: &str) {
        let mut s = self.lock();
        s.failed.get_or_insert_with(|| reason.to_string());
        self.changed.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, Round> {
        // A rank that panicked holding the lock left a consistent round (no step of it
        // panics halfway); the others go on and fail through `failed`.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits while `blocked` holds, failing when a rank failed or the timeout passes.
    fn wait_while<'a>(
        &self,
        mut s: MutexGuard<'a, Round>,
        rank: usize,
        deadline: Instant,
        blocked: impl Fn(&Round) -> bool,
    ) -> Result<MutexGuard<'a, Round>> {
        loop {
            if let Some(why) = &s.failed {
                bail!("stopped: {why}");
            }
            if !blocked(&s) {
                return Ok(s);
            }
            let now = Instant::now();
            if now >= deadline {
                let why = format!(
                    "rank {rank} waited {:.0} s at a collective for the other ranks \
                     (SWEEP_COLLECTIVE_TIMEOUT_S)",
                    self.timeout.as_secs_f64()
                );
                s.failed = Some(why.clone());
                self.changed.notify_all();
                bail!("{why}");
            }
            s = self
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Brings `value` to the meeting and returns `combine` of every rank's, in rank order.
    fn exchange(
        &self,
        rank: usize,
        value: Vec<f32>,
        combine: impl FnOnce(&[Vec<f32>]) -> Vec<f32>,
    ) -> Result<Vec<f32>> {
        let deadline = Instant::now() + self.timeout;
        // The previous round must be read by every rank before this one fills.
        let mut s = self.wait_while(self.lock(), rank, deadline, |s| s.result.is_some())?;
        s.arrived[rank] = Some(value);
        if s.arrived.iter().all(Option::is_some) {
            let values: Vec<Vec<f32>> = s.arrived.iter_mut().map(|v| v.take().unwrap()).collect();
            if values.iter().any(|v| v.len() != values[0].len()) {
                let why = "ranks brought tensors of different sizes to a collective".to_string();
                s.failed = Some(why.clone());
                self.changed.notify_all();
                bail!("{why}");
            }
            s.result = Some(Arc::new(combine(&values)));
            s.read = 0;
            self.changed.notify_all();
        }
        let mut s = self.wait_while(s, rank, deadline, |s| s.result.is_none())?;
        let out = s.result.as_ref().expect("waited for it").as_ref().clone();
        s.read += 1;
        if s.read == self.world {
            s.result = None;
            self.changed.notify_all();
        }
        Ok(out)
    }
}

/// One rank's membership of a [`Hub`].
pub struct Local {
    pub(super) hub: Arc<Hub>,
    rank: usize,
}

impl Local {
    fn exchange(
        &self,
        t: &Tensor,
        combine: impl FnOnce(&[Vec<f32>]) -> Vec<f32>,
    ) -> Result<Tensor> {
        let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let out = self.hub.exchange(self.rank, values, combine)?;
        Tensor::from_vec(out, t.shape(), t.device())
    }
}

impl Group for Local {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.hub.world
    }

    fn sum(&self, t: &Tensor) -> Result<Tensor> {
        self.exchange(t, |values| {
            let mut total = values[0].clone();
            for v in &values[1..] {
                total.iter_mut().zip(v).for_each(|(a, b)| *a += b);
            }
            total
        })
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        self.exchange(t, |values| values[root].clone())
    }
}
