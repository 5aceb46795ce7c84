//! The plain pre-norm residual (GPT-2, Xiong et al. 2020, arXiv 2002.04745):
//! x + F(RMSNorm(x)). One stream; the sublayer applies its own norm.

use candle_core::{Result, Tensor};
use registry::{Backward, Detached, Dims, Entry, ParamBuilder, Residual, Spec, Stream};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PreNorm {}

impl Spec for PreNorm {}

struct Plain;

impl Stream for Plain {
    fn expand(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }

    fn sublayer(
        &self,
        _k: usize,
        state: &Tensor,
        f: &dyn Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        state + f(state)?
    }

    fn reduce(&self, state: &Tensor) -> Result<Tensor> {
        Ok(state.clone())
    }

    fn expand_detached(&self, x: &Tensor) -> Result<Option<Detached>> {
        Ok(Some(super::identity_outside(x)))
    }

    fn reduce_detached(&self, state: &Tensor) -> Result<Option<Detached>> {
        Ok(Some(super::identity_outside(state)))
    }

    fn sublayer_detached(
        &self,
        _k: usize,
        state: &Tensor,
        f: &dyn Fn(&Tensor) -> Result<Detached>,
    ) -> Result<Option<Detached>> {
        let Detached {
            y,
            weights,
            backward,
        } = f(state)?;
        let next = crate::fused::add_outside(state, &y)?;
        // d state = g + f's input gradient, which f's backward pass (its norm's) adds into g
        // in place: the trunk hands each gradient over once.
        let backward: Backward = Box::new(move |g, into| {
            let acc = match into {
                Some(a) => (a + g)?,
                None => g.clone(),
            };
            backward(g, Some(acc))
        });
        Ok(Some(Detached {
            y: next,
            weights,
            backward,
        }))
    }
}

impl Residual for PreNorm {
    fn build(&self, _dims: &Dims, _p: &ParamBuilder) -> Result<Box<dyn Stream>> {
        Ok(Box::new(Plain))
    }

    fn flops(&self, _dims: &Dims) -> f64 {
        0.0
    }

    fn params(&self, _dims: &Dims) -> usize {
        0
    }
}

inventory::submit! {
    Entry::residual::<PreNorm>("PreNorm", "plain pre-norm residual: x + F(norm(x))", &[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adds_the_sublayer_output_to_the_stream() -> Result<()> {
        let dims = Dims {
            d_model: 2,
            n_layers: 1,
            vocab: 2,
            seq_len: 1,
        };
        let s = PreNorm {}.build(&dims, &ParamBuilder::new(0, &Device::Cpu))?;
        let x = Tensor::new(&[[[1f32, 2.0]]], &Device::Cpu)?;
        let y = s.reduce(&s.sublayer(0, &s.expand(&x)?, &|h| h * 3.0)?)?;
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![4.0, 8.0]);
        Ok(())
    }
}
