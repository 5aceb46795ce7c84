//! Registry entries, the global table built from them, and lookup with "did you mean".

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, OnceLock};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::slots::{Attention, Ffn, Optimizer, Residual, Schedule, Slot};

/// One documented parameter of a component; its default comes from the config's `Default`.
#[derive(Debug)]
pub struct ParamDoc {
    pub name: &'static str,
    pub doc: &'static str,
}

/// A parsed component, ready to build.
#[derive(Clone, Debug)]
pub enum Component {
    Attention(Arc<dyn Attention>),
    Ffn(Arc<dyn Ffn>),
    Residual(Arc<dyn Residual>),
    Optimizer(Arc<dyn Optimizer>),
    Schedule(Arc<dyn Schedule>),
}

impl Component {
    /// The common checks of every slot's trait.
    pub fn spec(&self) -> &dyn crate::Spec {
        match self {
            Component::Attention(c) => c.as_ref(),
            Component::Ffn(c) => c.as_ref(),
            Component::Residual(c) => c.as_ref(),
            Component::Optimizer(c) => c.as_ref(),
            Component::Schedule(c) => c.as_ref(),
        }
    }
}

/// Why a component's parameters were refused. `at` is the 1-based (line, column) inside the
/// parameter text handed to [`Entry::parse`], when the error has a place.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamsError {
    pub at: Option<(usize, usize)>,
    pub message: String,
}

/// A component's parameters, parsed and validated.
#[derive(Clone, Debug)]
pub struct Parsed {
    pub component: Component,
    /// The parameters with every default filled in, as compact RON (`(heads:4,...)`): the
    /// canonical form that identifies a trial.
    pub canonical: String,
}

/// What a component file submits: `inventory::submit!(Entry::attention::<Mha>(...))`.
pub struct Entry {
    pub slot: Slot,
    /// The RON variant name, e.g. `GatedGqa`. Unique across all slots.
    pub name: &'static str,
    /// One line for `sweep list`.
    pub summary: &'static str,
    pub params: &'static [ParamDoc],
    defaults: fn() -> String,
    parse: fn(&str) -> Result<Parsed, ParamsError>,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("slot", &self.slot)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The bounds a config struct meets to be registered: RON in and out, defaults for every
/// field (`#[serde(default, deny_unknown_fields)]`).
pub trait Config: Serialize + DeserializeOwned + Default {}
impl<T: Serialize + DeserializeOwned + Default> Config for T {}

macro_rules! slot_constructor {
    ($fn_name:ident, $parse_fn:ident, $trait:ident, $slot:ident) => {
        impl Entry {
            #[doc = concat!("An entry for the ", stringify!($slot), " slot.")]
            pub const fn $fn_name<T: $trait + Config>(
                name: &'static str,
                summary: &'static str,
                params: &'static [ParamDoc],
            ) -> Entry {
                Entry {
                    slot: Slot::$slot,
                    name,
                    summary,
                    params,
                    defaults: defaults_of::<T>,
                    parse: $parse_fn::<T>,
                }
            }
        }

        fn $parse_fn<T: $trait + Config>(text: &str) -> Result<Parsed, ParamsError> {
            let (config, canonical) = parse_config::<T>(text)?;
            Ok(Parsed {
                component: Component::$slot(Arc::new(config)),
                canonical,
            })
        }
    };
}

slot_constructor!(attention, parse_attention, Attention, Attention);
slot_constructor!(ffn, parse_ffn, Ffn, Ffn);
slot_constructor!(residual, parse_residual, Residual, Residual);
slot_constructor!(optimizer, parse_optimizer, Optimizer, Optimizer);
slot_constructor!(schedule, parse_schedule, Schedule, Schedule);

impl Entry {
    /// The defaults of every parameter as compact RON, e.g. `(heads:4,rope_theta:10000.0)`.
    pub fn defaults(&self) -> String {
        (self.defaults)()
    }

    /// Parses the parameter text of a sweep-file entry (`(lr: 1e-3)`, or empty for the
    /// defaults), fills in defaults and validates the values.
    pub fn parse(&self, params: &str) -> Result<Parsed, ParamsError> {
        (self.parse)(params)
    }

