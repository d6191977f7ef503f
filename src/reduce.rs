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
    pub fn stats(&mut self, grads: &[&Tensor], centered: bool) -> Result<Vec<GradStats>> {
        grads
            .iter()
            .map(|g| match g.device() {
                Device::Cpu => crate::backend::cpu::grad_stats(g, centered),
                other => Err(Error::Unsupported(format!(
                    "gradient reductions on {:?} are not supported yet",
                    other.location()
                ))),
            })
            .collect()
    }

    /// Σx² of every tensor together (f64). Non-finite exactly when some element is non-finite:
    /// the squares of finite f32 values cannot overflow an f64 sum.
    pub fn total_sum_sq(&mut self, grads: &[&Tensor]) -> Result<f64> {
        Ok(self.stats(grads, false)?.iter().map(|s| s.sum_sq).sum())
    }
}
