//! Shared building blocks, written with composite candle ops so that every one of them has a
//! backward pass. candle's fused `ops::rms_norm`, `softmax_last_dim` and `rotary_emb::rope*`
//! carry no gradient (DESIGN.md): using them would silently freeze the layers below.

use candle_core::{DType, Device, Result, Tensor, D};
use registry::{Detached, Init, ParamBuilder, Role};

/// Seeded standard-normal values times `std`, for tests: candle's CPU RNG cannot be seeded,
/// and tests must be deterministic.
#[cfg(test)]
pub(crate) fn randn(seed: u64, shape: impl Into<candle_core::Shape>, std: f64) -> Result<Tensor> {
    ParamBuilder::new(seed, &Device::Cpu)
        .tensor("x", shape, Init::Normal { std }, Role::Hidden)
        .map(|t| t.detach())
}

/// `param` in the dtype of the activations `x`: parameters are f32 masters, and under mixed
/// precision the activations are bf16. The cast is part of the graph, so the gradient reaches
/// the f32 variable.
pub fn cast_like(param: &Tensor, x: &Tensor) -> Result<Tensor> {
    param.to_dtype(x.dtype())
}

/// Epsilon of every RMSNorm in the model.
pub const NORM_EPS: f64 = 1e-6;

/// RMSNorm over the last dimension without a gain: x / sqrt(mean(x^2) + eps).
/// Statistics are taken in f32 whatever the input dtype.
pub fn rms_norm(x: &Tensor) -> Result<Tensor> {
    crate::fused::rms_norm(x, None, NORM_EPS)
}

/// RMSNorm with a learned per-channel gain (initialized to 1).
#[derive(Clone, Debug)]
pub struct RmsNorm {
    gain: Tensor,
}

impl RmsNorm {
    pub fn new(dim: usize, p: &ParamBuilder) -> Result<Self> {
        let gain = p.tensor("gain", dim, Init::Const(1.0), Role::Gain)?;
        Ok(Self { gain })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::fused::rms_norm(x, Some(&self.gain), NORM_EPS)
    }

    /// The norm outside the autograd graph on the GPU, where its backward pass adds the
    /// input's gradient into the one handed over (fused/norm.rs); None on the CPU, whose
    /// composite has no such form.
    pub fn detached(&self, x: &Tensor) -> Result<Option<Detached>> {
        if !x.device().is_cuda() {
            return Ok(None);
        }
        crate::fused::rms_norm_outside(x, &self.gain, NORM_EPS as f32).map(Some)
    }
}

/// A bias-free linear layer, weight stored (out, in) as in PyTorch.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
}

impl Linear {
    pub fn new(d_in: usize, d_out: usize, std: f64, role: Role, p: &ParamBuilder) -> Result<Self> {
        let weight = p.tensor("weight", (d_out, d_in), Init::Normal { std }, role)?;
        Ok(Self { weight })
    }

    /// The (out, in) f32 weight.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// (..., in) -> (..., out). On CUDA one op with the f32 weight (fused/linear.rs); on the
    /// CPU the composite, the op's reference.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cuda() {
            return x
                .contiguous()?
                .apply_op2(&self.weight, crate::fused::FusedLinear);
        }
        let w = cast_like(&self.weight, x)?;
        if x.rank() == 2 {
            return x.matmul(&w.t()?);
        }
        let dims = x.dims();
        let d_in = dims[dims.len() - 1];
        let rows = x.elem_count() / d_in;
        let y = x.reshape((rows, d_in))?.matmul(&w.t()?)?;
        let mut out = dims.to_vec();
        *out.last_mut().expect("non-scalar input") = self.weight.dim(0)?;
        y.reshape(out)
    }
}

/// (..., C) as rows (N, C). Sublayers flatten once and apply their linear layers to the rows:
/// every reshape is a node whose gradient candle's backward pass allocates and adds anew.
pub fn rows(x: &Tensor) -> Result<Tensor> {
    let c = x.dim(candle_core::D::Minus1)?;
    x.reshape(((), c))
}

/// Rows (N, C') back to the leading dimensions of `like` (..., C).
pub fn unrows(y: &Tensor, like: &Tensor) -> Result<Tensor> {
    let mut dims = like.dims().to_vec();
    *dims.last_mut().expect("non-scalar") = y.dim(1)?;
    y.reshape(dims)
}

