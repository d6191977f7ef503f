//! Adan (Xie et al., arXiv 2208.06677), exactly as the authors' `sail-sg/Adan` `adan.py`.
//! Spec: ALGORITHMS.md §6.
//!
//! Betas are in the code's convention (1 − the paper's): (0.98, 0.92, 0.99). The step counter is
//! per parameter group; the first step of a tensor (or the first after [`restart`]) takes the
//! previous gradient to be the current one, so the first difference is exactly 0. Global-norm
//! clipping (`max_grad_norm` of the configuration the optimizer was built with) runs over every
//! tensor of every group, adding the eps of the last group to the norm, as the official code
//! does.
//!
//! [`restart`]: crate::Optim::restart

use crate::algorithm::{Algorithm, ElementWise, Kernel, ParamMeta, Slot, StepContext};
use crate::elem::{Elem, Real};
use crate::error::{check_nonneg, check_range, Result};
use crate::reduce::ReduceOp;
use serde::{Deserialize, Serialize};

/// Adan hyperparameters (one parameter group). Defaults are the authors'.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdanConfig {
    /// Learning rate (1e-3).
    pub lr: f64,
    /// (β1, β2, β3) in the code convention = (0.98, 0.92, 0.99).
    pub betas: (f64, f64, f64),
    /// Added to the bias-corrected √n (1e-8).
    pub eps: f64,
    /// Weight decay: proximal p ← p/(1 + lr·λ) after the step, or with `no_prox`
    /// p ← p·(1 − lr·λ) before it (0).
    pub weight_decay: f64,
    /// Global gradient-norm clipping threshold; 0 disables (0). Only the value of the
    /// configuration the optimizer was built with counts.
    pub max_grad_norm: f64,
    /// AdamW-style decay instead of the proximal one (false).
    pub no_prox: bool,
}

impl Default for AdanConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            betas: (0.98, 0.92, 0.99),
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 0.0,
            no_prox: false,
        }
    }
}

// cuda-params
/// Adan's step scalars as `kernels/adan.cu` reads them (`kernels/params.cuh`, generated
/// from this definition).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdanParams {
    /// beta1 (code convention).
    pub(crate) beta1: f64,
    /// beta2.
    pub(crate) beta2: f64,
    /// beta3.
    pub(crate) beta3: f64,
    /// √(bias correction 3).
    pub(crate) bc3_sqrt: f64,
    /// eps.
    pub(crate) eps: f64,
    /// lr/bc1.
    pub(crate) step_size: f64,
    /// lr·beta2/bc2.
    pub(crate) step_size_diff: f64,
    /// 1 - lr·wd (with `no_prox`).
    pub(crate) decay: f64,
    /// 1 + lr·wd (proximal).
    pub(crate) prox_div: f64,
    /// The gradient scale (clipping).
    pub(crate) grad_scale: f64,
    /// 1 with `no_prox` (decoupled decay), else 0 (proximal).
    pub(crate) no_prox: u32,
    /// 1 at the first step (the previous gradient is the current one), else 0.
    pub(crate) first: u32,
}

/// Adan's step scalars.
#[derive(Clone, Copy, Debug)]
pub struct AdanKernel {
    beta1: f64,
    beta2: f64,
    beta3: f64,
    bc3_sqrt: f64,
    eps: f64,
    step_size: f64,
    step_size_diff: f64,
    decay: f64,
    prox_div: f64,
    no_prox: bool,
    first: bool,
    grad_scale: f64,
}

impl Kernel for AdanKernel {
    const CUDA_MODULE: &'static str = "adan";
    type Execution = ElementWise;

    type Params = AdanParams;

    fn params(&self) -> AdanParams {
        AdanParams {
            beta1: self.beta1,
            beta2: self.beta2,
            beta3: self.beta3,
            bc3_sqrt: self.bc3_sqrt,
            eps: self.eps,
            step_size: self.step_size,
            step_size_diff: self.step_size_diff,
            decay: self.decay,
            prox_div: self.prox_div,
            grad_scale: self.grad_scale,
            no_prox: self.no_prox.into(),
            first: self.first.into(),
        }
    }

