//! A computation run outside candle's autograd graph, with its backward pass beside it.
//!
//! candle's gradient store zero-fills and then adds the first gradient of every node of the
//! graph, so each activation-sized tensor between two ops costs the backward pass a fill and
//! an add of its size. A model's trunk (runner/src/trunk.rs) therefore runs its sublayers as
//! [`Detached`] computations: the graph holds one node for all of them, whose backward pass
//! calls theirs in turn, and the weights' gradients go straight to the step.

use candle_core::{Result, Tensor};

/// From the gradient of a [`Detached`] output and, optionally, a gradient `into` of the
/// input's shape and dtype that the caller hands over (it may be written in place), the
/// gradients of the input (plus `into`) and of every weight, in [`Detached::weights`]' order.
pub type Backward = Box<dyn FnOnce(&Tensor, Option<Tensor>) -> Result<Grads> + Send + Sync>;

/// What a [`Backward`] returns.
pub struct Grads {
    /// The input's gradient plus `into`; None only when the input takes no gradient and no
    /// `into` was given.
    pub input: Option<Tensor>,
    /// One entry a weight, None where the weight took no gradient.
    pub weights: Vec<Option<Tensor>>,
}

/// An output `y` computed outside the graph from an input and `weights` (the parameters'
/// own tensors), and the backward pass that gives their gradients.
pub struct Detached {
    pub y: Tensor,
    pub weights: Vec<Tensor>,
    pub backward: Backward,
}

impl Detached {
    /// `self` followed by `next`, which runs on `self.y`: next's output, both sets of weights
    /// (self's first), and the backward pass through both. `into` reaches self's backward.
    pub fn then(self, next: Detached) -> Detached {
        let mut weights = self.weights;
        let first = weights.len();
        weights.extend(next.weights);
        let (inner, outer) = (self.backward, next.backward);
        let backward: Backward = Box::new(move |dy, into| {
            let later = outer(dy, None)?;
            let dmid = later.input.ok_or_else(|| {
                candle_core::Error::Msg("a detached step gave its input no gradient".into())
            })?;
            let mut earlier = inner(&dmid, into)?;
            debug_assert_eq!(earlier.weights.len(), first);
            earlier.weights.extend(later.weights);
            Ok(earlier)
        });
        Detached {
            y: next.y,
            weights,
            backward,
        }
    }
}

/// `dx` plus `into` where one is given: how a backward pass that cannot add in place keeps
/// the [`Backward`] contract.
pub fn add_into(dx: Tensor, into: Option<Tensor>) -> Result<Tensor> {
    match into {
        Some(acc) => acc + dx,
        None => Ok(dx),
    }
}
