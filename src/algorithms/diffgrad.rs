//! diffGrad (Dubey et al., IEEE TNNLS 2020), exactly as the authors' bug-fixed `diffGrad_v2.py`.
//! Spec: ALGORITHMS.md §5.
//!
//! The previous gradient is its own state tensor, written after it is used (the v1 code kept a
//! reference to the gradient instead); it includes the coupled L2 term, which also feeds the
//! friction coefficient ξ = σ(|g_prev − g|). The user's gradient is never modified.

use crate::algorithm::{Algorithm, ElementWise, Kernel, ParamMeta, Slot};
use crate::elem::{Elem, Real};
use crate::error::{check_betas, check_nonneg, Result};
use serde::{Deserialize, Serialize};

/// diffGrad hyperparameters (one parameter group). Defaults are the authors'.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DiffGradConfig {
    /// Learning rate (1e-3).
    pub lr: f64,
    /// (β1, β2) = (0.9, 0.999).
    pub betas: (f64, f64),
    /// Added to √v, not bias-corrected (1e-8).
    pub eps: f64,
    /// Coupled L2 penalty: g ← g + λ·p (0).
    pub weight_decay: f64,
}

impl Default for DiffGradConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

// cuda-params
/// diffGrad's step scalars as `kernels/diffgrad.cu` reads them (`kernels/params.cuh`, generated
/// from this definition).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DiffGradParams {
    /// The weight decay (coupled L2).
    pub(crate) wd: f64,
    /// beta1.
    pub(crate) beta1: f64,
    /// beta2.
    pub(crate) beta2: f64,
    /// eps.
    pub(crate) eps: f64,
    /// lr·√bc2/bc1.
    pub(crate) step_size: f64,
    /// The gradient scale (clipping).
    pub(crate) grad_scale: f64,
}

/// diffGrad's step scalars.
#[derive(Clone, Copy, Debug)]
pub struct DiffGradKernel {
    wd: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    step_size: f64,
    grad_scale: f64,
}

impl Kernel for DiffGradKernel {
    const CUDA_MODULE: &'static str = "diffgrad";
    type Execution = ElementWise;

    type Params = DiffGradParams;

    fn params(&self) -> DiffGradParams {
        DiffGradParams {
            wd: self.wd,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            step_size: self.step_size,
            grad_scale: self.grad_scale,
        }
    }

    #[inline(always)]
    fn apply<P: Elem>(&self, p: &mut [P], g: &[P], s: &mut [&mut [P::Math]]) {
        let of = <P::Math as Real>::of;
        let one = <P::Math as Real>::ONE;
        let (wd, gs, eps, neg_ss) = (
            of(self.wd),
            of(self.grad_scale),
            of(self.eps),
            of(-self.step_size),
        );
        let (b1, one_b1) = (of(self.beta1), of(1.0 - self.beta1));
        let (b2, one_b2) = (of(self.beta2), of(1.0 - self.beta2));
        let coupled = self.wd != 0.0;
        let [m, v, gp] = s else {
            unreachable!("diffGrad has 3 state slots")
        };
        let n = p.len();
        let (g, m, v, gp) = (&g[..n], &mut m[..n], &mut v[..n], &mut gp[..n]);
        for i in 0..n {
            let pi = p[i].load();
            let mut gi = g[i].load() * gs;
            if coupled {
                gi += wd * pi;
            }
            let mi = m[i] * b1 + one_b1 * gi;
            let vi = v[i] * b2 + one_b2 * gi * gi;
            let denom = vi.sqrt() + eps;
            let dfc = one / (one + (-(gp[i] - gi).abs()).exp_v());
            m[i] = mi;
            v[i] = vi;
            gp[i] = gi;
            p[i] = P::store(pi + neg_ss * ((mi * dfc) / denom));
        }
    }
}

impl Algorithm for DiffGradConfig {
    const NAME: &'static str = "diffgrad";
    type Kernel = DiffGradKernel;
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
                name: "previous_grad",
                signed: true,
            },
        ]
    }
    fn kernel(&self, meta: &ParamMeta<'_>, _: &(), _: &(), grad_scale: f64) -> DiffGradKernel {
        let (b1, b2) = self.betas;
        let t = meta.t as f64;
        let bc1 = 1.0 - b1.powf(t);
        let bc2 = 1.0 - b2.powf(t);
        DiffGradKernel {
            wd: self.weight_decay,
            beta1: b1,
            beta2: b2,
            eps: self.eps,
            step_size: meta.lr * bc2.sqrt() / bc1,
            grad_scale,
        }
    }
}
