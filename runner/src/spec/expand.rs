//! Grid axes to variants, variants to cells, cells times seeds to trials.

use std::collections::BTreeMap;
use std::sync::Arc;

use registry::{Component, Dims, Entry, Slot};
use sha2::{Digest, Sha256};

use super::raw;
use super::source::Source;
use super::{ModelSpec, TrainSpec};
use crate::data::{DataSpec, EvalSpec};
use crate::error::InputError;

/// One resolved component of an axis.
#[derive(Clone, Debug)]
pub struct Variant {
    pub slot: Slot,
    pub name: &'static str,
    /// `Name(k:v,...)` with every default filled in.
    pub canonical: String,
    pub component: Component,
    /// Where the variant was written: offset in the source text.
    pub at: usize,
}

/// The components of one grid cell.
#[derive(Clone, Debug)]
pub struct Cell {
    pub attention: Arc<dyn registry::Attention>,
    pub ffn: Arc<dyn registry::Ffn>,
    pub residual: Arc<dyn registry::Residual>,
    pub optimizer: Arc<dyn registry::Optimizer>,
    pub schedule: Arc<dyn registry::Schedule>,
}

/// One trial: a cell and a seed.
#[derive(Clone, Debug)]
pub struct Trial {
    /// 16 hex digits of SHA-256 over `config`.
    pub id: String,
    pub seed: u64,
    /// Index of the cell in the grid (the same for every seed).
    pub cell_index: usize,
    pub cell: Cell,
    /// The model's shape (one of the sweep's size axes' combinations).
    pub dims: Dims,
    /// The components that vary across the sweep, e.g. `ffn=Gelu optimizer.lr=0.003`.
    pub label: String,
    /// The fully resolved configuration, RON: what the id hashes and the DB stores.
    pub config: String,
}

/// The parts of a trial's configuration that every cell shares.
pub struct Shared<'a> {
    pub data: &'a DataSpec,
    /// Held-out evaluation sets; in the config only when there are some, so that sweeps
    /// without them keep their ids.
    pub evals: &'a [EvalSpec],
    /// Zero-shot benchmarks; like `evals`, in the config only when there are some.
    pub benchmarks: &'a [crate::benchmarks::BenchmarkSpec],
    pub train: &'a TrainSpec,
}

/// The model shapes a sweep's cells are built at, their dims, and per shape the budget (if
/// any) each cell solves its d_model for at the shape's depth.
pub struct Shapes<'a> {
    pub models: &'a [ModelSpec],
    pub dims: &'a [Dims],
    pub targets: &'a [Option<super::matching::MatchSpec>],
}

/// Axes not written in the sweep file take these.
fn default_axis(slot: Slot) -> Option<&'static str> {
    match slot {
        Slot::Attention | Slot::Ffn => None,
        Slot::Residual => Some("PreNorm"),
        Slot::Optimizer => Some("AdamW"),
        Slot::Schedule => Some("Cosine"),
    }
}

pub fn parse_axes(
    source: &Source,
    raws: [Option<&ron::value::RawValue>; 5],
) -> Result<Vec<Vec<Variant>>, InputError> {
    let reg = registry::registry().map_err(InputError::new)?;
    let mut axes = Vec::new();
    for (slot, raw) in Slot::ALL.into_iter().zip(raws) {
        let variants = match raw {
            Some(raw) => parse_axis(source, reg, slot, raw.trim().get_ron())?,
            None => match default_axis(slot) {
                Some(name) => {
                    let entry = reg
                        .lookup(slot, name)
                        .map_err(|e| InputError::new(e.to_string()))?;
                    let parsed = entry.parse("").map_err(|e| InputError::new(e.message))?;
                    vec![Variant {
                        slot,
                        name: entry.name,
                        canonical: entry.canonical(&parsed),
                        component: parsed.component,
                        at: 0,
                    }]
                }
                None => {
                    let names = reg.names(slot).join(", ");
                    return Err(InputError::new(format!(
                        "{}: grid.{slot} is missing: list the {slot} variants to try, \
                         e.g. {slot}: [{}] (registered: {names})",
                        source.path.display(),
                        reg.names(slot).first().copied().unwrap_or("Name"),
                    )));
                }
            },
        };
        axes.push(variants);
    }
    Ok(axes)
}

fn parse_axis(
    source: &Source,
    reg: &registry::Registry,
    slot: Slot,
    text: &str,
) -> Result<Vec<Variant>, InputError> {
    let base = raw::offset_in(&source.text, text);
    let items = raw::items(text).map_err(|e| source.ron_error_in(base, &e))?;
    if items.is_empty() {
        return Err(source.error_at(
            text,
            format!("grid.{slot} is empty: list at least one {slot} component"),
        ));
    }
    let mut out: Vec<Variant> = Vec::new();
    for item in items {
        for v in parse_variant(source, reg, slot, item)? {
            if out.iter().any(|o| o.canonical == v.canonical) {
                return Err(
                    source.error_at(item, format!("grid.{slot} lists {} twice", v.canonical))
                );
            }
            out.push(v);
        }
    }
    Ok(out)
}

