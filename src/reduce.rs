//! Reductions over gradients, run on the gradients' device before the update pass: their
//! result type ([`GradStats`]) and the interface the driver and the algorithms call
//! ([`Reducer`]). The device code lives in the backend, which implements [`Reducer`]; this
//! module depends on nothing else in the crate, so the algorithm contract can name it.

use crate::error::Result;
use candle_core::Tensor;

/// Statistics of one gradient tensor, accumulated in f64.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradStats {
    /// Number of elements.
    pub n: usize,
    /// Σx².
    pub sum_sq: f64,
    /// Σ(x - mean)² from a second pass (two-pass variance); `None` when not asked for.
    pub centered_sq: Option<f64>,
}

/// Computes gradient statistics on the gradients' device. Results are accumulated in f64 and
/// do not depend on the number of threads.
pub trait Reducer {
    /// Per-tensor statistics: Σx², and with `centered` also Σ(x − mean)² from a second pass.
    /// CUDA gradients are reduced on the device, all tensors of a device in one launch per pass.
    fn stats(&mut self, grads: &[&Tensor], centered: bool) -> Result<Vec<GradStats>>;

    /// Σx² of every tensor together (f64).
    fn total_sum_sq(&mut self, grads: &[&Tensor]) -> Result<f64> {
        Ok(self.stats(grads, false)?.iter().map(|s| s.sum_sq).sum())
    }
}
