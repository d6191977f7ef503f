//! Parameter groups: which parameters an optimizer updates, and with which hyperparameters.

use crate::algorithm::Algorithm;
use crate::algorithms::muon::MuonConfig;
use crate::driver::{NonFinitePolicy, Optim, PoolVar};
use crate::error::{Error, Result};
use crate::schedule::Schedule;
use crate::state::{ParamRounding, StateFormat};
use candle_core::{DType, Var};
use std::collections::HashSet;

impl OptimBuilder<MuonConfig> {
    /// Moves the parameters whose names match any of `patterns` (as
    /// [`group_names`](Self::group_names)) into a group updated by AdamW (`use_muon = false`)
    /// with the base configuration's rate, `weight_decay`, `adamw_betas` and `adamw_eps`: the
    /// embeddings and the output head of the usual Muon setup. Parameters of rank ≠ 2 need no
    /// pattern: every Muon group gives them the AdamW step already.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use candle_optim::{Muon, MuonConfig};
    ///
    /// let varmap = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    /// let _emb = candle_nn::embedding(10, 4, vb.pp("wte"))?;
    /// let _fc = candle_nn::linear(4, 4, vb.pp("fc"))?; // weight: Muon; bias: AdamW
    /// let opt = Muon::builder(MuonConfig { lr: 0.02, ..Default::default() })
    ///     .varmap(&varmap)
    ///     .adamw_for_with(&["wte*"], |c| c.lr = 3e-4)
    ///     .build()?;
    /// assert_eq!(opt.num_groups(), 2);
    /// # Ok::<(), candle_optim::Error>(())
    /// ```
    pub fn adamw_for(self, patterns: &[&str]) -> Self {
        self.adamw_for_with(patterns, |_| {})
    }

    /// Like [`adamw_for`](Self::adamw_for), with the group's configuration further changed by
    /// `overrides` (its own `lr`, `weight_decay`, `adamw_betas`, ...).
    pub fn adamw_for_with(self, patterns: &[&str], overrides: impl Fn(&mut MuonConfig)) -> Self {
        self.group_names(patterns, |c| {
            c.use_muon = false;
            overrides(c)
        })
    }
}

/// Whether a parameter should be exempt from weight decay by the usual convention: tensors of
/// rank 0 or 1 (biases, norm gains), and anything whose name has a `bias` segment or a segment
/// that mentions a norm (`ln_1`, `layer_norm`, `bn1`, `norm`).
pub fn is_bias_or_norm(name: &str, var: &Var) -> bool {
    var.rank() <= 1
        || name.split(['.', '/']).any(|s| {
            s == "bias"
                || s.contains("norm")
                || s.starts_with("ln")
                || (s.starts_with("bn") && s[2..].chars().all(|c| c.is_ascii_digit() || c == '_'))
        })
}

impl<A: Algorithm> Optim<A> {
    /// One group holding `vars` (named `param.0`, `param.1`, ... by position; see
    /// [`OptimBuilder::vars`] for what that means for checkpoints), configured by `config`.
    /// Non-float vars are ignored.
    pub fn new(vars: Vec<Var>, config: A) -> Result<Self> {
        OptimBuilder::new(config).vars(vars).build()
    }

    /// One group holding every variable of `varmap`, named as in the map.
    pub fn from_varmap(varmap: &candle_nn::VarMap, config: A) -> Result<Self> {
        OptimBuilder::new(config).varmap(varmap).build()
    }

    /// A builder for parameter groups, clipping, schedules and the non-finite policy.
    pub fn builder(config: A) -> OptimBuilder<A> {
        OptimBuilder::new(config)
    }
}

