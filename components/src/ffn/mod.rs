pub mod gelu;
pub mod relu2;
pub mod swiglu;

use candle_core::{Result, Tensor};
use registry::{Detached, Dims, ParamBuilder, Role, Sublayer};

use crate::fused::{activation, mlp_outside, FusedMlp, Kind};
use crate::nn::{out_proj_std, rows, unrows, Linear, INIT_STD};

/// The two-matrix MLP down(act(up x)) that Gelu and Relu2 differ in the activation of.
pub(crate) struct Mlp {
    up: Linear,
    down: Linear,
    act: Kind,
}

impl Mlp {
    pub(crate) fn new(mult: f64, act: Kind, dims: &Dims, p: &ParamBuilder) -> Result<Self> {
        let (c, h) = (dims.d_model, hidden_width(mult, dims.d_model));
        let down_std = out_proj_std(dims.n_layers);
        Ok(Self {
            up: Linear::new(c, h, INIT_STD, Role::Hidden, &p.pp("up"))?,
            down: Linear::new(h, c, down_std, Role::Hidden, &p.pp("down"))?,
            act,
        })
    }
}

impl Sublayer for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cuda() {
            // One op on the GPU (fused/mlp.rs), given the f32 weights: it casts them itself.
            let (up, down) = (self.up.weight(), self.down.weight());
            return x.contiguous()?.apply_op3(up, down, FusedMlp(self.act));
        }
        let h = activation(&self.up.forward(&rows(x)?)?, self.act)?;
        unrows(&self.down.forward(&h)?, x)
    }

    fn detached(&self, x: &Tensor) -> Result<Option<Detached>> {
        if !x.device().is_cuda() {
            return Ok(None);
        }
        let (up, down) = (self.up.weight(), self.down.weight());
        mlp_outside(self.act, x, up, down).map(Some)
    }
}

/// Hidden width for a multiplier of d_model, rounded to a multiple of 8 (kernel-friendly)
/// and never below 8.
/// Forward FLOPs per token of a two-matrix MLP: up (C -> H) and down (H -> C).
pub(crate) fn two_matrix_flops(mult: f64, dims: &Dims) -> f64 {
    2.0 * 2.0 * (dims.d_model * hidden_width(mult, dims.d_model)) as f64
}

pub(crate) fn hidden_width(mult: f64, d_model: usize) -> usize {
    (((mult * d_model as f64) / 8.0).round() as usize).max(1) * 8
}

pub(crate) fn check_mult(mult: f64) -> std::result::Result<(), String> {
    if mult.is_finite() && mult > 0.0 {
        Ok(())
    } else {
        Err(format!("mult must be a positive number, got {mult}"))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use registry::{Dims, Ffn, ParamBuilder};

    #[test]
    fn the_two_matrix_mlps_size_their_hidden_layer_by_mult() {
        let dims = Dims {
            d_model: 16,
            n_layers: 1,
            vocab: 4,
            seq_len: 4,
        };
        let ffns: [Box<dyn Ffn>; 2] = [
            Box::new(super::gelu::Gelu { mult: 4.0 }),
            Box::new(super::relu2::Relu2 { mult: 2.0 }),
        ];
        for (ffn, hidden) in ffns.iter().zip([64, 32]) {
            let p = ParamBuilder::new(0, &Device::Cpu);
            ffn.build(&dims, &p).unwrap();
            let shapes: Vec<_> = p.params().iter().map(|q| q.var.dims().to_vec()).collect();
            assert_eq!(shapes, vec![vec![hidden, 16], vec![16, hidden]], "{ffn:?}");
        }
    }

    #[test]
    fn hidden_width_rounds_to_multiples_of_eight() {
        assert_eq!(super::hidden_width(8.0 / 3.0, 64), 168); // 170.7 -> 21.3 x 8
        assert_eq!(super::hidden_width(4.0, 64), 256);
        assert_eq!(super::hidden_width(0.01, 64), 8);
    }
}
