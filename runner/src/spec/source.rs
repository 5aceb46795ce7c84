//! The sweep file's text with `--set` overrides applied, and the map from any offset in it
//! back to a place the researcher can find: a line and column of the file, or the flag.

use std::path::{Path, PathBuf};

use ron::error::SpannedError;

use super::raw;
use crate::error::InputError;

/// One `--set` replacement, in the coordinates of the text it was applied to.
#[derive(Debug, Clone)]
struct Patch {
    start: usize,
    old_len: usize,
    new_len: usize,
    flag: String,
}

#[derive(Debug, Clone)]
pub struct Source {
    pub path: PathBuf,
    original: String,
    /// The text as parsed: the file with every override applied.
    pub text: String,
    patches: Vec<Patch>,
}

/// Where an offset of the patched text came from.
enum Place {
    File(usize),
    Flag(String),
}

impl Source {
    /// Reads a sweep file; refuses unreadable, non-UTF-8 and empty files.
    pub fn read(path: &Path) -> Result<Self, InputError> {
        let shown = path.display();
        let bytes = std::fs::read(path)
            .map_err(|e| InputError::new(format!("{shown}: cannot read the sweep file: {e}")))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            let at = e.utf8_error().valid_up_to();
            let src = String::from_utf8_lossy(&e.as_bytes()[..at]).into_owned();
            let (line, col) = line_col(&src, at.min(src.len()));
            InputError::new(format!(
                "{shown}:{line}:{col}: the sweep file is not valid UTF-8; save it as UTF-8"
            ))
        })?;
        if text.trim().is_empty() {
            return Err(InputError::new(format!(
                "{shown}: the sweep file is empty; see sweeps/quickstart.ron for a complete one"
            )));
        }
        Ok(Self::from_text(path, text))
    }

    pub fn from_text(path: &Path, text: String) -> Self {
        Self {
            path: path.to_path_buf(),
            original: text.clone(),
            text,
            patches: Vec::new(),
        }
    }

    /// Applies `--set PATH=RON`: replaces the field's value, or adds the field to its parent
    /// struct when the file does not set it.
    pub fn apply_set(&mut self, set: &str) -> Result<(), InputError> {
        let flag = format!("--set {set}");
        let (path, value) = set.split_once('=').ok_or_else(|| {
            InputError::new(format!(
                "{flag}: expected PATH=VALUE, e.g. --set train.steps=50 or --set seeds=[0]"
            ))
        })?;
        let (path, value) = (path.trim(), value.trim());
        if let Err(e) = ron::value::RawValue::from_ron(value) {
            return Err(InputError::new(format!(
                "{flag}: `{value}` is not a RON value ({})",
                e.code
            )));
        }
        let segments: Vec<&str> = path.split('.').collect();
        if segments.iter().any(|s| s.is_empty()) {
            return Err(InputError::new(format!(
                "{flag}: `{path}` is not a field path; write it like train.steps"
            )));
        }
        let text = self.text.clone();
        let mut cur: &str = &text[raw::skip_trivia(&text)..];
        let (last, parents) = segments.split_last().expect("non-empty path");
        for (i, seg) in parents.iter().enumerate() {
            let fields = raw::fields(cur).map_err(|e| self.ron_error(&e))?;
            cur = fields
                .into_iter()
                .find(|(k, _)| k == seg)
                .map(|(_, v)| v)
                .ok_or_else(|| {
                    InputError::new(format!(
                        "{flag}: the sweep file has no `{}`; set the whole struct instead, \
                         e.g. --set {}=(...)",
                        segments[..=i].join("."),
                        segments[..=i].join(".")
                    ))
                })?;
        }
        let fields = raw::fields(cur).map_err(|e| self.ron_error(&e))?;
        let (start, old_len, insert) = match fields.iter().find(|(k, _)| k == last) {
            Some((_, v)) => (raw::offset_in(&text, v), v.len(), value.to_string()),
            None => {
                // Insert before the parent's closing parenthesis.
                let close = cur.rfind(')').ok_or_else(|| {
                    InputError::new(format!("{flag}: `{}` is not a struct", parents.join(".")))
                })?;
                let before = cur[..close].trim_end();
                let sep = if before.ends_with('(') || before.ends_with(',') {
                    ""
                } else {
                    ", "
                };
                let at = raw::offset_in(&text, cur) + close;
                let insert = format!("{sep}{last}: {value}");
                self.text = format!("{}{insert}{}", &text[..at], &text[at..]);
                self.patches.push(Patch {
                    start: at,
                    old_len: 0,
                    new_len: insert.len(),
                    flag,
                });
                return Ok(());
            }
        };
        self.text = format!("{}{insert}{}", &text[..start], &text[start + old_len..]);
        self.patches.push(Patch {
            start,
            old_len,
            new_len: insert.len(),
            flag,
        });
        Ok(())
    }

    fn place(&self, mut offset: usize) -> Place {
        for p in self.patches.iter().rev() {
            if offset >= p.start && offset < p.start + p.new_len {
                return Place::Flag(p.flag.clone());
            }
            if offset >= p.start + p.new_len {
                offset = offset + p.old_len - p.new_len;
            }
        }
        Place::File(offset)
    }

    /// `FILE:LINE:COL` for an offset of [`Self::text`], or the flag that wrote it.
    pub fn locate(&self, offset: usize) -> String {
        match self.place(offset.min(self.text.len())) {
            Place::File(o) => {
                let (line, col) = line_col(&self.original, o.min(self.original.len()));
                format!("{}:{line}:{col}", self.path.display())
            }
            Place::Flag(flag) => flag,
        }
    }

    /// An error at `part`, a slice of [`Self::text`].
    pub fn error_at(&self, part: &str, msg: impl std::fmt::Display) -> InputError {
        InputError::new(format!(
            "{}: {msg}",
            self.locate(raw::offset_in(&self.text, part))
        ))
    }

    /// A RON error of [`Self::text`] (or of a slice of it starting at `base`).
    pub fn ron_error_in(&self, base: usize, e: &SpannedError) -> InputError {
        let sub = &self.text[base..];
        let start = base + offset_of(sub, e.span.start.line, e.span.start.col);
        let end = base + offset_of(sub, e.span.end.line, e.span.end.col);
        // ron's span may start on the whitespace before a bad value; if the span reaches
        // into a `--set` value, the flag is the place to fix.
        let next = start + raw::skip_trivia(&self.text[start..]);
        let at = [next, end.saturating_sub(1).max(start)]
            .into_iter()
            .find(|&o| matches!(self.place(o), Place::Flag(_)))
            .unwrap_or(start);
        InputError::new(format!("{}: {}", self.locate(at), e.code))
    }

    pub fn ron_error(&self, e: &SpannedError) -> InputError {
        self.ron_error_in(0, e)
    }

    /// The raw text of a dotted field path (e.g. `train.steps`), if the text sets it.
    pub fn field(&self, path: &str) -> Option<&str> {
        let mut cur: &str = &self.text[raw::skip_trivia(&self.text)..];
        for seg in path.split('.') {
            cur = raw::fields(cur)
                .ok()?
                .into_iter()
                .find(|(k, _)| k == seg)?
                .1;
        }
        Some(cur)
    }

    /// An error about a field: at its value when the text sets it, else at the file.
    pub fn field_error(&self, path: &str, msg: impl std::fmt::Display) -> InputError {
        match self.field(path) {
            Some(part) => self.error_at(part, format!("{path}: {msg}")),
            None => InputError::new(format!("{}: {path}: {msg}", self.path.display())),
        }
    }

    /// The directory relative paths in the file resolve against.
    pub fn base_dir(&self) -> PathBuf {
        match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }
}

