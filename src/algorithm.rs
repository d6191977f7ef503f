//! The contract between the shared driver ([`crate::Optim`]) and one optimizer's math.
//!
//! An algorithm is its per-group configuration type: it validates itself, names its state slots,
//! computes its step scalars in f64 ([`Algorithm::kernel`]) and supplies the per-element rule
//! ([`Kernel::apply`]). Parameter groups, lazy state, counters, gradient checks, clipping,
//! schedules, checkpoints and the CPU/CUDA execution all live once in the driver.

use crate::backend::cpu;
use crate::elem::Elem;
use crate::error::Result;
use crate::reduce::Reducer;
use arrayvec::ArrayVec;
use candle_core::{Shape, Tensor};
use serde::{de::DeserializeOwned, Serialize};
use std::fmt::Debug;

/// Most state tensors any algorithm keeps per parameter (Adan: m, n, d, q).
pub const MAX_SLOTS: usize = 4;

/// The state slices of one parameter (or of one chunk of it), in [`Algorithm::slots`] order.
pub type Slots<'a, F> = ArrayVec<&'a mut [F], MAX_SLOTS>;

/// What the driver knows about one parameter at the step being taken.
#[derive(Clone, Debug)]
pub struct ParamMeta<'a> {
    /// The parameter's name.
    pub name: &'a str,
    /// The parameter's shape.
    pub shape: &'a Shape,
    /// The learning rate in effect for this parameter at this step: the peak rate × the
    /// schedule's factor × its group's ratio to the base rate. Algorithms read the rate from
    /// here, never from their configuration's `lr` (which is the group's configured rate).
    pub lr: f64,
    /// How many updates this parameter has received, counting the current one (so 1 at its
    /// first update). It does not advance in steps where the parameter has no gradient.
    pub t: u64,
    /// The parameter group's step counter, counting the current step. It advances at every
    /// step taken, whether or not this parameter has a gradient (Adan's convention).
    pub group_step: u64,
    /// True when the parameter's state was created (or reset) for this step: its slots hold
    /// zeros that the algorithm has never written.
    pub fresh: bool,
}

/// A kernel's step scalars as the CUDA kernel reads them (`kernels/<module>.cu` documents the
/// order). At most 16.
pub type Words = ArrayVec<f64, 16>;

/// The per-element update rule with its step scalars. The scalars are f64 and are rounded to
/// the compute type once per chunk, outside the element loop. The same scalars drive the CUDA
/// kernel ([`Kernel::words`]), so the CPU and GPU paths share one definition.
pub trait Kernel: Copy + Send + Sync + Debug + Sized + 'static {
    /// The CUDA module (`kernels/<name>.cu`) whose `<name>_<dtype>` entry points run this rule.
    const CUDA_MODULE: &'static str;

    /// The step scalars in the order the CUDA kernel reads them.
    fn words(&self) -> Words;

    /// Applies the update to one contiguous run of elements. `p`, `g` and every slot have the
    /// same length.
    fn apply<P: Elem>(&self, p: &mut [P], g: &[P], state: &mut [&mut [P::Math]]);

    /// Updates a whole tensor on the CPU. The default splits it into chunks over the current
    /// rayon pool and calls [`Kernel::apply`] on each; algorithms that need per-tensor or
    /// per-row reductions before writing (AdamP) override it.
    fn update_cpu<P: Elem>(&self, p: &mut [P], g: &[P], state: Slots<'_, P::Math>, shape: &Shape) {
        let _ = shape;
        cpu::par_apply(self, p, g, state);
    }

    /// Updates a group's tensors on one CUDA device. The default is one multi-tensor launch of
    /// the module's element-wise kernel per parameter dtype; algorithms with reductions before
    /// the write (AdamP) override it.
    #[cfg(feature = "cuda")]
    fn update_cuda(items: &[crate::backend::Work<'_, Self>]) -> Result<()> {
        crate::backend::cuda::elementwise(items)
    }
}

/// One parameter with a gradient in the current step, as seen by [`Algorithm::prepare`].
pub struct PrepareEntry<'a, A: Algorithm> {
    /// Index of the parameter's group.
    pub group: usize,
    /// The parameter's name.
    pub name: &'a str,
    /// The gradient (contiguous, validated against the parameter).
    pub grad: &'a Tensor,
    /// The parameter's algorithm-specific scalars; `prepare` may write them.
    pub extra: &'a mut A::ParamExtra,
    /// Whether the parameter has no state yet.
    pub fresh: bool,
}

