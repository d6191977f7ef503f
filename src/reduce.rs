//! Reductions over gradients, run on the gradients' device before the update pass: their
//! result type ([`GradStats`]) and the interface the driver and the algorithms call
//! ([`Reducer`]). The device code lives in the backend, which implements [`Reducer`]; this
//! module depends on nothing else in the crate, so the algorithm contract can name it.

use crate::error::Result;
use candle_core::Tensor;

// cuda-params
/// The step scalars of the CUDA reductions (`kernels/reduce.cu`; `kernels/params.cuh` is
/// generated from this definition).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct ReduceParams {
    /// The tensor's mean, for the centered sum of squares.
    pub(crate) mean: f64,
}

// cuda-params
/// A step's verdict decided on the device (`kernels/reduce.cu`'s `step_verdict`): the update
/// kernels read it through their table's `ctl` pointer (a skipped step writes nothing; gradients
/// are multiplied by `grad_mul`), and the host reads it back only when the step's report is read.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct StepControl {
    /// The clipping factor every gradient is multiplied by (1 without clipping).
    pub(crate) grad_mul: f64,
    /// The global norm of the gradients times the step's scale.
    pub(crate) norm: f64,
    /// 1: a gradient is non-finite and the policy skips the step.
    pub(crate) skip: u32,
    /// The position among the step's gradients of the first non-finite one (`u32::MAX`: none).
    pub(crate) bad: u32,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl StepControl {
    /// Words of the struct as the device writes it.
    pub(crate) const WORDS: usize = 3;

    /// The struct from its bytes as the device wrote them (native endianness, C layout).
    pub(crate) fn from_words(w: &[u64; Self::WORDS]) -> Self {
        let b: Vec<u8> = w.iter().flat_map(|x| x.to_ne_bytes()).collect();
        let f64_at = |o: usize| f64::from_ne_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        StepControl {
            grad_mul: f64_at(std::mem::offset_of!(StepControl, grad_mul)),
            norm: f64_at(std::mem::offset_of!(StepControl, norm)),
            skip: u32_at(std::mem::offset_of!(StepControl, skip)),
            bad: u32_at(std::mem::offset_of!(StepControl, bad)),
        }
    }
}
const _: () = assert!(std::mem::size_of::<StepControl>() == 8 * StepControl::WORDS);

/// Statistics of one gradient tensor, accumulated in f64.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradStats {
    /// Number of elements.
    pub n: usize,
    /// Σx².
    pub sum_sq: f64,
    /// Σ(x - mean)² from a second pass (two-pass variance); `None` when not asked for.
    pub centered_sq: Option<f64>,
    /// Whether every element is finite: exact, computed in the same pass as Σx² (which can
    /// overflow to +∞ for finite f64 values above ~1e154).
    pub all_finite: bool,
    /// (s, Σ(x/s)²) with Σx² = s²·Σ(x/s)²: `(1, sum_sq)`, except when `sum_sq` overflowed with
    /// every element finite; then s = max |x|, so the norm is still right ([`GradStats::norm`]).
    pub scaled: (f64, f64),
}

impl GradStats {
    /// ‖x‖₂, finite for finite elements even where Σx² overflows.
    pub fn norm(&self) -> f64 {
        self.scaled.0 * self.scaled.1.sqrt()
    }
}

/// The global 2-norm of several tensors whose elements are multiplied by `scale`:
/// `sqrt(Σ sum_sq · scale²)`, and where that overflows with every element finite, the same norm
/// from the rescaled sums (so clipping sees the right norm). Non-finite when an element is.
pub fn global_norm(stats: &[GradStats], scale: f64) -> f64 {
    let total: f64 = stats.iter().map(|s| s.sum_sq).sum::<f64>() * (scale * scale);
    if total.is_finite() || stats.iter().any(|s| !s.all_finite) {
        return total.sqrt();
    }
    // Per-tensor norms are finite; combine them relative to the largest.
    let m = stats.iter().map(GradStats::norm).fold(0.0, f64::max);
    let sum: f64 = stats
        .iter()
        .map(|s| {
            let r = s.norm() / m;
            r * r
        })
        .sum();
    m * sum.sqrt() * scale.abs()
}

/// How values from several ranks combine in a collective.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    /// The sum, added in rank order.
    Sum,
    /// The sum divided by the number of ranks.
    Avg,
    /// The maximum.
    Max,
}

/// Scalar reductions across the ranks of a data-parallel job: what a sharded optimizer needs
/// to agree on global quantities (the clipping norm, the non-finite check, SGD-SaI's maximum
/// g-SNR, Adan's clipping norm). Every rank must make the same calls in the same order.
/// [`crate::dist::Communicator`] extends it with tensor collectives.
pub trait Collective: Send + Sync {
    /// The number of ranks.
    fn world_size(&self) -> usize;

    /// Combines `values` element by element across ranks; every rank gets the result.
    fn all_reduce_scalars(&self, values: &mut [f64], op: ReduceOp) -> Result<()>;
}

/// Computes gradient statistics on the gradients' device. Results are accumulated in f64 and
/// do not depend on the number of threads.
pub trait Reducer {
    /// Per-tensor statistics: Σx², and with `centered` also Σ(x − mean)² from a second pass.
    /// CUDA gradients are reduced on the device, all tensors of a device in one launch per pass.
    fn stats(&mut self, grads: &[&Tensor], centered: bool) -> Result<Vec<GradStats>>;

    /// Whether every element of each tensor is finite. The default reads the statistics; a
    /// device may run a cheaper pass that computes no sum.
    fn all_finite(&mut self, grads: &[&Tensor]) -> Result<Vec<bool>> {
        Ok(self
            .stats(grads, false)?
            .iter()
            .map(|s| s.all_finite)
            .collect())
    }

    /// Σx² of every tensor together (f64).
    fn total_sum_sq(&mut self, grads: &[&Tensor]) -> Result<f64> {
        Ok(self.stats(grads, false)?.iter().map(|s| s.sum_sq).sum())
    }
}