/// The cell of one combination of the axes' variants.
fn cell_of(axes: &[Vec<Variant>], combo: &[usize]) -> Cell {
    let pick = |slot: usize| &axes[slot][combo[slot]];
    Cell {
        attention: match &pick(0).component {
            Component::Attention(c) => c.clone(),
            other => unreachable!("attention axis holds {other:?}"),
        },
        ffn: match &pick(1).component {
            Component::Ffn(c) => c.clone(),
            other => unreachable!("ffn axis holds {other:?}"),
        },
        residual: match &pick(2).component {
            Component::Residual(c) => c.clone(),
            other => unreachable!("residual axis holds {other:?}"),
        },
        optimizer: match &pick(3).component {
            Component::Optimizer(c) => c.clone(),
            other => unreachable!("optimizer axis holds {other:?}"),
        },
        schedule: match &pick(4).component {
            Component::Schedule(c) => c.clone(),
            other => unreachable!("schedule axis holds {other:?}"),
        },
    }
}

/// One written variant, `Name` or `Name(k: v, k2: [a, b])`; a list under a parameter that
/// does not take a list expands into one variant per value.
fn parse_variant(
    source: &Source,
    reg: &registry::Registry,
    slot: Slot,
    item: &str,
) -> Result<Vec<Variant>, InputError> {
    let (name, params) = raw::split_variant(item).ok_or_else(|| {
        source.error_at(
            item,
            format!("expected a {slot} component such as `Name` or `Name(param: value)`"),
        )
    })?;
    let entry = reg
        .lookup(slot, name)
        .map_err(|e| source.error_at(item, e))?;
    let defaults: BTreeMap<String, String> = raw::fields(&entry.defaults())
        .map(|f| f.into_iter().map(|(k, v)| (k, v.to_string())).collect())
        .unwrap_or_default();
    let fields = if params.is_empty() {
        Vec::new()
    } else {
        let base = raw::offset_in(&source.text, params);
        raw::fields(params).map_err(|e| source.ron_error_in(base, &e))?
    };

    // Each parameter's alternatives, checked one at a time so an error points at its value.
    let mut choices: Vec<(String, Vec<&str>)> = Vec::new();
    for (key, value) in fields {
        let Some(default) = defaults.get(&key) else {
            let known: Vec<&str> = defaults.keys().map(String::as_str).collect();
            let hint = registry::nearest(&key, &known)
                .map(|s| format!(" Did you mean `{s}`?"))
                .unwrap_or_default();
            let key_at = source.text[..raw::offset_in(&source.text, value)]
                .rfind(key.as_str())
                .unwrap_or(raw::offset_in(&source.text, value));
            return Err(InputError::new(format!(
                "{}: {name} has no parameter `{key}`; its parameters: {}.{hint}",
                source.locate(key_at),
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                },
            )));
        };
        let values = if value.starts_with('[') && !default.starts_with('[') {
            let base = raw::offset_in(&source.text, value);
            let vs = raw::items(value).map_err(|e| source.ron_error_in(base, &e))?;
            if vs.is_empty() {
                return Err(source.error_at(
                    value,
                    format!("{name}.{key} is an empty list: give at least one value"),
                ));
            }
            vs
        } else {
            vec![value]
        };
        choices.push((key, values));
    }
    // Each value checked with the other written parameters at their first values (not their
    // defaults, which may not go with it: Laurel's rank 0 needs rw), so an error points at it.
    for (key, values) in &choices {
        for v in values {
            let body: Vec<String> = choices
                .iter()
                .map(|(k, vs)| format!("{k}: {}", if k == key { v } else { vs[0] }))
                .collect();
            entry
                .parse(&format!("({})", body.join(", ")))
                .map_err(|e| source.error_at(v, format!("{name}.{key}: {}", e.message)))?;
        }
    }

    let mut out = Vec::new();
    for combo in product(&choices.iter().map(|(_, v)| v.len()).collect::<Vec<_>>()) {
        let body: Vec<String> = choices
            .iter()
            .zip(&combo)
            .map(|((k, vs), &i)| format!("{k}: {}", vs[i]))
            .collect();
        let parsed = entry
            .parse(&format!("({})", body.join(", ")))
            .map_err(|e| source.error_at(item, format!("{name}: {}", e.message)))?;
        out.push(variant(entry, parsed, raw::offset_in(&source.text, item)));
    }
    Ok(out)
}