/// Standard deviation of hidden weights: GPT-2's 0.02.
pub const INIT_STD: f64 = 0.02;

/// Output projections feeding the residual stream get 0.02 / sqrt(2 L), as in GPT-2, so the
/// stream's variance does not grow with depth at init.
pub fn out_proj_std(n_layers: usize) -> f64 {
    INIT_STD / (2.0 * n_layers as f64).sqrt()
}

/// Softmax over the last dimension, computed in f32 and returned in the input's dtype. The
/// max is detached: subtracting it does not change the result, so it needs no gradient.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.to_dtype(dtype)
}

/// The logistic function as 0.5 (1 + tanh(x / 2)): tanh saturates where exp(-x) would
/// overflow, so neither the value nor its gradient becomes NaN for large |x|.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    ((x * 0.5)?.tanh()? + 1.0)? * 0.5
}

/// Additive causal mask (T, T): 0 on and below the diagonal, -inf above.
pub fn causal_mask(t: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (t, t), device)
}

/// Rotary position embedding tables (Su et al. 2021, arXiv 2104.09864), rotate-half layout
/// as in GPT-NeoX and Llama: channel i pairs with channel i + D/2.
#[derive(Clone, Debug)]
pub struct Rope {
    cos: Tensor, // (T, D)
    sin: Tensor, // (T, D)
}