    /// The full canonical form, `Name(k:v,...)`.
    pub fn canonical(&self, parsed: &Parsed) -> String {
        if parsed.canonical == "()" {
            self.name.to_string()
        } else {
            format!("{}{}", self.name, parsed.canonical)
        }
    }
}

fn defaults_of<T: Config>() -> String {
    ron::to_string(&T::default()).unwrap_or_else(|e| format!("<unserializable: {e}>"))
}

fn parse_config<T: Config + crate::Spec>(text: &str) -> Result<(T, String), ParamsError> {
    let config: T = if text.trim().is_empty() {
        T::default()
    } else {
        ron::from_str(text).map_err(|e| ParamsError {
            at: Some((e.span.start.line, e.span.start.col)),
            message: e.code.to_string(),
        })?
    };
    config
        .validate()
        .map_err(|message| ParamsError { at: None, message })?;
    let canonical = ron::to_string(&config).map_err(|e| ParamsError {
        at: None,
        message: e.to_string(),
    })?;
    Ok((config, canonical))
}

inventory::collect!(Entry);

/// The components a binary was linked with, by name.
#[derive(Debug)]
pub struct Registry {
    by_name: BTreeMap<&'static str, &'static Entry>,
}

/// Why a name did not resolve.
#[derive(Clone, Debug, PartialEq)]
pub enum LookupError {
    Unknown {
        slot: Slot,
        name: String,
        known: Vec<&'static str>,
        suggestion: Option<&'static str>,
    },
    WrongSlot {
        name: String,
        wanted: Slot,
        actual: Slot,
    },
}

impl fmt::Display for LookupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LookupError::Unknown {
                slot,
                name,
                known,
                suggestion,
            } => {
                write!(f, "unknown {slot} component `{name}`; registered: ")?;
                if known.is_empty() {
                    write!(f, "none")?;
                } else {
                    write!(f, "{}", known.join(", "))?;
                }
                if let Some(s) = suggestion {
                    write!(f, ". Did you mean `{s}`?")?;
                }
                Ok(())
            }
            LookupError::WrongSlot {
                name,
                wanted,
                actual,
            } => write!(
                f,
                "`{name}` is a {actual} component, but this is the {wanted} axis; \
                 move it to `{actual}: [...]`"
            ),
        }
    }
}

impl std::error::Error for LookupError {}

impl Registry {
    /// Builds the table, refusing a name registered twice (names are unique across slots,
    /// since a sweep file names a component by its variant name alone).
    pub fn new(entries: impl IntoIterator<Item = &'static Entry>) -> Result<Self, String> {
        let mut by_name: BTreeMap<&'static str, &'static Entry> = BTreeMap::new();
        for e in entries {
            if let Some(prev) = by_name.insert(e.name, e) {
                return Err(format!(
                    "component name `{}` is registered twice (as {} and as {}); \
                     rename one of them",
                    e.name, prev.slot, e.slot
                ));
            }
        }
        Ok(Self { by_name })
    }

    /// Entries sorted by slot, then name.
    pub fn entries(&self) -> Vec<&'static Entry> {
        let mut v: Vec<_> = self.by_name.values().copied().collect();
        v.sort_by_key(|e| (e.slot, e.name));
        v
    }

    pub fn names(&self, slot: Slot) -> Vec<&'static str> {
        self.entries()
            .into_iter()
            .filter(|e| e.slot == slot)
            .map(|e| e.name)
            .collect()
    }

    pub fn lookup(&self, slot: Slot, name: &str) -> Result<&'static Entry, LookupError> {
        match self.by_name.get(name) {
            Some(e) if e.slot == slot => Ok(e),
            Some(e) => Err(LookupError::WrongSlot {
                name: name.to_string(),
                wanted: slot,
                actual: e.slot,
            }),
            None => {
                let known = self.names(slot);
                let suggestion = nearest(name, &known);
                Err(LookupError::Unknown {
                    slot,
                    name: name.to_string(),
                    known,
                    suggestion,
                })
            }
        }
    }
}

