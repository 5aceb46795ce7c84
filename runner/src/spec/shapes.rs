//! The `model` section: the shapes a sweep's cells are built at.
//!
//! Three ways to write it:
//! - one shape, `model: (d_model: 384, n_layers: 6)`;
//! - size axes, `model: (d_model: [256, 384], n_layers: [4, 8])`: every combination, each with
//!   every cell, like the grid's axes;
//! - a `scale` axis of named shapes whose width and depth move together,
//!   `model: (scale: [(name: "S", d_model: 256, n_layers: 4), (name: "M", d_model: 512, n_layers: 8)])`,
//!   labelled `model.scale=S` in reports (a frontier's family leaves it out, as it does the
//!   size axes).
//!
//! With a `match` section the widths are left out and each cell solves its own at each
//! shape's depth (spec/matching.rs). A named shape may carry its own `match`, so that one
//! sweep compares stacks at two or more matched sizes:
//! `(name: "20M", n_layers: 8, match: Params(non_embedding: 20e6))`.

use serde::{Deserialize, Serialize};

use super::matching::MatchSpec;
use super::source::Source;
use crate::error::InputError;

/// One model shape, as a trial's configuration records it; the components come from the grid.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// The name of the `scale` axis's shape; empty and left out of the config otherwise, so
    /// that configs (and trial ids) of sweeps without one are what they were.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub scale: String,
    pub d_model: usize,
    pub n_layers: usize,
}

impl ModelSpec {
    /// `d_model D, n_layers L`; where a `match` has yet to solve the width (d_model 0),
    /// `unsolved` stands in for the width's part.
    pub fn sizes(&self, unsolved: &str) -> String {
        match self.d_model {
            0 => format!("{unsolved}n_layers {}", self.n_layers),
            d => format!("d_model {d}, n_layers {}", self.n_layers),
        }
    }
}

/// The `model` section as written: each size a number or a list of them, or named shapes.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename = "ModelSpec")]
pub(super) struct ModelAxes {
    /// Left out when `match` solves it.
    #[serde(default)]
    d_model: Option<Sizes>,
    #[serde(default)]
    n_layers: Option<Sizes>,
    #[serde(default)]
    scale: Option<Vec<NamedShape>>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
enum Sizes {
    One(usize),
    Many(Vec<usize>),
}

impl Sizes {
    fn values(&self) -> Vec<usize> {
        match self {
            Sizes::One(v) => vec![*v],
            Sizes::Many(v) => v.clone(),
        }
    }
}

/// One entry of the `scale` axis.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename = "Shape")]
struct NamedShape {
    name: String,
    #[serde(default)]
    d_model: Option<usize>,
    n_layers: usize,
    /// This shape's own budget, in place of the sweep's `match`.
    #[serde(default, rename = "match")]
    matching: Option<MatchSpec>,
}

/// Every model shape of the `model` section, in the order written (size axes d_model-major),
/// each with the budget its cells solve their width for: its own `match`, else the sweep's
/// (`matching`), else none. A shape with a budget leaves its width out (d_model 0 until the
/// cells solve it).
pub(super) fn model_shapes(
    source: &Source,
    m: &ModelAxes,
    matching: Option<&MatchSpec>,
) -> Result<Vec<(ModelSpec, Option<MatchSpec>)>, InputError> {
    if let Some(scale) = &m.scale {
        if m.d_model.is_some() || m.n_layers.is_some() {
            return Err(source.field_error(
                "model.scale",
                "gives each shape's d_model and n_layers: leave model.d_model and \
                 model.n_layers out beside it",
            ));
        }
        return named_shapes(source, scale, matching);
    }
    match (&m.d_model, matching.is_some()) {
        (Some(_), true) => {
            return Err(source.field_error(
                "model.d_model",
                "match solves each cell's d_model: leave model.d_model out",
            ))
        }
        (None, false) => {
            return Err(source.field_error(
                "model",
                "needs d_model (the residual width), or a `match` section to solve it per cell",
            ))
        }
        _ => {}
    }
    let Some(n_layers) = &m.n_layers else {
        return Err(source.field_error(
            "model",
            "needs n_layers (a number or a list), or a `scale` axis of named shapes",
        ));
    };
    let widths = match &m.d_model {
        Some(sizes) => sizes_of(source, "model.d_model", sizes)?,
        None => vec![0],
    };
    let depths = sizes_of(source, "model.n_layers", n_layers)?;
    Ok(widths
        .iter()
        .flat_map(|&d_model| {
            depths.iter().map(move |&n_layers| {
                let model = ModelSpec {
                    scale: String::new(),
                    d_model,
                    n_layers,
                };
                (model, matching.cloned())
            })
        })
        .collect())
}

fn sizes_of(source: &Source, path: &str, sizes: &Sizes) -> Result<Vec<usize>, InputError> {
    let values = sizes.values();
    if values.is_empty() {
        return Err(source.field_error(path, "is an empty list: give at least one size"));
    }
    if let Some(v) = values.iter().find(|&&v| v == 0) {
        return Err(source.field_error(path, format!("must be at least 1, got {v}")));
    }
    if let Some(v) = values
        .iter()
        .enumerate()
        .find_map(|(i, v)| values[..i].contains(v).then_some(v))
    {
        return Err(source.field_error(path, format!("lists {v} twice")));
    }
    Ok(values)
}

fn named_shapes(
    source: &Source,
    scale: &[NamedShape],
    matching: Option<&MatchSpec>,
) -> Result<Vec<(ModelSpec, Option<MatchSpec>)>, InputError> {
    let fail = |msg: String| Err(source.field_error("model.scale", msg));
    if scale.is_empty() {
        return fail("is an empty list: give at least one named shape".into());
    }
    let mut out: Vec<(ModelSpec, Option<MatchSpec>)> = Vec::new();
    for s in scale {
        let name = &s.name;
        // Labels are `key=value` words: a name must be one word of its own.
        if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c == '=') {
            return fail(format!(
                "shape name {name:?} must be one word without spaces or '=' (it labels \
                 the trials: model.scale=NAME)"
            ));
        }
        if let Some(m) = &s.matching {
            m.check().map_err(|e| {
                source.field_error("model.scale", format!("shape {name:?}: match: {e}"))
            })?;
        }
        let target = s.matching.clone().or_else(|| matching.cloned());
        let d_model = match (s.d_model, target.is_some()) {
            (Some(_), true) => {
                return fail(format!(
                    "shape {name:?}: match solves each cell's d_model: leave its d_model out"
                ))
            }
            (None, false) => {
                return fail(format!(
                    "shape {name:?} needs d_model (or a `match`, its own or the sweep's, to \
                     solve it per cell)"
                ))
            }
            (Some(0), _) => return fail(format!("shape {name:?}: d_model must be at least 1")),
            (d, _) => d.unwrap_or(0),
        };
        if s.n_layers == 0 {
            return fail(format!("shape {name:?}: n_layers must be at least 1"));
        }
        if let Some((o, _)) = out.iter().find(|(o, _)| &o.scale == name) {
            return fail(format!(
                "names {:?} twice: give each shape its own name",
                o.scale
            ));
        }
        if let Some((o, _)) = out
            .iter()
            .find(|(o, t)| o.d_model == d_model && o.n_layers == s.n_layers && *t == target)
        {
            return fail(format!(
                "shapes {:?} and {name:?} are the same (d_model {d_model}, n_layers {}): \
                 the trials would repeat each other",
                o.scale, s.n_layers
            ));
        }
        out.push((
            ModelSpec {
                scale: name.clone(),
                d_model,
                n_layers: s.n_layers,
            },
            target,
        ));
    }
    Ok(out)
}
