//! A trial's resolved configuration (the RON text the store keeps) as flat `key = value`
//! factors, for the report: `residual = Mhc`, `residual.streams = 4`, `train.steps = 300`.

use registry::Slot;

use super::raw;

/// The factors of `config`, components first (in slot order), then the data, train and
/// model sections; the seed is left out. Values are RON text as the config writes them.
/// Text that does not parse gives the factors read so far (never a panic: the DB may come
/// from another version of sweep).
pub fn factors(config: &str) -> Vec<(String, String)> {
    let Ok(fields) = raw::fields(config) else {
        return Vec::new();
    };
    let is_slot = |k: &str| Slot::ALL.iter().any(|s| s.key() == k);
    let (mut slots, mut rest): (Vec<_>, Vec<_>) = fields
        .into_iter()
        .filter(|(k, _)| k != "seed")
        .partition(|(k, _)| is_slot(k));
    slots.sort_by_key(|(k, _)| Slot::ALL.iter().position(|s| s.key() == k));
    slots.append(&mut rest);

    let mut out = Vec::new();
    for (key, value) in slots {
        // `Name(params)` or `Name`: the name, then each parameter; `(fields)`: each field.
        let (name, params) = match raw::split_variant(value) {
            Some((name, params)) => (Some(name), params),
            None if value.starts_with('(') => (None, value),
            None => (None, ""),
        };
        if let Some(name) = name {
            out.push((key.clone(), name.to_string()));
        }
        let inner = if params.is_empty() {
            Vec::new()
        } else {
            raw::fields(params).unwrap_or_default()
        };
        if name.is_none() && inner.is_empty() {
            out.push((key.clone(), value.to_string()));
        }
        for (k, v) in inner {
            out.push((format!("{key}.{k}"), v.to_string()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_config_flattens_components_first() {
        let config = "(\n    seed: 2,\n    data: Text(path:([\"a.txt\"]),tokenizer:Bytes),\n    \
                      train: (steps:300,eval_every:Some(50)),\n    model: (d_model:64),\n    \
                      attention: Gqa(heads:4,kv_heads:2),\n    ffn: SwiGlu,\n    \
                      residual: Hc(streams:4,dynamic:true),\n    optimizer: AdamW(lr:0.003),\n    \
                      schedule: Cosine,\n)";
        let f = factors(config);
        let pairs: Vec<(&str, &str)> = f.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            pairs,
            [
                ("attention", "Gqa"),
                ("attention.heads", "4"),
                ("attention.kv_heads", "2"),
                ("ffn", "SwiGlu"),
                ("residual", "Hc"),
                ("residual.streams", "4"),
                ("residual.dynamic", "true"),
                ("optimizer", "AdamW"),
                ("optimizer.lr", "0.003"),
                ("schedule", "Cosine"),
                ("data", "Text"),
                ("data.path", "([\"a.txt\"])"),
                ("data.tokenizer", "Bytes"),
                ("train.steps", "300"),
                ("train.eval_every", "Some(50)"),
                ("model.d_model", "64"),
            ]
        );
        assert!(factors("not ron (").is_empty());
    }
}
