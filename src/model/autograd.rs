//! Custom differentiable functions: a fast forward paired with our own backward.
//!
//! candle's fastest kernels (rms_norm, softmax, rope) record no backward pass,
//! and its matmul backward computes a weight gradient even for frozen weights.
//! A [`Function`] runs its forward on a detached tensor, so it may use any
//! kernel on any device, and supplies the gradient of its input itself.
//! [`apply`] records it in candle's graph as a single op.

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, Layout, MetalStorage, Result, Shape, Storage, Tensor,
};

/// A function of one tensor with a hand-written backward pass.
pub trait Function: Send + Sync + 'static {
    /// A name for errors and graph dumps.
    fn name(&self) -> &'static str;
    /// The value. `x` tracks no gradient.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// The gradient with respect to `x`, given the forward's input `x`, output `y`
    /// and the gradient `grad` of the output.
    fn backward(&self, x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Tensor>;
}

/// Applies `f` to `x`: directly when `x` tracks no gradient, else as a graph op.
pub fn apply<F: Function>(x: &Tensor, f: F) -> Result<Tensor> {
    if !x.track_op() {
        return f.forward(x);
    }
    // The op sees raw storage: hand it a contiguous view that starts at offset 0.
    let x = if x.is_contiguous() && x.layout().start_offset() == 0 {
        x.clone()
    } else {
        x.force_contiguous()?
    };
    x.apply_op1(Adapter(f))
}

struct Adapter<F>(F);

/// Wraps storage as a detached tensor of the layout's shape (contiguous, offset 0).
fn detached(storage: Storage, layout: &Layout) -> Tensor {
    Tensor::from_storage(storage, layout.shape().clone(), BackpropOp::none(), false)
}

/// The storage of `y`, contiguous from offset 0, and its shape.
fn into_storage(y: Tensor) -> Result<(Storage, Shape)> {
    let y = if y.is_contiguous() && y.layout().start_offset() == 0 {
        y
    } else {
        y.force_contiguous()?
    };
    let (storage, layout) = y.storage_and_layout();
    Ok((storage.try_clone(layout)?, layout.shape().clone()))
}

impl<F: Function> Adapter<F> {
    fn run<S: BackendStorage>(
        &self,
        s: &S,
        l: &Layout,
        wrap: fn(S) -> Storage,
        unwrap: fn(Storage) -> Option<S>,
    ) -> Result<(S, Shape)> {
        let x = detached(wrap(s.try_clone(l)?), l);
        let (storage, shape) = into_storage(self.0.forward(&x)?)?;
        let storage = unwrap(storage).ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: forward changed device", self.0.name()))
        })?;
        Ok((storage, shape))
    }
}

impl<F: Function> CustomOp1 for Adapter<F> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(s, l, Storage::Cpu, |s| match s {
            Storage::Cpu(s) => Some(s),
            _ => None,
        })
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        self.run(s, l, Storage::Cuda, |s| match s {
            Storage::Cuda(s) => Some(s),
            _ => None,
        })
    }

    fn metal_fwd(&self, s: &MetalStorage, l: &Layout) -> Result<(MetalStorage, Shape)> {
        self.run(s, l, Storage::Metal, |s| match s {
            Storage::Metal(s) => Some(s),
            _ => None,
        })
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.0.backward(x, y, grad)?))
    }
}
