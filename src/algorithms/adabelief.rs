//! AdaBelief (Zhuang et al., NeurIPS 2020), exactly as the authors' `adabelief-pytorch` 0.2.1.
//! Spec: ALGORITHMS.md §4.
//!
//! As in the official code, eps is added to the stored variance `s` every step (and again
//! outside the square root), the rectified (RAdam) branch uses `s` and not the amsgrad maximum,
//! and all rectification scalars (ρ_t, the factor k) are computed in f64. The official code's
//! optimizer-wide switches (`weight_decouple`, `fixed_decay`, `rectify`, `degenerated_to_sgd`)
//! are per group here. The user's gradient is never modified (the L2 term is applied inside).

use crate::algorithm::{Algorithm, ElementWise, Kernel, ParamMeta, Slot};
use crate::elem::{Elem, Real};
use crate::error::{check_betas, check_nonneg, Result};
use serde::{Deserialize, Serialize};

/// AdaBelief hyperparameters (one parameter group). Defaults are the authors' (0.2.1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdaBeliefConfig {
    /// Learning rate (1e-3).
    pub lr: f64,
    /// (β1, β2) = (0.9, 0.999).
    pub betas: (f64, f64),
    /// Added to s every step and to the denominator (1e-16).
    pub eps: f64,
    /// Weight decay coefficient (0).
    pub weight_decay: f64,
    /// Keep the running maximum of s (12 bytes of state per element instead of 8).
    pub amsgrad: bool,
    /// Decoupled decay p ← p·(1 − lr·λ) (true); false: coupled L2 g ← g + λ·p.
    pub weight_decouple: bool,
    /// With `weight_decouple`: p ← p·(1 − λ), independent of lr (false).
    pub fixed_decay: bool,
    /// RAdam rectification (true).
    pub rectify: bool,
    /// With `rectify`: while ρ_t < 5, take bias-corrected momentum SGD steps (true) instead
    /// of no step.
    pub degenerated_to_sgd: bool,
}

impl Default for AdaBeliefConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-16,
            weight_decay: 0.0,
            amsgrad: false,
            weight_decouple: true,
            fixed_decay: false,
            rectify: true,
            degenerated_to_sgd: true,
        }
    }
}

/// How this step moves the parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// `p -= step · m/denom` (not rectified), `denom = √s/√bc2 + eps` (ŝ with amsgrad).
    Adam,
    /// `p -= step · m/(√s + eps)` (rectified, ρ_t ≥ 5).
    Rectified,
    /// `p -= step · m` (ρ_t < 5, degenerated to SGD).
    Sgd,
    /// No step (ρ_t < 5 without degeneration).
    None,
}

// cuda-params
/// AdaBelief's step scalars as `kernels/adabelief.cu` reads them (`kernels/params.cuh`, generated
/// from this definition).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdaBeliefParams {
    /// The decay factor (1 - lr·wd, 1 - wd with `fixed_decay`, 1 for L2).
    pub(crate) decay: f64,
    /// The coupled L2 coefficient (0 when decoupled).
    pub(crate) l2: f64,
    /// beta1.
    pub(crate) beta1: f64,
    /// beta2.
    pub(crate) beta2: f64,
    /// eps.
    pub(crate) eps: f64,
    /// √(bias correction 2).
    pub(crate) bc2_sqrt: f64,
    /// The step (lr/bc1; k·lr rectified; lr/bc1 as SGD).
    pub(crate) step: f64,
    /// The gradient scale (clipping).
    pub(crate) grad_scale: f64,
    /// The step's form: 0 Adam, 1 rectified, 2 SGD, 3 no step.
    pub(crate) mode: u32,
    /// 1 with amsgrad, else 0.
    pub(crate) amsgrad: u32,
}

/// AdaBelief's step scalars.
#[derive(Clone, Copy, Debug)]
pub struct AdaBeliefKernel {
    decay: f64,
    l2: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    bc2_sqrt: f64,
    step: f64,
    mode: Mode,
    grad_scale: f64,
    amsgrad: bool,
}

impl AdaBeliefKernel {
    /// The element loop for one (mode, amsgrad) combination; the branches on `MODE` and
    /// `AMS` are resolved at compile time so the loop vectorizes.
    #[inline(always)]
    fn run<P: Elem, const MODE: u8, const AMS: bool>(
        &self,
        p: &mut [P],
        g: &[P],
        m: &mut [P::Math],
        var: &mut [P::Math],
        vmax: &mut [P::Math],
    ) {
        let of = <P::Math as Real>::of;
        let (decay, l2, gs, eps) = (
            of(self.decay),
            of(self.l2),
            of(self.grad_scale),
            of(self.eps),
        );
        let (b1, one_b1) = (of(self.beta1), of(1.0 - self.beta1));
        let (b2, one_b2) = (of(self.beta2), of(1.0 - self.beta2));
        let (bc2s, neg_step) = (of(self.bc2_sqrt), of(-self.step));
        let coupled = self.l2 != 0.0;
        let n = p.len();
        let (g, m, var) = (&g[..n], &mut m[..n], &mut var[..n]);
        let vmax = if AMS { &mut vmax[..n] } else { &mut vmax[..0] };
        for i in 0..n {
            let p0 = p[i].load();
            let pi = p0 * decay;
            let mut gi = g[i].load() * gs;
            if coupled {
                gi += l2 * p0;
            }
            let mi = m[i] * b1 + one_b1 * gi;
            let r = gi - mi;
            let si = (var[i] * b2 + one_b2 * r * r) + eps;
            m[i] = mi;
            var[i] = si;
            let vm = if AMS {
                let x = vmax[i].max_nan(si);
                vmax[i] = x;
                x
            } else {
                si
            };
            let out = match MODE {
                ADAM => pi + neg_step * (mi / (vm.sqrt() / bc2s + eps)),
                RECTIFIED => pi + neg_step * (mi / (si.sqrt() + eps)),
                SGD => pi + neg_step * mi,
                _ => pi,
            };
            p[i] = P::store(out);
        }
    }
}

