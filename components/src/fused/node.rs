//! A whole computation as one autograd node over its input and any number of weights.
//!
//! candle's gradient store zero-fills and then adds the first gradient of every node, so a
//! sublayer built from ops pays a pass or two over each intermediate's size in the backward
//! pass (the attention sublayer: about ten of the activations' size a layer), and a custom op
//! takes at most three tensors. Here the caller computes the output outside the graph and
//! hands it over with a backward function; the node joins the graph as
//!
//! ```text
//! link_1 = Link(0, w_1, w_2), link_2 = Link(link_1, w_3, w_4), ..., y = Output(x, link_n)
//! ```
//!
//! where the links are scalars that carry the weights two at a time. The output's backward
//! runs the caller's function once, returns the input's gradient and leaves the weights' for
//! the links, which autograd visits after it (they are its ancestors) and which hand them on.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
};
use registry::{Backward, Detached, Grads};

/// `d.y`, computed outside the graph from `x` and `d.weights`, as one node of the graph
/// whose backward pass is `d.backward`.
pub fn node(x: &Tensor, d: Detached) -> Result<Tensor> {
    let Detached {
        y,
        weights,
        backward,
    } = d;
    let grads = Arc::new(Mutex::new(Vec::new()));
    let mut link = Tensor::zeros((), DType::F32, x.device())?;
    for (i, pair) in weights.chunks(2).enumerate() {
        let op = Link {
            grads: grads.clone(),
            first: 2 * i,
        };
        link = match pair {
            [a, b] => link.apply_op3(a, b, op)?,
            [a] => link.apply_op2(a, op)?,
            _ => unreachable!("chunks of two"),
        };
    }
    let op = Output {
        y: HandOver::new(&y)?,
        backward: Mutex::new(Some(backward)),
        grads,
        weights: weights.len(),
    };
    x.apply_op2(&link, op)
}

/// A scalar zero on `device`: what a link outputs and the gradient it passes on.
fn zero(device: &candle_core::Device) -> Result<Tensor> {
    Tensor::zeros((), DType::F32, device)
}

/// Carries weights `first` and `first + 1` into the graph; see the module's text.
struct Link {
    grads: Arc<Mutex<Vec<Option<Tensor>>>>,
    first: usize,
}

impl Link {
    /// Weight i's gradient (None where it took none), once.
    fn take(&self, i: usize) -> Result<Option<Tensor>> {
        let mut grads = self.grads.lock().expect("the lock is never poisoned");
        match grads.get_mut(i) {
            Some(g) => Ok(g.take()),
            None => bail!("node: weight {i}'s gradient was not computed"),
        }
    }
}

/// A custom op's output storage for a scalar f32 zero (on the CPU).
pub fn scalar_zero_cpu() -> (CpuStorage, Shape) {
    (CpuStorage::F32(vec![0.0]), Shape::from(()))
}

/// A custom op's output storage for a scalar f32 zero, on `s`'s GPU.
#[cfg(feature = "cuda")]
pub fn scalar_zero_cuda(s: &candle_core::CudaStorage) -> Result<(candle_core::CudaStorage, Shape)> {
    use candle_core::backend::BackendDevice;
    let shape = Shape::from(());
    Ok((s.device().zeros_impl(&shape, DType::F32)?, shape))
}

/// A tensor computed outside the graph, handed over once as a custom op's output: a copy of
/// its storage (`try_clone`), which therefore holds it contiguous from its start.
pub struct HandOver(Mutex<Option<Tensor>>);

impl HandOver {
    pub fn new(t: &Tensor) -> Result<Self> {
        let t = match t.is_contiguous() && t.layout().start_offset() == 0 {
            true => t.detach(),
            false => t.force_contiguous()?.detach(),
        };
        Ok(Self(Mutex::new(Some(t))))
    }

    fn take(&self) -> Result<Tensor> {
        match self.0.lock().expect("the lock is never poisoned").take() {
            Some(t) => Ok(t),
            None => bail!("an op's output was handed over twice"),
        }
    }

    /// The storage and shape for `cpu_fwd`.
    pub fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let t = self.take()?;
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cpu(s) = &*storage else {
            bail!("an op's output was computed on another device than its input");
        };
        Ok((s.try_clone(layout)?, t.shape().clone()))
    }

    /// The storage and shape for `cuda_fwd`.
    #[cfg(feature = "cuda")]
    pub fn cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        let t = self.take()?;
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(s) = &*storage else {
            bail!("an op's output was computed on another device than its input");
        };
        Ok((s.try_clone(layout)?, t.shape().clone()))
    }
}

impl CustomOp2 for Link {
    fn name(&self) -> &'static str {
        "node-link"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok(scalar_zero_cpu())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        scalar_zero_cuda(s1)
    }

    fn bwd(
        &self,
        prev: &Tensor,
        _w: &Tensor,
        _res: &Tensor,
        _grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(zero(prev.device())?), self.take(self.first)?))
    }
}

impl CustomOp3 for Link {
    fn name(&self) -> &'static str {
        "node-link"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok(scalar_zero_cpu())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        scalar_zero_cuda(s1)
    }

    fn bwd(
        &self,
        prev: &Tensor,
        _a: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        _grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (a, b) = (self.take(self.first)?, self.take(self.first + 1)?);
        Ok((Some(zero(prev.device())?), a, b))
    }
}

/// The node's output: the handed-over `y`, and the backward pass that fills the links'
/// gradients.
struct Output {
    y: HandOver,
    backward: Mutex<Option<Backward>>,
    grads: Arc<Mutex<Vec<Option<Tensor>>>>,
    weights: usize,
}

impl CustomOp2 for Output {
    fn name(&self) -> &'static str {
        "node"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.y.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.y.cuda()
    }

    fn bwd(
        &self,
        x: &Tensor,
        _link: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Some(backward) = self
            .backward
            .lock()
            .expect("the lock is never poisoned")
            .take()
        else {
            bail!("node: a second backward pass");
        };
        let Grads {
            input: dx,
            weights: dw,
        } = backward(grad, None)?;
        if dw.len() != self.weights {
            bail!(
                "node: {} weight gradients for {} weights",
                dw.len(),
                self.weights
            );
        }
        *self.grads.lock().expect("the lock is never poisoned") = dw;
        Ok((dx, Some(zero(x.device())?)))
    }
}
