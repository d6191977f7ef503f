//! The [`Optimizer`] trait and the one shared driver, [`Optim`], that runs every algorithm.

use crate::algorithm::{Algorithm, ParamMeta, PrepareEntry, StepContext};
use crate::backend::DeviceReducer as Reducer;
use crate::backend::{self, Work};
use crate::error::{Error, Result};
use crate::groups::OptimBuilder;
use crate::reduce::Reducer as _;
use crate::schedule::Schedule;
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

/// What a step does when a gradient holds NaN or infinity. The same for every algorithm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NonFinitePolicy {
    /// Do not look: NaN and infinity flow into parameters and state, as in PyTorch. Saves the
    /// read pass over the gradients when no clipping is configured.
    Propagate,
    /// Skip the whole step: parameters, state, counters and schedule stay exactly as they were,
    /// and the report says why (the default).
    #[default]
    SkipStep,
    /// Fail the step with [`Error::NonFiniteGradient`]; nothing changes.
    Error,
}

/// Why a step was skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// A gradient held NaN or infinity (under [`NonFinitePolicy::SkipStep`]).
    NonFiniteGradient {
        /// The first parameter found with a non-finite gradient.
        param: String,
    },
}

/// What one call to `step` did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// Whether the update was applied.
    pub taken: bool,
    /// Why it was not, if it was not.
    pub skipped: Option<SkipReason>,
    /// The global L2 norm of the gradients before clipping, when it was computed (clipping or
    /// a non-finite check is configured).
    pub grad_norm: Option<f64>,
    /// The factor the gradients were scaled by (1 without clipping).
    pub clip_scale: f64,
    /// How many parameters were updated.
    pub updated: usize,
    /// The optimizer's step count after this call.
    pub step: u64,
}

/// The state of one parameter, for inspection. The tensors share storage with the optimizer's
/// state: they show later steps too, and they must not be handed back as gradients.
#[derive(Clone, Debug)]
pub struct ParamState {
    /// Parameter name.
    pub name: String,
    /// Index of its group.
    pub group: usize,
    /// How many updates it has received.
    pub step: u64,
    /// The state tensors, by slot name (`exp_avg`, `exp_avg_sq`, `momentum_buffer`, ...).
    pub slots: Vec<(&'static str, Tensor)>,
    /// Per-parameter scalars (SGD-SaI: `gsnr`).
    pub scalars: Vec<(&'static str, f64)>,
}

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
    /// Bytes a fused step over every parameter must move (reads and writes of parameters,
    /// gradients and state): the memory-traffic floor that benchmarks divide by the time.
    fn step_traffic_bytes(&self) -> usize;
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
    /// [`step`](Self::step) with every gradient multiplied by `scale` inside the fused pass.
    fn step_scaled(&mut self, grads: &GradStore, scale: f64) -> Result<StepReport>;
    /// Sets (or with `None` removes) the learning-rate schedule.
    fn set_schedule(&mut self, schedule: Option<Schedule>) -> Result<()>;
    /// State bytes per group and dtype.
    fn memory_report(&self) -> Vec<GroupMemory>;
    /// The whole optimizer state as a safetensors checkpoint (see [`crate::checkpoint`]).
    fn save_bytes(&self) -> Result<Vec<u8>>;
    /// Restores a checkpoint made by [`save_bytes`](Self::save_bytes) (or `save`) of an
    /// optimizer with the same algorithm, groups and parameter names. On any error the
    /// optimizer is left exactly as it was.
    fn load_bytes(&mut self, bytes: &[u8]) -> Result<()>;
    /// Writes [`save_bytes`](Self::save_bytes) to `path` (atomically: a temporary file renamed).
    fn save(&self, path: &std::path::Path) -> Result<()> {
        crate::checkpoint::write_atomic(path, &self.save_bytes()?)
    }
    /// Reads a checkpoint file (see [`load_bytes`](Self::load_bytes)).
    fn load(&mut self, path: &std::path::Path) -> Result<()> {
        let bytes = std::fs::read(path)?;
        self.load_bytes(&bytes)
    }
}

/// Optimizer-state bytes of one group in one dtype.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupMemory {
    /// Group index.
    pub group: usize,
    /// The state tensors' dtype.
    pub dtype: DType,
    /// Parameters of the group with state in this dtype.
    pub params: usize,
    /// Bytes of state tensors.
    pub bytes: usize,
}

