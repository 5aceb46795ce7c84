mod core;
pub mod gated_gqa;
pub mod gqa;
pub mod mha;

pub use self::core::{AttentionShape, CausalSelfAttention};

#[cfg(test)]
mod tests {
    use super::gated_gqa::{Gate, GatedGqa};
    use super::gqa::Gqa;
    use super::mha::Mha;
    use crate::nn::randn;
    use candle_core::{Device, IndexOp, Result, Tensor};
    use registry::{Attention, Dims, ParamBuilder, Spec};

    fn dims() -> Dims {
        Dims {
            d_model: 16,
            n_layers: 2,
            vocab: 32,
            seq_len: 8,
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
    }

    #[test]
    fn changing_a_later_token_leaves_earlier_outputs_unchanged() -> Result<()> {
        let variants: Vec<Box<dyn Attention>> = vec![
            Box::new(Mha::default()),
            Box::new(Gqa::default()),
            Box::new(Gqa {
                kv_heads: 1,
                qk_norm: true,
                ..Gqa::default()
            }),
            Box::new(GatedGqa::default()),
            Box::new(GatedGqa {
                gate: Gate::Headwise,
                ..GatedGqa::default()
            }),
        ];
        let x = randn(1, (1, 8, 16), 1.0)?;
        let x2 = Tensor::cat(
            &[
                &x.i((.., ..5, ..))?,
                &(x.i((.., 5.., ..))? + randn(2, (1, 3, 16), 1.0)?)?,
            ],
            1,
        )?;
        for a in variants {
            let attn = a.build(&dims(), &ParamBuilder::new(3, &Device::Cpu))?;
            let (y, y2) = (attn.forward(&x)?, attn.forward(&x2)?);
            let early = max_diff(&y.i((.., ..5, ..))?, &y2.i((.., ..5, ..))?)?;
            let late = max_diff(&y.i((.., 5.., ..))?, &y2.i((.., 5.., ..))?)?;
            assert_eq!(early, 0.0, "{a:?}");
            assert!(late > 1e-6, "{a:?}");
        }
        Ok(())
    }

    #[test]
    fn gqa_with_as_many_kv_heads_as_heads_is_mha() -> Result<()> {
        let x = randn(4, (2, 8, 16), 1.0)?;
        let mha = Mha {
            qk_norm: true,
            ..Mha::default()
        }
        .build(&dims(), &ParamBuilder::new(9, &Device::Cpu))?;
        let gqa = Gqa {
            heads: 4,
            kv_heads: 4,
            qk_norm: true,
            ..Gqa::default()
        }
        .build(&dims(), &ParamBuilder::new(9, &Device::Cpu))?;
        assert_eq!(max_diff(&mha.forward(&x)?, &gqa.forward(&x)?)?, 0.0);
        Ok(())
    }

    #[test]
    fn grouped_heads_share_their_key_value_head() -> Result<()> {
        // kv_heads = 1 with every query weight equal across heads: all heads see the same
        // keys and values, so each head's output equals head 0's.
        let p = ParamBuilder::new(5, &Device::Cpu);
        let attn = super::CausalSelfAttention::new(
            Gqa {
                kv_heads: 1,
                ..Gqa::default()
            }
            .shape(),
            &dims(),
            &p,
        )?;
        let q = p
            .params()
            .into_iter()
            .find(|q| q.name == "q.weight")
            .unwrap();
        let head0 = q.var.as_tensor().narrow(0, 0, 4)?;
        q.var
            .set(&Tensor::cat(&[&head0, &head0, &head0, &head0], 0)?)?;
        let y = attn
            .attend(&randn(6, (1, 8, 16), 1.0)?)?
            .reshape((1, 8, 4, 4))?;
        for h in 1..4 {
            assert!(max_diff(&y.i((.., .., h))?, &y.i((.., .., 0))?)? < 1e-6);
        }
        Ok(())
    }

    #[test]
    fn a_gate_of_one_is_ungated_attention() -> Result<()> {
        let x = randn(7, (2, 8, 16), 1.0)?;
        for gate in [Gate::Elementwise, Gate::Headwise] {
            let cfg = GatedGqa {
                gate,
                ..GatedGqa::default()
            };
            // Same seed and names: the q, k, v, o weights are the ones Gqa draws.
            let gated = cfg.build_gated(&dims(), &ParamBuilder::new(11, &Device::Cpu))?;
            let plain = Gqa::default().build(&dims(), &ParamBuilder::new(11, &Device::Cpu))?;
            let width = if gate == Gate::Elementwise { 16 } else { 4 };
            let ones = Tensor::ones((2, 8, width), candle_core::DType::F32, &Device::Cpu)?;
            let y = gated.forward_with_gate(&x, &ones)?;
            assert!(max_diff(&y, &plain.forward(&x)?)? < 1e-6, "{gate:?}");
            // A zero gate silences the sublayer.
            let y0 = gated.forward_with_gate(&x, &ones.zeros_like()?)?;
            assert_eq!(y0.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        }
        Ok(())
    }

    #[test]
    fn kv_heads_must_divide_heads() {
        let err = Gqa {
            heads: 4,
            kv_heads: 3,
            ..Gqa::default()
        }
        .check(&dims())
        .unwrap_err();
        assert_eq!(err, "kv_heads = 3 does not divide heads = 4");
        let err = Mha {
            heads: 3,
            ..Mha::default()
        }
        .check(&dims())
        .unwrap_err();
        assert_eq!(err, "heads = 3 does not divide d_model = 16");
    }

    /// On a GPU: every attention sublayer where flash attention applies (bf16, heads of 64 and
    /// 128), which trains as one node of the graph (fused/attention_sublayer.rs), against the
    /// same weights in f32 on the CPU (the composites): the output and the gradients of the
    /// input and of every weight, within bf16's rounding.
    #[cfg(feature = "cuda")]
    #[test]
    fn the_fused_sublayers_match_the_cpu_composites() -> Result<()> {
        use candle_core::DType;
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("skipped: no CUDA device");
            return Ok(());
        };
        let c = 256;
        let dims = Dims {
            d_model: c,
            n_layers: 2,
            vocab: 32,
            seq_len: 96,
        };
        let variants: Vec<(&str, Box<dyn Attention>)> = vec![
            (
                "Gqa, heads of 128",
                Box::new(Gqa {
                    heads: 2,
                    kv_heads: 1,
                    ..Gqa::default()
                }),
            ),
            (
                "Gqa, heads of 64, QK-norm",
                Box::new(Gqa {
                    heads: 4,
                    kv_heads: 2,
                    qk_norm: true,
                    ..Gqa::default()
                }),
            ),
            (
                "GatedGqa, elementwise",
                Box::new(GatedGqa {
                    heads: 4,
                    kv_heads: 2,
                    ..GatedGqa::default()
                }),
            ),
            (
                "GatedGqa, headwise",
                Box::new(GatedGqa {
                    heads: 2,
                    kv_heads: 2,
                    gate: Gate::Headwise,
                    ..GatedGqa::default()
                }),
            ),
        ];
        let x = randn(7, (2, 96, c), 1.0)?;
        let w = randn(8, (2, 96, c), 1.0)?;
        for (name, attention) in &variants {
            let run = |d: &Device, dtype: DType| -> Result<Vec<(String, Tensor)>> {
                let p = ParamBuilder::new(3, d);
                let layer = attention.build(&dims, &p)?;
                // Gates start at zero weight by design in some models: move them off it.
                for q in p.params() {
                    let moved =
                        (q.var.as_tensor() + randn(9, q.var.shape(), 0.02)?.to_device(d)?)?;
                    q.var.set(&moved)?;
                }
                let xv = candle_core::Var::from_tensor(&x.to_device(d)?.to_dtype(dtype)?)?;
                let y = layer.forward(xv.as_tensor())?;
                let grads = (y.to_dtype(DType::F32)? * w.to_device(d)?)?
                    .sum_all()?
                    .backward()?;
                let mut out = vec![("y".to_string(), y.clone())];
                out.push(("dx".into(), grads.get(xv.as_tensor()).expect("dx").clone()));
                for q in p.params() {
                    let g = grads
                        .get(q.var.as_tensor())
                        .unwrap_or_else(|| panic!("{name}: no gradient for {}", q.name));
                    out.push((q.name.clone(), g.clone()));
                }
                out.into_iter()
                    .map(|(n, t)| Ok((n, t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)))
                    .collect()
            };
            let (cpu, cuda) = (run(&Device::Cpu, DType::F32)?, run(&gpu, DType::BF16)?);
            assert_eq!(cpu.len(), cuda.len());
            for ((what, a), (_, b)) in cpu.iter().zip(&cuda) {
                let scale = a.abs()?.max_all()?.to_scalar::<f32>()?;
                let d = max_diff(a, b)? / scale;
                assert!(d < 3e-2, "{name}, {what}: {d} of {scale}");
            }
        }
        Ok(())
    }
}
