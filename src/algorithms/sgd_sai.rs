//! SGD-SaI (Xu, Xiang, Cai, Wen 2024, "No More Adam: Learning Rate Scaling at Initialization is
//! All You Need"): SGD with EMA momentum whose per-tensor learning rate is scaled, once, by the
//! g-SNR of the tensor's first gradient. Exactly the authors' code (ALGORITHMS.md §1):
//! `exact` is the released v1.0.3, `max_normalized` v1.0.4, `sqrt_numel` v1.1.0.
//!
//! Where the official code crashes, this port does the following (and says so):
//! * `momentum = 0` is plain SGD with the scaled learning rate (`buf = g` every step) and keeps
//!   no momentum buffer (0 bytes of state per element).
//! * A tensor whose first gradient arrives after the first step gets its g-SNR from that first
//!   gradient, when it arrives. In `max_normalized` mode it is divided by the maximum fixed at
//!   the first step that had gradients (the maximum never changes once set).
//! * An all-zero first gradient in `max_normalized` mode gives a maximum of 0, and the official
//!   code then turns every parameter into NaN; this port reproduces that (it is what v1.0.4
//!   computes) rather than inventing a different rule.

use crate::algorithm::{Algorithm, ElementWise, Kernel, ParamMeta, Slot, StepContext};
use crate::elem::{Elem, Real};
use crate::error::{check_nonneg, check_range, Error, Result};
use crate::reduce::ReduceOp;
use serde::{Deserialize, Serialize};

/// Which official version's per-tensor factor to use (ALGORITHMS.md §1.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GsnrMode {
    /// v1.0.3 (the released package): step size `lr · gsnr`, gsnr = ‖g‖₂ / (std(g) + eps).
    #[default]
    Exact,
    /// v1.0.4: step size `lr · gsnr / G`, G the largest gsnr over all tensors of all groups.
    MaxNormalized,
    /// v1.1.0: step size `lr · sqrt(numel)`; the gradient's values are not used.
    SqrtNumel,
}

/// SGD-SaI hyperparameters (one parameter group). Defaults are the authors'.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SgdSaiConfig {
    /// Learning rate (1e-2).
    pub lr: f64,
    /// EMA momentum μ: buf ← μ·buf + (1 − μ)·g; the first buffer is g itself (0.9).
    pub momentum: f64,
    /// Added to the gradient's standard deviation in the g-SNR (1e-8).
    pub eps: f64,
    /// Decoupled weight decay p ← p·(1 − lr·λ), not scaled by the g-SNR (1e-2).
    pub weight_decay: f64,
    /// Which official version's g-SNR rule to use.
    pub gsnr_mode: GsnrMode,
}

impl Default for SgdSaiConfig {
    fn default() -> Self {
        Self {
            lr: 1e-2,
            momentum: 0.9,
            eps: 1e-8,
            weight_decay: 1e-2,
            gsnr_mode: GsnrMode::Exact,
        }
    }
}

/// Per-tensor scalars: the g-SNR fixed at the tensor's first gradient.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SgdSaiParam {
    /// The raw g-SNR (before any division by the maximum). For `exact` and `max_normalized`
    /// it is an f32 value, as in the reference; for `sqrt_numel` the f64 `sqrt(numel)`.
    pub gsnr: Option<f64>,
}

/// Optimizer-wide state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SgdSaiGlobal {
    /// The largest g-SNR over every `max_normalized` tensor at the first step that had any.
    pub gsnr_max: Option<f64>,
}

// cuda-params
/// SGD-SaI's step scalars as `kernels/sgd_sai.cu` reads them (`kernels/params.cuh`, generated
/// from this definition).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdSaiParams {
    /// 1 - wd·lr.
    pub(crate) decay: f64,
    /// The step size lr·g-SNR (÷ the maximum with `max_normalized`).
    pub(crate) step_size: f64,
    /// The momentum.
    pub(crate) momentum: f64,
    /// 1 - momentum.
    pub(crate) one_minus_momentum: f64,
    /// The gradient scale (clipping).
    pub(crate) grad_scale: f64,
    /// 1 at this tensor's first step (the buffer starts as g), else 0.
    pub(crate) first: u32,
}