/// Builds an [`Optim`] with parameter groups.
///
/// Parameters are added to a pool (from `Var`s, named `Var`s or a `VarMap`); each
/// [`group`](Self::group) call moves the pool's matching parameters into a new group whose
/// configuration is the base configuration changed by its `overrides`; what is left in the pool
/// at [`build`](Self::build) forms group 0, with the base configuration; the group of the
/// i-th `group` call is group i + 1.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// use candle_optim::{AdamW, AdamWConfig};
///
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let _lin = candle_nn::linear(4, 2, vb.pp("fc"))?;
/// let opt = AdamW::builder(AdamWConfig { lr: 3e-4, ..Default::default() })
///     .varmap(&varmap)
///     .no_decay_for_bias_and_norm()
///     .group_names(&["fc.weight"], |c| c.lr = 1e-4)
///     .build()?;
/// assert_eq!(opt.num_groups(), 3); // the rest (empty here), no-decay, fc.weight
/// # Ok::<(), candle_optim::Error>(())
/// ```
pub struct OptimBuilder<A: Algorithm> {
    base: A,
    pool: Vec<PoolVar>,
    groups: Vec<(A, f64, Vec<PoolVar>)>,
    error: Option<Error>,
    policy: NonFinitePolicy,
    max_grad_norm: Option<f64>,
    schedule: Option<Schedule>,
    auto_names: usize,
    format: StateFormat,
    group_formats: Vec<(usize, StateFormat)>,
    rounding: ParamRounding,
}

impl<A: Algorithm> OptimBuilder<A> {
    /// A builder with `config` as the base configuration and no parameters yet.
    pub fn new(config: A) -> Self {
        Self {
            base: config,
            pool: Vec::new(),
            groups: Vec::new(),
            error: None,
            policy: NonFinitePolicy::default(),
            max_grad_norm: None,
            schedule: None,
            auto_names: 0,
            format: StateFormat::F32,
            group_formats: Vec::new(),
            rounding: ParamRounding::Nearest,
        }
    }

    fn fail(&mut self, e: Error) {
        self.error.get_or_insert(e);
    }

    fn push(&mut self, name: String, var: Var, positional: bool) {
        if !var.dtype().is_float() {
            return; // integer vars (counters, indices) are not optimized
        }
        if !matches!(
            var.dtype(),
            DType::F32 | DType::F64 | DType::BF16 | DType::F16
        ) {
            self.fail(Error::UnsupportedDType {
                param: name,
                dtype: var.dtype(),
            });
            return;
        }
        self.pool.push((name, var, positional));
    }

    /// Adds unnamed variables; they are named `param.<i>` in the order given. A checkpoint
    /// can be matched to such parameters only by shape and dtype: loading one into an
    /// optimizer where two unnamed parameters of a group share both fails with
    /// [`Error::AmbiguousCheckpoint`] (the order of `VarMap::all_vars` changes from run to run).
    /// Use [`varmap`](Self::varmap) or [`named_vars`](Self::named_vars) for checkpoints that
    /// always load.
    pub fn vars(mut self, vars: impl IntoIterator<Item = Var>) -> Self {
        for v in vars {
            let name = format!("param.{}", self.auto_names);
            self.auto_names += 1;
            self.push(name, v, true);
        }
        self
    }

    /// Adds named variables.
    pub fn named_vars<S: Into<String>>(mut self, vars: impl IntoIterator<Item = (S, Var)>) -> Self {
        for (n, v) in vars {
            self.push(n.into(), v, false);
        }
        self
    }

    /// Adds every variable of a `VarMap`, named as in the map (in name order).
    pub fn varmap(mut self, varmap: &candle_nn::VarMap) -> Self {
        let mut vars: Vec<(String, Var)> = match varmap.data().lock() {
            Ok(data) => data.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Err(_) => {
                self.fail(Error::Unsupported("the VarMap's lock is poisoned".into()));
                return self;
            }
        };
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        self.named_vars(vars)
    }

    /// Moves every pooled parameter for which `pred(name, var)` holds into a new group, whose
    /// configuration is the base one changed by `overrides`.
    pub fn group(mut self, pred: impl Fn(&str, &Var) -> bool, overrides: impl Fn(&mut A)) -> Self {
        let (take, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pool)
            .into_iter()
            .partition(|(n, v, _)| pred(n, v));
        self.pool = keep;
        let mut config = self.base.clone();
        overrides(&mut config);
        // The group's rate as a ratio to the base rate. With a base rate of 0 the ratio is
        // what `overrides` makes of a base rate of 1 (`c.lr *= 2.0` keeps its 2).
        let mut unit = self.base.clone();
        unit.set_lr(1.0);
        overrides(&mut unit);
        match crate::driver::lr_ratio(self.base.lr(), config.lr(), unit.lr()) {
            Ok(ratio) => self.groups.push((config, ratio, take)),
            Err(e) => self.fail(e),
        }
        self
    }

