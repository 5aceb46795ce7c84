use super::*;
use crate::nn::randn;
use candle_core::{Device, Var};
use registry::{Backward, Detached, Grads};

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let a = a.to_dtype(DType::F32)?;
    let b = b.to_dtype(DType::F32)?;
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// The fused op's value and gradient next to the composite one's, for loss = sum(W * f(x)).
fn both_ways(
    x: &Tensor,
    fused: &dyn Fn(&Tensor) -> Result<Tensor>,
    composite: &dyn Fn(&Tensor) -> Result<Tensor>,
    seed: u64,
) -> Result<[(Tensor, Tensor); 2]> {
    let mut out = Vec::new();
    for f in [fused, composite] {
        let v = Var::from_tensor(x)?;
        let y = f(v.as_tensor())?;
        let w = randn(seed, y.shape(), 1.0)?.to_dtype(y.dtype())?;
        let g = (y.to_dtype(DType::F32)? * w.to_dtype(DType::F32)?)?
            .sum_all()?
            .backward()?;
        let grad = g.get(v.as_tensor()).expect("a gradient").clone();
        out.push((y, grad));
    }
    let b = out.pop().unwrap();
    let a = out.pop().unwrap();
    Ok([a, b])
}

#[test]
fn causal_softmax_op_matches_the_composite_forward_and_backward() -> Result<()> {
    // Square (self-attention) and more keys than queries; 7 keys leave a partial warp.
    for (shape, seed) in [((2, 3, 7, 7), 1), ((1, 2, 3, 7), 2)] {
        let x = (randn(seed, shape, 1.0)? * 3.0)?;
        let scale = 0.37;
        let [(y1, g1), (y2, g2)] = both_ways(
            &x,
            &|x| x.apply_op1(CausalSoftmax { scale }),
            &|x| causal_softmax(x, scale),
            seed + 10,
        )?;
        assert!(max_diff(&y1, &y2)? < 1e-6, "{shape:?}");
        assert!(max_diff(&g1, &g2)? < 1e-6, "{shape:?}");
    }
    Ok(())
}

#[test]
fn causal_softmax_sees_only_earlier_keys() -> Result<()> {
    // Equal scores: query i spreads evenly over keys 0..=i, nothing after.
    let x = Tensor::zeros((1, 1, 3, 3), DType::F32, &Device::Cpu)?;
    let p = x.apply_op1(CausalSoftmax { scale: 1.0 })?;
    let rows = p.reshape((3, 3))?.to_vec2::<f32>()?;
    let third = 1.0 / 3.0;
    let want = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [third, third, third]];
    for (r, w) in rows.iter().zip(want) {
        for (a, b) in r.iter().zip(w) {
            assert!((a - b).abs() < 1e-7, "{rows:?}");
        }
    }
    Ok(())
}

#[test]
fn causal_softmax_op_in_bf16_agrees_with_f32_to_its_rounding() -> Result<()> {
    let x = randn(4, (2, 2, 9, 9), 2.0)?;
    let f32_p = x.apply_op1(CausalSoftmax { scale: 0.5 })?;
    let bf16_p = x
        .to_dtype(DType::BF16)?
        .apply_op1(CausalSoftmax { scale: 0.5 })?;
    assert_eq!(bf16_p.dtype(), DType::BF16);
    // bf16 keeps 8 significant bits: probabilities <= 1 are off by at most 2^-8 (plus the
    // inputs' own rounding, amplified a little by exp).
    assert!(max_diff(&f32_p, &bf16_p)? < 1.5e-2);
    Ok(())
}

#[test]
fn cross_entropy_op_matches_the_composite_forward_and_backward() -> Result<()> {
    let logits = (randn(5, (6, 11), 1.0)? * 4.0)?;
    let targets = Tensor::new(&[0u32, 10, 3, 3, 7, 1], &Device::Cpu)?;
    let [(l1, g1), (l2, g2)] = both_ways(
        &logits,
        &|x| x.apply_op2(&targets, CrossEntropy),
        &|x| cross_entropy_rows(x, &targets),
        6,
    )?;
    assert_eq!(l1.dims(), &[6]);
    assert!(max_diff(&l1, &l2)? < 1e-5);
    assert!(max_diff(&g1, &g2)? < 1e-6);
    Ok(())
}

#[test]
fn cross_entropy_op_matches_a_hand_worked_case() -> Result<()> {
    // Row 1: logits (0, ln 3), target 1: -ln(3/4) = 0.287682; row 2: (5, 5): ln 2.
    // d/dx of row 1 = softmax - onehot = (1/4, 3/4 - 1).
    let x = Var::new(&[[0f32, 3f32.ln()], [5.0, 5.0]], &Device::Cpu)?;
    let t = Tensor::new(&[1u32, 0], &Device::Cpu)?;
    let l = x.as_tensor().apply_op2(&t, CrossEntropy)?;
    let v = l.to_vec1::<f32>()?;
    assert!((v[0] - 0.287_682).abs() < 1e-6 && (v[1] - std::f32::consts::LN_2).abs() < 1e-6);
    let g = l.sum_all()?.backward()?;
    let g = g.get(x.as_tensor()).unwrap().to_vec2::<f32>()?;
    assert!((g[0][0] - 0.25).abs() < 1e-6 && (g[0][1] + 0.25).abs() < 1e-6);
    assert!((g[1][0] + 0.5).abs() < 1e-6 && (g[1][1] - 0.5).abs() < 1e-6);
    Ok(())
}

/// The first GPU, or None (said on stderr) where a `cuda` build runs without one.
#[cfg(feature = "cuda")]
fn gpu() -> Option<Device> {
    let gpu = Device::new_cuda(0).ok();
    if gpu.is_none() {
        eprintln!("skipped: no CUDA device");
    }
    gpu
}