pub(crate) struct Param<A: Algorithm> {
    pub name: String,
    pub var: Var,
    pub slots: Option<Vec<Tensor>>,
    pub t: u64,
    pub extra: A::ParamExtra,
    pub fresh: bool,
}

pub(crate) struct Group<A: Algorithm> {
    pub config: A,
    /// This group's learning rate divided by the base rate.
    pub lr_scale: f64,
    pub params: Vec<Param<A>>,
    pub step: u64,
}

/// The shared driver: parameter groups, lazy per-parameter state, counters, gradient checks,
/// non-finite policy and clipping around one [`Algorithm`]'s fused update.
///
/// Use it through the aliases [`crate::AdamW`], [`crate::SgdSai`], ... .
pub struct Optim<A: Algorithm> {
    pub(crate) base: A,
    pub(crate) groups: Vec<Group<A>>,
    pub(crate) global: A::Global,
    pub(crate) steps: u64,
    /// The base learning rate in effect (peak × schedule factor).
    pub(crate) lr: f64,
    /// The base learning rate set by the user; a schedule multiplies it.
    pub(crate) peak_lr: f64,
    pub(crate) schedule: Option<Schedule>,
    pub(crate) policy: NonFinitePolicy,
    pub(crate) max_grad_norm: Option<f64>,
    reducer: Reducer,
}

impl<A: Algorithm> std::fmt::Debug for Optim<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Optim")
            .field("algorithm", &A::NAME)
            .field("lr", &self.lr)
            .field("groups", &self.groups.len())
            .field("params", &self.num_params())
            .field("steps", &self.steps)
            .finish()
    }
}

fn storage_addr(t: &Tensor) -> usize {
    let (s, _) = t.storage_and_layout();
    &*s as *const candle_core::Storage as usize
}

