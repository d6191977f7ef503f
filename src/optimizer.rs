//! The [`Optimizer`] trait: what a training loop calls, object safe so the algorithm can be
//! picked at run time, implemented by the driver [`Optim`] for every algorithm, plus the
//! `candle_nn::optim::Optimizer` drop-in.

use crate::algorithm::Algorithm;
use crate::checkpoint::write_atomic;
use crate::driver::{GroupMemory, NonFinitePolicy, Optim, ParamState, StepReport, VerdictMode};
use crate::error::{Error, Result};
use crate::schedule::Schedule;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

/// The interface every optimizer of this crate offers. Object safe, so a training loop can pick
/// the algorithm at run time (`Box<dyn Optimizer>`).
pub trait Optimizer: Send {
    /// The algorithm's short name (`"adamw"`).
    fn algorithm(&self) -> &'static str;
    /// Applies one update from `grads`. Parameters without a gradient are skipped entirely.
    fn step(&mut self, grads: &GradStore) -> Result<StepReport>;
    /// Back-propagates `loss` and applies one update.
    fn backward_step(&mut self, loss: &Tensor) -> Result<StepReport> {
        let grads = loss.backward()?;
        self.step(&grads)
    }
    /// The learning rate (of the configuration the optimizer was built with; groups keep their
    /// ratios to it).
    fn learning_rate(&self) -> f64;
    /// Sets the learning rate of every group, keeping each group's ratio to the base rate.
    fn set_learning_rate(&mut self, lr: f64) -> Result<()>;
    /// Steps taken (skipped steps do not count).
    fn step_count(&self) -> u64;
    /// Bytes of optimizer state held now (state tensors plus per-parameter scalars; not the
    /// at most 64 bytes per CPU state tensor that place it on cache lines).
    fn state_bytes(&self) -> usize;
    /// The state of the parameter with this name, if it has any.
    fn param_state(&self, name: &str) -> Option<ParamState>;
    /// Names of the optimizer-wide scalars and their values (SGD-SaI: `gsnr_max`).
    fn global_scalars(&self) -> Vec<(&'static str, f64)>;
    /// Forgets all state: the optimizer then behaves exactly like a fresh one, except that the
    /// parameters keep their values (Adan's `restart_opt`).
    fn reset_state(&mut self) -> Result<()>;
    /// Sets what a step does with NaN or infinite gradients.
    fn set_non_finite_policy(&mut self, policy: NonFinitePolicy);
    /// Sets (or with `None` removes) global gradient-norm clipping.
    fn set_max_grad_norm(&mut self, max: Option<f64>) -> Result<()>;
    /// Sets where steps are decided (see [`VerdictMode`]: on CUDA by default on the device,
    /// without waiting for it).
    fn set_verdict_mode(&mut self, mode: VerdictMode) -> Result<()>;
    /// [`step`](Self::step) with every gradient multiplied by `scale` inside the fused pass.
    fn step_scaled(&mut self, grads: &GradStore, scale: f64) -> Result<StepReport>;
    /// Sets (or with `None` removes) the learning-rate schedule.
    fn set_schedule(&mut self, schedule: Option<Schedule>) -> Result<()>;
    /// State bytes per group and storage format.
    fn memory_report(&self) -> Vec<GroupMemory>;
    /// The whole optimizer state as a safetensors checkpoint (see [`crate::checkpoint`]).
    fn save_bytes(&self) -> Result<Vec<u8>>;
    /// Restores a checkpoint made by [`save_bytes`](Self::save_bytes) (or `save`) of an
    /// optimizer with the same algorithm, groups and parameter names. On any error the
    /// optimizer is left exactly as it was.
    fn load_bytes(&mut self, bytes: &[u8]) -> Result<()>;
    /// Like [`load_bytes`](Self::load_bytes), converting state stored in another format than
    /// this optimizer's ([`crate::StateFormat`]) instead of failing.
    fn load_bytes_converting(&mut self, bytes: &[u8]) -> Result<()>;
    /// Writes [`save_bytes`](Self::save_bytes) to `path` (atomically: a temporary file renamed).
    fn save(&self, path: &std::path::Path) -> Result<()> {
        write_atomic(path, &self.save_bytes()?)
    }
    /// Reads a checkpoint file (see [`load_bytes`](Self::load_bytes)).
    fn load(&mut self, path: &std::path::Path) -> Result<()> {
        let bytes = std::fs::read(path)?;
        self.load_bytes(&bytes)
    }
}

impl<A: Algorithm> Optimizer for Optim<A> {
    fn algorithm(&self) -> &'static str {
        A::NAME
    }
    fn step(&mut self, grads: &GradStore) -> Result<StepReport> {
        Optim::step(self, grads)
    }
    fn learning_rate(&self) -> f64 {
        Optim::learning_rate(self)
    }
    fn set_learning_rate(&mut self, lr: f64) -> Result<()> {
        Optim::set_learning_rate(self, lr)
    }
    fn step_count(&self) -> u64 {
        Optim::step_count(self)
    }
    fn set_verdict_mode(&mut self, mode: VerdictMode) -> Result<()> {
        Optim::set_verdict_mode(self, mode)
    }
    fn state_bytes(&self) -> usize {
        Optim::state_bytes(self)
    }
    fn param_state(&self, name: &str) -> Option<ParamState> {
        Optim::param_state(self, name)
    }
    fn global_scalars(&self) -> Vec<(&'static str, f64)> {
        Optim::global_scalars(self)
    }
    fn reset_state(&mut self) -> Result<()> {
        Optim::reset_state(self)
    }
    fn set_non_finite_policy(&mut self, policy: NonFinitePolicy) {
        Optim::set_non_finite_policy(self, policy)
    }
    fn set_max_grad_norm(&mut self, max: Option<f64>) -> Result<()> {
        Optim::set_max_grad_norm(self, max)
    }
    fn step_scaled(&mut self, grads: &GradStore, scale: f64) -> Result<StepReport> {
        Optim::step_scaled(self, grads, scale)
    }
    fn set_schedule(&mut self, schedule: Option<Schedule>) -> Result<()> {
        Optim::set_schedule(self, schedule)
    }
    fn memory_report(&self) -> Vec<GroupMemory> {
        Optim::memory_report(self)
    }
    fn save_bytes(&self) -> Result<Vec<u8>> {
        Optim::save_bytes(self)
    }
    fn load_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        Optim::load_bytes(self, bytes)
    }
    fn load_bytes_converting(&mut self, bytes: &[u8]) -> Result<()> {
        Optim::load_bytes_converting(self, bytes)
    }
}

fn to_candle(e: Error) -> candle_core::Error {
    match e {
        Error::Candle(e) => e,
        e => candle_core::Error::wrap(e),
    }
}

/// Drop-in use in code written against candle-nn: `candle_nn::optim::Optimizer` for every
/// algorithm. `set_learning_rate` cannot fail there; an invalid rate fails the next `step`.
impl<A: Algorithm> candle_nn::optim::Optimizer for Optim<A> {
    type Config = A;

    fn new(vars: Vec<Var>, config: A) -> candle_core::Result<Self> {
        Optim::new(vars, config).map_err(to_candle)
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        Optim::step(self, grads).map(|_| ()).map_err(to_candle)
    }

    fn learning_rate(&self) -> f64 {
        Optim::learning_rate(self)
    }

    fn set_learning_rate(&mut self, lr: f64) {
        // Cannot fail here: an invalid rate is kept and fails the next step.
        self.peak_lr = lr;
    }
}
