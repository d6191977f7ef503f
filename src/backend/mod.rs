//! Execution of the fused update on each device.

pub mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub mod simd;

use crate::algorithm::Kernel;
use crate::error::{Error, Result};
use candle_core::{Device, Shape, Tensor};

/// One parameter's share of a fused update: the kernel over (param, grad, state slots).
#[derive(Clone, Copy, Debug)]
pub struct Work<'a, K> {
    /// The parameter (contiguous).
    pub param: &'a Tensor,
    /// Its gradient (contiguous, same shape, dtype and device, distinct storage).
    pub grad: &'a Tensor,
    /// Its state tensors, in [`crate::Algorithm::slots`] order.
    pub slots: &'a [Tensor],
    /// The parameter's shape.
    pub shape: &'a Shape,
    /// The step scalars.
    pub kernel: K,
}

/// Runs the fused update of every item in place.
///
/// The caller has checked that each grad matches its param (shape, dtype, device), that both
/// are contiguous, and that the grad shares storage with neither the param nor any slot.
pub(crate) fn update<K: Kernel>(items: &[Work<'_, K>]) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        let (cuda, rest): (Vec<&Work<'_, K>>, Vec<&Work<'_, K>>) = items
            .iter()
            .partition(|w| matches!(w.param.device(), Device::Cuda(_)));
        if !cuda.is_empty() {
            // One group's CUDA tensors go in as few launches as possible (per device).
            let mut by_dev: Vec<(candle_core::DeviceLocation, Vec<Work<'_, K>>)> = Vec::new();
            for w in cuda {
                let loc = w.param.device().location();
                match by_dev.iter_mut().find(|(l, _)| *l == loc) {
                    Some((_, v)) => v.push(*w),
                    None => by_dev.push((loc, vec![*w])),
                }
            }
            for (_, ws) in by_dev {
                K::update_cuda(&ws)?;
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