impl Rope {
    pub fn new(head_dim: usize, max_len: usize, theta: f64, device: &Device) -> Result<Self> {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_len * head_dim);
        let mut sin = Vec::with_capacity(max_len * head_dim);
        for pos in 0..max_len {
            for i in 0..head_dim {
                let freq = theta.powf(-((i % half) as f64) / half as f64);
                let angle = pos as f64 * freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_len, head_dim), device)?,
            sin: Tensor::from_vec(sin, (max_len, head_dim), device)?,
        })
    }

    /// cos and sin of the first `t` positions stacked: (2, t, D) f32, the fused head op's table.
    pub fn table(&self, t: usize) -> Result<Tensor> {
        Tensor::stack(&[self.cos.narrow(0, 0, t)?, self.sin.narrow(0, 0, t)?], 0)
    }

    /// Rotates (B, H, T, D) queries or keys by position.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, t, d) = x.dims4()?;
        let cos = self.cos.narrow(0, 0, t)?.to_dtype(x.dtype())?;
        let sin = self.sin.narrow(0, 0, t)?.to_dtype(x.dtype())?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn rms_norm_matches_a_hand_worked_row() -> Result<()> {
        // mean of squares of (3, 4) is 12.5; 3 / sqrt(12.5) = 0.848528, 4 / sqrt(12.5) = 1.131371
        let x = Tensor::new(&[[3f32, 4.0]], &Device::Cpu)?;
        let y = v(&rms_norm(&x)?);
        assert!((y[0] - 0.848_528).abs() < 1e-5 && (y[1] - 1.131_371).abs() < 1e-5);
        Ok(())
    }

    #[test]
    fn rms_norm_gradient_matches_finite_differences() -> Result<()> {
        // Loss = sum(w * rmsnorm(x)) with fixed random-looking w; compare d loss / dx with
        // central differences in f64.
        let xs = [0.3f64, -1.2, 2.0, 0.7, -0.4];
        let w = [0.5f64, -1.0, 0.25, 2.0, 1.5];
        let loss = |x: &[f64]| {
            let ms = x.iter().map(|a| a * a).sum::<f64>() / x.len() as f64;
            let r = (ms + NORM_EPS).sqrt();
            x.iter().zip(w).map(|(a, b)| a / r * b).sum::<f64>()
        };
        let x = candle_core::Var::new(&xs.map(|a| a as f32), &Device::Cpu)?;
        let wt = Tensor::new(&w.map(|a| a as f32), &Device::Cpu)?;
        let l = rms_norm(x.as_tensor())?.mul(&wt)?.sum_all()?;
        let g = v(l.backward()?.get(x.as_tensor()).expect("gradient"));
        for i in 0..xs.len() {
            let (mut up, mut down) = (xs, xs);
            up[i] += 1e-5;
            down[i] -= 1e-5;
            let fd = (loss(&up) - loss(&down)) / 2e-5;
            assert!((g[i] as f64 - fd).abs() < 1e-4, "dx[{i}]: {} vs {fd}", g[i]);
        }
        Ok(())
    }

    #[test]
    fn softmax_rows_sum_to_one_and_survive_large_logits() -> Result<()> {
        let x = Tensor::new(&[[1000f32, 1001.0, 999.0], [0.0, 0.0, 0.0]], &Device::Cpu)?;
        let y = softmax(&x)?.to_vec2::<f32>()?;
        // e^1 / (1 + e + e^-1) = 0.665241, hand-worked.
        assert!((y[0][1] - 0.665_241).abs() < 1e-5);
        assert!((y[1][0] - 1.0 / 3.0).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn rope_preserves_norms_and_leaves_position_zero_alone() -> Result<()> {
        let rope = Rope::new(4, 8, 10_000.0, &Device::Cpu)?;
        let x = Tensor::new(&[1f32, 2.0, 3.0, 4.0], &Device::Cpu)?
            .reshape((1, 1, 1, 4))?
            .repeat((1, 1, 8, 1))?;
        let y = rope.apply(&x)?;
        let rows = y.reshape((8, 4))?.to_vec2::<f32>()?;
        assert_eq!(rows[0], vec![1.0, 2.0, 3.0, 4.0]);
        for r in rows {
            let n: f32 = r.iter().map(|a| a * a).sum();
            assert!((n - 30.0).abs() < 1e-4, "norm^2 {n}");
        }
        Ok(())
    }

    #[test]
    fn linear_maps_the_last_dimension() -> Result<()> {
        let p = ParamBuilder::new(0, &Device::Cpu);
        let lin = Linear::new(3, 2, 1.0, Role::Hidden, &p)?;
        let x = Tensor::ones((2, 5, 3), DType::F32, &Device::Cpu)?;
        let y = lin.forward(&x)?;
        assert_eq!(y.dims(), &[2, 5, 2]);
        // All-ones input: each output is the row sum of the weight.
        let w = p.params()[0].var.as_tensor().sum(1)?.to_vec1::<f32>()?;
        let y0 = y.get(0)?.get(0)?.to_vec1::<f32>()?;
        assert!((y0[0] - w[0]).abs() < 1e-6 && (y0[1] - w[1]).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn rope_scores_depend_only_on_the_offset() -> Result<()> {
        // The same query and key vectors at every position: after rotation the score
        // q_m . k_n is a function of m - n alone (the rotations compose: R_m^T R_n = R_(n-m)).
        let (t, d) = (12, 8);
        let rope = Rope::new(d, t, 100.0, &Device::Cpu)?;
        let at_all = |v: &[f32]| -> Result<Tensor> {
            Tensor::new(v, &Device::Cpu)?
                .reshape((1, 1, 1, d))?
                .repeat((1, 1, t, 1))
        };
        let q = rope.apply(&at_all(&[0.3, -1.0, 0.5, 2.0, 1.0, 0.1, -0.7, 0.4])?)?;
        let k = rope.apply(&at_all(&[1.5, 0.2, -0.3, 0.8, -1.1, 0.6, 0.9, -0.2])?)?;
        let s = q
            .reshape((t, d))?
            .matmul(&k.reshape((t, d))?.t()?)?
            .to_vec2::<f32>()?;
        for m in 0..t {
            for n in 0..t {
                let (m0, n0) = if m >= n { (m - n, 0) } else { (0, n - m) };
                assert!(
                    (s[m][n] - s[m0][n0]).abs() < 1e-4,
                    "({m},{n}) vs ({m0},{n0})"
                );
            }
        }
        // ... and it does depend on the offset.
        assert!((s[1][0] - s[0][0]).abs() > 1e-3);
        Ok(())
    }

    #[test]
    fn sigmoid_matches_its_definition_and_saturates() -> Result<()> {
        let x = Tensor::new(&[0f32, 3.0, -3.0, 200.0, -200.0], &Device::Cpu)?;
        let y = sigmoid(&x)?.to_vec1::<f32>()?;
        let want = [0.5, 0.952_574_1, 0.047_425_87, 1.0, 0.0];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
        Ok(())
    }
}
