//! Execution of the fused update on each device: the backend runs each execution strategy of
//! the algorithm contract ([`crate::algorithm::Execution`]) with threads and SIMD on the CPU
//! and with kernel launches on CUDA, and computes the gradient reductions ([`DeviceReducer`]).
//! Crate-private: users see only the optimizers.

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "cuda")]
mod cuda_rows;
#[cfg(feature = "cuda")]
mod kernel_abi;
mod matrix;
mod ns_bf16;
mod q8_simd;
mod rows;
pub mod simd;
mod split;
mod staged;

use crate::algorithm::{ElementWise, Execution, ExecutionKind, Kernel, Slots};
use crate::elem::Elem;
use crate::error::{Error, Result};
use crate::reduce::{GradStats, Reducer};
use crate::state::StateTensor;
use candle_core::{Device, Shape, Tensor};

/// One parameter's share of a fused update: the kernel over (param, grad, state slots).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Work<'a, K> {
    /// The parameter (contiguous).
    pub param: &'a Tensor,
    /// Its gradient (contiguous, same shape, dtype and device, distinct storage).
    pub grad: &'a Tensor,
    /// Its state slots, in [`crate::Algorithm::slots`] order.
    pub slots: &'a [StateTensor],
    /// The parameter's shape.
    pub shape: &'a Shape,
    /// The step scalars.
    pub kernel: K,
    /// The stochastic-rounding stream of a bf16 parameter written back stochastically.
    pub rounding: Option<u64>,
    /// CUDA: the device address of the step's verdict (`StepControl`, decided on the device:
    /// skip, clipping factor) that the kernels read, or 0 (the CPU's is always 0: its verdict is
    /// known before the update).
    pub ctl: u64,
}

impl<K: Kernel> Execution<K> for ElementWise {
    const KIND: ExecutionKind = ExecutionKind::ElementWise;
    type Aux = K;

    fn update_cpu<P: Elem>(k: &K, p: &mut [P], g: &[P], s: Slots<'_, P::Math>, _: &Shape) {
        cpu::par_apply(k, p, g, s);
    }
}

/// Runs the fused update of every item in place.
///
/// The caller has checked that each grad matches its param (shape, dtype, device), that both
/// are contiguous, and that the grad shares storage with neither the param nor any slot.
pub(crate) fn update<K: Kernel>(items: &[Work<'_, K>]) -> Result<()> {
    if <K::Execution as Execution<K>>::KIND == ExecutionKind::Matrix {
        // Newton–Schulz runs with candle's tensor ops on any device, over the whole group.
        return matrix::update(items);
    }
    #[cfg(feature = "cuda")]
    {
        let (cuda, rest): (Vec<&Work<'_, K>>, Vec<&Work<'_, K>>) = items
            .iter()
            .partition(|w| matches!(w.param.device(), Device::Cuda(_)));
        // One group's CUDA tensors go in as few launches as possible (per device).
        for ws in cuda::by_device(&cuda, |w| w.param.device().location()) {
            let ws: Vec<Work<'_, K>> = ws.into_iter().copied().collect();
            match <K::Execution as Execution<K>>::KIND {
                ExecutionKind::ElementWise => cuda::elementwise(&ws)?,
                ExecutionKind::RowProjected => cuda_rows::update(&ws)?,
                ExecutionKind::Matrix => matrix::update(&ws)?,
            }
        }
        for w in rest {
            update_one(w)?;
        }
        Ok(())
    }
    #[cfg(not(feature = "cuda"))]
    items.iter().try_for_each(update_one)
}

fn update_one<K: Kernel>(w: &Work<'_, K>) -> Result<()> {
    match w.param.device() {
        Device::Cpu => cpu::update(w),
        other => Err(Error::Unsupported(format!(
            "optimizer step on {:?} is not supported (build with the `cuda` feature for CUDA)",
            other.location()
        ))),
    }
}

/// The backend's [`Reducer`]: CPU tensors with a fixed split tree, CUDA tensors on the device.
#[derive(Debug, Default)]
pub(crate) struct DeviceReducer {
    _private: (),
}

impl DeviceReducer {
    pub(crate) fn new() -> Self {
        Self::default()
    }
}

impl Reducer for DeviceReducer {
    fn stats(&mut self, grads: &[&Tensor], centered: bool) -> Result<Vec<GradStats>> {
        let mut out = Vec::with_capacity(grads.len());
        #[cfg(feature = "cuda")]
        let on_gpu: Vec<&Tensor> = grads
            .iter()
            .copied()
            .filter(|g| matches!(g.device(), Device::Cuda(_)))
            .collect();
        #[cfg(feature = "cuda")]
        let mut gpu = cuda::grad_stats(&on_gpu, centered)?.into_iter();
        for g in grads {
            out.push(match g.device() {
                Device::Cpu => cpu::grad_stats(g, centered)?,
                #[cfg(feature = "cuda")]
                Device::Cuda(_) => gpu
                    .next()
                    .ok_or_else(|| Error::Unsupported("missing CUDA statistics".into()))?,
                other => {
                    return Err(Error::Unsupported(format!(
                        "gradient reductions on {:?} are not supported",
                        other.location()
                    )))
                }
            });
        }
        Ok(out)
    }

    fn all_finite(&mut self, grads: &[&Tensor]) -> Result<Vec<bool>> {
        // CPU tensors get the finite-only pass; others (CUDA) read their statistics.
        let others: Vec<&Tensor> = grads
            .iter()
            .copied()
            .filter(|g| !g.device().is_cpu())
            .collect();
        let mut others = self.stats(&others, false)?.into_iter();
        grads
            .iter()
            .map(|g| {
                if g.device().is_cpu() {
                    cpu::all_finite(g)
                } else {
                    others
                        .next()
                        .map(|s| s.all_finite)
                        .ok_or_else(|| Error::Unsupported("missing statistics".into()))
                }
            })
            .collect()
    }
}