/// The closest candidate by edit distance, if it is close enough to be a likely typo.
pub fn nearest<'a>(name: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let lower = name.to_lowercase();
    candidates
        .iter()
        .map(|c| (strsim::levenshtein(&lower, &c.to_lowercase()), *c))
        .filter(|(d, c)| *d <= (c.len().max(name.len()) / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

static REGISTRY: OnceLock<Result<Registry, String>> = OnceLock::new();

/// The table of every entry linked into this binary.
pub fn registry() -> Result<&'static Registry, String> {
    REGISTRY
        .get_or_init(|| Registry::new(inventory::iter::<Entry>))
        .as_ref()
        .map_err(Clone::clone)
}

/// Every registered entry, sorted by slot then name.
pub fn entries() -> Result<Vec<&'static Entry>, String> {
    Ok(registry()?.entries())
}

/// Looks a component up in the global table.
pub fn lookup(slot: Slot, name: &str) -> Result<&'static Entry, Box<dyn std::error::Error>> {
    Ok(registry()?.lookup(slot, name)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slots::{Dims, Spec, Stepper};
    use crate::Param;
    use serde::Deserialize;

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Plain {
        lr: f64,
    }
    impl Spec for Plain {
        fn validate(&self) -> Result<(), String> {
            if self.lr < 0.0 {
                return Err(format!("lr must be >= 0, got {}", self.lr));
            }
            Ok(())
        }
    }
    impl Optimizer for Plain {
        fn lr(&self) -> f64 {
            self.lr
        }
        fn build(
            &self,
            _: &[Param],
            _: candle_core::DType,
        ) -> candle_core::Result<Box<dyn Stepper>> {
            candle_core::bail!("not used")
        }
    }
    impl Schedule for Plain {
        fn factor(&self, _: usize, _: usize) -> f64 {
            1.0
        }
    }

    static A: Entry = Entry::optimizer::<Plain>("Sgd", "a", &[]);
    static B: Entry = Entry::optimizer::<Plain>("Lion", "b", &[]);
    static C: Entry = Entry::schedule::<Plain>("Sgd", "c", &[]);
    static D: Entry = Entry::schedule::<Plain>("Constant", "d", &[]);

    #[test]
    fn duplicate_names_are_refused_even_across_slots() {
        let err = Registry::new([&A, &C]).unwrap_err();
        assert!(err.contains("`Sgd` is registered twice"), "{err}");
    }

    #[test]
    fn lookup_suggests_the_nearest_name_of_the_slot() {
        let r = Registry::new([&A, &B, &D]).unwrap();
        assert_eq!(r.lookup(Slot::Optimizer, "Lion").unwrap().summary, "b");
        match r.lookup(Slot::Optimizer, "Lino").unwrap_err() {
            LookupError::Unknown {
                known, suggestion, ..
            } => {
                assert_eq!(known, vec!["Lion", "Sgd"]);
                assert_eq!(suggestion, Some("Lion"));
            }
            e => panic!("{e:?}"),
        }
        let far = r.lookup(Slot::Optimizer, "Adafactor").unwrap_err();
        assert!(matches!(
            far,
            LookupError::Unknown {
                suggestion: None,
                ..
            }
        ));
        let wrong = r.lookup(Slot::Optimizer, "Constant").unwrap_err();
        assert!(
            wrong.to_string().contains("is a schedule component"),
            "{wrong}"
        );
    }

    #[test]
    fn parse_fills_defaults_validates_and_canonicalizes() {
        let p = A.parse("(lr: 1e-3)").unwrap();
        assert_eq!(A.canonical(&p), "Sgd(lr:0.001)");
        assert_eq!(A.canonical(&A.parse("").unwrap()), "Sgd(lr:0.0)");
        let bad = A.parse("(lr: -1.0)").unwrap_err();
        assert_eq!(bad.message, "lr must be >= 0, got -1");
        let typo = A.parse("(\n  lrr: 1.0)").unwrap_err();
        assert_eq!(typo.at, Some((2, 3))); // the start of `lrr`
        assert!(typo.message.contains("lrr"), "{}", typo.message);
        let _ = Dims {
            d_model: 1,
            n_layers: 1,
            vocab: 1,
            seq_len: 1,
        };
    }
}
