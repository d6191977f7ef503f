//! Gradient accumulation over micro-batches.

use crate::driver::{check_matches, StepReport};
use crate::error::{Error, Result};
use crate::optimizer::Optimizer;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

/// What [`GradAccumulator::add`] does to one buffer, prepared before any is changed.
enum Update {
    /// Add this contiguous gradient into the (contiguous, CPU) buffer in place.
    AddInPlace(Tensor),
    /// The buffer's new value.
    Replace(Tensor),
}

/// How accumulated micro-batch gradients combine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    /// The sum over micro-batches.
    Sum,
    /// The mean over micro-batches (the sum, scaled by 1/n inside the optimizer's fused pass).
    Mean,
}

/// Sums gradients over micro-batches into buffers that are allocated once (at a variable's
/// first gradient) and reused, added to in place on the CPU.
///
/// ```
/// use candle_core::{DType, Device, Tensor, Var};
/// use candle_optim::{AdamW, AdamWConfig, GradAccumulator, Reduction};
///
/// let w = Var::from_tensor(&Tensor::ones(3, DType::F32, &Device::Cpu)?)?;
/// let mut opt = AdamW::new(vec![w.clone()], AdamWConfig::default())?;
/// let mut acc = GradAccumulator::new([w.clone()], Reduction::Mean);
/// for k in 1..=4 {
///     let loss = (w.as_tensor() * k as f64)?.sum_all()?;
///     acc.backward(&loss)?;
/// }
/// let report = acc.step(&mut opt)?; // one step on the mean gradient, then the buffers reset
/// assert!(report.taken() && acc.micro_batches() == 0);
/// # Ok::<(), candle_optim::Error>(())
/// ```
pub struct GradAccumulator {
    vars: Vec<Var>,
    bufs: Vec<Option<Tensor>>,
    seen: Vec<bool>,
    count: usize,
    reduction: Reduction,
}

impl GradAccumulator {
    /// An accumulator for `vars`.
    pub fn new(vars: impl IntoIterator<Item = Var>, reduction: Reduction) -> Self {
        let vars: Vec<Var> = vars.into_iter().collect();
        let n = vars.len();
        Self {
            vars,
            bufs: vec![None; n],
            seen: vec![false; n],
            count: 0,
            reduction,
        }
    }

    /// An accumulator for every variable of a `VarMap`.
    pub fn from_varmap(varmap: &candle_nn::VarMap, reduction: Reduction) -> Self {
        Self::new(varmap.all_vars(), reduction)
    }

    /// Micro-batches added since the last reset.
    pub fn micro_batches(&self) -> usize {
        self.count
    }

    /// Adds one micro-batch's gradients. Every gradient is checked (shape, dtype, device;
    /// f32, f64, bf16 or f16) and every allocation made before anything is added; on an error
    /// nothing is added.
    pub fn add(&mut self, grads: &GradStore) -> Result<()> {
        for (i, v) in self.vars.iter().enumerate() {
            if let Some(g) = grads.get(v.as_tensor()) {
                check_matches(&format!("#{i}"), v.as_tensor(), g)?;
                if !matches!(
                    g.dtype(),
                    DType::F32 | DType::F64 | DType::BF16 | DType::F16
                ) {
                    return Err(Error::UnsupportedDType {
                        param: format!("#{i}"),
                        dtype: g.dtype(),
                    });
                }
            }
        }
        // Everything that allocates, so can fail, first; then only in-place adds into
        // contiguous buffers of the checked dtype, and assignments.
        let mut plan = Vec::with_capacity(self.vars.len());
        for ((v, buf), seen) in self.vars.iter().zip(&self.bufs).zip(&self.seen) {
            let Some(g) = grads.get(v.as_tensor()) else {
                plan.push(None);
                continue;
            };
            plan.push(Some(match buf {
                // In place on the CPU (a buffer zeroed by `reset` is added to as well).
                Some(b) if matches!(b.device(), Device::Cpu) => {
                    Update::AddInPlace(if g.is_contiguous() {
                        g.clone()
                    } else {
                        g.contiguous()?
                    })
                }
                Some(b) if *seen => Update::Replace((b + g)?),
                // An owned, contiguous copy: `copy` alone keeps a strided layout, which the
                // in-place add cannot take.
                _ => Update::Replace(if g.is_contiguous() {
                    g.copy()?
                } else {
                    g.contiguous()?
                }),
            }));
        }
        for ((update, buf), seen) in plan.into_iter().zip(&mut self.bufs).zip(&mut self.seen) {
            match update {
                None => continue,
                Some(Update::AddInPlace(g)) => {
                    if let Some(b) = buf {
                        crate::backend::cpu::add_assign(b, &g)?;
                    }
                }
                Some(Update::Replace(t)) => *buf = Some(t),
            }
            *seen = true;
        }
        self.count += 1;
        Ok(())
    }

    /// Back-propagates `loss` and adds its gradients.
    pub fn backward(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.add(&grads)
    }

    /// The summed gradients (no copy), for the variables that got any since the last reset.
    pub fn sums(&self) -> GradStore {
        let mut g = GradStore::default();
        for ((v, b), seen) in self.vars.iter().zip(&self.bufs).zip(&self.seen) {
            if let (Some(b), true) = (b, seen) {
                g.insert(v.as_tensor(), b.clone());
            }
        }
        g
    }

    /// The factor the sums are multiplied by: 1 for [`Reduction::Sum`], 1/n for the mean.
    pub fn scale(&self) -> f64 {
        match self.reduction {
            Reduction::Sum => 1.0,
            Reduction::Mean => 1.0 / self.count.max(1) as f64,
        }
    }

    /// The accumulated gradients as the reduction says (the mean allocates scaled copies; a
    /// step through [`step`](Self::step) does not).
    pub fn grads(&self) -> Result<GradStore> {
        let scale = self.scale();
        if scale == 1.0 {
            return Ok(self.sums());
        }
        let mut g = GradStore::default();
        for ((v, b), seen) in self.vars.iter().zip(&self.bufs).zip(&self.seen) {
            if let (Some(b), true) = (b, seen) {
                g.insert(v.as_tensor(), (b * scale)?);
            }
        }
        Ok(g)
    }

    /// One optimizer step on the accumulated gradients (scaled inside the fused pass), then
    /// [`reset`](Self::reset). A failed step keeps the accumulated gradients.
    pub fn step(&mut self, opt: &mut dyn Optimizer) -> Result<StepReport> {
        let report = opt.step_scaled(&self.sums(), self.scale())?;
        self.reset()?;
        Ok(report)
    }

    /// Zeroes the buffers in place and starts a new accumulation.
    pub fn reset(&mut self) -> Result<()> {
        for b in self.bufs.iter().flatten() {
            b.zero_set()?;
        }
        self.seen.iter_mut().for_each(|s| *s = false);
        self.count = 0;
        Ok(())
    }
}