/// SGD-SaI's step scalars for one parameter.
#[derive(Clone, Copy, Debug)]
pub struct SgdSaiKernel {
    decay: f64,
    step_size: f64,
    momentum: f64,
    one_minus_momentum: f64,
    first: bool,
    grad_scale: f64,
}

impl Kernel for SgdSaiKernel {
    const CUDA_MODULE: &'static str = "sgd_sai";
    type Execution = ElementWise;

    type Params = SgdSaiParams;

    fn params(&self) -> SgdSaiParams {
        SgdSaiParams {
            decay: self.decay,
            step_size: self.step_size,
            momentum: self.momentum,
            one_minus_momentum: self.one_minus_momentum,
            grad_scale: self.grad_scale,
            first: self.first.into(),
        }
    }

    #[inline(always)]
    fn apply<P: Elem>(&self, p: &mut [P], g: &[P], s: &mut [&mut [P::Math]]) {
        let of = <P::Math as Real>::of;
        let (decay, neg_s, gs) = (of(self.decay), of(-self.step_size), of(self.grad_scale));
        let (mu, one_mu) = (of(self.momentum), of(self.one_minus_momentum));
        let n = p.len();
        let g = &g[..n];
        match s {
            [buf] => {
                let buf = &mut buf[..n];
                if self.first {
                    for i in 0..n {
                        let b = g[i].load() * gs;
                        buf[i] = b;
                        p[i] = P::store(p[i].load() * decay + neg_s * b);
                    }
                } else {
                    for i in 0..n {
                        let b = buf[i] * mu + one_mu * (g[i].load() * gs);
                        buf[i] = b;
                        p[i] = P::store(p[i].load() * decay + neg_s * b);
                    }
                }
            }
            [] => {
                for i in 0..n {
                    p[i] = P::store(p[i].load() * decay + neg_s * (g[i].load() * gs));
                }
            }
            _ => unreachable!("SGD-SaI has 1 state slot (0 without momentum)"),
        }
    }
}

/// The reference's `‖g‖ / (nan_to_num(std(g)) + eps)`, in f32 like the reference's tensors.
fn gsnr_of(sum_sq: f64, centered_sq: f64, n: usize, eps: f64) -> f64 {
    let norm = sum_sq.sqrt() as f32;
    let sigma = if n > 1 {
        (centered_sq.max(0.0) / (n - 1) as f64).sqrt() as f32
    } else {
        f32::NAN // torch's unbiased std of one element
    };
    // nan_to_num: NaN → 0, ±inf → ±f32::MAX.
    let sigma = if sigma.is_nan() {
        0.0
    } else {
        sigma.clamp(f32::MIN, f32::MAX)
    };
    (norm / (sigma + eps as f32)) as f64
}

impl Algorithm for SgdSaiConfig {
    const NAME: &'static str = "sgd_sai";
    type Kernel = SgdSaiKernel;
    type ParamExtra = SgdSaiParam;
    type Global = SgdSaiGlobal;