/// On a GPU (a build with `cuda`, run where one is): the CUDA kernels against the CPU ops at
/// the sizes training uses, f32 and bf16.
#[cfg(feature = "cuda")]
#[test]
fn cuda_kernels_match_the_cpu_ops() -> Result<()> {
    let Some(gpu) = gpu() else {
        return Ok(());
    };
    for dtype in [DType::F32, DType::BF16] {
        let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
        // Attention scores: 1024 keys (several elements per thread), and 77 (a partial warp).
        for (shape, seed) in [((2, 3, 1024, 1024), 1), ((2, 2, 77, 77), 2)] {
            let x = (randn(seed, shape, 1.0)? * 3.0)?.to_dtype(dtype)?;
            let w = randn(seed + 1, shape, 1.0)?.to_dtype(dtype)?;
            let run = |d: &Device| -> Result<(Tensor, Tensor)> {
                let v = Var::from_tensor(&x.to_device(d)?)?;
                let p = v.as_tensor().apply_op1(CausalSoftmax { scale: 0.125 })?;
                let l =
                    (p.to_dtype(DType::F32)? * w.to_device(d)?.to_dtype(DType::F32)?)?.sum_all()?;
                let g = l.backward()?.get(v.as_tensor()).unwrap().clone();
                Ok((p.to_device(&Device::Cpu)?, g.to_device(&Device::Cpu)?))
            };
            let ((p1, g1), (p2, g2)) = (run(&Device::Cpu)?, run(&gpu)?);
            assert!(max_diff(&p1, &p2)? < tol, "{dtype:?} {shape:?} softmax");
            assert!(
                max_diff(&g1, &g2)? < tol,
                "{dtype:?} {shape:?} softmax grad"
            );
        }
        // The GPT-2 vocabulary: 50304 logits a row (held in registers), 256 (bytes, few
        // threads) and 1001 (no whole number of packs: the looping path).
        for (rows, v) in [(64, 50304), (9, 256), (7, 1001)] {
            let logits = (randn(3, (rows, v), 1.0)? * 2.0)?.to_dtype(dtype)?;
            let targets: Vec<u32> = (0..rows as u32).map(|i| (i * 7919) % v as u32).collect();
            let t = Tensor::new(targets.as_slice(), &Device::Cpu)?;
            let run = |d: &Device| -> Result<(Tensor, Tensor)> {
                let x = Var::from_tensor(&logits.to_device(d)?)?;
                let l = x.as_tensor().apply_op2(&t.to_device(d)?, CrossEntropy)?;
                let g = l.sum_all()?.backward()?.get(x.as_tensor()).unwrap().clone();
                Ok((l.to_device(&Device::Cpu)?, g.to_device(&Device::Cpu)?))
            };
            let ((l1, g1), (l2, g2)) = (run(&Device::Cpu)?, run(&gpu)?);
            assert!(max_diff(&l1, &l2)? < 1e-3, "{dtype:?} {v} cross-entropy");
            // The target's entry is p - 1, near -1: bf16 keeps it to 2^-8.
            let gtol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
            assert!(
                max_diff(&g1, &g2)? < gtol,
                "{dtype:?} {v} cross-entropy grad"
            );
        }
        // RMSNorm: model rows (768) with a gain, and head rows (64) without.
        // 17,000 rows: a partial tile of the gain's kernel and blocks taking several tiles.
        // (300, 100): rows of no whole number of 16-byte packs, read a value at a time.
        for (shape, gained) in [
            ((512, 768), true),
            ((4096, 64), false),
            ((17000, 256), true),
            ((300, 100), true),
        ] {
            let x = randn(4, shape, 1.0)?.to_dtype(dtype)?;
            let gain = randn(5, shape.1, 1.0)?;
            let w = randn(6, shape, 1.0)?;
            let run = |d: &Device| -> Result<Vec<Tensor>> {
                let v = Var::from_tensor(&x.to_device(d)?)?;
                let g = Var::from_tensor(&gain.to_device(d)?)?;
                let y = if gained {
                    v.as_tensor()
                        .apply_op2(g.as_tensor(), RmsNormGain { eps: 1e-6 })?
                } else {
                    v.as_tensor().apply_op1(RmsNormPlain { eps: 1e-6 })?
                };
                let l = (y.to_dtype(DType::F32)? * w.to_device(d)?)?.sum_all()?;
                let grads = l.backward()?;
                let mut out = vec![y, grads.get(v.as_tensor()).unwrap().clone()];
                if gained {
                    out.push(grads.get(g.as_tensor()).unwrap().clone());
                }
                out.into_iter().map(|t| t.to_device(&Device::Cpu)).collect()
            };
            for (i, (a, b)) in run(&Device::Cpu)?.iter().zip(run(&gpu)?).enumerate() {
                // The gain's gradient sums every row (up to 17,000, sums of magnitude ~500):
                // the CPU adds them in order in f32, the kernel by tiles and blocks, so the two
                // differ by f32's rounding of long sums, about 1e-6 of their size.
                // Relative to the largest value: bf16 rounds values of 4 to 8 by 2^-5.
                let scale = a
                    .to_dtype(DType::F32)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f32>()?;
                let d = max_diff(a, &b)? / (1.0 + scale);
                assert!(d < tol, "{dtype:?} {shape:?} rms norm #{i}: {d}");
            }
        }
        // Activations over an MLP's hidden width; the kernels move 16-byte packs, and the
        // second shape's widths (3070, SwiGLU's 1535) are no multiple of a pack: the
        // one-at-a-time paths and an element-wise tail.
        let shapes = [(512usize, 3072usize), (511, 3070)];
        for (kind, (rows, cols)) in [Kind::GeluErf, Kind::Relu2, Kind::SwiGlu]
            .into_iter()
            .flat_map(|k| shapes.map(|s| (k, s)))
        {
            let x = (randn(9, (rows, cols), 1.0)? * 2.0)?.to_dtype(dtype)?;
            let width = if kind.gated() { cols / 2 } else { cols };
            let w = randn(10, (rows, width), 1.0)?;
            let run = |d: &Device| -> Result<(Tensor, Tensor)> {
                let v = Var::from_tensor(&x.to_device(d)?)?;
                let y = v.as_tensor().apply_op1(Activation(kind))?;
                let l = (y.to_dtype(DType::F32)? * w.to_device(d)?)?.sum_all()?;
                let g = l
                    .backward()?
                    .get(v.as_tensor())
                    .unwrap()
                    .to_device(&Device::Cpu)?;
                Ok((y.to_device(&Device::Cpu)?, g))
            };
            let ((y1, g1), (y2, g2)) = (run(&Device::Cpu)?, run(&gpu)?);
            // Values up to ~16 (relu2 of 4): bf16's 2^-8 relative is 0.06 there.
            let atol = if dtype == DType::F32 { 1e-4 } else { 0.1 };
            assert!(
                max_diff(&y1, &y2)? < atol,
                "{dtype:?} {kind:?} {rows}x{cols}"
            );
            assert!(
                max_diff(&g1, &g2)? < atol,
                "{dtype:?} {kind:?} {rows}x{cols} grad"
            );
        }
        // Attention heads at the benchmark's shape per sequence: 12 heads of 64, 1024 positions.
        let rope = crate::nn::Rope::new(64, 1024, 10_000.0, &Device::Cpu)?;
        let y = randn(11, (2, 1024, 768), 1.0)?.to_dtype(dtype)?;
        let w = randn(12, (2, 12, 1024, 64), 1.0)?;
        for norm in [true, false] {
            let op = HeadPrep {
                seq: 1024,
                heads: 12,
                norm,
                eps: 1e-6,
            };
            let run = |d: &Device| -> Result<(Tensor, Tensor)> {
                let v = Var::from_tensor(&y.to_device(d)?)?;
                let h = v
                    .as_tensor()
                    .apply_op2(&rope.table(1024)?.to_device(d)?, op)?;
                let l = (h.to_dtype(DType::F32)? * w.to_device(d)?)?.sum_all()?;
                let g = l
                    .backward()?
                    .get(v.as_tensor())
                    .unwrap()
                    .to_device(&Device::Cpu)?;
                Ok((h.to_device(&Device::Cpu)?, g))
            };
            let ((h1, g1), (h2, g2)) = (run(&Device::Cpu)?, run(&gpu)?);
            let atol = if dtype == DType::F32 { 1e-4 } else { 5e-2 };
            assert!(max_diff(&h1, &h2)? < atol, "{dtype:?} heads norm {norm}");
            assert!(
                max_diff(&g1, &g2)? < atol,
                "{dtype:?} heads grad norm {norm}"
            );
        }
        // The attention core at 1024 positions.
        let qkv: Vec<Tensor> = (0..3)
            .map(|i| (randn(30 + i, (2, 4, 1024, 64), 1.0)? * 0.5)?.to_dtype(dtype))
            .collect::<Result<_>>()?;
        let w = randn(33, (2, 4, 1024, 64), 1.0)?;
        let run = |d: &Device| -> Result<Vec<Tensor>> {
            let vars: Vec<Var> = qkv
                .iter()
                .map(|x| Var::from_tensor(&x.to_device(d)?))
                .collect::<Result<_>>()?;
            let [q, k, v] = [0, 1, 2].map(|i| vars[i].as_tensor());
            let y = q.apply_op3(
                k,
                v,
                CausalAttention {
                    scale: 0.125,
                    rows: false,
                },
            )?;
            let grads = (y.to_dtype(DType::F32)? * w.to_device(d)?)?
                .sum_all()?
                .backward()?;
            let mut out = vec![y];
            out.extend([q, k, v].map(|x| grads.get(x).unwrap().clone()));
            out.into_iter().map(|t| t.to_device(&Device::Cpu)).collect()
        };
        for (i, (a, b)) in run(&Device::Cpu)?.iter().zip(run(&gpu)?).enumerate() {
            assert!(max_diff(a, &b)? < 10.0 * tol, "{dtype:?} attention #{i}");
        }
        // The same with V and the output as rows (B T, H hd).
        let v_rows = qkv[2]
            .transpose(1, 2)?
            .contiguous()?
            .reshape((2 * 1024, 4 * 64))?;
        let w_rows = w
            .transpose(1, 2)?
            .contiguous()?
            .reshape((2 * 1024, 4 * 64))?;
        let run = |d: &Device| -> Result<Vec<Tensor>> {
            let vars: Vec<Var> = [&qkv[0], &qkv[1], &v_rows]
                .iter()
                .map(|x| Var::from_tensor(&x.to_device(d)?))
                .collect::<Result<_>>()?;
            let [q, k, v] = [0, 1, 2].map(|i| vars[i].as_tensor());
            let y = q.apply_op3(
                k,
                v,
                CausalAttention {
                    scale: 0.125,
                    rows: true,
                },
            )?;
            let l = (y.to_dtype(DType::F32)? * w_rows.to_device(d)?)?.sum_all()?;
            let grads = l.backward()?;
            let mut out = vec![y];
            out.extend([q, k, v].map(|x| grads.get(x).unwrap().clone()));
            out.into_iter().map(|t| t.to_device(&Device::Cpu)).collect()
        };
        for (i, (a, b)) in run(&Device::Cpu)?.iter().zip(run(&gpu)?).enumerate() {
            assert!(
                max_diff(a, &b)? < 10.0 * tol,
                "{dtype:?} attention on rows #{i}"
            );
        }
        // Four-stream mixing at the model's width (the kernels for n = 4), three streams
        // over 77 tokens (the kernels for any n; a partial block of the per-warp sums), and
        // a width of 7, which no 16-byte piece divides (one value a thread).
        for (b, t, n, c) in [(2, 256, 4, 768), (1, 77, 3, 200), (1, 5, 3, 7)] {
            let st = randn(50, (b, t, n, c), 1.0)?.to_dtype(dtype)?;
            let pre = randn(51, (b, t, n), 1.0)?;
            let coef = randn(52, (b, t, n, n + 1), 1.0)?;
            let w = randn(53, (b, t, n, c), 1.0)?;
            let run = |d: &Device| -> Result<Vec<Tensor>> {
                let vs: Vec<Var> = [&st, &pre, &coef]
                    .iter()
                    .map(|x| Var::from_tensor(&x.to_device(d)?))
                    .collect::<Result<_>>()?;
                let h = vs[0]
                    .as_tensor()
                    .apply_op2(vs[1].as_tensor(), PreMix::default())?;
                let y = vs[0]
                    .as_tensor()
                    .apply_op3(vs[2].as_tensor(), &h, PostMix::default())?;
                let grads = (y.to_dtype(DType::F32)? * w.to_device(d)?)?
                    .sum_all()?
                    .backward()?;
                let mut out = vec![y];
                out.extend(vs.iter().map(|v| grads.get(v.as_tensor()).unwrap().clone()));
                out.into_iter().map(|t| t.to_device(&Device::Cpu)).collect()
            };
            for (i, (a, b)) in run(&Device::Cpu)?.iter().zip(run(&gpu)?).enumerate() {
                // Coefficient gradients sum 768 products: scale the tolerance with them.
                let scale = if i >= 2 { 100.0 } else { 10.0 };
                let rel = max_diff(a, &b)?
                    / (1.0
                        + a.abs()?
                            .max_all()?
                            .to_dtype(DType::F32)?
                            .to_scalar::<f32>()?);
                assert!(
                    rel < tol * scale,
                    "{dtype:?} {n} streams, mixing #{i}: {rel}"
                );
            }
        }
        // Sinkhorn over a batch of tokens' 4 x 4 logits (always f32).
        let logits = (randn(70, (16384, 4, 4), 1.0)? * 3.0)?;
        let w = randn(71, (16384, 4, 4), 1.0)?;
        let run = |d: &Device| -> Result<(Tensor, Tensor)> {
            let v = Var::from_tensor(&logits.to_device(d)?)?;
            let y = v.as_tensor().apply_op1(Sinkhorn { iters: 20 })?;
            let g = (&y * w.to_device(d)?)?.sum_all()?.backward()?;
            let g = g.get(v.as_tensor()).unwrap().to_device(&Device::Cpu)?;
            Ok((y.to_device(&Device::Cpu)?, g))
        };
        let ((y1, g1), (y2, g2)) = (run(&Device::Cpu)?, run(&gpu)?);
        assert!(
            max_diff(&y1, &y2)? < 1e-5 && max_diff(&g1, &g2)? < 1e-4,
            "sinkhorn"
        );
        // AdamW's in-place update, two steps.
        let run = |d: &Device| -> Result<Vec<Tensor>> {
            let g = randn(80, 100_000, 1.0)?.to_device(d)?;
            let w = randn(81, 100_000, 1.0)?.to_device(d)?;
            let (m, v) = (w.zeros_like()?, w.zeros_like()?);
            let op = |what, p| AdamUpdate { what, p };
            for t in 1..=2 {
                let (b1, b2) = (1.0 - 0.9f32.powi(t), 1.0 - 0.95f32.powi(t));
                m.inplace_op2(&g, &op(AdamPart::FirstMoment, [0.9, 0.1, 0.0, 0.0, 0.0]))?;
                v.inplace_op2(&g, &op(AdamPart::SecondMoment, [0.95, 0.05, 0.0, 0.0, 0.0]))?;
                w.inplace_op3(&m, &v, &op(AdamPart::Weight, [0.999, 1e-3, b1, b2, 1e-8]))?;
            }
            [m, v, w]
                .iter()
                .map(|t| t.to_device(&Device::Cpu))
                .collect()
        };
        for (i, (a, b)) in run(&Device::Cpu)?.iter().zip(run(&gpu)?).enumerate() {
            assert!(max_diff(a, &b)? < 1e-6, "adam #{i}");
        }
        // The whole MLP at the model's width, two-matrix and SwiGLU, from f32 master weights
        // as training passes them; and a linear layer on its own.
        let x = randn(110, (2, 512, 768), 1.0)?.to_dtype(dtype)?;
        let w = randn(113, (2, 512, 768), 1.0)?;
        let relative = |a: &Tensor, b: &Tensor| -> Result<f32> {
            let scale = a
                .abs()?
                .max_all()?
                .to_dtype(DType::F32)?
                .to_scalar::<f32>()?;
            Ok(max_diff(a, b)? / (1.0 + scale))
        };
        for (kind, up_rows, hidden) in [(Kind::GeluErf, 3072, 3072), (Kind::SwiGlu, 4096, 2048)] {
            let up = randn(111, (up_rows, 768), 0.02)?;
            let down = randn(112, (768, hidden), 0.02)?;
            let run = |d: &Device| -> Result<Vec<Tensor>> {
                let vs: Vec<Var> = [&x, &up, &down]
                    .iter()
                    .map(|t| Var::from_tensor(&t.to_device(d)?))
                    .collect::<Result<_>>()?;
                let y = vs[0].as_tensor().apply_op3(
                    vs[1].as_tensor(),
                    vs[2].as_tensor(),
                    FusedMlp(kind),
                )?;
                let grads = (y.to_dtype(DType::F32)? * w.to_device(d)?)?
                    .sum_all()?
                    .backward()?;
                let mut out = vec![y];
                out.extend(vs.iter().map(|v| grads.get(v.as_tensor()).unwrap().clone()));
                out.into_iter().map(|t| t.to_device(&Device::Cpu)).collect()
            };
            for (i, (a, b)) in run(&Device::Cpu)?.iter().zip(run(&gpu)?).enumerate() {
                let rel = relative(a, &b)?;
                assert!(rel < 10.0 * tol, "{dtype:?} {kind:?} mlp #{i}: {rel}");
            }
        }
        let weight = randn(114, (512, 768), 0.02)?;
        let run = |d: &Device| -> Result<Vec<Tensor>> {
            let (v, wv) = (
                Var::from_tensor(&x.to_device(d)?)?,
                Var::from_tensor(&weight.to_device(d)?)?,
            );
            let y = v.as_tensor().apply_op2(wv.as_tensor(), FusedLinear)?;
            let wy = randn(115, y.shape(), 1.0)?.to_device(d)?;
            let grads = (y.to_dtype(DType::F32)? * wy)?.sum_all()?.backward()?;
            let out = [
                &y,
                grads.get(v.as_tensor()).unwrap(),
                grads.get(wv.as_tensor()).unwrap(),
            ];
            out.iter().map(|t| t.to_device(&Device::Cpu)).collect()
        };
        for (i, (a, b)) in run(&Device::Cpu)?.iter().zip(run(&gpu)?).enumerate() {
            let rel = relative(a, &b)?;
            assert!(rel < 10.0 * tol, "{dtype:?} linear #{i}: {rel}");
        }
        // Embedding rows and their scattered gradient, with ids repeating.
        let table = randn(7, (1000, 768), 1.0)?;
        let ids: Vec<u32> = (0..4096u32).map(|i| (i * 37) % 1000).collect();
        let ids = Tensor::new(ids.as_slice(), &Device::Cpu)?;
        let w = randn(8, (4096, 768), 1.0)?;
        let run = |d: &Device| -> Result<(Tensor, Tensor)> {
            let v = Var::from_tensor(&table.to_device(d)?)?;
            let y = v.as_tensor().apply_op2(&ids.to_device(d)?, Embedding)?;
            let g = (&y * w.to_device(d)?)?.sum_all()?.backward()?;
            let g = g.get(v.as_tensor()).unwrap().to_device(&Device::Cpu)?;
            Ok((y.to_device(&Device::Cpu)?, g))
        };
        let ((y1, g1), (y2, g2)) = (run(&Device::Cpu)?, run(&gpu)?);
        assert!(
            max_diff(&y1, &y2)? == 0.0 && max_diff(&g1, &g2)? < 1e-4,
            "embedding"
        );
    }
    Ok(())
}

#[test]
fn rms_norm_ops_match_the_composite_forward_and_backward() -> Result<()> {
    let x = (randn(7, (3, 4, 10), 1.0)? * 2.0)?;
    let g = randn(8, 10, 1.0)?;
    let eps = 1e-6;
    // Without a gain.
    let [(y1, g1), (y2, g2)] = both_ways(
        &x,
        &|x| x.apply_op1(RmsNormPlain { eps: eps as f32 }),
        &|x| rms_norm(x, None, eps),
        9,
    )?;
    assert!(max_diff(&y1, &y2)? < 1e-6 && max_diff(&g1, &g2)? < 1e-5);
    // With one: the gradients of x and of the gain.
    let gain = Var::from_tensor(&g)?;
    let [(y1, g1), (y2, g2)] = both_ways(
        &x,
        &|x| x.apply_op2(gain.as_tensor(), RmsNormGain { eps: eps as f32 }),
        &|x| rms_norm(x, Some(gain.as_tensor()), eps),
        10,
    )?;
    assert!(max_diff(&y1, &y2)? < 1e-6 && max_diff(&g1, &g2)? < 1e-5);
    let w = randn(11, (3, 4, 10), 1.0)?;
    let dgain = |fused: bool| -> Result<Tensor> {
        let y = if fused {
            x.apply_op2(gain.as_tensor(), RmsNormGain { eps: eps as f32 })?
        } else {
            rms_norm(&x, Some(gain.as_tensor()), eps)?
        };
        let grads = (y * &w)?.sum_all()?.backward()?;
        Ok(grads
            .get(gain.as_tensor())
            .expect("a gain gradient")
            .clone())
    };
    assert!(max_diff(&dgain(true)?, &dgain(false)?)? < 1e-5);
    Ok(())
}