/// Everything [`Algorithm::prepare`] may look at or change before the update pass.
pub struct StepContext<'a, 'b, A: Algorithm> {
    /// The configuration the optimizer was built with (optimizer-wide options live here).
    pub base: &'a A,
    /// Every group's configuration.
    pub groups: &'a [&'a A],
    /// The parameters that have a gradient this step, in group order.
    pub entries: &'a mut [PrepareEntry<'b, A>],
    /// Factor every gradient is multiplied by inside the fused pass (driver clipping already
    /// folded in). An algorithm with its own clipping (Adan) multiplies it further.
    pub grad_scale: f64,
    /// Gradient reductions on the parameters' device.
    pub reducer: &'a mut Reducer,
}

/// Implements the [`Algorithm`] accessors of a configuration with `lr` and `weight_decay`
/// fields.
macro_rules! lr_and_weight_decay {
    () => {
        fn lr(&self) -> f64 {
            self.lr
        }
        fn set_lr(&mut self, lr: f64) {
            self.lr = lr;
        }
        fn weight_decay(&self) -> f64 {
            self.weight_decay
        }
        fn set_weight_decay(&mut self, wd: f64) {
            self.weight_decay = wd;
        }
    };
}
pub(crate) use lr_and_weight_decay;

/// One optimizer's math. Implemented by the optimizer's configuration type, which holds one
/// parameter group's hyperparameters with the official names and defaults.
pub trait Algorithm:
    Clone + Debug + Default + PartialEq + Send + Sync + Serialize + DeserializeOwned + 'static
{
    /// Short name, used in checkpoints and reports (`"adamw"`).
    const NAME: &'static str;
    /// The per-element rule with this step's scalars.
    type Kernel: Kernel;
    /// Scalars kept per parameter besides the slot tensors (SGD-SaI's g-SNR).
    type ParamExtra: Clone
        + Debug
        + Default
        + PartialEq
        + Send
        + Sync
        + Serialize
        + DeserializeOwned;
    /// Optimizer-wide state (SGD-SaI's warm-up flag and g-SNR maximum).
    type Global: Clone + Debug + Default + PartialEq + Send + Sync + Serialize + DeserializeOwned;

    /// Checks every hyperparameter; called for each group at construction and before each step.
    fn validate(&self) -> Result<()>;
    /// The learning rate.
    fn lr(&self) -> f64;
    /// Sets the learning rate.
    fn set_lr(&mut self, lr: f64);
    /// The weight-decay coefficient.
    fn weight_decay(&self) -> f64;
    /// Sets the weight-decay coefficient.
    fn set_weight_decay(&mut self, wd: f64);
    /// Names of the state tensors kept per parameter under this configuration, in the order the
    /// kernel receives them. All have the parameter's shape.
    fn slots(&self) -> &'static [&'static str];

    /// Bytes one step must move for a parameter of `numel` elements and rank `rank` whose
    /// elements take `param_bytes` each (state is f32): the floor of a fused step's memory
    /// traffic (ALGORITHMS.md §8). The default is one pass that reads p, g and every slot and
    /// writes p and every slot.
    fn traffic_bytes(&self, numel: usize, rank: usize, param_bytes: usize) -> usize {
        let _ = rank;
        numel * (3 * param_bytes + 2 * 4 * self.slots().len())
    }

    /// Runs once per step, after the gradients were checked and before any parameter changes:
    /// the place for reductions over gradients (SGD-SaI's first-step g-SNR, Adan's global norm).
    fn prepare(global: &mut Self::Global, ctx: &mut StepContext<'_, '_, Self>) -> Result<()> {
        let _ = (global, ctx);
        Ok(())
    }

    /// The step scalars of one parameter, computed in f64.
    fn kernel(
        &self,
        meta: &ParamMeta<'_>,
        extra: &Self::ParamExtra,
        global: &Self::Global,
        grad_scale: f64,
    ) -> Self::Kernel;

    /// Checks per-parameter scalars read from a checkpoint: they must be what some run can
    /// produce (SGD-SaI: a g-SNR that is finite, ≥ 0 and an f32 value).
    fn check_extra(extra: &Self::ParamExtra) -> Result<()> {
        let _ = extra;
        Ok(())
    }

    /// Checks optimizer-wide scalars read from a checkpoint, like
    /// [`check_extra`](Self::check_extra).
    fn check_global(global: &Self::Global) -> Result<()> {
        let _ = global;
        Ok(())
    }

    /// Named per-parameter scalars for inspection and checkpoints.
    fn extra_scalars(extra: &Self::ParamExtra) -> Vec<(&'static str, f64)> {
        let _ = extra;
        Vec::new()
    }

    /// Named optimizer-wide scalars for inspection and checkpoints.
    fn global_scalars(global: &Self::Global) -> Vec<(&'static str, f64)> {
        let _ = global;
        Vec::new()
    }
}