    fn validate(&self) -> Result<()> {
        check_nonneg("lr", self.lr)?;
        check_range("momentum", self.momentum, 0.0, 1.0)?;
        check_nonneg("eps", self.eps)?;
        check_nonneg("weight_decay", self.weight_decay)
    }
    crate::algorithm::lr_and_weight_decay!();
    fn slots(&self) -> &'static [Slot] {
        if self.momentum > 0.0 {
            &[Slot {
                name: "momentum_buffer",
                signed: true,
            }]
        } else {
            &[]
        }
    }

    // The g-SNR is a per-tensor statistic: a shard must see its tensors whole.
    const WHOLE_TENSORS: bool = true;

    fn prepare(global: &mut SgdSaiGlobal, ctx: &mut StepContext<'_, '_, Self>) -> Result<()> {
        let mode = |e: usize| ctx.groups[ctx.entries[e].group].gsnr_mode;
        // Tensors at their first gradient whose factor depends on the gradient.
        let pending: Vec<usize> = (0..ctx.entries.len())
            .filter(|&e| ctx.entries[e].extra.gsnr.is_none() && mode(e) != GsnrMode::SqrtNumel)
            .collect();
        let grads: Vec<_> = pending.iter().map(|&e| ctx.entries[e].grad).collect();
        let stats = ctx.reducer.stats(&grads, true)?;
        let mut values = Vec::with_capacity(pending.len());
        for (&e, st) in pending.iter().zip(&stats) {
            let eps = ctx.groups[ctx.entries[e].group].eps;
            values.push(gsnr_of(st.sum_sq, st.centered_sq.unwrap_or(0.0), st.n, eps));
        }
        // The maximum is fixed at the first step that has max-normalized tensors, over all of
        // them in every group.
        if global.gsnr_max.is_none() {
            let max = pending
                .iter()
                .zip(&values)
                .filter(|(&e, _)| mode(e) == GsnrMode::MaxNormalized)
                .map(|(_, &v)| v)
                .reduce(f64::max);
            // Sharded: the maximum over every rank's tensors (-inf: none on this rank).
            let mut m = [max.unwrap_or(f64::NEG_INFINITY)];
            ctx.reduce_across_ranks(&mut m, ReduceOp::Max)?;
            global.gsnr_max = (m[0] > f64::NEG_INFINITY).then_some(m[0]);
        }
        for (&e, v) in pending.iter().zip(values) {
            ctx.entries[e].extra.gsnr = Some(v);
        }
        for entry in ctx.entries.iter_mut() {
            if entry.extra.gsnr.is_none() {
                // sqrt_numel: a Python double in v1.1.0 (a 0-dim tensor has numel 1).
                entry.extra.gsnr = Some((entry.grad.elem_count() as f64).sqrt());
            }
        }
        Ok(())
    }

    fn kernel(
        &self,
        meta: &ParamMeta<'_>,
        extra: &SgdSaiParam,
        global: &SgdSaiGlobal,
        grad_scale: f64,
    ) -> SgdSaiKernel {
        let gsnr = extra.gsnr.unwrap_or(0.0);
        let step_size = match self.gsnr_mode {
            GsnrMode::MaxNormalized => meta.lr * gsnr / global.gsnr_max.unwrap_or(gsnr),
            GsnrMode::Exact | GsnrMode::SqrtNumel => meta.lr * gsnr,
        };
        SgdSaiKernel {
            decay: 1.0 - self.weight_decay * meta.lr,
            step_size,
            momentum: self.momentum,
            one_minus_momentum: 1.0 - self.momentum,
            first: meta.fresh,
            grad_scale,
        }
    }

    fn check_extra(extra: &SgdSaiParam) -> Result<()> {
        // An f32 ratio of a norm to a std: finite, ≥ 0, representable in f32.
        match extra.gsnr {
            Some(g) if !(0.0..=f32::MAX as f64).contains(&g) => Err(Error::Checkpoint(format!(
                "a g-SNR of {g} is not one an f32 gradient can have"
            ))),
            _ => Ok(()),
        }
    }

    fn check_global(global: &SgdSaiGlobal) -> Result<()> {
        // The maximum divides every max-normalized rate: it must be > 0.
        match global.gsnr_max {
            Some(m) if !(m > 0.0 && m <= f32::MAX as f64) => Err(Error::Checkpoint(format!(
                "a maximum g-SNR of {m} is not one a run can have"
            ))),
            _ => Ok(()),
        }
    }

    fn extra_scalars(extra: &SgdSaiParam) -> Vec<(&'static str, f64)> {
        extra.gsnr.map(|g| vec![("gsnr", g)]).unwrap_or_default()
    }

    fn global_scalars(global: &SgdSaiGlobal) -> Vec<(&'static str, f64)> {
        global
            .gsnr_max
            .map(|g| vec![("gsnr_max", g)])
            .unwrap_or_default()
    }
}

impl crate::Optim<SgdSaiConfig> {
    /// The g-SNR of `var`, fixed at its first gradient (None before that).
    pub fn gsnr(&self, var: &candle_core::Var) -> Option<f64> {
        self.state_of(var).and_then(|s| {
            s.scalars
                .iter()
                .find(|(n, _)| *n == "gsnr")
                .map(|(_, v)| *v)
        })
    }

    /// The maximum g-SNR that `max_normalized` groups divide by, once fixed.
    pub fn gsnr_max(&self) -> Option<f64> {
        self.global.gsnr_max
    }
}
