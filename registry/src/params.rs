//! Trainable parameters: created by name with an explicit, seeded initialization.
//!
//! candle's CPU backend cannot be seeded (`Device::set_seed` fails there), so parameters are
//! drawn here from a generator seeded by the trial seed and the parameter's full name. The
//! same seed gives the same weights on every run and device, and adding a component does not
//! shift the initialization of the others.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha12Rng;

/// What a parameter is, which decides its optimizer group and weight decay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Token embedding (tied with the output head).
    Embedding,
    /// A 2-D weight matrix of a hidden layer: Muon-family optimizers take these.
    Hidden,
    /// A gate projection: 2-D, but trained by AdamW in the Muon family.
    Gate,
    /// Norm gains and other per-channel scales.
    Gain,
    /// Additive biases.
    Bias,
    /// Residual mixing coefficients (Hyper-Connections, mHC, LAuReL).
    Mixing,
}

impl Role {
    /// Weight decay applies to matrices, never to gains, biases or mixing coefficients.
    pub fn decays(self) -> bool {
        matches!(self, Role::Embedding | Role::Hidden | Role::Gate)
    }
}

/// How a parameter starts.
#[derive(Clone, Debug, PartialEq)]
pub enum Init {
    Normal {
        std: f64,
    },
    Const(f64),
    /// Explicit values in row-major order (e.g. the mHC bias pattern).
    Values(Vec<f32>),
}

/// A named trainable variable.
#[derive(Clone, Debug)]
pub struct Param {
    pub name: String,
    pub var: Var,
    pub role: Role,
}

/// Creates parameters under a dotted name prefix, like candle's `VarBuilder` but seeded.
#[derive(Clone)]
pub struct ParamBuilder {
    prefix: String,
    seed: u64,
    device: Device,
    store: Arc<Mutex<Vec<Param>>>,
}

impl ParamBuilder {
    pub fn new(seed: u64, device: &Device) -> Self {
        Self {
            prefix: String::new(),
            seed,
            device: device.clone(),
            store: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// A builder whose parameters are named `prefix.name`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        };
        Self {
            prefix,
            ..self.clone()
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Creates (and registers) an f32 parameter; returns the tensor that tracks its gradient.
    pub fn tensor(
        &self,
        name: &str,
        shape: impl Into<Shape>,
        init: Init,
        role: Role,
    ) -> Result<Tensor> {
        let shape: Shape = shape.into();
        let full = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        };
        let n = shape.elem_count();
        let values = match init {
            Init::Normal { std } => {
                normal_values(self.seed ^ fnv1a(full.as_bytes()), n, std, NORMAL_CHUNK)
            }
            Init::Const(c) => vec![c as f32; n],
            Init::Values(v) => {
                if v.len() != n {
                    candle_core::bail!(
                        "parameter {full}: {} initial values for shape {shape:?}",
                        v.len()
                    );
                }
                v
            }
        };
        let t = Tensor::from_vec(values, shape, &self.device)?.to_dtype(DType::F32)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        let mut store = self.store.lock().expect("parameter store poisoned");
        if store.iter().any(|p| p.name == full) {
            candle_core::bail!("parameter {full} created twice");
        }
        store.push(Param {
            name: full,
            var,
            role,
        });
        Ok(out)
    }

    /// Every parameter created through this builder or its children, in creation order.
    pub fn params(&self) -> Vec<Param> {
        self.store.lock().expect("parameter store poisoned").clone()
    }
}

/// FNV-1a, to turn a parameter name into a seed offset that is stable across builds
/// (std's hashers are randomly keyed or unspecified).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Values a thread draws at a time in [`normal_values`].
const NORMAL_CHUNK: usize = 1 << 20;

/// n draws of N(0, std^2) from the generator seeded by `seed`, in the order one generator
/// would give them, drawn by several threads: each value takes exactly two u64 of the stream
/// (Box-Muller, four 32-bit words), so chunk i of `chunk` values starts at word 4 chunk i,
/// and every thread seeks there. A 1B model's 1.3G values took about a minute on one core.
/// (rand's StdRng is this generator, ChaCha12, seeded the same way; the tests hold the two to
/// the same values.)
fn normal_values(seed: u64, n: usize, std: f64, chunk: usize) -> Vec<f32> {
    let mut values = vec![0f32; n];
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let chunks: Vec<(usize, &mut [f32])> = values.chunks_mut(chunk).enumerate().collect();
    let per_thread = chunks.len().div_ceil(threads).max(1);
    let mut chunks = chunks.into_iter();
    std::thread::scope(|scope| loop {
        let share: Vec<(usize, &mut [f32])> = chunks.by_ref().take(per_thread).collect();
        if share.is_empty() {
            break;
        }
        scope.spawn(move || {
            for (i, out) in share {
                let mut rng = ChaCha12Rng::seed_from_u64(seed);
                rng.set_word_pos(4 * (chunk * i) as u128);
                for v in out.iter_mut() {
                    *v = (normal(&mut rng) * std) as f32;
                }
            }
        });
    });
    values
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]: ln stays finite
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_weights_and_names_decorrelate() -> Result<()> {
        let a = ParamBuilder::new(7, &Device::Cpu);
        let b = ParamBuilder::new(7, &Device::Cpu);
        let wa = a
            .pp("l0")
            .tensor("w", (4, 4), Init::Normal { std: 1.0 }, Role::Hidden)?;
        let wb = b
            .pp("l0")
            .tensor("w", (4, 4), Init::Normal { std: 1.0 }, Role::Hidden)?;
        let wc = b
            .pp("l1")
            .tensor("w", (4, 4), Init::Normal { std: 1.0 }, Role::Hidden)?;
        let va: Vec<f32> = wa.flatten_all()?.to_vec1()?;
        assert_eq!(va, wb.flatten_all()?.to_vec1::<f32>()?);
        assert_ne!(va, wc.flatten_all()?.to_vec1::<f32>()?);
        assert_eq!(b.params().len(), 2);
        assert_eq!(b.params()[1].name, "l1.w");
        Ok(())
    }

    #[test]
    fn threaded_draws_are_the_single_generators_values() {
        // rand's StdRng drawing one value after another is the reference; chunks of 1000
        // over 2500 values (a partial last chunk), and the default chunk over fewer values.
        for (seed, n, chunk) in [(3u64, 2500usize, 1000usize), (9, 777, NORMAL_CHUNK)] {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let want: Vec<f32> = (0..n).map(|_| (normal(&mut rng) * 0.5) as f32).collect();
            assert_eq!(normal_values(seed, n, 0.5, chunk), want, "seed {seed}");
        }
    }

    #[test]
    fn normal_init_has_the_requested_spread() -> Result<()> {
        let p = ParamBuilder::new(1, &Device::Cpu);
        let w = p.tensor("w", (200, 200), Init::Normal { std: 0.02 }, Role::Hidden)?;
        let v: Vec<f32> = w.flatten_all()?.to_vec1()?;
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        // 40k draws: the sample std is within ~0.4% of 0.02 with overwhelming probability.
        assert!(mean.abs() < 5e-4, "mean {mean}");
        assert!((std - 0.02).abs() < 4e-4, "std {std}");
        Ok(())
    }

    #[test]
    fn duplicate_names_are_refused() {
        let p = ParamBuilder::new(0, &Device::Cpu);
        p.tensor("g", 3, Init::Const(1.0), Role::Gain).unwrap();
        assert!(p.tensor("g", 3, Init::Const(1.0), Role::Gain).is_err());
    }
}