#[test]
fn embedding_op_gathers_rows_and_scatters_their_gradients() -> Result<()> {
    // Rows 2, 0, 2 of a 3 x 2 table; row 2 is used twice, so its gradient is the sum of two.
    let w = Var::new(&[[1f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &Device::Cpu)?;
    let ids = Tensor::new(&[2u32, 0, 2], &Device::Cpu)?;
    let y = w.as_tensor().apply_op2(&ids, Embedding)?;
    assert_eq!(y.to_vec2::<f32>()?, [[5.0, 6.0], [1.0, 2.0], [5.0, 6.0]]);
    let dy = Tensor::new(&[[1f32, 10.0], [100.0, 1000.0], [2.0, 20.0]], &Device::Cpu)?;
    let g = (y * dy)?.sum_all()?.backward()?;
    let g = g.get(w.as_tensor()).unwrap().to_vec2::<f32>()?;
    assert_eq!(g, [[100.0, 1000.0], [0.0, 0.0], [3.0, 30.0]]);
    // An id outside the table is an error, not a read out of bounds.
    let bad = Tensor::new(&[3u32], &Device::Cpu)?;
    assert!(w.as_tensor().apply_op2(&bad, Embedding).is_err());
    Ok(())
}

#[test]
fn activation_ops_match_the_composite_forward_and_backward() -> Result<()> {
    for kind in [Kind::GeluErf, Kind::Relu2, Kind::SwiGlu] {
        // SwiGLU's rows hold [g | u]: an even width.
        let x = (randn(12, (4, if kind.gated() { 34 } else { 33 }), 1.0)? * 3.0)?;
        let [(y1, g1), (y2, g2)] = both_ways(
            &x,
            &|x| x.apply_op1(Activation(kind)),
            &|x| activation(x, kind),
            13,
        )?;
        assert!(max_diff(&y1, &y2)? < 1e-5, "{kind:?}");
        assert!(max_diff(&g1, &g2)? < 1e-5, "{kind:?}");
    }
    Ok(())
}

/// The composite the head op replaces: split into heads, QK-norm, RoPE.
fn heads_composite(y: &Tensor, n: usize, norm: bool, rope: &crate::nn::Rope) -> Result<Tensor> {
    let (b, t, w) = y.dims3()?;
    let mut h = y.reshape((b, t, n, w / n))?.transpose(1, 2)?.contiguous()?;
    if norm {
        h = rms_norm(&h, None, crate::nn::NORM_EPS)?;
    }
    rope.apply(&h)
}

#[test]
fn head_prep_op_matches_split_norm_and_rope() -> Result<()> {
    let (b, t, n, hd) = (2, 5, 3, 8);
    let rope = crate::nn::Rope::new(hd, 16, 100.0, &Device::Cpu)?;
    let y = (randn(14, (b, t, n * hd), 1.0)? * 2.0)?;
    for norm in [true, false] {
        let op = HeadPrep {
            seq: t,
            heads: n,
            norm,
            eps: crate::nn::NORM_EPS as f32,
        };
        let table = rope.table(t)?;
        let [(h1, g1), (h2, g2)] = both_ways(
            &y,
            &|y| y.apply_op2(&table, op),
            &|y| heads_composite(y, n, norm, &rope),
            15,
        )?;
        assert_eq!(h1.dims(), &[b, n, t, hd]);
        assert!(max_diff(&h1, &h2)? < 1e-5, "norm {norm}");
        assert!(max_diff(&g1, &g2)? < 1e-5, "norm {norm}");
    }
    Ok(())
}

#[test]
fn attention_op_matches_the_composite_forward_and_backward() -> Result<()> {
    let shape = (2, 3, 6, 4);
    let scale = 0.5;
    let inputs: Vec<Var> = (0..3)
        .map(|i| Var::from_tensor(&randn(20 + i, shape, 1.0)?))
        .collect::<Result<_>>()?;
    let w = randn(23, shape, 1.0)?;
    let run = |fused: bool| -> Result<Vec<Tensor>> {
        let [q, k, v] = [0, 1, 2].map(|i| inputs[i].as_tensor());
        let y = if fused {
            q.apply_op3(k, v, CausalAttention { scale, rows: false })?
        } else {
            causal_softmax(&q.matmul(&k.t()?)?, scale)?.matmul(v)?
        };
        let grads = (&y * &w)?.sum_all()?.backward()?;
        let mut out = vec![y];
        for x in [q, k, v] {
            out.push(grads.get(x).expect("a gradient").clone());
        }
        Ok(out)
    };
    for (i, (a, b)) in run(true)?.iter().zip(run(false)?).enumerate() {
        assert!(max_diff(a, &b)? < 1e-5, "output {i}");
    }
    Ok(())
}

#[test]
fn stream_mixing_ops_match_the_matrix_products() -> Result<()> {
    // Per token (2 x 3 tokens), n = 3 streams of 5 channels: h = pre^T s, y = res s + post out.
    let (b, t, n, c) = (2, 3, 3, 5);
    let s = Var::from_tensor(&randn(40, (b, t, n, c), 1.0)?)?;
    let pre = Var::from_tensor(&randn(41, (b, t, n), 1.0)?)?;
    let res = Var::from_tensor(&randn(42, (b, t, n, n), 1.0)?)?;
    let post = Var::from_tensor(&randn(43, (b, t, n), 1.0)?)?;
    let w = randn(44, (b, t, n, c), 1.0)?;
    // The sublayer in between: any differentiable map, here out = h * h.
    let run = |fused: bool| -> Result<Vec<Tensor>> {
        let st = s.as_tensor();
        let h = if fused {
            st.apply_op2(pre.as_tensor(), PreMix::default())?
        } else {
            pre.as_tensor().unsqueeze(2)?.matmul(st)?.squeeze(2)?
        };
        let out = h.sqr()?;
        let y = if fused {
            let coef = Tensor::cat(&[res.as_tensor(), &post.as_tensor().unsqueeze(3)?], 3)?;
            st.apply_op3(&coef, &out, PostMix::default())?
        } else {
            let carried = res.as_tensor().matmul(st)?;
            (carried + post.as_tensor().unsqueeze(3)?.matmul(&out.unsqueeze(2)?)?)?
        };
        let grads = (&y * &w)?.sum_all()?.backward()?;
        let mut all = vec![y];
        for v in [&s, &pre, &res, &post] {
            all.push(grads.get(v.as_tensor()).expect("a gradient").clone());
        }
        Ok(all)
    };
    for (i, (a, b)) in run(true)?.iter().zip(run(false)?).enumerate() {
        assert_eq!(a.dims(), b.dims(), "#{i}");
        assert!(max_diff(a, &b)? < 1e-5, "#{i}: {}", max_diff(a, &b)?);
    }
    Ok(())
}

#[test]
fn sinkhorn_op_matches_the_composite_forward_and_backward() -> Result<()> {
    // Spread logits (the log-domain first round matters) and 1, 2 and 20 rounds.
    let x = (randn(60, (3, 2, 4, 4), 1.0)? * 4.0)?;
    for iters in [1, 2, 20] {
        let [(y1, g1), (y2, g2)] = both_ways(
            &x,
            &|x| x.apply_op1(Sinkhorn { iters }),
            &|x| crate::residual::sinkhorn(x, iters),
            61,
        )?;
        assert!(max_diff(&y1, &y2)? < 1e-5, "iters {iters}");
        assert!(
            max_diff(&g1, &g2)? < 1e-4,
            "iters {iters}: {}",
            max_diff(&g1, &g2)?
        );
    }
    Ok(())
}

/// mHC's coefficients from logits z (N, w) and the parameters, by the two ops or by candle's
/// ops (residual/mhc.rs's CPU arithmetic), on z's device: [pre (N, n), coef (N, n, n + 1)]
/// and the gradients of z, a, b_pre, b_post and b_res under loss = sum(W1 pre) + sum(W2 coef).
fn mhc_coef_both(z: &Tensor, n: usize, iters: usize, fused: bool) -> Result<Vec<Tensor>> {
    let dev = z.device();
    let (rows, _) = z.dims2()?;
    let var = |seed: u64, shape: &[usize], scale: f64, shift: f64| -> Result<Var> {
        Var::from_tensor(&((randn(seed, shape, scale)? + shift)?.to_device(dev)?))
    };
    let zv = Var::from_tensor(z)?;
    let a = var(140, &[3], 0.5, 0.2)?;
    let b_pre = var(141, &[n], 1.0, 0.0)?;
    let b_post = var(142, &[n], 1.0, 0.0)?;
    let b_res = var(143, &[n, n], 2.0, 0.0)?;
    let (pre, coef) = if fused {
        let p = pack_params(&[&a, &b_pre, &b_post, &b_res])?;
        let scheme = Scheme::Mhc { iters };
        let (pre, coef) = stream_coefficients(zv.as_tensor(), &p, (1, rows, n), scheme)?;
        (pre.squeeze(0)?, coef.squeeze(0)?)
    } else {
        let z = zv.as_tensor();
        let part = |start: usize, len: usize, i: usize, bias: &Tensor| -> Result<Tensor> {
            z.narrow(1, start, len)?
                .broadcast_mul(&a.narrow(0, i, 1)?)?
                .broadcast_add(bias)
        };
        let pre = crate::nn::sigmoid(&part(0, n, 0, &b_pre)?)?;
        let post = (crate::nn::sigmoid(&part(n, n, 1, &b_post)?)? * 2.0)?;
        let logits = part(2 * n, n * n, 2, &b_res.flatten_all()?)?.reshape((rows, n, n))?;
        let res = crate::residual::sinkhorn(&logits, iters)?;
        (pre, Tensor::cat(&[&res, &post.unsqueeze(2)?], 2)?)
    };
    let w1 = randn(144, pre.shape(), 1.0)?.to_device(dev)?;
    let w2 = randn(145, coef.shape(), 1.0)?.to_device(dev)?;
    let grads = ((&pre * &w1)?.sum_all()? + (&coef * &w2)?.sum_all()?)?.backward()?;
    let mut out = vec![pre, coef];
    for v in [&zv, &a, &b_pre, &b_post, &b_res] {
        out.push(grads.get(v.as_tensor()).expect("a gradient").clone());
    }
    Ok(out)
}

#[test]
fn mhc_coef_ops_match_the_composite_forward_and_backward() -> Result<()> {
    // 4 streams from the projection's rows of 2n + n^2 + 1 = 25 (the last, r, is not a
    // logit: its gradient must be zero), 2 streams from rows of exactly 8; 1 and 20 rounds.
    for (rows, n, w, iters, seed) in [(37, 4, 25, 20, 150), (5, 2, 8, 1, 151)] {
        let z = (randn(seed, (rows, w), 1.0)? * 2.0)?;
        let fused = mhc_coef_both(&z, n, iters, true)?;
        let composite = mhc_coef_both(&z, n, iters, false)?;
        for (i, (a, b)) in fused.iter().zip(&composite).enumerate() {
            assert_eq!(a.dims(), b.dims(), "n {n} #{i}");
            let d = max_diff(a, b)?;
            assert!(d < 2e-5, "n {n} #{i}: {d}");
        }
        if w > 2 * n + n * n {
            let dz_r = fused[2].narrow(1, w - 1, 1)?.abs()?.max_all()?;
            assert_eq!(dz_r.to_scalar::<f32>()?, 0.0);
        }
        // Each token's carried mixing is doubly stochastic, and post lies in (0, 2).
        let res = fused[1].narrow(2, 0, n)?;
        let rows_err = (res.sum(2)? - 1.0)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(rows_err < 1e-5, "{rows_err}");
        let post = fused[1].narrow(2, n, 1)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(post.iter().all(|&v| v > 0.0 && v < 2.0));
    }
    Ok(())
}

/// Each tensor of `b` (any device) within `tol` of `a`'s, relative to 1 + a's largest value.
#[cfg(feature = "cuda")]
fn assert_close_rel(a: &[Tensor], b: &[Tensor], tol: f32, what: &str) -> Result<()> {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (a, b)) in a.iter().zip(b).enumerate() {
        let b = b.to_device(&Device::Cpu)?;
        let scale = 1.0 + a.abs()?.max_all()?.to_scalar::<f32>()?;
        let d = max_diff(a, &b)? / scale;
        assert!(d < tol, "{what} #{i}: {d}");
    }
    Ok(())
}

#[cfg(feature = "cuda")]
#[test]
fn mhc_coef_kernels_match_the_cpu_ops() -> Result<()> {
    let Some(gpu) = gpu() else {
        return Ok(());
    };
    // A partial warp of tokens and the Goedel-1B shape's 8192 tokens with 4 streams (16
    // threads a token), 20 rounds; 3 streams (a thread a token) from rows of 16.
    for (rows, n, w) in [(45, 4, 25), (8192, 4, 25), (45, 3, 16)] {
        let z = (randn(152, (rows, w), 1.0)? * 2.0)?;
        let cpu = mhc_coef_both(&z, n, 20, true)?;
        let on_gpu = mhc_coef_both(&z.to_device(&gpu)?, n, 20, true)?;
        assert_close_rel(
            &cpu,
            &on_gpu,
            1e-5,
            &format!("mHC, {rows} rows, {n} streams"),
        )?;
    }
    Ok(())
}

#[test]
fn the_coefficient_gradients_are_the_rows_sums_and_their_tokens_sums() -> Result<()> {
    // Hand-worked: two rows of w = 1 logit and P = 2 parameter columns.
    let a = Tensor::new(&[[1f32, 10.0, 100.0], [2.0, 20.0, 200.0]], &Device::Cpu)?;
    let b = Tensor::new(&[[3f32, 1.0, 2.0], [4.0, 3.0, 4.0]], &Device::Cpu)?;
    let out = a.apply_op2_no_bwd(&b, &CoefGrads { w: 1 })?;
    // [dp | dz]: dp = (10 + 1 + 20 + 3, 100 + 2 + 200 + 4), dz = (1 + 3, 2 + 4).
    assert_eq!(out.to_vec1::<f32>()?, vec![34.0, 306.0, 4.0, 6.0]);
    // The token sums alone: the columns of a.
    let sums = a.apply_op1_no_bwd(&TokenSums)?;
    assert_eq!(sums.to_vec1::<f32>()?, vec![3.0, 30.0, 300.0]);
    Ok(())
}

#[cfg(feature = "cuda")]
#[test]
fn the_coefficient_gradients_kernels_match_the_cpu_op() -> Result<()> {
    let Some(gpu) = gpu() else {
        return Ok(());
    };
    // Rows that fill no whole block, the d384 width's 8192 tokens (128 blocks of 64), more
    // parameter columns than a warp's lanes (HC of 8 streams: 82), and one row.
    for (rows, w, np) in [(45, 25, 27), (8192, 25, 27), (300, 80, 82), (1, 4, 3)] {
        let a = randn(160, (rows, w + np), 1.0)?;
        let b = randn(161, (rows, w + np), 1.0)?;
        let op = CoefGrads { w };
        let cpu = a.apply_op2_no_bwd(&b, &op)?;
        let on_gpu = a
            .to_device(&gpu)?
            .apply_op2_no_bwd(&b.to_device(&gpu)?, &op)?;
        assert_close_rel(&[cpu], &[on_gpu], 1e-5, &format!("{rows} x ({w} + {np})"))?;
        let cpu = a.apply_op1_no_bwd(&TokenSums)?;
        let on_gpu = a.to_device(&gpu)?.apply_op1_no_bwd(&TokenSums)?;
        assert_close_rel(&[cpu], &[on_gpu], 1e-5, &format!("sums of {rows} rows"))?;
    }
    Ok(())
}

/// Dynamic HC's coefficients from logits z (N, n w) (n stream rows of w a token) by the two
/// ops or by candle's ops (residual/hc.rs's CPU arithmetic), on z's device: [pre, coef] and
/// the gradients of z, s_alpha, s_beta, a_m, b and a_r, as [`mhc_coef_both`].
fn hc_coef_both(z: &Tensor, n: usize, fused: bool) -> Result<Vec<Tensor>> {
    let dev = z.device();
    let (rows, width) = z.dims2()?;
    let w = width / n;
    let var = |seed: u64, shape: &[usize], scale: f64| -> Result<Var> {
        Var::from_tensor(&randn(seed, shape, scale)?.to_device(dev)?)
    };
    let zv = Var::from_tensor(z)?;
    let (s_alpha, s_beta) = (var(170, &[1], 0.5)?, var(171, &[1], 0.5)?);
    let (a_m, b, a_r) = (
        var(172, &[n, 1], 1.0)?,
        var(173, &[n, 1], 1.0)?,
        var(174, &[n, n], 1.0)?,
    );
    let (pre, coef) = if fused {
        let p = pack_params(&[&s_alpha, &s_beta, &a_m, &b, &a_r])?;
        let (pre, coef) = stream_coefficients(zv.as_tensor(), &p, (1, rows, n), Scheme::Hc)?;
        (pre.squeeze(0)?, coef.squeeze(0)?)
    } else {
        let u = zv.as_tensor().reshape((rows, n, w))?.tanh()?;
        let alpha = |x: Tensor| x.broadcast_mul(&s_alpha);
        let pre = alpha(u.narrow(2, 0, 1)?)?.broadcast_add(&a_m)?.squeeze(2)?;
        let post = u
            .narrow(2, 1, 1)?
            .broadcast_mul(&s_beta)?
            .broadcast_add(&b)?;
        let a = alpha(u.narrow(2, 2, n)?)?.broadcast_add(&a_r)?;
        (pre, Tensor::cat(&[&a.transpose(1, 2)?, &post], 2)?)
    };
    let w1 = randn(175, pre.shape(), 1.0)?.to_device(dev)?;
    let w2 = randn(176, coef.shape(), 1.0)?.to_device(dev)?;
    let grads = ((&pre * &w1)?.sum_all()? + (&coef * &w2)?.sum_all()?)?.backward()?;
    let mut out = vec![pre, coef];
    for v in [&zv, &s_alpha, &s_beta, &a_m, &b, &a_r] {
        out.push(grads.get(v.as_tensor()).expect("a gradient").clone());
    }
    Ok(out)
}

#[test]
fn hc_coef_ops_match_the_composite_forward_and_backward() -> Result<()> {
    // 4 streams from the projection's rows of n + 3 (its last, r, not a logit), 3 streams
    // from rows of exactly n + 2.
    for (rows, n, w, seed) in [(37, 4, 7, 177), (5, 3, 5, 178)] {
        let z = (randn(seed, (rows, n * w), 1.0)? * 2.0)?;
        let fused = hc_coef_both(&z, n, true)?;
        let composite = hc_coef_both(&z, n, false)?;
        for (i, (a, b)) in fused.iter().zip(&composite).enumerate() {
            assert_eq!(a.dims(), b.dims(), "n {n} #{i}");
            let d = max_diff(a, b)?;
            assert!(d < 2e-5, "n {n} #{i}: {d}");
        }
    }
    Ok(())
}

#[cfg(feature = "cuda")]
#[test]
fn hc_coef_kernels_match_the_cpu_ops() -> Result<()> {
    let Some(gpu) = gpu() else {
        return Ok(());
    };
    for (rows, n, w) in [(45, 4, 7), (8192, 4, 7), (45, 3, 5)] {
        let z = (randn(179, (rows, n * w), 1.0)? * 2.0)?;
        let cpu = hc_coef_both(&z, n, true)?;
        let on_gpu = hc_coef_both(&z.to_device(&gpu)?, n, true)?;
        assert_close_rel(
            &cpu,
            &on_gpu,
            1e-5,
            &format!("HC, {rows} rows, {n} streams"),
        )?;
    }
    Ok(())
}

/// The streams' mean and copy by the op or by candle's ops on x's device: the value and x's
/// gradient under loss = sum(W y).
fn streams_both(x: &Tensor, spread: bool, n: usize, fused: bool) -> Result<(Tensor, Tensor)> {
    let v = Var::from_tensor(x)?;
    let y = match (fused, spread) {
        (true, _) => {
            let scale = if spread { 1.0 } else { 1.0 / n as f32 };
            v.as_tensor().apply_op1(Streams { spread, n, scale })?
        }
        (false, true) => {
            let (b, t, c) = x.dims3()?;
            v.as_tensor()
                .unsqueeze(2)?
                .broadcast_as((b, t, n, c))?
                .contiguous()?
        }
        (false, false) => v.as_tensor().mean(2)?,
    };
    let w = randn(160, y.shape(), 1.0)?.to_device(x.device())?;
    let grads = (y.to_dtype(DType::F32)? * w)?.sum_all()?.backward()?;
    let g = grads.get(v.as_tensor()).expect("a gradient").clone();
    Ok((y, g))
}

#[test]
fn streams_op_matches_the_composite_forward_and_backward() -> Result<()> {
    // 3 streams of 5 channels (no 16-byte packs on the GPU) and 4 of 16.
    for (n, c) in [(3, 5), (4, 16)] {
        for spread in [false, true] {
            let x = match spread {
                true => randn(161, (2, 3, c), 1.0)?,
                false => randn(161, (2, 3, n, c), 1.0)?,
            };
            let (y1, g1) = streams_both(&x, spread, n, true)?;
            let (y2, g2) = streams_both(&x, spread, n, false)?;
            assert_eq!(y1.dims(), y2.dims());
            assert!(max_diff(&y1, &y2)? < 1e-6, "{n} x {c} spread {spread}");
            assert!(max_diff(&g1, &g2)? < 1e-6, "{n} x {c} spread {spread}");
        }
    }
    Ok(())
}

#[cfg(feature = "cuda")]
#[test]
fn streams_kernels_match_the_cpu_op() -> Result<()> {
    let Some(gpu) = gpu() else {
        return Ok(());
    };
    for dtype in [DType::F32, DType::BF16] {
        for (n, c, spread) in [
            (3, 5, false),
            (3, 5, true),
            (4, 2048, false),
            (4, 2048, true),
        ] {
            let x = match spread {
                true => randn(162, (2, 33, c), 1.0)?,
                false => randn(162, (2, 33, n, c), 1.0)?,
            }
            .to_dtype(dtype)?;
            let (y1, g1) = streams_both(&x, spread, n, true)?;
            let (y2, g2) = streams_both(&x.to_device(&gpu)?, spread, n, true)?;
            let tol = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
            assert!(
                max_diff(&y1, &y2.to_device(&Device::Cpu)?)? < tol,
                "{dtype:?} {n} {c}"
            );
            assert!(
                max_diff(&g1, &g2.to_device(&Device::Cpu)?)? < tol,
                "{dtype:?} {n} {c}"
            );
        }
    }
    Ok(())
}

#[test]
fn adam_update_in_place_follows_adamw_by_hand() -> Result<()> {
    // One step from m = v = 0 with g = (1, -2), w = (0.5, 0.5), lr 0.1, decay 0.99, eps 1e-8,
    // beta 0.9 / 0.999 at t = 1 (bias corrections 0.1 and 0.001): m = (0.1, -0.2),
    // v = (0.001, 0.004), m^ = g, v^ = g^2, w = 0.99 w - 0.1 sign(g) (to eps).
    let g = Tensor::new(&[1f32, -2.0], &Device::Cpu)?;
    let m = Tensor::zeros(2, DType::F32, &Device::Cpu)?;
    let v = Tensor::zeros(2, DType::F32, &Device::Cpu)?;
    let w = Tensor::new(&[0.5f32, 0.5], &Device::Cpu)?;
    let op = |what, p| AdamUpdate { what, p };
    m.inplace_op2(&g, &op(AdamPart::FirstMoment, [0.9, 0.1, 0.0, 0.0, 0.0]))?;
    v.inplace_op2(
        &g,
        &op(AdamPart::SecondMoment, [0.999, 0.001, 0.0, 0.0, 0.0]),
    )?;
    w.inplace_op3(&m, &v, &op(AdamPart::Weight, [0.99, 0.1, 0.1, 0.001, 1e-8]))?;
    let close = |t: &Tensor, want: [f32; 2]| -> Result<()> {
        let got = t.to_vec1::<f32>()?;
        assert!(
            (got[0] - want[0]).abs() < 1e-6 && (got[1] - want[1]).abs() < 1e-6,
            "{got:?}"
        );
        Ok(())
    };
    close(&m, [0.1, -0.2])?;
    close(&v, [0.001, 0.004])?;
    close(&w, [0.395, 0.595])?;
    Ok(())
}

#[test]
fn attention_op_on_rows_matches_the_one_on_heads() -> Result<()> {
    // V given as rows (B T, H hd) and the output returned as rows: the same numbers as the
    // op on heads, transposed, and the same gradients.
    let (b, h, t, hd) = (2, 3, 5, 4);
    let q = Var::from_tensor(&randn(90, (b, h, t, hd), 1.0)?)?;
    let k = Var::from_tensor(&randn(91, (b, h, t, hd), 1.0)?)?;
    let v_rows = Var::from_tensor(&randn(92, (b * t, h * hd), 1.0)?)?;
    let w = randn(93, (b * t, h * hd), 1.0)?;
    let to_rows = |y: &Tensor| -> Result<Tensor> { y.transpose(1, 2)?.reshape((b * t, h * hd)) };
    let run = |rows: bool| -> Result<Vec<Tensor>> {
        let op = CausalAttention { scale: 0.5, rows };
        let y = if rows {
            q.as_tensor()
                .apply_op3(k.as_tensor(), v_rows.as_tensor(), op)?
        } else {
            let v = v_rows
                .as_tensor()
                .reshape((b, t, h, hd))?
                .transpose(1, 2)?
                .contiguous()?;
            to_rows(&q.as_tensor().apply_op3(k.as_tensor(), &v, op)?)?
        };
        let grads = (&y * &w)?.sum_all()?.backward()?;
        let mut out = vec![y];
        for x in [&q, &k, &v_rows] {
            out.push(grads.get(x.as_tensor()).expect("a gradient").clone());
        }
        Ok(out)
    };
    for (i, (a, b)) in run(true)?.iter().zip(run(false)?).enumerate() {
        assert_eq!(a.dims(), b.dims(), "#{i}");
        assert!(max_diff(a, &b)? < 1e-6, "#{i}");
    }
    Ok(())
}

#[test]
fn mlp_op_matches_the_composite_forward_and_backward() -> Result<()> {
    let (b, t, c, hidden) = (2, 3, 6, 16);
    let x = Var::from_tensor(&randn(100, (b, t, c), 1.0)?)?;
    let up = Var::from_tensor(&randn(101, (hidden, c), 0.5)?)?;
    let down = Var::from_tensor(&randn(102, (c, hidden), 0.5)?)?;
    let w = randn(103, (b, t, c), 1.0)?;
    for kind in [Kind::GeluErf, Kind::Relu2] {
        let run = |fused: bool| -> Result<Vec<Tensor>> {
            let y = if fused {
                x.as_tensor()
                    .apply_op3(up.as_tensor(), down.as_tensor(), FusedMlp(kind))?
            } else {
                let r = x.as_tensor().reshape((b * t, c))?;
                let h = activation(&r.matmul(&up.as_tensor().t()?)?, kind)?;
                h.matmul(&down.as_tensor().t()?)?.reshape((b, t, c))?
            };
            let grads = (&y * &w)?.sum_all()?.backward()?;
            let mut out = vec![y];
            for v in [&x, &up, &down] {
                out.push(grads.get(v.as_tensor()).expect("a gradient").clone());
            }
            Ok(out)
        };
        for (i, (a, b)) in run(true)?.iter().zip(run(false)?).enumerate() {
            assert_eq!(a.dims(), b.dims(), "{kind:?} #{i}");
            assert!(
                max_diff(a, &b)? < 1e-5,
                "{kind:?} #{i}: {}",
                max_diff(a, &b)?
            );
        }
    }
    Ok(())
}

/// On a GPU: flash attention (bf16) against the attention op on cuBLAS in f32 from the same
/// bf16-rounded inputs, grouped-query heads widened for the reference: the output and the
/// three gradients, for both head dimensions and lengths that are and are not whole blocks
/// of 64 (and of the forward kernel's 128 queries, and of the dK/dV kernel's steps of 32),
/// with each set of kernels the GPU runs (mma.sync, and wgmma on a Hopper GPU).
#[cfg(feature = "cuda")]
#[test]
fn flash_attention_matches_the_attention_op_in_f32() -> Result<()> {
    let Some(gpu) = gpu() else {
        return Ok(());
    };
    let Device::Cuda(dev) = &gpu else {
        unreachable!("gpu() gives a CUDA device")
    };
    let mut sets = vec![FlashKernels::Mma];
    if FlashKernels::for_device(dev)? == FlashKernels::Wgmma {
        sets.push(FlashKernels::Wgmma);
    }
    for kernels in sets {
        for (b, h, kv, t, hd, seed) in [
            (2, 4, 2, 200, 64, 110),
            (1, 12, 12, 1024, 64, 120),
            (2, 2, 1, 1, 64, 130),
            (2, 4, 1, 200, 128, 150),
            (1, 16, 4, 1024, 128, 160),
            (1, 2, 2, 33, 128, 170),
            (2, 2, 1, 1, 128, 180),
        ] {
            let round = |x: Tensor| x.to_dtype(DType::BF16)?.to_dtype(DType::F32);
            let q0 = round(randn(seed, (b, h, t, hd), 1.0)?)?;
            let k0 = round(randn(seed + 1, (b, kv, t, hd), 1.0)?)?;
            let v0 = round(randn(seed + 2, (b * t, kv * hd), 1.0)?)?;
            let w = randn(seed + 3, (b * t, h * hd), 1.0)?.to_device(&gpu)?;
            let scale = 1.0 / (hd as f64).sqrt();
            let run = |flash: bool| -> Result<Vec<Tensor>> {
                let dtype = if flash { DType::BF16 } else { DType::F32 };
                let mut vars = Vec::new();
                for x in [&q0, &k0, &v0] {
                    vars.push(Var::from_tensor(&x.to_device(&gpu)?.to_dtype(dtype)?)?);
                }
                let [q, k, v] = [0, 1, 2].map(|i| vars[i].as_tensor());
                let y = if flash {
                    assert!(FlashAttention::fits(q));
                    q.apply_op3(k, v, FlashAttention::with_kernels(scale, kernels))?
                } else {
                    let widen = |y: &Tensor| -> Result<Tensor> {
                        y.unsqueeze(2)?
                            .broadcast_as((b, kv, h / kv, t, hd))?
                            .reshape((b, h, t, hd))
                    };
                    let vh = v.reshape((b, t, kv, hd))?.transpose(1, 2)?.contiguous()?;
                    let op = CausalAttention { scale, rows: false };
                    let y = q.apply_op3(&widen(k)?, &widen(&vh)?, op)?;
                    y.transpose(1, 2)?.reshape((b * t, h * hd))?
                };
                let grads = (y.to_dtype(DType::F32)? * &w)?.sum_all()?.backward()?;
                let mut out = vec![y];
                for x in [q, k, v] {
                    out.push(grads.get(x).expect("a gradient").clone());
                }
                out.iter()
                    .map(|x| x.to_dtype(DType::F32)?.to_device(&Device::Cpu))
                    .collect()
            };
            let (got, want) = (run(true)?, run(false)?);
            for (i, (a, e)) in got.iter().zip(&want).enumerate() {
                assert_eq!(a.dims(), e.dims(), "{i}");
                // Relative to the largest value (with one key, dQ is exactly zero).
                let scale = e.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                let err = max_diff(a, e)? / scale.max(1e-3);
                // bf16 keeps 8 bits: the probabilities and outputs are rounded to 1 part in 256.
                assert!(
                    err < 2e-2,
                    "{kernels:?} (b {b}, h {h}, kv {kv}, t {t}, hd {hd}) #{i}: {err}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn flash_attention_is_refused_off_the_gpu() -> Result<()> {
    // The attention layer asks `fits` first and keeps the cuBLAS op on the CPU; applied
    // anyway, the op says where it runs instead of computing something else.
    let hd = FLASH_HEAD_DIMS[0];
    let q = randn(140, (1, 2, 8, hd), 1.0)?.to_dtype(DType::BF16)?;
    let k = randn(141, (1, 2, 8, hd), 1.0)?.to_dtype(DType::BF16)?;
    let v = randn(142, (8, 2 * hd), 1.0)?.to_dtype(DType::BF16)?;
    assert!(!FlashAttention::fits(&q));
    let err = q.apply_op3(&k, &v, FlashAttention::new(0.125)).unwrap_err();
    assert!(err.to_string().contains("CUDA only"), "{err}");
    Ok(())
}

/// On a GPU: the chunked sum of squares against the per-tensor composite, over tensors of one
/// element, of several chunks, and a view that starts inside its storage.
#[cfg(feature = "cuda")]
#[test]
fn sum_squares_kernel_matches_the_composite() -> Result<()> {
    let Some(gpu) = gpu() else {
        return Ok(());
    };
    let big = randn(150, (300, 500), 1.0)?;
    let mut tensors = vec![randn(151, 1, 1.0)?, randn(152, 70_000, 1.0)?, big.clone()];
    let mut on_gpu: Vec<Tensor> = tensors
        .iter()
        .map(|t| t.to_device(&gpu))
        .collect::<Result<_>>()?;
    // Narrowed on each device, so that the GPU view starts 7 rows into its storage.
    tensors.push(big.narrow(0, 7, 200)?);
    on_gpu.push(on_gpu[2].narrow(0, 7, 200)?);
    let want = sum_squares(&tensors.iter().collect::<Vec<_>>())?.to_scalar::<f32>()?;
    let got = sum_squares(&on_gpu.iter().collect::<Vec<_>>())?;
    assert!(got.device().is_cuda());
    let got = got.to_scalar::<f32>()?;
    assert!((got - want).abs() / want < 1e-5, "{got} vs {want}");
    Ok(())
}

#[test]
fn sum_squares_by_hand() -> Result<()> {
    // 3^2 + 4^2 + (1 + 4 + 4 + 0) + 5^2 = 59, over a vector, a matrix and a scalar.
    let a = Tensor::new(&[3f32, 4.0], &Device::Cpu)?;
    let b = Tensor::new(&[[1f32, 2.0], [2.0, 0.0]], &Device::Cpu)?;
    let c = Tensor::new(5f32, &Device::Cpu)?;
    assert_eq!(sum_squares(&[&a, &b, &c])?.to_scalar::<f32>()?, 59.0);
    assert_eq!(sum_squares(&[])?.to_scalar::<f32>()?, 0.0);
    Ok(())
}

/// z = rms(x) phi and the gradients of x and phi under loss = sum(W z), fused or composite.
fn norm_proj_both(x: &Tensor, phi: &Tensor, fused: bool, seed: u64) -> Result<Vec<Tensor>> {
    let (xv, pv) = (Var::from_tensor(x)?, Var::from_tensor(phi)?);
    let z = if fused {
        let ext = xv.as_tensor().apply_op2(
            pv.as_tensor(),
            NormProj {
                eps: 1e-6,
                acc: None,
            },
        )?;
        ext.narrow(1, 0, phi.dim(1)?)?
    } else {
        let x32 = xv.as_tensor().to_dtype(DType::F32)?;
        let ms = x32.sqr()?.mean_keepdim(D::Minus1)?;
        x32.broadcast_div(&(ms + 1e-6)?.sqrt()?)?
            .matmul(pv.as_tensor())?
    };
    let w = randn(seed, z.shape(), 1.0)?.to_device(z.device())?;
    let grads = (&z * &w)?.sum_all()?.backward()?;
    Ok(vec![
        z,
        grads.get(xv.as_tensor()).expect("dx").clone(),
        grads.get(pv.as_tensor()).expect("dphi").clone(),
    ])
}

#[test]
fn norm_proj_op_matches_the_composite_forward_and_backward() -> Result<()> {
    // 37 tokens of n C = 24 state values to 2n + n^2 = 8 logits (n = 2), and n = 5's 35.
    for (n, k, m, seed) in [(37, 24, 8, 120), (5, 320, 35, 121)] {
        let x = (randn(seed, (n, k), 1.0)? * 3.0)?;
        let phi = randn(seed + 1, (k, m), 0.1)?;
        let fused = norm_proj_both(&x, &phi, true, seed + 2)?;
        let composite = norm_proj_both(&x, &phi, false, seed + 2)?;
        for (i, (a, b)) in fused.iter().zip(&composite).enumerate() {
            assert_eq!(a.dims(), b.dims(), "#{i}");
            assert!(
                max_diff(a, b)? < 1e-5,
                "({n}, {k}, {m}) #{i}: {}",
                max_diff(a, b)?
            );
        }
        // The op's last column is r itself.
        let ext = x.apply_op2(
            &phi,
            NormProj {
                eps: 1e-6,
                acc: None,
            },
        )?;
        let r = ext.narrow(1, m, 1)?.squeeze(1)?;
        let want = (x.sqr()?.mean(1)? + 1e-6)?.sqrt()?.recip()?;
        assert!(max_diff(&r, &want)? < 1e-6);
    }
    Ok(())
}

#[cfg(feature = "cuda")]
#[test]
fn norm_proj_kernels_match_the_cpu_op() -> Result<()> {
    let Some(gpu) = gpu() else {
        return Ok(());
    };
    // A partial token tile and K slice; the Goedel-1B shape's n C = 8192 (4 x 2048) and its
    // 24 logits over 1030 tokens, d384's 1536 over 45, and dynamic HC's rows of d384's C =
    // 384 and 6 logits (all on the tensor cores in bf16: K whole steps of 64, partial token
    // tiles, and at 384 a block's 256 columns half used); n = 5's 35 logits.
    for (n, k, m) in [
        (77, 200, 24),
        (1030, 8192, 24),
        (45, 1536, 24),
        (180, 384, 6),
        (300, 640, 35),
    ] {
        for dtype in [DType::F32, DType::BF16] {
            let x = randn(130, (n, k), 1.0)?.to_dtype(dtype)?;
            let phi = randn(131, (k, m), 0.05)?;
            let cpu = norm_proj_both(&x, &phi, true, 132)?;
            let on_gpu = norm_proj_both(&x.to_device(&gpu)?, &phi.to_device(&gpu)?, true, 132)?;
            for (i, (a, b)) in cpu.iter().zip(&on_gpu).enumerate() {
                let b = b.to_device(&Device::Cpu)?;
                let scale = 1.0
                    + a.to_dtype(DType::F32)?
                        .abs()?
                        .max_all()?
                        .to_scalar::<f32>()?;
                // f32: sums in another order; bf16: dx is rounded to bf16 on both sides.
                let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
                let d = max_diff(a, &b)? / scale;
                assert!(d < tol, "({n}, {k}, {m}) {dtype:?} #{i}: {d}");
            }
        }
    }
    Ok(())
}

/// dx of the normed projection with the post-mix's part and the pre-mix's folded in, for
/// `tokens` of n streams of C: mHC's rows of n C (`hc_rows` false) or dynamic HC's of C.
fn norm_proj_dx_with_mixing(
    (tokens, n, c, m): (usize, usize, usize, usize),
    hc_rows: bool,
    dtype: DType,
    dev: &Device,
    folded: bool,
) -> Result<Tensor> {
    let (rows, k) = if hc_rows {
        (tokens * n, c)
    } else {
        (tokens, n * c)
    };
    let on = |t: Tensor| -> Result<Tensor> { t.to_device(dev) };
    let x = on(randn(140, (rows, k), 1.0)?.to_dtype(dtype)?)?;
    let phi = on(randn(141, (k, m), 0.05)?)?;
    let dzz = on(randn(142, (rows, 2 * (m + 1)), 1.0)?)?;
    let add = on(randn(143, (rows, k), 1.0)?.to_dtype(dtype)?)?;
    let pre = on(randn(144, (tokens, n), 1.0)?)?;
    let dh = on(randn(145, (tokens, c), 1.0)?.to_dtype(dtype)?)?;
    if folded {
        let op = NormProjBwdX {
            add: Some(add),
            premix: Some((pre, dh)),
        };
        return x.apply_op3_no_bwd(&phi, &dzz, &op);
    }
    // The pre-mix's own op adds its part to the post-mix's; the projection adds the sum.
    let add = add.reshape((tokens, n, c))?;
    let sum = pre.apply_op3_no_bwd(&dh, &add, &MixBwd::PreStateAdd)?;
    let op = NormProjBwdX {
        add: Some(sum.reshape((rows, k))?),
        premix: None,
    };
    x.apply_op3_no_bwd(&phi, &dzz, &op)
}

#[test]
fn norm_proj_backward_folds_the_pre_mix_part_as_its_own_op_adds_it() -> Result<()> {
    for (shape, hc_rows) in [((7, 4, 24, 24), false), ((9, 3, 16, 5), true)] {
        let folded = norm_proj_dx_with_mixing(shape, hc_rows, DType::F32, &Device::Cpu, true)?;
        let apart = norm_proj_dx_with_mixing(shape, hc_rows, DType::F32, &Device::Cpu, false)?;
        assert!(max_diff(&folded, &apart)? < 1e-5, "{shape:?} {hc_rows}");
    }
    Ok(())
}

/// On a GPU: the folded pre-mix part in both backward kernels (tensor cores: bf16, K whole
/// steps of 64; CUDA cores otherwise) against the CPU op.
#[cfg(feature = "cuda")]
#[test]
fn norm_proj_backward_kernels_fold_the_pre_mix_part_as_the_cpu_op() -> Result<()> {
    let Some(gpu) = gpu() else {
        return Ok(());
    };
    // The Goedel-1B width over a partial token tile; d384's; dynamic HC's rows of C, at 256
    // and at d384's 384 (the second block of 256 columns half used); n = 3 over a width no
    // tensor-core step divides.
    let cases = [
        ((70, 4, 2048, 24), false),
        ((45, 4, 384, 24), false),
        ((33, 4, 256, 6), true),
        ((33, 4, 384, 6), true),
        ((20, 3, 40, 15), false),
    ];
    for (shape, hc_rows) in cases {
        for dtype in [DType::F32, DType::BF16] {
            let cpu = norm_proj_dx_with_mixing(shape, hc_rows, dtype, &Device::Cpu, true)?;
            let on_gpu = norm_proj_dx_with_mixing(shape, hc_rows, dtype, &gpu, true)?;
            // bf16: dx is rounded once on each side, a unit of the last place apart at most.
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
            let scale = 1.0
                + cpu
                    .to_dtype(DType::F32)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f32>()?;
            let d = max_diff(&cpu, &on_gpu.to_device(&Device::Cpu)?)? / scale;
            assert!(d < tol, "{shape:?} hc rows {hc_rows} {dtype:?}: {d}");
        }
    }
    Ok(())
}

#[test]
fn swiglu_mlp_op_matches_the_composite_forward_and_backward() -> Result<()> {
    // The op stacks gate and up as one (2 H, C) weight; the composite is the layer's CPU path,
    // down(silu(x g^T) (x u^T)), with candle's silu. Both weights get their own gradients back
    // through the stacking. And the same as one node over the three weights (the layer's CUDA
    // path, `swiglu_mlp`), the stack made outside the graph and its gradient handed back in
    // halves.
    let (b, t, c, hidden) = (2, 3, 6, 10);
    let x = Var::from_tensor(&randn(120, (b, t, c), 1.0)?)?;
    let gate = Var::from_tensor(&randn(121, (hidden, c), 0.5)?)?;
    let up = Var::from_tensor(&randn(122, (hidden, c), 0.5)?)?;
    let down = Var::from_tensor(&randn(123, (c, hidden), 0.5)?)?;
    let w = randn(124, (b, t, c), 1.0)?;
    let (xt, g, u, d) = (
        x.as_tensor(),
        gate.as_tensor(),
        up.as_tensor(),
        down.as_tensor(),
    );
    let run = |how: usize| -> Result<Vec<Tensor>> {
        let y = match how {
            0 => {
                let r = xt.reshape((b * t, c))?;
                let h = (r.matmul(&g.t()?)?.silu()? * r.matmul(&u.t()?)?)?;
                h.matmul(&d.t()?)?.reshape((b, t, c))?
            }
            1 => xt.apply_op3(&Tensor::cat(&[g, u], 0)?, d, FusedMlp(Kind::SwiGlu))?,
            _ => swiglu_mlp(xt, g, u, d)?,
        };
        let grads = (&y * &w)?.sum_all()?.backward()?;
        let mut out = vec![y];
        for v in [&x, &gate, &up, &down] {
            out.push(grads.get(v.as_tensor()).expect("a gradient").clone());
        }
        Ok(out)
    };
    let composite = run(0)?;
    for how in [1, 2] {
        for (i, (a, b)) in run(how)?.iter().zip(&composite).enumerate() {
            assert_eq!(a.dims(), b.dims(), "{how} #{i}");
            assert!(max_diff(a, b)? < 1e-5, "{how} #{i}: {}", max_diff(a, b)?);
        }
    }
    Ok(())
}

#[test]
fn linear_op_matches_the_composite_forward_and_backward() -> Result<()> {
    // f32 throughout: the op against x W^T as candle's matmul of the transposed weight, on
    // (B, T, in) inputs, values and both gradients.
    let x = Var::from_tensor(&randn(130, (2, 5, 7), 1.0)?)?;
    let weight = Var::from_tensor(&randn(131, (4, 7), 0.5)?)?;
    let w = randn(132, (2, 5, 4), 1.0)?;
    let run = |fused: bool| -> Result<Vec<Tensor>> {
        let y = if fused {
            x.as_tensor().apply_op2(weight.as_tensor(), FusedLinear)?
        } else {
            let r = x.as_tensor().reshape((10, 7))?;
            r.matmul(&weight.as_tensor().t()?)?.reshape((2, 5, 4))?
        };
        let grads = (&y * &w)?.sum_all()?.backward()?;
        Ok(vec![
            y,
            grads.get(x.as_tensor()).expect("dx").clone(),
            grads.get(weight.as_tensor()).expect("dw").clone(),
        ])
    };
    for (i, (a, b)) in run(true)?.iter().zip(run(false)?).enumerate() {
        assert_eq!(a.dims(), b.dims(), "#{i}");
        assert!(max_diff(a, &b)? < 1e-6, "#{i}: {}", max_diff(a, &b)?);
    }
    Ok(())
}

#[test]
fn ops_given_f32_weights_compute_in_bf16_and_return_f32_gradients() -> Result<()> {
    // Under mixed precision the ops take the f32 masters and cast them inside: the same values
    // as casting first in the graph (the composite training used before), the weights'
    // gradients in f32.
    let x = randn(140, (3, 8), 1.0)?.to_dtype(DType::BF16)?;
    let (up, down) = (randn(141, (12, 8), 0.3)?, randn(142, (8, 12), 0.3)?);
    let weight = randn(144, (5, 8), 0.3)?;
    let w = randn(143, (3, 8), 1.0)?;
    let run = |fused: bool| -> Result<Vec<Tensor>> {
        let vars: Vec<Var> = [&x, &up, &down, &weight]
            .iter()
            .map(|t| Var::from_tensor(t))
            .collect::<Result<_>>()?;
        let [xt, ut, dt, wt] = [0, 1, 2, 3].map(|i| vars[i].as_tensor());
        let (y, z) = if fused {
            let y = xt.apply_op3(ut, dt, FusedMlp(Kind::Relu2))?;
            (y, xt.apply_op2(wt, FusedLinear)?)
        } else {
            let [u16, d16, w16] = [ut, dt, wt].map(|t| t.to_dtype(DType::BF16));
            let h = activation(&xt.matmul(&u16?.t()?)?, Kind::Relu2)?;
            (h.matmul(&d16?.t()?)?, xt.matmul(&w16?.t()?)?)
        };
        let y_part = (y.to_dtype(DType::F32)? * &w)?.sum_all()?;
        let grads = (y_part + z.to_dtype(DType::F32)?.sum_all()?)?.backward()?;
        let mut out = vec![y, z];
        for v in &vars {
            out.push(grads.get(v.as_tensor()).expect("a gradient").clone());
        }
        Ok(out)
    };
    let (fused, composite) = (run(true)?, run(false)?);
    for (i, (a, b)) in fused.iter().zip(&composite).enumerate() {
        assert_eq!(a.dtype(), b.dtype(), "#{i}");
        let scale = b
            .to_dtype(DType::F32)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(max_diff(a, b)? <= 2e-2 * scale, "#{i}: {}", max_diff(a, b)?);
    }
    assert_eq!(fused[3].dtype(), DType::F32);
    assert_eq!(fused[5].dtype(), DType::F32);
    Ok(())
}

/// y sigmoid(g) through the op or through the composite (nn::sigmoid, broadcast over each
/// gate's group), with the values and both gradients of loss = sum(w * out).
fn gate_both(y: &Tensor, g: &Tensor, fused: bool, seed: u64) -> Result<Vec<Tensor>> {
    let (yv, gv) = (Var::from_tensor(y)?, Var::from_tensor(g)?);
    let out = if fused {
        yv.as_tensor().apply_op2(gv.as_tensor(), SigmoidGate)?
    } else {
        let (b, t, c) = y.dims3()?;
        let heads = g.dim(2)?;
        let s = crate::nn::sigmoid(gv.as_tensor())?.unsqueeze(3)?;
        yv.as_tensor()
            .reshape((b, t, heads, c / heads))?
            .broadcast_mul(&s)?
            .reshape((b, t, c))?
    };
    let w = randn(seed, out.shape(), 1.0)?.to_device(out.device())?;
    let grads = (out.to_dtype(DType::F32)? * w)?.sum_all()?.backward()?;
    let dy = grads.get(yv.as_tensor()).expect("dy").clone();
    let dg = grads.get(gv.as_tensor()).expect("dg").clone();
    Ok(vec![out, dy, dg])
}

#[test]
fn sigmoid_gate_op_matches_the_composite_forward_and_backward() -> Result<()> {
    // Elementwise (a gate a value) and headwise (a gate per head of 4), logits up to +-12
    // where the composite's tanh saturates.
    for heads in [12, 3] {
        let y = randn(150, (2, 5, 12), 1.0)?;
        let g = (randn(151, (2, 5, heads), 1.0)? * 4.0)?;
        let fused = gate_both(&y, &g, true, 152)?;
        let composite = gate_both(&y, &g, false, 152)?;
        for (i, (a, b)) in fused.iter().zip(&composite).enumerate() {
            assert_eq!(a.dims(), b.dims(), "heads {heads} #{i}");
            assert!(
                max_diff(a, b)? < 1e-5,
                "heads {heads} #{i}: {}",
                max_diff(a, b)?
            );
        }
    }
    Ok(())
}

/// On a GPU: the gate's kernels against the CPU op at the 1B shape's width, both kinds.
#[cfg(feature = "cuda")]
#[test]
fn sigmoid_gate_kernels_match_the_cpu_op() -> Result<()> {
    let Some(gpu) = gpu() else {
        return Ok(());
    };
    for dtype in [DType::F32, DType::BF16] {
        let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
        for heads in [2048, 16] {
            let y = randn(160, (2, 300, 2048), 1.0)?.to_dtype(dtype)?;
            let g = (randn(161, (2, 300, heads), 1.0)? * 3.0)?.to_dtype(dtype)?;
            let cpu = gate_both(&y, &g, true, 162)?;
            let cuda = gate_both(&y.to_device(&gpu)?, &g.to_device(&gpu)?, true, 162)?;
            for (i, (a, b)) in cpu.iter().zip(&cuda).enumerate() {
                // dg of a head sums 128 products: scale the tolerance with it.
                let scale = if i == 2 && heads == 16 { 16.0 } else { 1.0 };
                let d = max_diff(a, &b.to_device(&Device::Cpu)?)?;
                assert!(d < tol * scale, "{dtype:?} heads {heads} #{i}: {d}");
            }
        }
    }
    Ok(())
}

/// On a GPU: Muon's stack kernels (fused/muon_step.rs) against their CPU ops, on a stack of
/// three 512 x 2048 matrices, both dtypes of the rounds.
#[cfg(feature = "cuda")]
#[test]
fn muon_stack_kernels_match_the_cpu_ops() -> Result<()> {
    let Some(gpu) = gpu() else {
        return Ok(());
    };
    let m = randn(170, (3, 512, 2048), 1.0)?;
    let g = randn(171, (3, 512, 2048), 1.0)?;
    let w = randn(172, (512, 2048), 1.0)?;
    let f = (randn(173, (512, 1), 1.0)?.abs()? * 0.01)?;
    for dtype in [DType::F32, DType::BF16] {
        let run = |d: &Device| -> Result<Vec<Tensor>> {
            let (m, g) = (m.to_device(d)?, g.to_device(d)?);
            // A clipping factor that is not one: the kernels scale g as they read it.
            let (m2, x) = muon_prepare(&m, &g, (0.95, true), 0.3, dtype)?;
            let rs = row_sum_squares(&x)?;
            let w = w.to_device(d)?.copy()?;
            muon_apply(&w, &x.get(1)?, &f.to_device(d)?, 0.99)?;
            [m2, x, rs, w]
                .iter()
                .map(|t| t.to_device(&Device::Cpu))
                .collect()
        };
        let (cpu, cuda) = (run(&Device::Cpu)?, run(&gpu)?);
        // The norm and the row sums add 2048 x 512 and 2048 values in another order.
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
        for (i, (a, b)) in cpu.iter().zip(&cuda).enumerate() {
            let scale = a
                .to_dtype(DType::F32)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            let d = max_diff(a, b)? / (1.0 + scale);
            assert!(d < tol, "{dtype:?} muon #{i}: {d}");
        }
    }
    Ok(())
}

#[test]
fn norm_proj_op_takes_the_state_as_it_is() -> Result<()> {
    // An mHC state (B, T, n, C) = (2, 3, 4, 5) against its rows (6, 20) through the
    // composite: the same logits, and the gradients in the state's own shape.
    let state = randn(180, (2, 3, 4, 5), 1.0)?;
    let phi = randn(181, (20, 7), 0.3)?;
    let fused = norm_proj_both(&state, &phi, true, 182)?;
    let composite = norm_proj_both(&state.reshape((6, 20))?, &phi, false, 182)?;
    assert_eq!(fused[1].dims(), &[2, 3, 4, 5]);
    for (i, (a, b)) in fused.iter().zip(&composite).enumerate() {
        let d = max_diff(&a.reshape(b.shape())?, b)?;
        assert!(d < 1e-5, "#{i}: {d}");
    }
    Ok(())
}

/// One mHC-shaped sublayer through the ops: coefficients from the normed projection of the
/// state, the pre-mix, a sublayer, the post-mix; `shared` passes the three readers of the
/// state one gradient cell. Returns the output and the gradients of the state and of phi.
fn mixed_sublayer(state: &Tensor, phi: &Tensor, shared: bool) -> Result<Vec<Tensor>> {
    let (b, t, n, _) = state.dims4()?;
    let (sv, pv) = (Var::from_tensor(state)?, Var::from_tensor(phi)?);
    let acc = shared.then(StateGrad::default);
    let op = NormProj {
        eps: 1e-6,
        acc: acc.clone(),
    };
    let z = sv
        .as_tensor()
        .apply_op2(pv.as_tensor(), op)?
        .narrow(1, 0, n + n * (n + 1))?;
    let pre = crate::nn::sigmoid(&z.narrow(1, 0, n)?)?.reshape((b, t, n))?;
    let coef = z
        .narrow(1, n, n * (n + 1))?
        .reshape((b, t, n, n + 1))?
        .contiguous()?;
    let premix = PreMix { acc: acc.clone() };
    let h = sv.as_tensor().apply_op2(&pre.contiguous()?, premix)?;
    let out = (h * 2.0)?.tanh()?;
    let y = sv.as_tensor().apply_op3(&coef, &out, PostMix { acc })?;
    let w = randn(192, y.shape(), 1.0)?.to_device(y.device())?;
    let grads = (y.to_dtype(DType::F32)? * &w)?.sum_all()?.backward()?;
    Ok(vec![
        y,
        grads.get(sv.as_tensor()).expect("dstate").clone(),
        grads.get(pv.as_tensor()).expect("dphi").clone(),
    ])
}

#[test]
fn the_states_readers_sum_its_gradient_in_one_cell() -> Result<()> {
    // The same values and gradients whether each reader returns its part of the state's
    // gradient to autograd or the three share the cell, the projection returning the sum.
    let state = randn(190, (2, 3, 4, 5), 1.0)?;
    let phi = randn(191, (20, 24), 0.3)?;
    let (apart, shared) = (
        mixed_sublayer(&state, &phi, false)?,
        mixed_sublayer(&state, &phi, true)?,
    );
    for (i, (a, b)) in apart.iter().zip(&shared).enumerate() {
        assert!(max_diff(a, b)? < 1e-6, "#{i}: {}", max_diff(a, b)?);
    }
    Ok(())
}

/// On a GPU: the shared state gradient's kernels (the pre-mix's and the projection's with the
/// gradient so far added) against the CPU ops, at a width of 256 and 4 streams.
#[cfg(feature = "cuda")]
#[test]
fn the_shared_state_gradient_matches_on_the_gpu() -> Result<()> {
    let Some(gpu) = gpu() else {
        return Ok(());
    };
    let state = randn(193, (2, 64, 4, 256), 1.0)?;
    let phi = randn(194, (1024, 24), 0.05)?;
    for dtype in [DType::F32, DType::BF16] {
        let tol = if dtype == DType::F32 { 1e-4 } else { 3e-2 };
        let cpu = mixed_sublayer(&state.to_dtype(dtype)?, &phi, false)?;
        let cuda = mixed_sublayer(
            &state.to_dtype(dtype)?.to_device(&gpu)?,
            &phi.to_device(&gpu)?,
            true,
        )?;
        for (i, (a, b)) in cpu.iter().zip(&cuda).enumerate() {
            let scale = a
                .to_dtype(DType::F32)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            let d = max_diff(a, &b.to_device(&Device::Cpu)?)? / (1.0 + scale);
            assert!(d < tol, "{dtype:?} #{i}: {d}");
        }
    }
    Ok(())
}

/// A block of Newton-Schulz rounds on the Gram matrix is the rounds taken one at a time on
/// X (the same polynomials in exact arithmetic): in f32, wide and tall stacks, blocks of two
/// and three against that many plain rounds X <- a X + (b A + c A^2) X written out here.
#[test]
fn a_newton_schulz_block_is_its_rounds_one_at_a_time() -> Result<()> {
    let coeffs = (3.4445, -4.7750, 2.0315);
    let (a, b, c) = coeffs;
    for shape in [(2usize, 16usize, 48usize), (3, 40, 12)] {
        let scale = 1.0 / ((shape.1 * shape.2) as f64).sqrt();
        let x = (randn(201, shape, 1.0)? * scale)?;
        let tall = shape.1 > shape.2;
        let round = |x: &Tensor| -> Result<Tensor> {
            let (x, back) = match tall {
                true => (x.transpose(1, 2)?.contiguous()?, true),
                false => (x.clone(), false),
            };
            let g = x.matmul(&x.t()?)?;
            let y = ((&x * a)? + ((&g * b)? + (g.matmul(&g)? * c)?)?.matmul(&x)?)?;
            match back {
                true => y.transpose(1, 2)?.contiguous(),
                false => Ok(y),
            }
        };
        for rounds in [1usize, 2, 3] {
            let mut want = x.clone();
            for _ in 0..rounds {
                want = round(&want)?;
            }
            let got = newton_schulz_block(&x, rounds, coeffs)?;
            let top = want.abs()?.max_all()?.to_scalar::<f32>()?;
            let d = max_diff(&want, &got)? / top;
            assert!(d < 1e-5, "{shape:?}, {rounds} rounds: {d}");
        }
    }
    Ok(())
}

/// On a GPU: a block of Newton-Schulz rounds through cuBLAS (bf16, on the Gram matrix)
/// against candle's ops in f32 on the CPU from the same bf16 values, wide and tall stacks
/// (each matrix of Frobenius norm about 1, as the rounds see them), blocks of one and two.
#[cfg(feature = "cuda")]
#[test]
fn newton_schulz_block_matches_the_composite() -> Result<()> {
    let Some(gpu) = gpu() else {
        return Ok(());
    };
    for shape in [(3usize, 256usize, 512usize), (2, 512, 256), (2, 128, 1024)] {
        for rounds in [1usize, 2] {
            let scale = 1.0 / ((shape.1 * shape.2) as f64).sqrt();
            let x = (randn(200, shape, 1.0)? * scale)?.to_dtype(DType::BF16)?;
            let coeffs = (3.4445, -4.7750, 2.0315);
            let cpu = newton_schulz_block(&x.to_dtype(DType::F32)?, rounds, coeffs)?;
            let cuda = newton_schulz_block(&x.to_device(&gpu)?, rounds, coeffs)?;
            assert_eq!(cuda.dtype(), DType::BF16);
            let cuda = cuda.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
            let top = cpu.abs()?.max_all()?.to_scalar::<f32>()?;
            let d = max_diff(&cpu, &cuda)? / top;
            eprintln!("newton-schulz block {shape:?} x {rounds}: {d:.2e}");
            assert!(d < 2e-2 * rounds as f32, "{shape:?}, {rounds} rounds: {d}");
        }
    }
    Ok(())
}

#[test]
fn weight_gradient_op_sums_row_products_in_f32() -> Result<()> {
    // Hand-worked: dy = [[1, 2], [3, -1]], x = [[0.5, 1, -2], [2, 0, 1]]:
    // dW[o][i] = sum_r dy[r][o] x[r][i] = [[1*0.5 + 3*2, 1 + 0, -2 + 3], [1 - 2, 2, -4 - 1]].
    let dy = Tensor::new(&[[1f32, 2.0], [3.0, -1.0]], &Device::Cpu)?;
    let x = Tensor::new(&[[0.5f32, 1.0, -2.0], [2.0, 0.0, 1.0]], &Device::Cpu)?;
    let dw = dy.apply_op2_no_bwd(&x, &WeightGrad)?;
    assert_eq!(dw.dtype(), DType::F32);
    assert_eq!(
        dw.to_vec2::<f32>()?,
        vec![vec![6.5, 1.0, 1.0], vec![-1.0, 2.0, -5.0]]
    );
    // From bf16 rows: the product of the rounded values, summed in f32 (a second
    // implementation: candle's f32 matmul of the same values).
    let (dy, x) = (
        randn(170, (64, 24), 1.0)?.to_dtype(DType::BF16)?,
        randn(171, (64, 40), 1.0)?.to_dtype(DType::BF16)?,
    );
    let want = dy
        .to_dtype(DType::F32)?
        .t()?
        .matmul(&x.to_dtype(DType::F32)?)?;
    let got = dy.apply_op2_no_bwd(&x, &WeightGrad)?;
    assert_eq!(got.dtype(), DType::F32);
    assert!(max_diff(&got, &want)? < 1e-5);
    Ok(())
}

#[test]
fn scale_in_place_multiplies_by_the_factor_on_the_device() -> Result<()> {
    let f = Tensor::new(&[0.25f32], &Device::Cpu)?;
    let x = Tensor::new(&[4f32, -2.0, 1.0], &Device::Cpu)?;
    x.inplace_op2(&f, &ScaleBy)?;
    assert_eq!(x.to_vec1::<f32>()?, vec![1.0, -0.5, 0.25]);
    // bf16: the product in f32, rounded once (3 * 0.25 = 0.75 is exact in bf16).
    let h = Tensor::new(&[3f32, 10.0], &Device::Cpu)?.to_dtype(DType::BF16)?;
    h.inplace_op2(&f, &ScaleBy)?;
    assert_eq!(h.to_dtype(DType::F32)?.to_vec1::<f32>()?, vec![0.75, 2.5]);
    // A factor of two values is refused.
    let two = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
    assert!(x.inplace_op2(&two, &ScaleBy).is_err());
    Ok(())
}

/// On a GPU: the weight gradient's f32-output product and the in-place scale against their
/// CPU ops, at a linear layer's size (2048 rows into a 512 x 768 weight).
#[cfg(feature = "cuda")]
#[test]
fn weight_gradient_and_scale_kernels_match_the_cpu_ops() -> Result<()> {
    let Some(gpu) = gpu() else {
        return Ok(());
    };
    let (dy, x) = (
        randn(172, (2048, 512), 1.0)?.to_dtype(DType::BF16)?,
        randn(173, (2048, 768), 1.0)?.to_dtype(DType::BF16)?,
    );
    let cpu = dy.apply_op2_no_bwd(&x, &WeightGrad)?;
    let cuda = dy
        .to_device(&gpu)?
        .apply_op2_no_bwd(&x.to_device(&gpu)?, &WeightGrad)?;
    assert_eq!(cuda.dtype(), DType::F32);
    // Sums of 2048 products of size ~1: f32 accumulation in another order.
    let d = max_diff(&cpu, &cuda.to_device(&Device::Cpu)?)?;
    assert!(d < 1e-3, "weight gradient: {d}");
    for dtype in [DType::F32, DType::BF16] {
        let v = randn(174, (3, 1000), 1.0)?.to_dtype(dtype)?;
        let f = Tensor::new(&[1f32 / 8192.0], &Device::Cpu)?;
        let on_gpu = v.to_device(&gpu)?;
        on_gpu.inplace_op2(&f.to_device(&gpu)?, &ScaleBy)?;
        v.inplace_op2(&f, &ScaleBy)?;
        let d = max_diff(&v, &on_gpu.to_device(&Device::Cpu)?)?;
        assert_eq!(d, 0.0, "{dtype:?}: one rounding of the same f32 product");
    }
    Ok(())
}

/// On a GPU: the head and loss from bf16 rows and the f32 head weight (as training calls it)
/// against the same function on the CPU, loss and both gradients, through a mean so that the
/// incoming gradient is not one.
#[cfg(feature = "cuda")]
#[test]
fn the_head_loss_on_the_gpu_matches_the_cpu() -> Result<()> {
    let Some(gpu) = gpu() else {
        return Ok(());
    };
    let x = randn(175, (256, 64), 1.0)?.to_dtype(DType::BF16)?;
    let w = randn(176, (500, 64), 0.2)?;
    let t = Tensor::from_vec(
        (0..256u32).map(|i| (i * 37 + 11) % 500).collect::<Vec<_>>(),
        256,
        &Device::Cpu,
    )?;
    let run = |x: &Tensor, dev: &Device| -> Result<Vec<Tensor>> {
        let (xv, wv) = (
            Var::from_tensor(&x.to_device(dev)?)?,
            Var::from_tensor(&w.to_device(dev)?)?,
        );
        let loss = (linear_cross_entropy_sum(xv.as_tensor(), wv.as_tensor(), &t.to_device(dev)?)?
            / 256.0)?;
        let g = loss.backward()?;
        let dw = g.get(wv.as_tensor()).expect("a head gradient").clone();
        assert_eq!(dw.dtype(), DType::F32, "the f32 weight's gradient is f32");
        let dx = g.get(xv.as_tensor()).expect("an input gradient").clone();
        [loss, dx, dw]
            .iter()
            .map(|t| t.to_device(&Device::Cpu))
            .collect()
    };
    // The reference: the same values in f32 on the CPU (x's bf16 values cast up).
    let reference = run(&x.to_dtype(DType::F32)?, &Device::Cpu)?;
    let cuda = run(&x, &gpu)?;
    let mut gaps = Vec::new();
    for (a, b) in reference.iter().zip(&cuda) {
        let size = a.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        gaps.push((max_diff(a, b)?, size));
    }
    // All three before any assertion, so that a failure shows each (loss, dx, dw).
    eprintln!("head loss on the GPU against f32 on the CPU (gap, size): {gaps:?}");
    for (i, (d, size)) in gaps.iter().enumerate() {
        assert!(*d <= 2e-2 * size, "#{i}: {d} of {size}");
    }
    Ok(())
}

/// Slots of three sizes (one over a chunk of the CUDA kernel's, one under a warp), the last
/// without decay, on `dev`: (w, m, v, g) each.
fn adam_slots(dev: &Device) -> Result<Vec<[Tensor; 4]>> {
    [(300_001usize, 190u64), (1000, 191), (7, 192)]
        .iter()
        .map(|&(n, seed)| {
            let w = randn(seed, n, 1.0)?.to_device(dev)?;
            let m = (randn(seed + 10, n, 0.1)?).to_device(dev)?;
            let v = (randn(seed + 20, n, 0.1)?.sqr()?).to_device(dev)?;
            let g = randn(seed + 30, n, 1.0)?.to_device(dev)?;
            Ok([w, m, v, g])
        })
        .collect()
}

fn adam_numbers(grad_scale: f32) -> AdamStep {
    AdamStep {
        beta1: 0.9,
        beta2: 0.95,
        lr: 1e-2,
        bias1: 0.19,
        bias2: 0.0975,
        eps: 1e-8,
        decay: 0.999,
        grad_scale,
    }
}

fn adam_on(slots: &[[Tensor; 4]], h: &AdamStep) -> Result<()> {
    let views: Vec<AdamSlot> = slots
        .iter()
        .enumerate()
        .map(|(i, [w, m, v, g])| AdamSlot {
            w,
            m,
            v,
            g,
            decays: i + 1 < slots.len(),
        })
        .collect();
    adam_step(&views, h)
}

#[test]
fn adam_step_scales_the_gradients_it_reads() -> Result<()> {
    // The step with clipping's factor s equals the step on the gradients times s (scaled
    // beforehand), and a slot that does not decay keeps d = 1.
    let (a, b) = (adam_slots(&Device::Cpu)?, adam_slots(&Device::Cpu)?);
    adam_on(&a, &adam_numbers(0.25))?;
    let scaled: Vec<[Tensor; 4]> = b
        .iter()
        .map(|[w, m, v, g]| Ok([w.clone(), m.clone(), v.clone(), (g * 0.25)?]))
        .collect::<Result<_>>()?;
    adam_on(&scaled, &adam_numbers(1.0))?;
    for (x, y) in a.iter().zip(&scaled) {
        for i in 0..3 {
            assert_eq!(max_diff(&x[i], &y[i])?, 0.0, "tensor {i}");
        }
    }
    // By hand for the last (non-decaying) slot's first value: m and v from the scaled g,
    // then w - lr m^ / (sqrt(v^) + eps).
    let [w0, m0, v0, g0] = adam_slots(&Device::Cpu)?.pop().expect("three slots");
    let first = |t: &Tensor| -> Result<f32> { Ok(t.to_vec1::<f32>()?[0]) };
    let (w, m, v, g) = (first(&w0)?, first(&m0)?, first(&v0)?, first(&g0)? * 0.25);
    let m1 = 0.9 * m + 0.1 * g;
    let v1 = 0.95 * v + 0.05 * g * g;
    let want = w - 1e-2 * (m1 / 0.19) / ((v1 / 0.0975).sqrt() + 1e-8);
    let got = first(&a[2][0])?;
    assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    Ok(())
}

/// On a GPU: AdamW's one-launch update of every parameter against the CPU's per-parameter
/// ops, two steps with a clipping factor.
#[cfg(feature = "cuda")]
#[test]
fn adam_step_kernel_matches_the_cpu_ops() -> Result<()> {
    let Some(gpu) = gpu() else {
        return Ok(());
    };
    let (cpu, cuda) = (adam_slots(&Device::Cpu)?, adam_slots(&gpu)?);
    for _ in 0..2 {
        adam_on(&cpu, &adam_numbers(0.7))?;
        adam_on(&cuda, &adam_numbers(0.7))?;
    }
    for (i, (a, b)) in cpu.iter().zip(&cuda).enumerate() {
        for j in 0..3 {
            let d = max_diff(&a[j], &b[j].to_device(&Device::Cpu)?)?;
            assert!(d < 1e-6, "slot {i} tensor {j}: {d}");
        }
    }
    Ok(())
}

#[test]
fn a_node_over_any_number_of_weights_backpropagates_like_its_composite() -> Result<()> {
    // y = (x w1 + w2) w3 elementwise, three weights (a link of two and a link of one), as a
    // node with its backward pass by hand, against autograd through the composite; the input
    // is read a second time outside the node, so its gradients from both add.
    let (x0, w10, w20, w30) = (
        randn(180, (3, 5), 1.0)?,
        randn(181, (3, 5), 1.0)?,
        randn(182, (3, 5), 1.0)?,
        randn(183, (3, 5), 1.0)?,
    );
    let r = randn(184, (3, 5), 1.0)?;
    let run = |fused: bool| -> Result<Vec<Tensor>> {
        let vars = [&x0, &w10, &w20, &w30].map(|t| Var::from_tensor(t).expect("a variable"));
        let [x, w1, w2, w3] = vars.each_ref().map(|v| v.as_tensor().clone());
        let y = if fused {
            let inner = ((&x * &w1)? + &w2)?.detach();
            let y = (&inner * &w3)?.detach();
            let (xd, w1d, w3d) = (x.detach(), w1.detach(), w3.detach());
            let backward: Backward = Box::new(move |dy: &Tensor, into| {
                let dx = (dy * (&w1d * &w3d)?)?;
                let dw1 = (dy * (&xd * &w3d)?)?;
                let dw2 = (dy * &w3d)?;
                let dw3 = (dy * &inner)?;
                Ok(Grads {
                    input: Some(registry::add_into(dx, into)?),
                    weights: vec![Some(dw1), Some(dw2), Some(dw3)],
                })
            });
            let weights = vec![w1.clone(), w2.clone(), w3.clone()];
            node(
                &x,
                Detached {
                    y,
                    weights,
                    backward,
                },
            )?
        } else {
            (((&x * &w1)? + &w2)? * &w3)?
        };
        let loss = ((&y * &r)?.sum_all()? + x.sqr()?.sum_all()?)?;
        let grads = loss.backward()?;
        let mut out = vec![y];
        for v in &vars {
            out.push(grads.get(v.as_tensor()).expect("every gradient").clone());
        }
        Ok(out)
    };
    let (fused, composite) = (run(true)?, run(false)?);
    for (i, (a, b)) in fused.iter().zip(&composite).enumerate() {
        assert!(max_diff(a, b)? < 1e-6, "#{i}");
    }
    Ok(())
}

#[test]
fn add_product_adds_the_product_in_place() -> Result<()> {
    // dst = [[1, 0], [0, 1]] + [[1, 2, 0], [0, 1, -1]] [[1, 0], [0, 1], [2, 3]]
    //     = [[1 + 1, 0 + 2], [0 - 2, 1 + 1 - 3]] = [[2, 2], [-2, -1]].
    let dst = Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &Device::Cpu)?;
    let a = Tensor::new(&[[1f32, 2.0, 0.0], [0.0, 1.0, -1.0]], &Device::Cpu)?;
    let b = Tensor::new(&[[1f32, 0.0], [0.0, 1.0], [2.0, 3.0]], &Device::Cpu)?;
    dst.inplace_op3(&a, &b, &AddProduct)?;
    assert_eq!(
        dst.to_vec2::<f32>()?,
        vec![vec![2.0, 2.0], vec![-2.0, -1.0]]
    );
    // Operands that do not fit are refused.
    assert!(dst.inplace_op3(&b, &a, &AddProduct).is_err());
    Ok(())
}

/// On a GPU: the in-place product in bf16 against its CPU op, at a projection's size.
#[cfg(feature = "cuda")]
#[test]
fn add_product_kernel_matches_the_cpu_op() -> Result<()> {
    let Some(gpu) = gpu() else {
        return Ok(());
    };
    let dst = randn(185, (512, 256), 1.0)?.to_dtype(DType::BF16)?;
    let a = randn(186, (512, 384), 1.0)?.to_dtype(DType::BF16)?;
    let b = randn(187, (384, 256), 0.1)?.to_dtype(DType::BF16)?;
    let on_gpu = dst.to_device(&gpu)?;
    on_gpu.inplace_op3(&a.to_device(&gpu)?, &b.to_device(&gpu)?, &AddProduct)?;
    dst.inplace_op3(&a, &b, &AddProduct)?;
    let scale = dst
        .to_dtype(DType::F32)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    let d = max_diff(&dst, &on_gpu.to_device(&Device::Cpu)?)?;
    assert!(d < 1e-2 * scale, "{d} of {scale}");
    Ok(())
}

/// A detached computation (registry's `Detached`) against autograd through `composite` over
/// the same input and weights: the output, the input's gradient handed back with `into`
/// added, and every weight's, for the output's gradient `r`. Returns the largest gap, relative to 1 + the largest value
/// of the composite's tensor.
fn detached_gap(
    d: Detached,
    composite: &dyn Fn(&Tensor, &[Tensor]) -> Result<Tensor>,
    x: &Tensor,
    r: &Tensor,
    into: &Tensor,
) -> Result<f32> {
    let xv = Var::from_tensor(&x.to_dtype(DType::F32)?)?;
    let wv: Vec<Var> = d
        .weights
        .iter()
        .map(|w| Var::from_tensor(&w.to_dtype(DType::F32)?.copy()?))
        .collect::<Result<_>>()?;
    let ws: Vec<Tensor> = wv.iter().map(|v| v.as_tensor().clone()).collect();
    let y = composite(xv.as_tensor(), &ws)?;
    let grads = (&y * r.to_dtype(DType::F32)?)?.sum_all()?.backward()?;
    let want_dx =
        (grads.get(xv.as_tensor()).expect("the input's gradient") + into.to_dtype(DType::F32)?)?;
    let rel = |a: &Tensor, want: &Tensor| -> Result<f32> {
        let scale = 1.0 + want.abs()?.max_all()?.to_scalar::<f32>()?;
        Ok(max_diff(&a.to_device(&Device::Cpu)?, &want.to_device(&Device::Cpu)?)? / scale)
    };
    let mut gap = rel(&d.y.to_dtype(DType::F32)?, &y)?;
    let into = into.copy()?;
    let got = (d.backward)(&r.to_dtype(d.y.dtype())?, Some(into))?;
    let dx = got.input.expect("the input's gradient");
    gap = gap.max(rel(&dx.to_dtype(DType::F32)?, &want_dx)?);
    assert_eq!(got.weights.len(), ws.len());
    for (g, w) in got.weights.iter().zip(&ws) {
        let want = grads.get(w).expect("a weight's gradient");
        let g = g
            .as_ref()
            .expect("a weight's gradient")
            .to_dtype(DType::F32)?;
        gap = gap.max(rel(&g, want)?);
    }
    Ok(gap)
}

/// The detached norm and MLPs on `dev` in `dtype` against their composites, with a gradient
/// to add into: the largest gap of each.
fn detached_gaps(dev: &Device, dtype: DType) -> Result<Vec<(&'static str, f32)>> {
    let (b, t, c, hidden) = (2, 3, 16, 24);
    let on = |t: Tensor| t.to_dtype(dtype)?.to_device(dev);
    let x = on(randn(190, (b, t, c), 1.0)?)?;
    let r = on(randn(191, (b, t, c), 1.0)?)?;
    let into = on(randn(192, (b, t, c), 1.0)?)?;
    let gain = (randn(193, c, 0.3)? + 1.0)?.to_device(dev)?;
    let (gate, up) = (
        randn(194, (hidden, c), 0.3)?.to_device(dev)?,
        randn(195, (hidden, c), 0.3)?.to_device(dev)?,
    );
    let down = randn(196, (c, hidden), 0.3)?.to_device(dev)?;
    let rows = |x: &Tensor| x.reshape((b * t, c));
    let norm = |x: &Tensor, w: &[Tensor]| -> Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
        x.broadcast_div(&(ms + crate::nn::NORM_EPS)?.sqrt()?)?
            .broadcast_mul(&w[0])
    };
    let mut gaps = vec![(
        "norm",
        detached_gap(
            rms_norm_outside(&x, &gain, crate::nn::NORM_EPS as f32)?,
            &norm,
            &x,
            &r,
            &into,
        )?,
    )];
    for kind in [Kind::GeluErf, Kind::Relu2] {
        let mlp = |x: &Tensor, w: &[Tensor]| -> Result<Tensor> {
            let h = activation(&rows(x)?.matmul(&w[0].t()?)?, kind)?;
            h.matmul(&w[1].t()?)?.reshape((b, t, c))
        };
        let d = mlp_outside(kind, &x, &up, &down)?;
        gaps.push(("mlp", detached_gap(d, &mlp, &x, &r, &into)?));
    }
    let swiglu = |x: &Tensor, w: &[Tensor]| -> Result<Tensor> {
        let x = rows(x)?;
        let h = (x.matmul(&w[0].t()?)?.silu()? * x.matmul(&w[1].t()?)?)?;
        h.matmul(&w[2].t()?)?.reshape((b, t, c))
    };
    let d = swiglu_outside(&x, &gate, &up, &down)?;
    gaps.push(("swiglu", detached_gap(d, &swiglu, &x, &r, &into)?));
    // The norm, then the MLP on its output: `then` chains the backward passes, `into`
    // reaching the norm's.
    let both = |x: &Tensor, w: &[Tensor]| -> Result<Tensor> {
        let h = norm(x, &w[..1])?;
        let a = activation(&rows(&h)?.matmul(&w[1].t()?)?, Kind::Relu2)?;
        a.matmul(&w[2].t()?)?.reshape((b, t, c))
    };
    let normed = rms_norm_outside(&x, &gain, crate::nn::NORM_EPS as f32)?;
    let body = mlp_outside(Kind::Relu2, &normed.y, &up, &down)?;
    gaps.push((
        "norm then mlp",
        detached_gap(normed.then(body), &both, &x, &r, &into)?,
    ));
    Ok(gaps)
}

#[test]
fn detached_norm_and_mlps_match_their_composites() -> Result<()> {
    // f32 on the CPU: the same arithmetic in another order. In bf16 the detached forms round
    // their activations and the gradient they add into; the composite runs in f32 from the
    // same rounded inputs.
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
        for (what, gap) in detached_gaps(&Device::Cpu, dtype)? {
            assert!(gap < tol, "{what} {dtype:?}: {gap}");
        }
    }
    Ok(())
}

/// On a GPU: the same in bf16 and f32, through the kernels (the norm's backward adding into
/// the gradient in place, the MLPs' input gradients added by cuBLAS in bf16).
#[cfg(feature = "cuda")]
#[test]
fn detached_norm_and_mlps_on_the_gpu_match_their_composites() -> Result<()> {
    let Some(gpu) = gpu() else {
        return Ok(());
    };
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::BF16, 2e-2)] {
        for (what, gap) in detached_gaps(&gpu, dtype)? {
            eprintln!("{what} {dtype:?}: {gap}");
            assert!(gap < tol, "{what} {dtype:?}: {gap}");
        }
    }
    Ok(())
}

