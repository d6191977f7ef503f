//! AdamW (Loshchilov & Hutter), exactly as `torch.optim.AdamW` (torch 2.15,
//! `_single_tensor_adam` with decoupled weight decay). Spec: ALGORITHMS.md §2.

use crate::algorithm::{Algorithm, ElementWise, Kernel, ParamMeta, Slot};
use crate::elem::{Elem, Real};
use crate::error::{check_betas, check_nonneg, Result};
use serde::{Deserialize, Serialize};

/// AdamW hyperparameters (one parameter group). Defaults are torch's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    /// Learning rate (1e-3).
    pub lr: f64,
    /// (β1, β2) = (0.9, 0.999).
    pub betas: (f64, f64),
    /// Added to the bias-corrected √v (1e-8).
    pub eps: f64,
    /// Decoupled weight decay: p ← p·(1 − lr·λ) before the step (1e-2).
    pub weight_decay: f64,
    /// Use the running maximum of v (12 bytes of state per element instead of 8).
    pub amsgrad: bool,
    /// Maximize the objective instead of minimizing it.
    pub maximize: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 1e-2,
            amsgrad: false,
            maximize: false,
        }
    }
}

// cuda-params
/// AdamW's step scalars as `kernels/adamw.cu` reads them (`kernels/params.cuh`, generated
/// from this definition).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWParams {
    /// 1 - lr·wd.
    pub(crate) decay: f64,
    /// The lerp weight 1 - beta1.
    pub(crate) lerp_w: f64,
    /// beta2.
    pub(crate) beta2: f64,
    /// 1 - beta2.
    pub(crate) one_minus_beta2: f64,
    /// √(bias correction 2).
    pub(crate) bc2_sqrt: f64,
    /// lr / bias correction 1.
    pub(crate) step_size: f64,
    /// eps.
    pub(crate) eps: f64,
    /// The gradient scale (clipping; negative for `maximize`).
    pub(crate) grad_scale: f64,
    /// 1 with amsgrad, else 0.
    pub(crate) amsgrad: u32,
}

/// AdamW's step scalars (f64) for one parameter.
#[derive(Clone, Copy, Debug)]
pub struct AdamWKernel {
    decay: f64,
    lerp_w: f64,
    beta2: f64,
    one_minus_beta2: f64,
    bc2_sqrt: f64,
    step_size: f64,
    eps: f64,
    grad_scale: f64,
    amsgrad: bool,
}

impl Kernel for AdamWKernel {
    const CUDA_MODULE: &'static str = "adamw";
    type Execution = ElementWise;

    type Params = AdamWParams;

    fn params(&self) -> AdamWParams {
        AdamWParams {
            decay: self.decay,
            lerp_w: self.lerp_w,
            beta2: self.beta2,
            one_minus_beta2: self.one_minus_beta2,
            bc2_sqrt: self.bc2_sqrt,
            step_size: self.step_size,
            eps: self.eps,
            grad_scale: self.grad_scale,
            amsgrad: self.amsgrad.into(),
        }
    }

    #[inline(always)]
    fn apply<P: Elem>(&self, p: &mut [P], g: &[P], s: &mut [&mut [P::Math]]) {
        let of = <P::Math as Real>::of;
        // torch's lerp forms 1 - w in the compute type from the rounded w.
        let (decay, w) = (of(self.decay), of(self.lerp_w));
        let w1 = <P::Math as Real>::ONE - w;
        let (b2, one_b2, bc2s) = (of(self.beta2), of(self.one_minus_beta2), of(self.bc2_sqrt));
        let (neg_step, eps, gs) = (of(-self.step_size), of(self.eps), of(self.grad_scale));
        let w_small = self.lerp_w < 0.5;
        let n = p.len();
        let g = &g[..n];
        match s {
            [m, v] => {
                let (m, v) = (&mut m[..n], &mut v[..n]);
                for i in 0..n {
                    let gi = g[i].load() * gs;
                    let pi = p[i].load() * decay;
                    let mi = m[i].lerp(gi, w, w1, w_small);
                    let vi = v[i] * b2 + one_b2 * gi * gi;
                    let denom = vi.sqrt() / bc2s + eps;
                    m[i] = mi;
                    v[i] = vi;
                    p[i] = P::store(pi + neg_step * (mi / denom));
                }
            }
            [m, v, vmax] if self.amsgrad => {
                let (m, v, vmax) = (&mut m[..n], &mut v[..n], &mut vmax[..n]);
                for i in 0..n {
                    let gi = g[i].load() * gs;
                    let pi = p[i].load() * decay;
                    let mi = m[i].lerp(gi, w, w1, w_small);
                    let vi = v[i] * b2 + one_b2 * gi * gi;
                    let vm = vmax[i].max_nan(vi);
                    let denom = vm.sqrt() / bc2s + eps;
                    m[i] = mi;
                    v[i] = vi;
                    vmax[i] = vm;
                    p[i] = P::store(pi + neg_step * (mi / denom));
                }
            }
            _ => unreachable!("AdamW has 2 state slots, 3 with amsgrad"),
        }
    }
}

impl Algorithm for AdamWConfig {
    const NAME: &'static str = "adamw";
    type Kernel = AdamWKernel;
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
                    name: "exp_avg_sq",
                    signed: false,
                },
                Slot {
                    name: "max_exp_avg_sq",
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
                    name: "exp_avg_sq",
                    signed: false,
                },
            ]
        }
    }

    fn kernel(&self, meta: &ParamMeta<'_>, _: &(), _: &(), grad_scale: f64) -> AdamWKernel {
        let (b1, b2) = self.betas;
        let t = meta.t as f64;
        let bc1 = 1.0 - b1.powf(t);
        let bc2 = 1.0 - b2.powf(t);
        AdamWKernel {
            decay: 1.0 - meta.lr * self.weight_decay,
            lerp_w: 1.0 - b1,
            beta2: b2,
            one_minus_beta2: 1.0 - b2,
            bc2_sqrt: bc2.sqrt(),
            step_size: meta.lr / bc1,
            eps: self.eps,
            grad_scale: if self.maximize {
                -grad_scale
            } else {
                grad_scale
            },
            amsgrad: self.amsgrad,
        }
    }
}