fn state_dtype(param: DType) -> DType {
    if param == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

impl<A: Algorithm> Optim<A> {
    /// One group holding `vars` (named `param.0`, `param.1`, ...), configured by `config`.
    /// Non-float vars are ignored.
    pub fn new(vars: Vec<Var>, config: A) -> Result<Self> {
        OptimBuilder::new(config).vars(vars).build()
    }

    /// One group holding every variable of `varmap`, named as in the map.
    pub fn from_varmap(varmap: &candle_nn::VarMap, config: A) -> Result<Self> {
        OptimBuilder::new(config).varmap(varmap).build()
    }

    /// A builder for parameter groups, clipping and the non-finite policy.
    pub fn builder(config: A) -> OptimBuilder<A> {
        OptimBuilder::new(config)
    }

    pub(crate) fn from_parts(
        base: A,
        groups: Vec<(A, Vec<(String, Var)>)>,
        policy: NonFinitePolicy,
        max_grad_norm: Option<f64>,
        schedule: Option<Schedule>,
    ) -> Result<Self> {
        base.validate()?;
        if let Some(s) = &schedule {
            s.validate()?;
        }
        if let Some(m) = max_grad_norm {
            if !(m > 0.0 && m.is_finite()) {
                return Err(Error::hyper("max_grad_norm", m, "must be finite and > 0"));
            }
        }
        let base_lr = base.lr();
        let groups = groups
            .into_iter()
            .map(|(config, vars)| {
                config.validate()?;
                let lr_scale = if base_lr > 0.0 {
                    config.lr() / base_lr
                } else {
                    1.0
                };
                Ok(Group {
                    config,
                    lr_scale,
                    params: vars
                        .into_iter()
                        .map(|(name, var)| Param {
                            name,
                            var,
                            slots: None,
                            t: 0,
                            extra: Default::default(),
                            fresh: true,
                        })
                        .collect(),
                    step: 0,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut opt = Self {
            lr: base_lr,
            peak_lr: base_lr,
            schedule,
            base,
            groups,
            global: Default::default(),
            steps: 0,
            policy,
            max_grad_norm,
            reducer: Reducer::new(),
        };
        opt.apply_schedule();
        Ok(opt)
    }

    /// The configuration the optimizer was built with.
    pub fn config(&self) -> &A {
        &self.base
    }

    /// The configuration of group `i`.
    pub fn group_config(&self, i: usize) -> Option<&A> {
        self.groups.get(i).map(|g| &g.config)
    }

    /// Number of parameter groups.
    pub fn num_groups(&self) -> usize {
        self.groups.len()
    }

    /// Names of the parameters of group `i`.
    pub fn group_param_names(&self, i: usize) -> Vec<&str> {
        self.groups
            .get(i)
            .map(|g| g.params.iter().map(|p| p.name.as_str()).collect())
            .unwrap_or_default()
    }

    /// Number of parameters (tensors) across all groups.
    pub fn num_params(&self) -> usize {
        self.groups.iter().map(|g| g.params.len()).sum()
    }

    /// Number of scalar elements across all parameters.
    pub fn num_elements(&self) -> usize {
        self.params().map(|p| p.var.elem_count()).sum()
    }

    fn params(&self) -> impl Iterator<Item = &Param<A>> {
        self.groups.iter().flat_map(|g| g.params.iter())
    }

    /// The non-finite policy.
    pub fn non_finite_policy(&self) -> NonFinitePolicy {
        self.policy
    }

    /// Sets the non-finite policy.
    pub fn set_non_finite_policy(&mut self, policy: NonFinitePolicy) {
        self.policy = policy;
    }

    /// The global gradient-norm clipping threshold, if any.
    pub fn max_grad_norm(&self) -> Option<f64> {
        self.max_grad_norm
    }

    /// Sets (or with `None` removes) global gradient-norm clipping.
    pub fn set_max_grad_norm(&mut self, max: Option<f64>) -> Result<()> {
        if let Some(m) = max {
            if !(m > 0.0 && m.is_finite()) {
                return Err(Error::hyper("max_grad_norm", m, "must be finite and > 0"));
            }
        }
        self.max_grad_norm = max;
        Ok(())
    }

    /// The base learning rate in effect: the peak rate times the schedule's factor for the
    /// next step. Each group's rate is this times its ratio to the base rate.
    pub fn learning_rate(&self) -> f64 {
        self.lr
    }

    /// The peak learning rate (what [`set_learning_rate`](Self::set_learning_rate) set).
    pub fn peak_learning_rate(&self) -> f64 {
        self.peak_lr
    }

    /// Sets the peak learning rate; each group gets it times the schedule's factor times its
    /// ratio to the base rate.
    pub fn set_learning_rate(&mut self, lr: f64) -> Result<()> {
        crate::error::check_nonneg("lr", lr)?;
        self.peak_lr = lr;
        self.apply_schedule();
        Ok(())
    }

    /// The learning-rate schedule, if any.
    pub fn schedule(&self) -> Option<&Schedule> {
        self.schedule.as_ref()
    }

    /// Sets (or with `None` removes) the learning-rate schedule. It takes effect from the next
    /// step, at the current step count.
    pub fn set_schedule(&mut self, schedule: Option<Schedule>) -> Result<()> {
        if let Some(s) = &schedule {
            s.validate()?;
        }
        self.schedule = schedule;
        self.apply_schedule();
        Ok(())
    }

    /// Sets every group's rate from the peak rate and the schedule at the current step count.
    fn apply_schedule(&mut self) {
        let factor = self.schedule.as_ref().map_or(1.0, |s| s.factor(self.steps));
        self.apply_lr(self.peak_lr * factor);
    }

    pub(crate) fn apply_lr(&mut self, lr: f64) {
        self.lr = lr;
        for g in &mut self.groups {
            g.config.set_lr(lr * g.lr_scale);
        }
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.steps
    }

    /// Bytes of optimizer state held now: state tensors plus per-parameter scalars.
    pub fn state_bytes(&self) -> usize {
        self.params()
            .map(|p| {
                let tensors: usize = p
                    .slots
                    .iter()
                    .flatten()
                    .map(|s| s.elem_count() * s.dtype().size_in_bytes())
                    .sum();
                tensors + A::extra_scalars(&p.extra).len() * 4
            })
            .sum()
    }

    /// Bytes a fused step over every parameter must move (see [`Algorithm::traffic_bytes`]).
    pub fn step_traffic_bytes(&self) -> usize {
        self.groups
            .iter()
            .flat_map(|g| {
                g.params.iter().map(|p| {
                    g.config.traffic_bytes(
                        p.var.elem_count(),
                        p.var.rank(),
                        p.var.dtype().size_in_bytes(),
                    )
                })
            })
            .sum()
    }

    /// State bytes per group and dtype (only parameters that have state).
    pub fn memory_report(&self) -> Vec<GroupMemory> {
        let mut out: Vec<GroupMemory> = Vec::new();
        for (gi, g) in self.groups.iter().enumerate() {
            for slots in g.params.iter().filter_map(|p| p.slots.as_ref()) {
                let Some(dtype) = slots.first().map(|t| t.dtype()) else {
                    continue;
                };
                let bytes: usize = slots
                    .iter()
                    .map(|t| t.elem_count() * t.dtype().size_in_bytes())
                    .sum();
                match out.iter_mut().find(|m| m.group == gi && m.dtype == dtype) {
                    Some(m) => {
                        m.params += 1;
                        m.bytes += bytes;
                    }
                    None => out.push(GroupMemory {
                        group: gi,
                        dtype,
                        params: 1,
                        bytes,
                    }),
                }
            }
        }
        out
    }

    /// State bytes per parameter element, as the configuration prescribes (AdamW: 8, 12 with
    /// amsgrad; SGD-SaI: 4), for f32, bf16 and f16 parameters.
    pub fn state_bytes_per_element(&self) -> f64 {
        let n = self.num_elements();
        if n == 0 {
            return 0.0;
        }
        let bytes: usize = self
            .groups
            .iter()
            .flat_map(|g| {
                g.params
                    .iter()
                    .map(|p| g.config.slots().len() * 4 * p.var.elem_count())
            })
            .sum();
        bytes as f64 / n as f64
    }

    /// The state of `var`, if it is one of this optimizer's parameters and has state.
    pub fn state_of(&self, var: &Var) -> Option<ParamState> {
        let id = var.id();
        self.groups.iter().enumerate().find_map(|(gi, g)| {
            g.params
                .iter()
                .find(|p| p.var.id() == id)
                .map(|p| Self::view(gi, &g.config, p))
        })
    }

    fn view(gi: usize, config: &A, p: &Param<A>) -> ParamState {
        ParamState {
            name: p.name.clone(),
            group: gi,
            step: p.t,
            slots: match &p.slots {
                Some(s) => config
                    .slots()
                    .iter()
                    .map(|s| s.name)
                    .zip(s.iter().cloned())
                    .collect(),
                None => Vec::new(),
            },
            scalars: A::extra_scalars(&p.extra),
        }
    }

    /// The state of the parameter called `name`.
    pub fn param_state(&self, name: &str) -> Option<ParamState> {
        self.groups.iter().enumerate().find_map(|(gi, g)| {
            g.params
                .iter()
                .find(|p| p.name == name)
                .map(|p| Self::view(gi, &g.config, p))
        })
    }

    /// Optimizer-wide scalars (SGD-SaI: `gsnr_max`).
    pub fn global_scalars(&self) -> Vec<(&'static str, f64)> {
        A::global_scalars(&self.global)
    }

    /// Zeroes all state in place and resets every counter: the optimizer then behaves like a
    /// fresh one, except that the parameters keep their values.
    pub fn reset_state(&mut self) -> Result<()> {
        for g in &mut self.groups {
            g.step = 0;
            for p in &mut g.params {
                if let Some(slots) = &p.slots {
                    for s in slots {
                        s.zero_set()?;
                    }
                }
                p.t = 0;
                p.extra = Default::default();
                p.fresh = true;
            }
        }
        self.global = Default::default();
        Ok(())
    }

    /// Back-propagates `loss` and applies one update.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<StepReport> {
        let grads = loss.backward()?;
        self.step(&grads)
    }

    /// Applies one update. Every gradient is checked against its parameter first; on any error
    /// nothing has changed. Parameters without a gradient are skipped entirely: no decay, no
    /// state change, their counters do not advance.
    pub fn step(&mut self, grads: &GradStore) -> Result<StepReport> {
        self.step_scaled(grads, 1.0)
    }

    /// Like [`step`](Self::step) with every gradient multiplied by `scale` (inside the fused
    /// pass: nothing is allocated). Clipping and the reported norm see the scaled gradients.
    /// [`crate::GradAccumulator`] uses it to average micro-batches.
    pub fn step_scaled(&mut self, grads: &GradStore, scale: f64) -> Result<StepReport> {
        if !scale.is_finite() {
            return Err(Error::hyper("scale", scale, "must be finite"));
        }
        for g in &self.groups {
            g.config.validate()?;
        }
        // Gather and check every gradient before touching anything. A gradient must not share
        // storage with any parameter or state tensor: not only would the update read what it
        // writes, the CUDA path holds gradients' read locks while it takes the write locks.
        let owned: std::collections::HashSet<usize> = self
            .params()
            .flat_map(|p| std::iter::once(p.var.as_tensor()).chain(p.slots.iter().flatten()))
            .map(storage_addr)
            .collect();
        let mut found: Vec<Option<Tensor>> = Vec::with_capacity(self.num_params());
        for p in self.params() {
            found.push(match grads.get(p.var.as_tensor()) {
                Some(g) => Some(check_grad(p, g, &owned)?),
                None => None,
            });
        }
        let present: Vec<&Tensor> = found.iter().flatten().collect();
        let mut report = StepReport {
            taken: false,
            skipped: None,
            grad_norm: None,
            clip_scale: 1.0,
            updated: present.len(),
            step: self.steps,
        };

        let mut grad_scale = scale;
        if self.policy != NonFinitePolicy::Propagate || self.max_grad_norm.is_some() {
            let stats = self.reducer.stats(&present, false)?;
            if stats.iter().any(|s| !s.all_finite) && self.policy != NonFinitePolicy::Propagate {
                let names = self
                    .params()
                    .zip(&found)
                    .filter(|(_, g)| g.is_some())
                    .map(|(p, _)| p.name.clone());
                let param = names
                    .zip(&stats)
                    .find(|(_, s)| !s.all_finite)
                    .map(|(n, _)| n)
                    .unwrap_or_default();
                if self.policy == NonFinitePolicy::Error {
                    return Err(Error::NonFiniteGradient { param });
                }
                report.updated = 0;
                report.skipped = Some(SkipReason::NonFiniteGradient { param });
                return Ok(report);
            }
            let norm = crate::reduce::global_norm(&stats, scale);
            report.grad_norm = Some(norm);
            if let Some(max) = self.max_grad_norm {
                // torch.nn.utils.clip_grad_norm_: coef = max / (norm + 1e-6), clamped at 1.
                report.clip_scale = (max / (norm + 1e-6)).min(1.0);
                grad_scale *= report.clip_scale;
            }
        }
        // Algorithm-wide reductions (SGD-SaI's first-step g-SNR, Adan's clipping).
        let grad_scale = {
            let mut configs: Vec<&A> = Vec::with_capacity(self.groups.len());
            let mut entries: Vec<PrepareEntry<'_, A>> = Vec::with_capacity(present.len());
            let mut found_it = found.iter();
            for (gi, group) in self.groups.iter_mut().enumerate() {
                let Group { config, params, .. } = group;
                configs.push(config);
                for p in params.iter_mut() {
                    if let Some(Some(grad)) = found_it.next() {
                        entries.push(PrepareEntry {
                            group: gi,
                            name: &p.name,
                            grad,
                            extra: &mut p.extra,
                            fresh: p.fresh,
                        });
                    }
                }
            }
            let mut ctx = StepContext {
                base: &self.base,
                groups: &configs,
                entries: &mut entries,
                grad_scale,
                reducer: &mut self.reducer,
            };
            let saved = self.global.clone();
            if let Err(e) = A::prepare(&mut self.global, &mut ctx) {
                self.global = saved;
                return Err(e);
            }
            ctx.grad_scale
        };
        // The step will be taken: the schedule sets this step's rates.
        if self.schedule.is_some() {
            self.apply_schedule();
        }

        // Lazy state: allocate every missing slot before the first parameter changes.
        let mut found_it = found.iter();
        for group in &mut self.groups {
            let nslots = group.config.slots().len();
            for p in &mut group.params {
                let has_grad = matches!(found_it.next(), Some(Some(_)));
                if has_grad && p.slots.as_ref().is_none_or(|s| s.len() != nslots) {
                    let dt = state_dtype(p.var.dtype());
                    let slots = (0..nslots)
                        .map(|_| crate::backend::cpu::state_zeros(p.var.as_tensor(), dt))
                        .collect::<candle_core::Result<Vec<_>>>()?;
                    p.slots = Some(slots);
                    p.fresh = true;
                }
            }
        }

        // The update: counters first (the first update sees t = 1), then one fused pass each.
        let mut found_it = found.iter();
        let global = &self.global;
        for group in &mut self.groups {
            group.step += 1;
            let mut work = Vec::with_capacity(group.params.len());
            for p in &mut group.params {
                let Some(Some(grad)) = found_it.next() else {
                    continue;
                };
                p.t += 1;
                let meta = ParamMeta {
                    name: &p.name,
                    shape: p.var.shape(),
                    lr: group.config.lr(),
                    t: p.t,
                    group_step: group.step,
                    fresh: p.fresh,
                };
                let kernel = group.config.kernel(&meta, &p.extra, global, grad_scale);
                p.fresh = false;
                work.push(Work {
                    param: p.var.as_tensor(),
                    grad,
                    slots: p.slots.as_deref().unwrap_or(&[]),
                    shape: p.var.shape(),
                    kernel,
                });
            }
            backend::update(&work)?;
        }
        self.steps += 1;
        report.taken = true;
        report.step = self.steps;
        Ok(report)
    }
}

/// Checks that `g` can be the gradient of `var` (called `name`): same shape, dtype and device.
pub(crate) fn check_matches(name: &str, var: &Tensor, g: &Tensor) -> Result<()> {
    if g.shape() != var.shape() {
        return Err(Error::ShapeMismatch {
            param: name.to_string(),
            expected: var.shape().clone(),
            grad: g.shape().clone(),
        });
    }
    if g.dtype() != var.dtype() {
        return Err(Error::DTypeMismatch {
            param: name.to_string(),
            expected: var.dtype(),
            grad: g.dtype(),
        });
    }
    if !g.device().same_device(var.device()) {
        return Err(Error::DeviceMismatch {
            param: name.to_string(),
            expected: var.device().location(),
            grad: g.device().location(),
        });
    }
    Ok(())
}

fn check_grad<A: Algorithm>(
    p: &Param<A>,
    g: &Tensor,
    owned: &std::collections::HashSet<usize>,
) -> Result<Tensor> {
    let var = p.var.as_tensor();
    check_matches(&p.name, var, g)?;
    if !var.is_contiguous() {
        return Err(Error::NonContiguous {
            param: p.name.clone(),
        });
    }
    let g = if g.is_contiguous() {
        g.clone()
    } else {
        g.contiguous()?
    };
    let ga = storage_addr(&g);
    if owned.contains(&ga) {
        let other = if ga == storage_addr(var) {
            "the parameter itself"
        } else {
            "a parameter or optimizer state of this optimizer"
        };
        return Err(Error::Aliasing {
            param: p.name.clone(),
            other: other.into(),
        });
    }
    Ok(g)
}

impl<A: Algorithm> Optimizer for Optim<A> {
    fn algorithm(&self) -> &'static str {
        A::NAME
    }
    fn step(&mut self, grads: &GradStore) -> Result<StepReport> {
        Optim::step(self, grads)
    }
    fn learning_rate(&self) -> f64 {
        self.lr
    }
    fn set_learning_rate(&mut self, lr: f64) -> Result<()> {
        Optim::set_learning_rate(self, lr)
    }
    fn step_count(&self) -> u64 {
        self.steps
    }
    fn state_bytes(&self) -> usize {
        Optim::state_bytes(self)
    }
    fn step_traffic_bytes(&self) -> usize {
        Optim::step_traffic_bytes(self)
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
        self.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.peak_lr = lr;
        self.apply_schedule();
    }
}