    /// Moves the pooled parameters whose names match any of `patterns` (`*` and `?` wildcards;
    /// a plain name matches itself) into a new group. A pattern that matches no parameter is an
    /// error ([`Error::UnknownParameter`]) at [`build`](Self::build).
    pub fn group_names(mut self, patterns: &[&str], overrides: impl Fn(&mut A)) -> Self {
        let pats: Vec<wildmatch::WildMatch> = patterns
            .iter()
            .map(|p| wildmatch::WildMatch::new(p))
            .collect();
        for (raw, pat) in patterns.iter().zip(&pats) {
            if !self.pool.iter().any(|(n, _, _)| pat.matches(n)) {
                self.fail(Error::UnknownParameter((*raw).to_string()));
            }
        }
        self.group(|n, _| pats.iter().any(|p| p.matches(n)), overrides)
    }

    /// Moves biases, norm weights and every tensor of rank ≤ 1 (see [`is_bias_or_norm`]) into
    /// a group without weight decay.
    pub fn no_decay_for_bias_and_norm(self) -> Self {
        self.group(is_bias_or_norm, |c| c.set_weight_decay(0.0))
    }

    /// Sets the non-finite gradient policy (default [`NonFinitePolicy::SkipStep`]).
    pub fn non_finite(mut self, policy: NonFinitePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Clips the global L2 norm of all gradients to `max` before each step.
    pub fn clip_grad_norm(mut self, max: f64) -> Self {
        self.max_grad_norm = Some(max);
        self
    }

    /// How every group keeps its optimizer state (default [`StateFormat::F32`]), unless
    /// [`group_state_format`](Self::group_state_format) sets a group's own.
    pub fn state_format(mut self, format: StateFormat) -> Self {
        self.format = format;
        self
    }

    /// How group `group` keeps its state: 0 is the group of the parameters no
    /// [`group`](Self::group) call took, `i + 1` the `i`-th `group` call's. An index beyond the
    /// groups built is an error at [`build`](Self::build).
    pub fn group_state_format(mut self, group: usize, format: StateFormat) -> Self {
        self.group_formats.push((group, format));
        self
    }

    /// How bf16 parameters are written back (default [`ParamRounding::Nearest`]):
    /// [`ParamRounding::Stochastic`] keeps bf16 weights without an f32 master copy.
    pub fn param_rounding(mut self, rounding: ParamRounding) -> Self {
        self.rounding = rounding;
        self
    }

    /// Multiplies the learning rate by `schedule` (see [`Schedule`]).
    pub fn schedule(mut self, schedule: Schedule) -> Self {
        self.schedule = Some(schedule);
        self
    }

    /// Checks everything and builds the optimizer.
    pub fn build(self) -> Result<Optim<A>> {
        if let Some(e) = self.error {
            return Err(e);
        }
        // Group 0 holds what no `group` call took (possibly nothing); group i + 1 is the i-th
        // `group` call's, so indices are predictable.
        let mut groups = Vec::with_capacity(self.groups.len() + 1);
        groups.push((self.base.clone(), 1.0, self.format, self.pool));
        groups.extend(
            self.groups
                .into_iter()
                .map(|(c, r, vars)| (c, r, self.format, vars)),
        );
        for &(i, f) in &self.group_formats {
            match groups.get_mut(i) {
                Some(g) => g.2 = f,
                None => {
                    return Err(Error::Unsupported(format!(
                        "group_state_format: no group {i} (the optimizer has {})",
                        groups.len()
                    )))
                }
            }
        }
        let mut names = HashSet::new();
        let mut ids = HashSet::new();
        for (n, v, _) in groups.iter().flat_map(|(_, _, _, g)| g.iter()) {
            if !names.insert(n.as_str()) || !ids.insert(v.id()) {
                return Err(Error::DuplicateParameter(n.clone()));
            }
        }
        Optim::from_parts(
            self.base,
            groups,
            self.policy,
            self.max_grad_norm,
            self.schedule,
            self.rounding,
        )
    }
}