/// On a GPU: the residual's sum and the norm's input gradient added in place, against their
/// CPU ops, at rows of whole 16-byte packs and not (the kernels' two paths), f32 and bf16.
#[cfg(feature = "cuda")]
#[test]
fn add_and_norm_into_kernels_match_the_cpu_ops() -> Result<()> {
    let Some(gpu) = gpu() else {
        return Ok(());
    };
    for dtype in [DType::F32, DType::BF16] {
        let tol = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
        for shape in [(512, 2048), (300, 100), (17, 7)] {
            let on = |t: Tensor, d: &Device| t.to_dtype(dtype)?.to_device(d);
            let (a, b) = (randn(200, shape, 1.0)?, randn(201, shape, 1.0)?);
            let (x, dy, acc) = (
                randn(202, shape, 1.0)?,
                randn(203, shape, 1.0)?,
                randn(204, shape, 1.0)?,
            );
            let gain = randn(205, shape.1, 1.0)?;
            let run = |d: &Device| -> Result<Vec<Tensor>> {
                let sum = on(a.clone(), d)?.apply_op2_no_bwd(&on(b.clone(), d)?, &Add)?;
                // A copy of its own: in f32 on the CPU, `on` would hand back acc's storage,
                // which the op writes.
                let into = on(acc.copy()?, d)?;
                let op = RmsNormBwdXInto {
                    eps: 1e-6,
                    gain: gain.to_device(d)?,
                };
                into.inplace_op3(&on(x.clone(), d)?, &on(dy.clone(), d)?, &op)?;
                [sum, into]
                    .iter()
                    .map(|t| t.to_device(&Device::Cpu))
                    .collect()
            };
            let (cpu, cuda) = (run(&Device::Cpu)?, run(&gpu)?);
            for (i, (c, g)) in cpu.iter().zip(&cuda).enumerate() {
                // Relative to the largest value: bf16 rounds each sum to 2^-8 of it.
                let scale = 1.0
                    + c.to_dtype(DType::F32)?
                        .abs()?
                        .max_all()?
                        .to_scalar::<f32>()?;
                let d = max_diff(c, g)? / scale;
                assert!(d < tol, "{dtype:?} {shape:?} #{i}: {d}");
            }
        }
    }
    Ok(())
}