fn variant(entry: &'static Entry, parsed: registry::Parsed, at: usize) -> Variant {
    Variant {
        slot: entry.slot,
        name: entry.name,
        canonical: entry.canonical(&parsed),
        component: parsed.component,
        at,
    }
}

/// Every index combination of axes with the given lengths, last axis fastest.
pub fn product(lens: &[usize]) -> Vec<Vec<usize>> {
    let mut out = vec![Vec::new()];
    for &n in lens {
        out = out
            .into_iter()
            .flat_map(|prefix| {
                (0..n).map(move |i| {
                    let mut p = prefix.clone();
                    p.push(i);
                    p
                })
            })
            .collect();
    }
    out
}

/// Checks every cell (indices into the axes) against every model shape and returns the
/// trials seed-major, then shape-major: cell index s x cells + c for shape s and grid cell c.
pub fn trials(
    source: &Source,
    axes: &[Vec<Variant>],
    cells: &[Vec<usize>],
    seeds: &[u64],
    shapes: &Shapes,
    shared: &Shared,
) -> Result<Vec<Trial>, InputError> {
    let grid_labels = labels(axes, cells);
    // With several shapes, the sizes that vary lead the label.
    let vary =
        |f: fn(&ModelSpec) -> usize| shapes.models.iter().any(|m| f(m) != f(&shapes.models[0]));
    let (width_varies, depth_varies) = (vary(|m| m.d_model), vary(|m| m.n_layers));
    let label = |m: &ModelSpec, ci: usize| -> String {
        let mut parts = Vec::new();
        // A named shape stands for its sizes.
        if !m.scale.is_empty() {
            if shapes.models.len() > 1 {
                parts.push(format!("model.scale={}", m.scale));
            }
        } else {
            if width_varies {
                parts.push(format!("model.d_model={}", m.d_model));
            }
            if depth_varies {
                parts.push(format!("model.n_layers={}", m.n_layers));
            }
        }
        if !grid_labels[ci].is_empty() {
            parts.push(grid_labels[ci].clone());
        }
        parts.join(" ")
    };

    // Each cell at each shape, its width solved where the sweep matches a budget.
    let mut layout: Vec<Vec<(ModelSpec, Dims, Cell)>> = Vec::new();
    let mut problems = Vec::new();
    for ((m, dims), target) in shapes.models.iter().zip(shapes.dims).zip(shapes.targets) {
        let mut row = Vec::new();
        for (ci, combo) in cells.iter().enumerate() {
            let cell = cell_of(axes, combo);
            let (mut m, mut dims) = (m.clone(), dims.clone());
            if let Some(target) = target {
                match target.solve(&cell, &dims) {
                    Ok(d) => {
                        m.d_model = d;
                        dims.d_model = d;
                    }
                    Err(why) => {
                        problems.push(format!(
                            "{}: cell {ci} ({}) at {}: {why}",
                            source.locate(axes[0][combo[0]].at),
                            shown(&grid_labels[ci]),
                            shape_name(&m)
                        ));
                        continue;
                    }
                }
            }
            for (axis, &vi) in axes.iter().zip(combo) {
                let v = &axis[vi];
                if let Err(msg) = v.component.spec().check(&dims) {
                    let at = match shapes.models.len() {
                        1 => String::new(),
                        _ => format!(" at {}", shape_name(&m)),
                    };
                    problems.push(format!(
                        "{}: cell {ci} ({}){at}: {} {}: {msg}",
                        source.locate(v.at),
                        shown(&label(&m, ci)),
                        v.slot,
                        v.name
                    ));
                }
            }
            row.push((m, dims, cell));
        }
        layout.push(row);
    }
    if !problems.is_empty() {
        let n = problems.len();
        problems.truncate(20);
        let shape = match (shapes.models, shapes.targets.iter().flatten().next()) {
            (_, Some(t)) => format!("the {} to match", t.what()),
            ([m], None) => format!("model (d_model: {}, n_layers: {})", m.d_model, m.n_layers),
            _ => "the model's shapes".to_string(),
        };
        return Err(InputError::new(format!(
            "{n} invalid combination(s) of the grid with {shape}; change the model or the \
             components:\n  {}",
            problems.join("\n  ")
        )));
    }

    let evals = (!shared.evals.is_empty()).then(|| to_ron(&shared.evals));
    let benchmarks = (!shared.benchmarks.is_empty()).then(|| to_ron(&shared.benchmarks));
    let (data, train) = (to_ron(shared.data), to_ron(shared.train));
    let mut out = Vec::new();
    for &seed in seeds {
        for (si, row) in layout.iter().enumerate() {
            for (ci, ((m, dims, cell), combo)) in row.iter().zip(cells).enumerate() {
                let names: Vec<&str> = (0..axes.len())
                    .map(|s| axes[s][combo[s]].canonical.as_str())
                    .collect();
                let config = config_text(
                    seed,
                    &[data.clone(), train.clone(), to_ron(m)],
                    [evals.as_deref(), benchmarks.as_deref()],
                    &names,
                );
                out.push(Trial {
                    id: trial_id(&config),
                    seed,
                    cell_index: si * cells.len() + ci,
                    cell: cell.clone(),
                    dims: dims.clone(),
                    label: label(m, ci),
                    config,
                });
            }
        }
    }
    Ok(out)
}

