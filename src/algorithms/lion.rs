//! Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), exactly as the
//! authors' `google/automl` `lion_pytorch.py`. Spec: ALGORITHMS.md §7.
//!
//! `sign(0) = 0`, as in torch (an exactly zero interpolation does not move the parameter); Rust's
//! `f32::signum` would give ±1 for ±0 and is not used. `sign(NaN)` is NaN here, where torch's CPU
//! `sign` (and candle's) gives 0 and would silently turn a NaN gradient into "no update": what
//! happens to non-finite gradients is the driver's [`crate::NonFinitePolicy`].

use crate::algorithm::{Algorithm, ElementWise, Kernel, ParamMeta, Slot};
use crate::elem::{Elem, Real};
use crate::error::{check_betas, check_nonneg, Result};
use serde::{Deserialize, Serialize};

/// Lion hyperparameters (one parameter group). Defaults are the authors'.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LionConfig {
    /// Learning rate (1e-4; the paper advises 3–10× smaller than AdamW's).
    pub lr: f64,
    /// (β1, β2) = (0.9, 0.99): β1 interpolates the update, β2 the momentum.
    pub betas: (f64, f64),
    /// Decoupled weight decay p ← p·(1 − lr·λ) (0).
    pub weight_decay: f64,
}

impl Default for LionConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            betas: (0.9, 0.99),
            weight_decay: 0.0,
        }
    }
}

// cuda-params
/// Lion's step scalars as `kernels/lion.cu` reads them (`kernels/params.cuh`, generated
/// from this definition).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LionParams {
    /// 1 - lr·wd.
    pub(crate) decay: f64,
    /// lr.
    pub(crate) lr: f64,
    /// beta1.
    pub(crate) beta1: f64,
    /// beta2.
    pub(crate) beta2: f64,
    /// The gradient scale (clipping).
    pub(crate) grad_scale: f64,
}

/// Lion's step scalars.
#[derive(Clone, Copy, Debug)]
pub struct LionKernel {
    decay: f64,
    lr: f64,
    beta1: f64,
    beta2: f64,
    grad_scale: f64,
}

impl Kernel for LionKernel {
    const CUDA_MODULE: &'static str = "lion";
    type Execution = ElementWise;

    type Params = LionParams;

    fn params(&self) -> LionParams {
        LionParams {
            decay: self.decay,
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            grad_scale: self.grad_scale,
        }
    }

    #[inline(always)]
    fn apply<P: Elem>(&self, p: &mut [P], g: &[P], s: &mut [&mut [P::Math]]) {
        let of = <P::Math as Real>::of;
        let (decay, neg_lr, gs) = (of(self.decay), of(-self.lr), of(self.grad_scale));
        let (b1, one_b1) = (of(self.beta1), of(1.0 - self.beta1));
        let (b2, one_b2) = (of(self.beta2), of(1.0 - self.beta2));
        let [m] = s else {
            unreachable!("Lion has 1 state slot")
        };
        let n = p.len();
        let (g, m) = (&g[..n], &mut m[..n]);
        for i in 0..n {
            let gi = g[i].load() * gs;
            let mi = m[i];
            let c = mi * b1 + gi * one_b1; // from the old momentum
            p[i] = P::store(p[i].load() * decay + neg_lr * c.sign());
            m[i] = mi * b2 + one_b2 * gi;
        }
    }
}

impl Algorithm for LionConfig {
    const NAME: &'static str = "lion";
    type Kernel = LionKernel;
    type ParamExtra = ();
    type Global = ();

    fn validate(&self) -> Result<()> {
        check_nonneg("lr", self.lr)?;
        check_betas(self.betas)?;
        check_nonneg("weight_decay", self.weight_decay)
    }
    crate::algorithm::lr_and_weight_decay!();
    fn slots(&self) -> &'static [Slot] {
        &[Slot {
            name: "exp_avg",
            signed: true,
        }]
    }
    fn kernel(&self, meta: &ParamMeta<'_>, _: &(), _: &(), grad_scale: f64) -> LionKernel {
        LionKernel {
            decay: 1.0 - meta.lr * self.weight_decay,
            lr: meta.lr,
            beta1: self.betas.0,
            beta2: self.betas.1,
            grad_scale,
        }
    }
}
