//! Reductions over gradients, run on the gradients' device before the update pass.

pub use crate::backend::cpu::GradStats;
use crate::error::{Error, Result};
use candle_core::{Device, Tensor};

/// Computes gradient statistics on the gradients' device. Results are accumulated in f64 and
/// do not depend on the number of threads.
#[derive(Debug, Default)]
pub struct Reducer {
    _private: (),
}

impl Reducer {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Per-tensor statistics: Σx², and with `centered` also Σ(x − mean)² from a second pass.
    /// CUDA gradients are reduced on the device, all tensors in one launch per pass.
    pub fn stats(&mut self, grads: &[&Tensor], centered: bool) -> Result<Vec<GradStats>> {
        let mut out = Vec::with_capacity(grads.len());
        #[cfg(feature = "cuda")]
        let on_gpu: Vec<&Tensor> = grads
            .iter()
            .copied()
            .filter(|g| matches!(g.device(), Device::Cuda(_)))
            .collect();
        #[cfg(feature = "cuda")]
        let mut gpu = crate::backend::cuda::grad_stats(&on_gpu, centered)?.into_iter();
        for g in grads {
            out.push(match g.device() {
                Device::Cpu => crate::backend::cpu::grad_stats(g, centered)?,
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

    /// Σx² of every tensor together (f64). Non-finite exactly when some element is non-finite:
    /// the squares of finite f32 values cannot overflow an f64 sum.
    pub fn total_sum_sq(&mut self, grads: &[&Tensor]) -> Result<f64> {
        Ok(self.stats(grads, false)?.iter().map(|s| s.sum_sq).sum())
    }
}