/// A shape as errors name it: its scale name, or its sizes.
fn shape_name(m: &ModelSpec) -> String {
    let sizes = m.sizes("");
    match m.scale.as_str() {
        "" => sizes,
        name => format!("shape {name:?} ({sizes})"),
    }
}

fn shown(label: &str) -> &str {
    if label.is_empty() {
        "the only cell"
    } else {
        label
    }
}

fn to_ron(v: &impl serde::Serialize) -> String {
    ron::to_string(v).expect("plain config structs serialize")
}

/// The resolved configuration as RON. Field order is fixed; components are canonical.
/// `shared` holds the data, train and model sections; `extra` the evaluation sets and the
/// benchmarks, each written only when there are some (a sweep without them keeps the ids it
/// had before they existed).
pub fn config_text(
    seed: u64,
    shared: &[String; 3],
    extra: [Option<&str>; 2],
    components: &[&str],
) -> String {
    let [data, train, model] = shared;
    let mut s = format!("(\n    seed: {seed},\n    data: {data},\n");
    for (name, text) in ["evals", "benchmarks"].into_iter().zip(extra) {
        if let Some(text) = text {
            s.push_str(&format!("    {name}: {text},\n"));
        }
    }
    s.push_str(&format!("    train: {train},\n    model: {model},\n"));
    for (slot, c) in Slot::ALL.iter().zip(components) {
        s.push_str(&format!("    {slot}: {c},\n"));
    }
    s.push(')');
    s
}

/// 16 hex digits (64 bits) of SHA-256: collisions are out of reach for any sweep.
pub fn trial_id(config: &str) -> String {
    let digest = Sha256::digest(config.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// For each cell, the parts that vary across the grid: a slot's name where several
/// components fill it, and `slot.param=value` for parameters that differ among the
/// variants of one component.
fn labels(axes: &[Vec<Variant>], cells: &[Vec<usize>]) -> Vec<String> {
    let mut per_axis: Vec<Vec<String>> = Vec::new();
    for axis in axes {
        let names_vary = axis.iter().any(|v| v.name != axis[0].name);
        let params: Vec<Vec<(String, String)>> =
            axis.iter().map(|v| params_of(&v.canonical)).collect();
        let labels = axis
            .iter()
            .zip(&params)
            .map(|(v, ps)| {
                let mut parts = Vec::new();
                if names_vary {
                    parts.push(format!("{}={}", v.slot, v.name));
                }
                for (k, val) in ps {
                    let varies = axis.iter().zip(&params).any(|(o, ops)| {
                        o.name == v.name && ops.iter().any(|(ok, ov)| ok == k && ov != val)
                    });
                    if varies {
                        parts.push(format!("{}.{k}={val}", v.slot));
                    }
                }
                parts.join(" ")
            })
            .collect();
        per_axis.push(labels);
    }
    cells
        .iter()
        .map(|combo| {
            combo
                .iter()
                .enumerate()
                .map(|(a, &i)| per_axis[a][i].as_str())
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

fn params_of(canonical: &str) -> Vec<(String, String)> {
    match raw::split_variant(canonical) {
        Some((_, p)) if !p.is_empty() => raw::fields(p)
            .map(|f| f.into_iter().map(|(k, v)| (k, v.to_string())).collect())
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn product_is_last_axis_fastest() {
        assert_eq!(
            product(&[2, 1, 3]),
            vec![
                vec![0, 0, 0],
                vec![0, 0, 1],
                vec![0, 0, 2],
                vec![1, 0, 0],
                vec![1, 0, 1],
                vec![1, 0, 2]
            ]
        );
        assert_eq!(product(&[]), vec![Vec::<usize>::new()]);
    }

    #[test]
    fn trial_id_is_sha256_prefix() {
        // sha256("abc") = ba7816bf8f01cfea414140de5dae2223... (FIPS 180-2 test vector)
        assert_eq!(trial_id("abc"), "ba7816bf8f01cfea");
    }
}
