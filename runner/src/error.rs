//! Bad input: anything the researcher can fix in the sweep file, its data or the command
//! line. These exit with status 2 and write nothing.

use std::fmt;

/// An error in the input, with its place (`FILE:LINE:COL`, a flag, or a path) already in the
/// message.
#[derive(Debug, Clone, PartialEq)]
pub struct InputError(pub String);

impl InputError {
    pub fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InputError {}

/// Exit statuses scripts can rely on.
pub mod exit {
    /// Every trial done or diverged.
    pub const OK: u8 = 0;
    /// At least one trial failed, or an internal error.
    pub const FAILED: u8 = 1;
    /// Invalid input; nothing was trained or written.
    pub const INPUT: u8 = 2;
}