const ADAM: u8 = 0;
const RECTIFIED: u8 = 1;
const SGD: u8 = 2;
const NONE: u8 = 3;

impl Kernel for AdaBeliefKernel {
    const CUDA_MODULE: &'static str = "adabelief";
    type Execution = ElementWise;

    type Params = AdaBeliefParams;

    fn params(&self) -> AdaBeliefParams {
        AdaBeliefParams {
            decay: self.decay,
            l2: self.l2,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            bc2_sqrt: self.bc2_sqrt,
            step: self.step,
            grad_scale: self.grad_scale,
            mode: match self.mode {
                Mode::Adam => 0,
                Mode::Rectified => 1,
                Mode::Sgd => 2,
                Mode::None => 3,
            },
            amsgrad: self.amsgrad.into(),
        }
    }

    #[inline(always)]
    fn apply<P: Elem>(&self, p: &mut [P], g: &[P], s: &mut [&mut [P::Math]]) {
        let (m, var, rest) = match s {
            [m, v, rest @ ..] if rest.len() <= 1 => (m, v, rest),
            _ => unreachable!("AdaBelief has 2 state slots, 3 with amsgrad"),
        };
        let ams = !rest.is_empty();
        let vmax: &mut [P::Math] = match rest {
            [vm] => vm,
            _ => &mut [],
        };
        match (self.mode, ams) {
            (Mode::Adam, false) => self.run::<P, ADAM, false>(p, g, m, var, vmax),
            (Mode::Adam, true) => self.run::<P, ADAM, true>(p, g, m, var, vmax),
            (Mode::Rectified, false) => self.run::<P, RECTIFIED, false>(p, g, m, var, vmax),
            (Mode::Rectified, true) => self.run::<P, RECTIFIED, true>(p, g, m, var, vmax),
            (Mode::Sgd, false) => self.run::<P, SGD, false>(p, g, m, var, vmax),
            (Mode::Sgd, true) => self.run::<P, SGD, true>(p, g, m, var, vmax),
            (Mode::None, false) => self.run::<P, NONE, false>(p, g, m, var, vmax),
            (Mode::None, true) => self.run::<P, NONE, true>(p, g, m, var, vmax),
        }
    }
}

impl Algorithm for AdaBeliefConfig {
    const NAME: &'static str = "adabelief";
    type Kernel = AdaBeliefKernel;
    type ParamExtra = ();
    type Global = ();

    fn validate(&self) -> Result<()> {
        check_nonneg("lr", self.lr)?;
        check_betas(self.betas)?;
        check_nonneg("eps", self.eps)?;
        check_nonneg("weight_decay", self.weight_decay)
    }
    crate::algorithm::lr_and_weight_decay!();
    fn slots(&self) -> &'static [Slot] {
        if self.amsgrad {
            &[
                Slot {
                    name: "exp_avg",
                    signed: true,
                },
                Slot {
                    name: "exp_avg_var",
                    signed: false,
                },
                Slot {
                    name: "max_exp_avg_var",
                    signed: false,
                },
            ]
        } else {
            &[
                Slot {
                    name: "exp_avg",
                    signed: true,
                },
                Slot {
                    name: "exp_avg_var",
                    signed: false,
                },
            ]
        }
    }

    fn kernel(&self, meta: &ParamMeta<'_>, _: &(), _: &(), grad_scale: f64) -> AdaBeliefKernel {
        let (b1, b2) = self.betas;
        let t = meta.t as f64;
        let bc1 = 1.0 - b1.powf(t);
        let bc2 = 1.0 - b2.powf(t);
        let (decay, l2) = match (self.weight_decouple, self.fixed_decay) {
            (true, false) => (1.0 - meta.lr * self.weight_decay, 0.0),
            (true, true) => (1.0 - self.weight_decay, 0.0),
            (false, _) => (1.0, self.weight_decay),
        };
        let (mode, step) = if !self.rectify {
            (Mode::Adam, meta.lr / bc1)
        } else {
            // RAdam's ρ_t and k, in f64, evaluated in the reference's order.
            let beta2_t = b2.powf(t);
            let n_sma_max = 2.0 / (1.0 - b2) - 1.0;
            let n_sma = n_sma_max - 2.0 * t * beta2_t / (1.0 - beta2_t);
            if n_sma >= 5.0 {
                let k = ((1.0 - beta2_t) * (n_sma - 4.0) / (n_sma_max - 4.0) * (n_sma - 2.0)
                    / n_sma
                    * n_sma_max
                    / (n_sma_max - 2.0))
                    .sqrt()
                    / (1.0 - b1.powf(t));
                (Mode::Rectified, k * meta.lr)
            } else if self.degenerated_to_sgd {
                (Mode::Sgd, 1.0 / (1.0 - b1.powf(t)) * meta.lr)
            } else {
                (Mode::None, 0.0)
            }
        };
        AdaBeliefKernel {
            decay,
            l2,
            beta1: b1,
            beta2: b2,
            eps: self.eps,
            bc2_sqrt: bc2.sqrt(),
            step,
            mode,
            grad_scale,
            amsgrad: self.amsgrad,
        }
    }
}