/// 1-based line and column (in characters) of a byte offset, as ron counts them.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset];
    let line = 1 + before.matches('\n').count();
    let col = 1 + before.rsplit('\n').next().map_or(0, |l| l.chars().count());
    (line, col)
}

/// The byte offset of a 1-based line and character column.
pub fn offset_of(text: &str, line: usize, col: usize) -> usize {
    let mut start = 0;
    for _ in 1..line {
        match text[start..].find('\n') {
            Some(n) => start += n + 1,
            None => return text.len(),
        }
    }
    text[start..]
        .char_indices()
        .nth(col.saturating_sub(1))
        .map_or(text.len(), |(i, _)| start + i)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "Sweep(\n  name: \"a\",\n  train: (steps: 300, batch: 4),\n  seeds: [0],\n)";

    fn src() -> Source {
        Source::from_text(Path::new("s.ron"), FILE.to_string())
    }

    #[test]
    fn set_replaces_a_nested_field_and_keeps_file_positions() {
        let mut s = src();
        s.apply_set("train.steps=50000").unwrap();
        assert!(s.text.contains("train: (steps: 50000, batch: 4)"));
        // `seeds` moved by 2 bytes in the patched text but is still reported at 4:3.
        let off = s.text.find("seeds").unwrap();
        assert_eq!(s.locate(off), "s.ron:4:3");
        let patched = s.text.find("50000").unwrap();
        assert_eq!(s.locate(patched + 1), "--set train.steps=50000");
    }

    #[test]
    fn set_inserts_a_missing_field_and_replaces_lists() {
        let mut s = src();
        s.apply_set("train.eval_every=10").unwrap();
        s.apply_set("seeds=[0, 1, 2]").unwrap();
        assert!(
            s.text.contains("(steps: 300, batch: 4, eval_every: 10)"),
            "{}",
            s.text
        );
        assert!(s.text.contains("seeds: [0, 1, 2],"));
        assert_eq!(s.locate(s.text.find("name").unwrap()), "s.ron:2:3");
    }

    #[test]
    fn set_errors_name_the_flag() {
        let mut s = src();
        let e = s.apply_set("train.steps").unwrap_err();
        assert!(
            e.0.starts_with("--set train.steps: expected PATH=VALUE"),
            "{e}"
        );
        let e = s.apply_set("model.d_model=64").unwrap_err();
        assert!(e.0.contains("the sweep file has no `model`"), "{e}");
        let e = s.apply_set("train.steps=(").unwrap_err();
        assert!(e.0.contains("is not a RON value"), "{e}");
    }

    #[test]
    fn line_col_and_offset_of_are_inverse() {
        let t = "ab\nçd\n\nx";
        for off in [0, 1, 3, 5, 6, 8] {
            let (l, c) = line_col(t, off);
            assert_eq!(offset_of(t, l, c), off, "offset {off} -> {l}:{c}");
        }
    }
}
