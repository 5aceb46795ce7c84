//! A task's JSONL file as items, each a list of requests: a context and a continuation whose
//! log-likelihood the model gives, tokenized as lm-evaluation-harness tokenizes them.

use std::path::Path;

use serde_json::Value;

use super::tasks::{Kind, Task};
use crate::data::{read_utf8, Tokenizer};
use crate::error::InputError;

/// One continuation to score: the tokens of context and continuation together, the last
/// `cont` of them the continuation's.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub tokens: Vec<u32>,
    pub cont: usize,
}

/// One item of a task: a request per choice (one for LAMBADA), the gold choice, and the
/// UTF-8 bytes of each choice's text (acc_norm's denominator).
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    /// The item's line in its file (1-based).
    pub line: usize,
    pub gold: usize,
    pub requests: Vec<Request>,
    pub choice_bytes: Vec<usize>,
    /// Each request's (context, continuation) as text, before tokenizing.
    pub prompts: Vec<(String, String)>,
}

/// The first `limit` items (all without one) of a task's file.
pub fn read(
    task: Task,
    file: &Path,
    limit: Option<usize>,
    tok: Tokenizer,
) -> Result<Vec<Item>, InputError> {
    let text = read_utf8(file).map_err(|e| InputError::new(format!("{}: {e}", task.name())))?;
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if limit.is_some_and(|n| items.len() >= n) {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        let at = |msg: String| {
            InputError::new(format!(
                "{}:{}: {msg} (a {} item; see ../shared/data/README.md for the fields)",
                file.display(),
                i + 1,
                task.name()
            ))
        };
        let value: Value =
            serde_json::from_str(line).map_err(|e| at(format!("not a JSON object ({e})")))?;
        let (pairs, gold, choice_bytes) = prompts(task, &value).map_err(at)?;
        items.push(Item {
            line: i + 1,
            gold,
            requests: pairs.iter().map(|(c, x)| encode_pair(tok, c, x)).collect(),
            choice_bytes,
            prompts: pairs,
        });
    }
    if items.is_empty() {
        return Err(InputError::new(format!(
            "{}: {} holds no items",
            task.name(),
            file.display()
        )));
    }
    Ok(items)
}

/// (context, continuation) pairs, the gold index and the choices' bytes of one item.
type Prompts = (Vec<(String, String)>, usize, Vec<usize>);

/// An item's prompts, as the harness's task definitions write them: a choice follows its
/// context after a space; ARC and BoolQ put "\nAnswer:" after the query.
fn prompts(task: Task, v: &Value) -> Result<Prompts, String> {
    Ok(match task.kind() {
        Kind::Choice { answer } => {
            let query = string(v, "query")?;
            let choices = strings(v, "choices")?;
            let gold = index(v, "gold", choices.len())?;
            let context = if answer {
                format!("{query}\nAnswer:")
            } else {
                query.to_string()
            };
            let bytes = choices.iter().map(|c| c.len()).collect();
            let pairs = choices
                .iter()
                .map(|c| (context.clone(), format!(" {c}")))
                .collect();
            (pairs, gold, bytes)
        }
        Kind::Partial => {
            let options = strings(v, "context_options")?;
            let cont = string(v, "continuation")?;
            let gold = index(v, "gold", options.len())?;
            let pairs = options
                .iter()
                .map(|o| (o.to_string(), format!(" {cont}")))
                .collect();
            (pairs, gold, vec![cont.len(); options.len()])
        }
        Kind::LastWord => {
            let context = string(v, "context")?;
            let cont = string(v, "continuation")?;
            (
                vec![(context.to_string(), format!(" {}", cont.trim_start()))],
                0,
                vec![cont.len()],
            )
        }
    })
}

fn string<'a>(v: &'a Value, field: &str) -> Result<&'a str, String> {
    match v.get(field) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(Value::String(_)) => Err(format!("`{field}` is empty")),
        Some(_) => Err(format!("`{field}` is not a string")),
        None => Err(format!("no field `{field}`")),
    }
}

fn strings<'a>(v: &'a Value, field: &str) -> Result<Vec<&'a str>, String> {
    let Some(Value::Array(list)) = v.get(field) else {
        return Err(match v.get(field) {
            None => format!("no field `{field}`"),
            Some(_) => format!("`{field}` is not a list of strings"),
        });
    };
    if list.len() < 2 {
        return Err(format!(
            "`{field}` lists {} choice(s); at least 2",
            list.len()
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, x)| match x {
            Value::String(s) if !s.is_empty() => Ok(s.as_str()),
            _ => Err(format!("`{field}`[{i}] is not a non-empty string")),
        })
        .collect()
}

fn index(v: &Value, field: &str, n: usize) -> Result<usize, String> {
    match v.get(field).and_then(Value::as_u64) {
        Some(g) if (g as usize) < n => Ok(g as usize),
        Some(g) => Err(format!("`{field}` is {g}, past the {n} choices")),
        None => Err(format!("`{field}` is missing or not a whole number")),
    }
}

