//! The `benchmarks:` section, read from its raw text so that every error names its line and
//! column: `benchmarks: [HellaSwag, ArcEasy(limit: 200), WinoGrande(path: "w.jsonl")]`, the
//! files found in `benchmark_dir` unless a task names its own.

use super::{raw, Source};
use crate::benchmarks::{BenchmarkSpec, Task};
use crate::error::InputError;

/// The benchmarks listed in `text` (a slice of the source), each with its file resolved
/// (written into its `path`, so the trial's config names the file it was scored on).
pub fn parse(
    source: &Source,
    text: &str,
    dir: Option<&str>,
) -> Result<Vec<BenchmarkSpec>, InputError> {
    let base = raw::offset_in(&source.text, text);
    let items = raw::items(text).map_err(|e| source.ron_error_in(base, &e))?;
    let mut out: Vec<BenchmarkSpec> = Vec::new();
    for item in items {
        let (name, params) = raw::split_variant(item).ok_or_else(|| {
            source.error_at(
                item,
                format!(
                    "expected a benchmark such as `HellaSwag` or `ArcEasy(limit: 100)`; \
                     benchmarks: {}",
                    Task::names()
                ),
            )
        })?;
        let task = Task::parse(name).ok_or_else(|| {
            let names = Task::ALL.map(Task::name);
            let hint = registry::nearest(name, &names)
                .map(|s| format!(" Did you mean `{s}`?"))
                .unwrap_or_default();
            source.error_at(
                item,
                format!(
                    "unknown benchmark `{name}`; benchmarks: {}.{hint}",
                    Task::names()
                ),
            )
        })?;
        let mut spec = BenchmarkSpec {
            task,
            path: None,
            limit: None,
        };
        let fields = match params {
            "" => Vec::new(),
            p => {
                let at = raw::offset_in(&source.text, p);
                raw::fields(p).map_err(|e| source.ron_error_in(at, &e))?
            }
        };
        for (key, value) in fields {
            match key.as_str() {
                "path" => {
                    let path: String = ron::from_str(value).map_err(|_| {
                        source.error_at(value, format!("{name}.path must be a string"))
                    })?;
                    spec.path = Some(path);
                }
                "limit" => match ron::from_str::<usize>(value) {
                    Ok(n) if n > 0 => spec.limit = Some(n),
                    _ => {
                        return Err(source.error_at(
                            value,
                            format!("{name}.limit must be a whole number of items, at least 1"),
                        ))
                    }
                },
                other => {
                    return Err(source.error_at(
                        value,
                        format!("{name} has no parameter `{other}`; its parameters: path, limit"),
                    ))
                }
            }
        }
        if out.iter().any(|o| o.task == task) {
            return Err(source.error_at(item, format!("benchmarks lists {name} twice")));
        }
        let file = spec
            .file(dir, &source.base_dir())
            .map_err(|e| source.error_at(item, e))?;
        // The file as the sweep file reaches it (relative to its folder).
        let shown = match &spec.path {
            Some(p) => p.clone(),
            None => std::path::Path::new(dir.unwrap_or("."))
                .join(task.file())
                .display()
                .to_string(),
        };
        debug_assert!(file.is_file());
        spec.path = Some(shown);
        out.push(spec);
    }
    Ok(out)
}