    #[inline(always)]
    fn apply<P: Elem>(&self, p: &mut [P], g: &[P], s: &mut [&mut [P::Math]]) {
        let of = <P::Math as Real>::of;
        let (b1, one_b1) = (of(self.beta1), of(1.0 - self.beta1));
        let (b2, one_b2) = (of(self.beta2), of(1.0 - self.beta2));
        let (b3, one_b3) = (of(self.beta3), of(1.0 - self.beta3));
        let (bc3s, eps, gs) = (of(self.bc3_sqrt), of(self.eps), of(self.grad_scale));
        let (neg_ss, neg_ssd) = (of(-self.step_size), of(-self.step_size_diff));
        let (decay, prox_div) = (of(self.decay), of(self.prox_div));
        let (no_prox, first) = (self.no_prox, self.first);
        let [m, nn, d, q] = s else {
            unreachable!("Adan has 4 state slots")
        };
        let n = p.len();
        let (g, m, nn, d, q) = (&g[..n], &mut m[..n], &mut nn[..n], &mut d[..n], &mut q[..n]);
        for i in 0..n {
            let gi = g[i].load() * gs;
            // q holds −g_{k−1}; at a first step it is −g_k, so the difference is exactly 0.
            let q0 = if first { -gi } else { q[i] };
            let diff = q0 + gi;
            let mi = m[i] * b1 + one_b1 * gi;
            let di = d[i] * b2 + one_b2 * diff;
            let u = diff * b2 + gi;
            let ni = nn[i] * b3 + one_b3 * u * u;
            let denom = ni.sqrt() / bc3s + eps;
            let mut pi = p[i].load();
            if no_prox {
                pi *= decay;
            }
            pi += neg_ss * (mi / denom);
            pi += neg_ssd * (di / denom);
            if !no_prox {
                pi /= prox_div;
            }
            m[i] = mi;
            d[i] = di;
            nn[i] = ni;
            q[i] = -gi;
            p[i] = P::store(pi);
        }
    }
}

impl Algorithm for AdanConfig {
    const NAME: &'static str = "adan";
    type Kernel = AdanKernel;
    type ParamExtra = ();
    type Global = ();

    fn validate(&self) -> Result<()> {
        check_nonneg("lr", self.lr)?;
        check_range("betas[0]", self.betas.0, 0.0, 1.0)?;
        check_range("betas[1]", self.betas.1, 0.0, 1.0)?;
        check_range("betas[2]", self.betas.2, 0.0, 1.0)?;
        check_nonneg("eps", self.eps)?;
        check_nonneg("weight_decay", self.weight_decay)?;
        check_nonneg("max_grad_norm", self.max_grad_norm)
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
                name: "exp_avg_diff",
                signed: true,
            },
            Slot {
                name: "neg_pre_grad",
                signed: true,
            },
        ]
    }

    fn prepare(_: &mut (), ctx: &mut StepContext<'_, '_, Self>) -> Result<()> {
        let max = ctx.base.max_grad_norm;
        if max <= 0.0 {
            return Ok(());
        }
        let grads: Vec<_> = ctx.entries.iter().map(|e| e.grad).collect();
        // Sharded: every rank takes part, with or without gradients of its own.
        let mut sum_sq = [ctx.reducer.total_sum_sq(&grads)?];
        ctx.reduce_across_ranks(&mut sum_sq, ReduceOp::Sum)?;
        if ctx.entries.is_empty() {
            return Ok(());
        }
        let norm = sum_sq[0].sqrt() * ctx.grad_scale.abs();
        let eps = ctx.groups.last().map_or(ctx.base.eps, |g| g.eps);
        // The reference forms the clip factor from float32 tensors and then calls .item().
        let c = (max as f32 / (norm as f32 + eps as f32)).min(1.0);
        ctx.grad_scale *= c as f64;
        Ok(())
    }

    fn prepare_reads_gradients(&self) -> bool {
        self.max_grad_norm > 0.0
    }

    fn kernel(&self, meta: &ParamMeta<'_>, _: &(), _: &(), grad_scale: f64) -> AdanKernel {
        let (b1, b2, b3) = self.betas;
        let k = meta.group_step as f64;
        let bc1 = 1.0 - b1.powf(k);
        let bc2 = 1.0 - b2.powf(k);
        let bc3 = 1.0 - b3.powf(k);
        AdanKernel {
            beta1: b1,
            beta2: b2,
            beta3: b3,
            bc3_sqrt: bc3.sqrt(),
            eps: self.eps,
            step_size: meta.lr / bc1,
            step_size_diff: meta.lr * b2 / bc2,
            decay: 1.0 - meta.lr * self.weight_decay,
            prox_div: 1.0 + meta.lr * self.weight_decay,
            no_prox: self.no_prox,
            first: meta.fresh || meta.group_step == 1,
            grad_scale,
        }
    }
}

impl crate::Optim<AdanConfig> {
    /// The official `restart_opt()`: zeroes every moment and resets the step counters, so the
    /// optimizer continues exactly like a fresh one from the current parameters.
    pub fn restart(&mut self) -> Result<()> {
        self.reset_state()
    }
}
