//! Log-likelihoods from a trial's model, batched on its device. Requests are sorted by
//! length and packed into batches of about `tokens` tokens (short multiple-choice prompts
//! go many to a batch), each batch as long as its longest request and padded after the
//! shorter ones: attention is causal, so padding never reaches the positions scored.

use candle_core::{DType, Device, Result, Tensor};

use super::items::Request;
use super::score::{Scored, Scorer};
use crate::model::Gpt;

/// Most rows in one batch, however short the requests.
const MAX_ROWS: usize = 256;

pub struct ModelScorer<'a> {
    pub model: &'a Gpt,
    pub device: &'a Device,
    /// The model's context: a longer request keeps its last `seq_len + 1` tokens, as the
    /// harness truncates from the left.
    pub seq_len: usize,
    /// Tokens a batch may hold (rows x length).
    pub tokens: usize,
}

/// A request cut to the model's context: inputs, targets (the inputs shifted by one) and
/// how many of the last targets are the continuation's.
fn window(r: &Request, seq_len: usize) -> (&[u32], &[u32], usize) {
    let keep = r.tokens.len().min(seq_len + 1);
    let w = &r.tokens[r.tokens.len() - keep..];
    (&w[..keep - 1], &w[1..], r.cont.min(keep - 1))
}

impl Scorer for ModelScorer<'_> {
    fn score(&mut self, requests: &[&Request]) -> Result<Vec<Scored>> {
        let mut order: Vec<usize> = (0..requests.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(window(requests[i], self.seq_len).0.len()));
        let mut out = vec![Scored::default(); requests.len()];
        let mut at = 0;
        while at < order.len() {
            let t = window(requests[order[at]], self.seq_len).0.len().max(1);
            let rows = (self.tokens / t).clamp(1, MAX_ROWS).min(order.len() - at);
            let batch = &order[at..at + rows];
            let (mut x, mut y) = (vec![0u32; rows * t], vec![0u32; rows * t]);
            for (r, &i) in batch.iter().enumerate() {
                let (inp, tgt, _) = window(requests[i], self.seq_len);
                x[r * t..r * t + inp.len()].copy_from_slice(inp);
                y[r * t..r * t + tgt.len()].copy_from_slice(tgt);
            }
            // Only the continuations' positions reach the head.
            let mut positions = Vec::new();
            for (r, &i) in batch.iter().enumerate() {
                let (inp, _, cont) = window(requests[i], self.seq_len);
                positions.extend((r * t + inp.len() - cont..r * t + inp.len()).map(|p| p as u32));
            }
            let targets: Vec<u32> = positions.iter().map(|&p| y[p as usize]).collect();
            let n = positions.len();
            let x = Tensor::from_vec(x, (rows, t), self.device)?;
            let logits = self
                .model
                .logits_at(&x, &Tensor::from_vec(positions, n, self.device)?)?;
            let targets_t = Tensor::from_vec(targets.clone(), n, self.device)?;
            let nll = components::fused::cross_entropy_rows(&logits, &targets_t)?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            let best = logits.argmax(1)?.to_vec1::<u32>()?;
            let mut k = 0;
            for &i in batch {
                let cont = window(requests[i], self.seq_len).2;
                let span = k..k + cont;
                out[i] = Scored {
                    logprob: -span.clone().map(|p| f64::from(nll[p])).sum::<f64>(),
                    greedy: span.into_iter().all(|p| best[p] == targets[p]),
                };
                k += cont;
            }
            at += rows;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Source, Sweep};

    /// A small trained-from-init model of a real sweep (bytes, 2 layers, context 16).
    fn model() -> (Gpt, usize) {
        let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/data/tinyshakespeare/input.txt");
        let text = format!(
            "Sweep(name: \"s\", seeds: [3], data: Text(path: {:?}), \
             train: (steps: 1, batch: 2, seq_len: 16), model: (d_model: 32, n_layers: 2), \
             grid: (attention: [Gqa(heads: 4, kv_heads: 2)], ffn: [Relu2], residual: [Mhc]))",
            data.display()
        );
        let sweep =
            Sweep::from_source(Source::from_text(std::path::Path::new("s.ron"), text)).unwrap();
        let m = crate::train::build(
            &sweep.trials[0],
            &sweep.trials[0].dims,
            sweep.train.precision,
            &Device::Cpu,
        )
        .unwrap();
        (m, sweep.train.seq_len)
    }

    /// One request alone, unpadded, with the log-softmax in f64 on the host.
    fn by_hand(model: &Gpt, r: &Request, seq_len: usize) -> Scored {
        let keep = r.tokens.len().min(seq_len + 1);
        let w = &r.tokens[r.tokens.len() - keep..];
        let n = keep - 1;
        let x = Tensor::from_vec(w[..n].to_vec(), (1, n), &Device::Cpu).unwrap();
        let logits: Vec<Vec<f32>> = model.logits(&x).unwrap().to_vec2().unwrap();
        let (mut logprob, mut greedy) = (0.0, true);
        for p in n - r.cont.min(n)..n {
            let row = &logits[p];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let z: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            let target = w[p + 1] as usize;
            logprob += row[target] as f64 - max - z.ln();
            let best = (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b });
            greedy &= best == target;
        }
        Scored { logprob, greedy }
    }

    #[test]
    fn batched_padded_scores_equal_each_request_scored_alone() {
        let (model, seq_len) = model();
        let tok = crate::data::Tokenizer::Bytes;
        let requests: Vec<Request> = [
            ("To be, or not", " to be"),
            ("A", " horse"),
            ("My kingdom for", " a horse!"),
            // Longer than the context (16): only its last 17 tokens are read.
            (
                "Now is the winter of our discontent made glorious",
                " summer",
            ),
            ("x", "y"),
        ]
        .iter()
        .map(|(c, x)| super::super::items::encode_pair(tok, c, x))
        .collect();
        let refs: Vec<&Request> = requests.iter().collect();
        // 40 tokens a batch: the longest (16) go two to a batch, so there are several.
        let mut scorer = ModelScorer {
            model: &model,
            device: &Device::Cpu,
            seq_len,
            tokens: 40,
        };
        let got = scorer.score(&refs).unwrap();
        for (r, g) in requests.iter().zip(&got) {
            let want = by_hand(&model, r, seq_len);
            assert!(
                (g.logprob - want.logprob).abs() < 1e-4 * want.logprob.abs().max(1.0),
                "{r:?}: {} vs {}",
                g.logprob,
                want.logprob
            );
            assert_eq!(g.greedy, want.greedy, "{r:?}");
            assert!(g.logprob < 0.0);
        }
    }
}