/// Context and continuation as the harness encodes them (`_encode_pair`): trailing spaces
/// of the context move to the continuation; the continuation's tokens are those of the
/// whole text after the context's own; an empty context is the separator token.
pub fn encode_pair(tok: Tokenizer, context: &str, continuation: &str) -> Request {
    let trimmed = context.trim_end();
    let moved = &context[trimmed.len()..];
    let continuation = format!("{moved}{continuation}");
    if trimmed.is_empty() {
        let mut tokens = vec![tok.separator()];
        let cont = tok.encode(&continuation);
        let n = cont.len();
        tokens.extend(cont);
        return Request { tokens, cont: n };
    }
    let whole = tok.encode(&format!("{trimmed}{continuation}"));
    let ctx = tok.encode(trimmed).len();
    if ctx >= whole.len() {
        // A merge across the boundary swallowed the continuation: score its own tokens.
        let mut tokens = tok.encode(trimmed);
        let cont = tok.encode(&continuation);
        let n = cont.len();
        tokens.extend(cont);
        return Request { tokens, cont: n };
    }
    Request {
        cont: whole.len() - ctx,
        tokens: whole,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `lines` that is removed when the guard drops.
    struct Scratch(std::path::PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn write(lines: &str) -> (Scratch, std::path::PathBuf) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("sweep-items-{}-{n}.jsonl", std::process::id()));
        std::fs::write(&path, lines).unwrap();
        (Scratch(path.clone()), path)
    }

    #[test]
    fn arc_prompts_put_answer_after_the_query_and_a_space_before_each_choice() {
        let (_d, f) = write(
            r#"{"query": "Question: 2+2?", "choices": ["4", "five"], "gold": 0}
"#,
        );
        let items = read(Task::ArcEasy, &f, None, Tokenizer::Bytes).unwrap();
        let r = &items[0].requests;
        // Bytes: the continuation is " 4" (2 tokens) and " five" (5).
        let ctx = "Question: 2+2?\nAnswer:";
        assert_eq!(r[0].tokens, Tokenizer::Bytes.encode(&format!("{ctx} 4")));
        assert_eq!((r[0].cont, r[1].cont), (2, 5));
        assert_eq!(items[0].choice_bytes, vec![1, 4]);
        assert_eq!(items[0].gold, 0);
    }

    #[test]
    fn winogrande_scores_the_shared_continuation_after_each_option() {
        let (_d, f) = write(
            r#"{"context_options": ["Ann helped Bo so Ann", "Ann helped Bo so Bo"], "continuation": "was thanked.", "gold": 1}"#,
        );
        let items = read(Task::WinoGrande, &f, None, Tokenizer::Bytes).unwrap();
        let r = &items[0].requests;
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].cont, r[1].cont), (13, 13)); // " was thanked."
        assert_eq!(
            r[1].tokens,
            Tokenizer::Bytes.encode("Ann helped Bo so Bo was thanked.")
        );
        assert_eq!(items[0].gold, 1);
    }

    #[test]
    fn gpt2_pairs_split_where_the_harness_splits_them() {
        // "Hello world": [15496, 995]; context "Hello " loses its space to the continuation.
        let r = encode_pair(Tokenizer::Gpt2, "Hello ", "world");
        assert_eq!(r.tokens, vec![15496, 995]);
        assert_eq!(r.cont, 1);
        // An empty context is the end-of-text token.
        let r = encode_pair(Tokenizer::Gpt2, "", "Hello");
        assert_eq!(r.tokens, vec![crate::data::GPT2_EOT, 15496]);
        assert_eq!(r.cont, 1);
    }

    #[test]
    fn limit_takes_the_first_items() {
        let line = r#"{"context": "a b", "continuation": "c"}"#;
        let (_d, f) = write(&format!("{line}\n{line}\n\n{line}\n"));
        assert_eq!(
            read(Task::Lambada, &f, Some(2), Tokenizer::Bytes)
                .unwrap()
                .len(),
            2
        );
        let all = read(Task::Lambada, &f, None, Tokenizer::Bytes).unwrap();
        assert_eq!(
            all.iter().map(|i| i.line).collect::<Vec<_>>(),
            vec![1, 2, 4]
        );
        assert_eq!(all[0].requests[0].cont, 2); // " c"
    }

    #[test]
    fn malformed_items_name_the_line_and_the_field() {
        let good = r#"{"query": "q", "choices": ["a", "b"], "gold": 1}"#;
        for (bad, says) in [
            (
                r#"{"query": "q", "choices": ["a", "b"]}"#,
                "`gold` is missing",
            ),
            (
                r#"{"query": "q", "choices": ["a", "b"], "gold": 2}"#,
                "past the 2 choices",
            ),
            (r#"{"choices": ["a", "b"], "gold": 0}"#, "no field `query`"),
            (
                r#"{"query": "q", "choices": "a", "gold": 0}"#,
                "`choices` is not a list",
            ),
            (
                r#"{"query": "q", "choices": ["a", 3], "gold": 0}"#,
                "`choices`[1]",
            ),
            ("not json", "not a JSON object"),
        ] {
            let (_d, f) = write(&format!("{good}\n{bad}\n"));
            let err = read(Task::HellaSwag, &f, None, Tokenizer::Bytes)
                .unwrap_err()
                .to_string();
            assert!(err.contains(":2: ") && err.contains(says), "{bad}: {err}");
        }
        let (_d, f) = write("\n\n");
        let err = read(Task::Piqa, &f, None, Tokenizer::Bytes)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no items"), "{err}");
    }
}
