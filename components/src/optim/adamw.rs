//! AdamW (Loshchilov & Hutter 2019, arXiv 1711.05101): Adam with bias correction and weight
//! decay decoupled from the gradient. Decay applies to matrices only (`Role::decays`), not to
//! norm gains, biases or mixing coefficients. Moments are kept in f32 beside f32 weights.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor};
use registry::{restored, Entry, Optimizer, Param, ParamDoc, Ranks, Spec, Stepper};
use serde::{Deserialize, Serialize};

use crate::fused::{adam_step, AdamSlot, AdamStep};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamW {
    fn default() -> Self {
        // beta2 = 0.95 as in GPT-3 and nanoGPT: steadier than 0.999 for short LM runs.
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

impl Spec for AdamW {
    fn validate(&self) -> std::result::Result<(), String> {
        check_adam(self.lr, self.beta1, self.beta2, self.eps, self.weight_decay)
    }
}

/// Checks shared by every Adam-family configuration.
pub(crate) fn check_adam(
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
) -> std::result::Result<(), String> {
    if !(lr.is_finite() && lr > 0.0) {
        return Err(format!("lr must be positive, got {lr}"));
    }
    for (name, b) in [("beta1", beta1), ("beta2", beta2)] {
        if !(0.0..1.0).contains(&b) {
            return Err(format!("{name} must be in [0, 1), got {b}"));
        }
    }
    if !(eps.is_finite() && eps > 0.0) {
        return Err(format!("eps must be positive, got {eps}"));
    }
    if !(weight_decay.is_finite() && weight_decay >= 0.0) {
        return Err(format!("weight_decay must be >= 0, got {weight_decay}"));
    }
    Ok(())
}

/// Adam state of one parameter group member.
struct Slot {
    param: Param,
    m: Tensor,
    v: Tensor,
}

/// The AdamW update over a set of parameters; other optimizers reuse it for the parameters
/// they do not handle themselves.
pub struct AdamWState {
    cfg: AdamW,
    slots: Vec<Slot>,
    t: i32,
}

impl AdamWState {
    pub fn new(cfg: AdamW, params: &[Param]) -> Result<Self> {
        let slots = params
            .iter()
            .map(|p| {
                // Two tensors, not one shared: the GPU path updates them in place.
                let zeros = || p.var.as_tensor().zeros_like()?.to_dtype(DType::F32);
                Ok(Slot {
                    param: p.clone(),
                    m: zeros()?,
                    v: zeros()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { cfg, slots, t: 0 })
    }
}

impl Stepper for AdamWState {
    fn step_scaled(
        &mut self,
        grads: &GradStore,
        factor: f64,
        grad_scale: f64,
        _ranks: Option<&dyn Ranks>,
    ) -> Result<()> {
        self.t += 1;
        let c = &self.cfg;
        let lr = c.lr * factor;
        let bias1 = 1.0 - c.beta1.powi(self.t);
        let bias2 = 1.0 - c.beta2.powi(self.t);
        let decays = |s: &Slot| s.param.role.decays() && c.weight_decay > 0.0;
        let fused = self.slots.iter().all(|s| {
            grads.get(s.param.var.as_tensor()).is_none_or(|g| {
                s.m.device().is_cuda()
                    && s.param.var.dtype() == DType::F32
                    && g.dtype() == DType::F32
            })
        });
        if fused {
            // Every parameter in one launch, in place (fused/adam.rs); the same arithmetic
            // as below, clipping's factor applied as each gradient is read.
            let slots: Vec<AdamSlot> = self
                .slots
                .iter()
                .filter_map(|s| {
                    let g = grads.get(s.param.var.as_tensor())?;
                    Some(AdamSlot {
                        w: s.param.var.as_tensor(),
                        m: &s.m,
                        v: &s.v,
                        g,
                        decays: decays(s),
                    })
                })
                .collect();
            let step = AdamStep {
                beta1: c.beta1 as f32,
                beta2: c.beta2 as f32,
                lr: lr as f32,
                bias1: bias1 as f32,
                bias2: bias2 as f32,
                eps: c.eps as f32,
                decay: (1.0 - lr * c.weight_decay) as f32,
                grad_scale: grad_scale as f32,
            };
            return adam_step(&slots, &step);
        }
        for s in &mut self.slots {
            let Some(g) = grads.get(s.param.var.as_tensor()) else {
                continue;
            };
            let mut g = g.to_dtype(DType::F32)?;
            if grad_scale != 1.0 {
                g = (g * grad_scale)?;
            }
            s.m = ((&s.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            s.v = ((&s.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let m_hat = (&s.m / bias1)?;
            let v_hat = (&s.v / bias2)?;
            let mut w = s.param.var.as_tensor().to_dtype(DType::F32)?;
            if decays(s) {
                w = (w * (1.0 - lr * c.weight_decay))?;
            }
            let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            let w = (w - (update * lr)?)?;
            s.param.var.set(&w.to_dtype(s.param.var.dtype())?)?;
        }
        Ok(())
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let device = self
            .slots
            .first()
            .map_or(Device::Cpu, |s| s.m.device().clone());
        let mut out = vec![(
            "adamw.t".to_string(),
            Tensor::new(&[self.t as i64], &device)?,
        )];
        for s in &self.slots {
            out.push((format!("{}.m", s.param.name), s.m.clone()));
            out.push((format!("{}.v", s.param.name), s.v.clone()));
        }
        Ok(out)
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let t = state
            .get("adamw.t")
            .ok_or_else(|| candle_core::Error::Msg("checkpoint has no `adamw.t`".into()))?;
        self.t = t.flatten_all()?.to_vec1::<i64>()?[0] as i32;
        for s in &mut self.slots {
            s.m = restored(state, &format!("{}.m", s.param.name), &s.m)?;
            s.v = restored(state, &format!("{}.v", s.param.name), &s.v)?;
        }
        Ok(())
    }
}

impl Optimizer for AdamW {
    fn lr(&self) -> f64 {
        self.lr
    }

    fn build(&self, params: &[Param], _compute: DType) -> Result<Box<dyn Stepper>> {
        Ok(Box::new(AdamWState::new(self.clone(), params)?))
    }
}

inventory::submit! {
    Entry::optimizer::<AdamW>(
        "AdamW",
        "Adam with decoupled weight decay (matrices only)",
        &[
            ParamDoc { name: "lr", doc: "peak learning rate (the schedule scales it)" },
            ParamDoc { name: "beta1", doc: "first-moment decay" },
            ParamDoc { name: "beta2", doc: "second-moment decay" },
            ParamDoc { name: "eps", doc: "added to sqrt(v) for stability" },
            ParamDoc { name: "weight_decay", doc: "decoupled decay of embeddings and matrices" },
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use registry::Role;

    #[test]
    fn two_steps_match_hand_computed_numbers() -> Result<()> {
        // w = [1, -2] (decays), loss = sum(g * w) with g = [0.5, -1]; then g' = [0.1, -1].
        // Step 1: m = 0.1 g, v = 0.05 g^2 -> m_hat = g, v_hat = g^2, update = sign(g) (eps ~ 0)
        //   w = w * (1 - 0.1 * 0.5) - 0.1 * sign(g) = [0.85, -1.8]
        // Step 2 with g' = [0.1, -1] for element 0:
        //   m = 0.9*0.05 + 0.1*0.1 = 0.055, m_hat = 0.055/0.19 = 0.289474
        //   v = 0.95*0.0125 + 0.05*0.01 = 0.012375, v_hat = 0.012375/0.0975 = 0.126923
        //   update = 0.289474 / 0.356262 = 0.812532; w = 0.85*0.95 - 0.0812532 = 0.726247
        let var = Var::new(&[1f32, -2.0], &Device::Cpu)?;
        let p = Param {
            name: "w".into(),
            var: var.clone(),
            role: Role::Hidden,
        };
        let cfg = AdamW {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-12,
            weight_decay: 0.5,
        };
        let mut opt = cfg.build(std::slice::from_ref(&p), DType::F32)?;
        let grad_of = |g: [f32; 2]| -> Result<GradStore> {
            var.as_tensor()
                .mul(&Tensor::new(&g, &Device::Cpu)?)?
                .sum_all()?
                .backward()
        };
        opt.step(&grad_of([0.5, -1.0])?, 1.0)?;
        let w1 = var.as_tensor().to_vec1::<f32>()?;
        assert!(
            (w1[0] - 0.85).abs() < 1e-6 && (w1[1] + 1.8).abs() < 1e-6,
            "{w1:?}"
        );
        opt.step(&grad_of([0.1, -1.0])?, 1.0)?;
        let w2 = var.as_tensor().to_vec1::<f32>()?;
        assert!((w2[0] - 0.726_247).abs() < 1e-5, "{w2:?}");
        // Element 1 sees the same gradient twice: update stays -1, w = -1.8*0.95 + 0.1 = -1.61
        assert!((w2[1] + 1.61).abs() < 1e-5, "{w2:?}");
        Ok(())
    }

    #[test]
    fn gains_are_not_decayed() -> Result<()> {
        let var = Var::new(&[2f32], &Device::Cpu)?;
        let p = Param {
            name: "g".into(),
            var: var.clone(),
            role: Role::Gain,
        };
        let cfg = AdamW {
            weight_decay: 0.5,
            ..AdamW::default()
        };
        let mut opt = cfg.build(&[p], DType::F32)?;
        // A zero gradient: Adam's update is 0/(0+eps) = 0, so only decay could move w.
        let grads = (var.as_tensor() * 0.0)?.sum_all()?.backward()?;
        opt.step(&grads, 1.0)?;
        assert_eq!(var.as_tensor().to_vec1::<f32>()?, vec![2.0]);
        Ok(())
    }

    #[test]
    fn non_positive_lr_is_refused() {
        let err = AdamW {
            lr: 0.0,
            ..AdamW::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(err, "lr must be positive, got 0");
    }
}