#[test]
fn the_residual_sum_op_adds() -> Result<()> {
    let a = Tensor::new(&[[1f32, 2.0], [3.0, -4.0]], &Device::Cpu)?;
    let b = Tensor::new(&[[0.5f32, -2.0], [1.0, 4.0]], &Device::Cpu)?;
    let s = a.apply_op2_no_bwd(&b, &Add)?;
    assert_eq!(s.to_vec2::<f32>()?, vec![vec![1.5, 0.0], vec![4.0, 0.0]]);
    assert!(a.apply_op2_no_bwd(&b.t()?.narrow(0, 0, 1)?, &Add).is_err());
    Ok(())
}

#[test]
fn stacking_two_weights_in_bf16_is_their_casts_concatenated() -> Result<()> {
    let (a, b) = (randn(210, (3, 5), 1.0)?, randn(211, (2, 5), 1.0)?);
    let want = Tensor::cat(&[&a.to_dtype(DType::BF16)?, &b.to_dtype(DType::BF16)?], 0)?;
    let got = a.apply_op2_no_bwd(&b, &StackCast)?;
    assert_eq!(got.dtype(), DType::BF16);
    assert_eq!(max_diff(&got, &want)?, 0.0);
    assert!(a.apply_op2_no_bwd(&b.t()?, &StackCast).is_err());
    Ok(())
}

/// On a GPU: the stacking kernel against its CPU op, bit for bit (both round to nearest),
/// at rows of whole quads of values and not.
#[cfg(feature = "cuda")]
#[test]
fn the_stacking_kernel_matches_the_cpu_op() -> Result<()> {
    let Some(gpu) = gpu() else {
        return Ok(());
    };
    for (ra, rb, c) in [(300, 200, 64), (3, 2, 5)] {
        let (a, b) = (randn(212, (ra, c), 1.0)?, randn(213, (rb, c), 1.0)?);
        let cpu = a.apply_op2_no_bwd(&b, &StackCast)?;
        let cuda = a
            .to_device(&gpu)?
            .apply_op2_no_bwd(&b.to_device(&gpu)?, &StackCast)?;
        assert_eq!(
            max_diff(&cpu, &cuda.to_device(&Device::Cpu)?)?,
            0.0,
            "{ra} {rb} {c}"
        );
    }
    Ok(())
}
