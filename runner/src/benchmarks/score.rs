//! From log-likelihoods to a task's metrics, as lm-evaluation-harness computes them:
//! multiple choice by the largest summed log-likelihood (acc) and by the largest
//! log-likelihood per byte of the choice (acc_norm), the first choice winning a tie;
//! WinoGrande by the continuation's log-likelihood after each option; LAMBADA by whether
//! greedy decoding reproduces the last word, with the perplexity of it.

use super::items::{Item, Request};
use super::tasks::{Kind, Task};

/// What a scorer finds for one request: the continuation's summed log-likelihood (nats),
/// and whether every continuation token is the model's most likely next token.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Scored {
    pub logprob: f64,
    pub greedy: bool,
}

/// Computes log-likelihoods: a model on its device (scorer.rs), or a fixed table in tests.
pub trait Scorer {
    /// One [`Scored`] per request, in order.
    fn score(&mut self, requests: &[&Request]) -> candle_core::Result<Vec<Scored>>;
}

/// Counts over scored items; counts of several ranks add up.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Tally {
    pub items: usize,
    pub correct: usize,
    pub correct_norm: usize,
    /// Sum over items of the gold continuation's log-likelihood (LAMBADA's perplexity).
    pub logprob: f64,
}

/// The index of the largest value, the first of equal ones (numpy's argmax).
fn argmax(xs: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, x) in xs.enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    best.0
}

/// The choice an item's scores pick by summed log-likelihood, and by log-likelihood per byte
/// of the choice where the task has acc_norm (multiple choice). LAMBADA's one request is
/// choice 0.
pub fn choices(task: Task, item: &Item, scores: &[Scored]) -> (usize, Option<usize>) {
    let acc = argmax(scores.iter().map(|s| s.logprob));
    let norm = matches!(task.kind(), Kind::Choice { .. }).then(|| {
        argmax(
            scores
                .iter()
                .zip(&item.choice_bytes)
                .map(|(s, &n)| s.logprob / n.max(1) as f64),
        )
    });
    (acc, norm)
}

impl Tally {
    /// Adds one item with the scores of its requests.
    pub fn add(&mut self, task: Task, item: &Item, scores: &[Scored]) {
        self.items += 1;
        let (acc, norm) = choices(task, item, scores);
        match task.kind() {
            Kind::LastWord => {
                self.correct += usize::from(scores[0].greedy);
                self.logprob += scores[0].logprob;
            }
            _ => {
                self.correct += usize::from(acc == item.gold);
                self.correct_norm += usize::from(norm == Some(item.gold));
            }
        }
    }

    pub fn merge(&mut self, o: &Tally) {
        self.items += o.items;
        self.correct += o.correct;
        self.correct_norm += o.correct_norm;
        self.logprob += o.logprob;
    }

    /// (metric, value): acc and acc_norm for multiple choice, acc for WinoGrande, acc and
    /// perplexity for LAMBADA; and the number of items.
    pub fn metrics(&self, task: Task) -> Vec<(&'static str, f64)> {
        let n = self.items.max(1) as f64;
        let mut out = vec![("acc", self.correct as f64 / n)];
        match task.kind() {
            Kind::Choice { .. } => out.push(("acc_norm", self.correct_norm as f64 / n)),
            Kind::Partial => {}
            Kind::LastWord => out.push(("ppl", (-self.logprob / n).exp())),
        }
        out.push(("items", self.items as f64));
        out
    }

    /// As f32 values for a sum over ranks (counts are exact in f32 up to 2^24).
    pub fn to_vec(self) -> Vec<f32> {
        vec![
            self.items as f32,
            self.correct as f32,
            self.correct_norm as f32,
            self.logprob as f32,
        ]
    }

    pub fn from_slice(v: &[f32]) -> Self {
        Self {
            items: v[0].round() as usize,
            correct: v[1].round() as usize,
            correct_norm: v[2].round() as usize,
            logprob: f64::from(v[3]),
        }
    }
}

