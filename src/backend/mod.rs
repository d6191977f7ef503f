//! Execution of the fused update on each device.

pub mod cpu;
pub mod simd;

use crate::algorithm::Kernel;
use crate::error::{Error, Result};
use candle_core::{Device, Shape, Tensor};

/// One parameter's share of a fused update: the kernel over (param, grad, state slots).
pub(crate) struct Work<'a, K> {
    pub param: &'a Tensor,
    pub grad: &'a Tensor,
    pub slots: &'a [Tensor],
    pub shape: &'a Shape,
    pub kernel: K,
}

/// Runs the fused update of every item in place.
///
/// The caller has checked that each grad matches its param (shape, dtype, device), that both
/// are contiguous, and that the grad shares storage with neither the param nor any slot.
pub(crate) fn update<K: Kernel>(items: &[Work<'_, K>]) -> Result<()> {
    for w in items {
        match w.param.device() {
            Device::Cpu => cpu::update(w)?,
            other => {
                return Err(Error::Unsupported(format!(
                    "optimizer step on {:?} is not supported yet",
                    other.location()
                )))
            }
        }
    }
    Ok(())
}
