//! Stream amplification (mHC paper, section 3.1, "Amax gain magnitude"): how much the residual
//! path alone can scale the stream, per sublayer and composed over depth.
//!
//! Each sublayer's residual map M (from [`registry::Probe`], averaged over the tokens of a
//! fixed batch) acts on the stream axis from the left. The forward gain is the largest
//! absolute row sum (the infinity norm: how far one output stream can grow from bounded
//! inputs); the backward gain is the largest absolute column sum (the 1-norm, the same for
//! gradients, which flow through M^T). The composite map after sublayer i is
//! M_i M_(i-1) ... M_0. The identity (plain residual) has gain 1 in both directions.

use std::collections::BTreeMap;

use candle_core::{DType, Result, Tensor, D};

/// (forward, backward) gain of a square matrix.
pub fn gains(m: &Tensor) -> Result<(f64, f64)> {
    let a = m.to_dtype(DType::F64)?.abs()?;
    let max = |t: Tensor| -> Result<f64> { t.max(0)?.to_scalar::<f64>() };
    Ok((max(a.sum(D::Minus1)?)?, max(a.sum(D::Minus2)?)?))
}

/// What one probe of a model measured.
#[derive(Debug, Default)]
pub struct Amplification {
    /// Per sublayer, in depth order: its own (forward, backward) gain.
    pub sublayer: Vec<(f64, f64)>,
    /// Per sublayer: the gains of the composite map up to and including it.
    pub composite: Vec<(f64, f64)>,
    /// Per sublayer: RMS of the stream state after it (all streams), over the embedding's.
    pub stream_rms: Vec<f64>,
    /// Per sublayer of a multi-stream scheme: (k, mean pairwise cosine of the streams,
    /// effective rank of the state) after it (streams.rs).
    pub streams: Vec<(usize, f64, f64)>,
    /// Scheme diagnostics, the largest value over the sublayers.
    pub extra: BTreeMap<&'static str, f64>,
    /// The composite map so far; `None` while every map was the identity.
    product: Option<Tensor>,
}

impl Amplification {
    /// Folds in the next sublayer's residual map (`None`: the identity) and the stream's RMS
    /// ratio after it.
    pub fn push(&mut self, map: Option<&Tensor>, rms: f64) -> Result<()> {
        match map {
            None => {
                self.sublayer.push((1.0, 1.0));
            }
            Some(m) => {
                let m = m.to_dtype(DType::F64)?;
                self.sublayer.push(gains(&m)?);
                self.product = Some(match self.product.take() {
                    None => m,
                    Some(p) => m.matmul(&p)?,
                });
            }
        }
        self.composite.push(match &self.product {
            None => (1.0, 1.0),
            Some(p) => gains(p)?,
        });
        self.stream_rms.push(rms);
        Ok(())
    }

    /// Keeps the largest value seen of a scheme diagnostic.
    pub fn note(&mut self, name: &'static str, value: f64) {
        let v = self.extra.entry(name).or_insert(value);
        *v = v.max(value);
    }

    /// The metrics, by their names in the results store (documented in the README).
    pub fn metrics(&self) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        if let Some(&(f, b)) = self.composite.last() {
            out.push(("amax/fwd".to_string(), f));
            out.push(("amax/bwd".to_string(), b));
        }
        for (i, ((f, b), (cf, cb))) in self.sublayer.iter().zip(&self.composite).enumerate() {
            out.push((format!("amax/fwd/l{i}"), *f));
            out.push((format!("amax/bwd/l{i}"), *b));
            out.push((format!("amax/fwd/composite/l{i}"), *cf));
            out.push((format!("amax/bwd/composite/l{i}"), *cb));
        }
        for (i, r) in self.stream_rms.iter().enumerate() {
            out.push((format!("stream_rms/l{i}"), *r));
        }
        if let Some(max) = self.stream_rms.iter().copied().reduce(f64::max) {
            out.push(("stream_rms/max".to_string(), max));
        }
        for &(k, cos, rank) in &self.streams {
            out.push((format!("streams/cos/l{k}"), cos));
            out.push((format!("streams/rank/l{k}"), rank));
        }
        for (name, v) in &self.extra {
            out.push((name.to_string(), *v));
        }
        out
    }
}

/// Root mean square of all values of a tensor.
pub fn rms(t: &Tensor) -> Result<f64> {
    t.to_dtype(DType::F64)?
        .sqr()?
        .mean_all()?
        .sqrt()?
        .to_scalar::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn mat(rows: [[f64; 2]; 2]) -> Tensor {
        Tensor::new(&rows, &Device::Cpu).unwrap()
    }

    #[test]
    fn gains_are_the_largest_absolute_row_and_column_sums() -> Result<()> {
        // Rows: |1| + |-2| = 3, |0.5| + |4| = 4.5. Columns: 1.5, 6.
        assert_eq!(gains(&mat([[1.0, -2.0], [0.5, 4.0]]))?, (4.5, 6.0));
        // A row-stochastic matrix has forward gain 1 exactly; its columns need not sum to 1.
        assert_eq!(gains(&mat([[0.9, 0.1], [0.6, 0.4]]))?, (1.0, 1.5));
        Ok(())
    }

    #[test]
    fn composite_gain_is_that_of_the_product_in_depth_order() -> Result<()> {
        // M0 = [[1, 1], [0, 1]], M1 = [[1, 0], [2, 1]]:
        // M1 M0 = [[1, 1], [2, 3]] -> rows 2, 5; columns 3, 4.
        // (M0 M1 = [[3, 1], [2, 1]] would give rows 4, 3 and columns 5, 2.)
        let mut a = Amplification::default();
        a.push(Some(&mat([[1.0, 1.0], [0.0, 1.0]])), 1.0)?;
        a.push(None, 1.5)?;
        a.push(Some(&mat([[1.0, 0.0], [2.0, 1.0]])), 2.0)?;
        assert_eq!(a.sublayer, vec![(2.0, 2.0), (1.0, 1.0), (3.0, 3.0)]);
        assert_eq!(a.composite, vec![(2.0, 2.0), (2.0, 2.0), (5.0, 4.0)]);
        let m = a.metrics();
        assert!(m.contains(&("amax/fwd".into(), 5.0)));
        assert!(m.contains(&("amax/bwd".into(), 4.0)));
        assert!(m.contains(&("amax/bwd/composite/l0".into(), 2.0)));
        assert!(m.contains(&("stream_rms/l1".into(), 1.5)));
        Ok(())
    }

    #[test]
    fn the_identity_everywhere_gives_gain_one() -> Result<()> {
        let mut a = Amplification::default();
        for _ in 0..4 {
            a.push(None, 1.0)?;
        }
        assert!(a
            .metrics()
            .iter()
            .filter(|(n, _)| n.starts_with("amax"))
            .all(|(_, v)| *v == 1.0));
        Ok(())
    }
}