/// Scores the items that `mine` picks (by index) with one call of the scorer, which
/// batches them as it likes.
pub fn tally(
    task: Task,
    items: &[Item],
    scorer: &mut dyn Scorer,
    mine: impl Fn(usize) -> bool,
) -> candle_core::Result<Tally> {
    let picked: Vec<&Item> = items
        .iter()
        .enumerate()
        .filter(|(i, _)| mine(*i))
        .map(|(_, it)| it)
        .collect();
    let requests: Vec<&Request> = picked.iter().flat_map(|it| &it.requests).collect();
    let scores = scorer.score(&requests)?;
    let mut t = Tally::default();
    let mut at = 0;
    for it in picked {
        let n = it.requests.len();
        t.add(task, it, &scores[at..at + n]);
        at += n;
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Log-likelihoods by construction: request k of the batch scores table[k].
    struct Table(Vec<Scored>);

    impl Scorer for Table {
        fn score(&mut self, requests: &[&Request]) -> candle_core::Result<Vec<Scored>> {
            assert_eq!(requests.len(), self.0.len());
            Ok(self.0.clone())
        }
    }

    fn item(gold: usize, bytes: &[usize]) -> Item {
        Item {
            line: 1,
            gold,
            requests: bytes
                .iter()
                .map(|_| Request {
                    tokens: vec![1, 2],
                    cont: 1,
                })
                .collect(),
            choice_bytes: bytes.to_vec(),
            prompts: Vec::new(),
        }
    }

    fn lp(xs: &[f64]) -> Vec<Scored> {
        xs.iter()
            .map(|&logprob| Scored {
                logprob,
                greedy: false,
            })
            .collect()
    }

    #[test]
    fn acc_takes_the_summed_log_likelihood_and_acc_norm_the_per_byte_one() {
        // Item 1: choices of 2 and 10 bytes with log-likelihoods -4 and -6: acc picks 0
        // (-4 > -6), acc_norm picks 1 (-0.6 per byte > -2). Gold 1: acc wrong, norm right.
        // Item 2: -1, -1, -3 over 1, 1, 1 bytes: a tie goes to the first choice (gold 0).
        let items = [item(1, &[2, 10]), item(0, &[1, 1, 1])];
        let mut s = Table(lp(&[-4.0, -6.0, -1.0, -1.0, -3.0]));
        let t = tally(Task::HellaSwag, &items, &mut s, |_| true).unwrap();
        assert_eq!((t.items, t.correct, t.correct_norm), (2, 1, 2));
        let m = t.metrics(Task::HellaSwag);
        assert_eq!(m, vec![("acc", 0.5), ("acc_norm", 1.0), ("items", 2.0)]);
    }

    #[test]
    fn winogrande_reports_acc_only() {
        let items = [item(1, &[5, 5]), item(1, &[5, 5])];
        let mut s = Table(lp(&[-2.0, -1.0, -1.0, -2.0]));
        let t = tally(Task::WinoGrande, &items, &mut s, |_| true).unwrap();
        assert_eq!(
            t.metrics(Task::WinoGrande),
            vec![("acc", 0.5), ("items", 2.0)]
        );
    }

    #[test]
    fn lambada_counts_greedy_hits_and_takes_the_perplexity_of_the_last_words() {
        let items = [item(0, &[3]), item(0, &[4])];
        let mut s = Table(vec![
            Scored {
                logprob: -1.0,
                greedy: true,
            },
            Scored {
                logprob: -3.0,
                greedy: false,
            },
        ]);
        let t = tally(Task::Lambada, &items, &mut s, |_| true).unwrap();
        let m = t.metrics(Task::Lambada);
        assert_eq!(m[0], ("acc", 0.5));
        // exp(-(-1 - 3) / 2) = e^2.
        assert!((m[1].1 - 2f64.exp()).abs() < 1e-12 && m[1].0 == "ppl");
    }

    #[test]
    fn ranks_tally_their_own_items_and_the_sums_are_the_whole() {
        let items: Vec<Item> = (0..5).map(|i| item(i % 2, &[1, 1])).collect();
        // Choice 0 always wins: items with gold 0 (0, 2, 4) are right.
        let score = |rank: usize| {
            let n = (0..5).filter(|i| i % 2 == rank).count();
            let mut s = Table(lp(&[-1.0, -2.0].repeat(n)));
            tally(Task::Piqa, &items, &mut s, |i| i % 2 == rank).unwrap()
        };
        let mut all = Tally::from_slice(&score(0).to_vec());
        all.merge(&Tally::from_slice(&score(1).to_vec()));
        assert_eq!((all.items, all.correct, all.correct_norm), (5, 3, 3));
    }
}
