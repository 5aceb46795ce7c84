use std::fmt;
use std::str::FromStr;

/// The life of a trial: queued -> running -> done | diverged | failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    Queued,
    Running,
    /// Trained to the last step with finite losses.
    Done,
    /// Stopped because the loss or a gradient became NaN or infinite: a result, not an error.
    Diverged,
    /// Stopped by an error (or a panic); `trials.error` says which.
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Done => "done",
            Status::Diverged => "diverged",
            Status::Failed => "failed",
        }
    }

    /// Done and diverged trials are outcomes; a rerun of the sweep skips them.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Done | Status::Diverged)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<Self> {
        Ok(match s {
            "queued" => Status::Queued,
            "running" => Status::Running,
            "done" => Status::Done,
            "diverged" => Status::Diverged,
            "failed" => Status::Failed,
            other => return Err(crate::Error::BadStatus(other.to_string())),
        })
    }
}
