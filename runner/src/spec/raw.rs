//! A light view of RON text as fields and raw values that remember where they stand, so
//! that every error can name a line and column, and `--set` can replace one field's text.
//!
//! `ron::Value` is no help here: it drops struct and enum names (`Text(...)` becomes a
//! map), and it keeps no positions. `ron::value::RawValue` keeps the exact text, and a
//! borrowed one is a slice of the source, so its offset is a pointer difference.

use ron::value::RawValue;
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// The fields of a struct-like RON value (`(a: 1)`, `Name(a: 1)`), in source order. A bare
/// name (`SwiGlu`) has none.
pub struct Fields<'a>(pub Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Fields<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a struct such as `(name: value, ...)`")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, &'de RawValue>()? {
                    out.push((k, v));
                }
                Ok(Fields(out))
            }

            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Fields(Vec::new()))
            }
        }
        d.deserialize_any(V)
    }
}

/// The elements of a RON list, each a raw value.
pub struct Items<'a>(pub Vec<&'a RawValue>);

impl<'de> Deserialize<'de> for Items<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Items<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list `[...]`")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = seq.next_element::<&'de RawValue>()? {
                    out.push(v);
                }
                Ok(Items(out))
            }
        }
        d.deserialize_seq(V)
    }
}

/// The fields of `text` (which must be a slice of the text being navigated).
pub fn fields(text: &str) -> Result<Vec<(String, &str)>, ron::error::SpannedError> {
    let f: Fields = ron::from_str(text)?;
    Ok(f.0
        .into_iter()
        .map(|(k, v)| (k, v.trim().get_ron()))
        .collect())
}

/// The elements of the list `text`.
pub fn items(text: &str) -> Result<Vec<&str>, ron::error::SpannedError> {
    let i: Items = ron::from_str(text)?;
    Ok(i.0.into_iter().map(|v| v.trim().get_ron()).collect())
}

/// Byte offset of `part` inside `whole`; `part` must be a subslice of `whole`.
pub fn offset_in(whole: &str, part: &str) -> usize {
    let (w, p) = (whole.as_ptr() as usize, part.as_ptr() as usize);
    debug_assert!(p >= w && p + part.len() <= w + whole.len());
    p - w
}

/// Skips whitespace and comments from the start of `s`; returns the number of bytes skipped.
pub fn skip_trivia(s: &str) -> usize {
    let mut i = 0;
    let b = s.as_bytes();
    loop {
        while i < b.len() && (b[i] as char).is_ascii_whitespace() {
            i += 1;
        }
        if s[i..].starts_with("//") {
            i += s[i..].find('\n').map_or(s.len() - i, |n| n + 1);
        } else if s[i..].starts_with("/*") {
            i += s[i..].find("*/").map_or(s.len() - i, |n| n + 2);
        } else {
            return i;
        }
    }
}

/// Splits `Name(params...)` or `Name` into the name and the parenthesized rest (possibly
/// empty). Returns `None` when the text does not start with an identifier.
pub fn split_variant(text: &str) -> Option<(&str, &str)> {
    let end = text
        .char_indices()
        .find(|&(i, c)| !(c == '_' || c.is_ascii_alphanumeric()) || (i == 0 && c.is_ascii_digit()))
        .map_or(text.len(), |(i, _)| i);
    if end == 0 {
        return None;
    }
    let rest = &text[end..];
    let rest = &rest[skip_trivia(rest)..];
    Some((&text[..end], rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_keep_names_order_and_offsets() {
        let src =
            "Sweep(\n  name: \"x\", // c\n  data: Text(path: \"a.txt\"),\n  seeds: [0, 1],\n)";
        let f = fields(src).unwrap();
        let names: Vec<_> = f.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["name", "data", "seeds"]);
        assert_eq!(f[1].1, "Text(path: \"a.txt\")");
        assert_eq!(&src[offset_in(src, f[2].1)..][..6], "[0, 1]");
        let inner = fields(f[1].1).unwrap();
        assert_eq!(inner[0].0, "path");
        assert_eq!(offset_in(src, inner[0].1), src.find("\"a.txt\"").unwrap());
        let list = items(f[2].1).unwrap();
        assert_eq!(list, ["0", "1"]);
        assert!(fields("SwiGlu").unwrap().is_empty());
    }

    #[test]
    fn split_variant_separates_name_and_params() {
        assert_eq!(split_variant("AdamW(lr: 1)"), Some(("AdamW", "(lr: 1)")));
        assert_eq!(split_variant("SwiGlu"), Some(("SwiGlu", "")));
        assert_eq!(
            split_variant("Mha /* x */ (heads: 2)"),
            Some(("Mha", "(heads: 2)"))
        );
        assert_eq!(split_variant("[1]"), None);
        assert_eq!(split_variant("1e-3"), None);
    }
}
