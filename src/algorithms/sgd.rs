//! SGD with momentum, exactly as `torch.optim.SGD` (torch 2.x, `_single_tensor_sgd`). Spec:
//! ALGORITHMS.md §14.
//!
//! ```text
//! g ← −grad if maximize else grad
//! g ← g + weight_decay·p                         (coupled L2, only when weight_decay ≠ 0)
//! if momentum ≠ 0:
//!     buf ← g                                    (the parameter's first update: a copy)
//!     buf ← momentum·buf + (1 − dampening)·g     (every later update)
//!     g ← g + momentum·buf if nesterov else buf
//! p ← p − lr·g
//! ```
//!
//! The momentum buffer is the only state (`momentum_buffer`, none without momentum). The
//! arithmetic runs in the compute type in torch's order (`g + wd·p`, `buf·momentum +
//! (1 − dampening)·g`, `p + (−lr)·g`), each scalar rounded once; `maximize` is folded into the
//! sign of the gradient scale, which is exact.

use crate::algorithm::{Algorithm, ElementWise, Kernel, ParamMeta, Slot};
use crate::elem::{Elem, Real};
use crate::error::{check_finite, check_nonneg, Error, Result};
use serde::{Deserialize, Serialize};

/// SGD hyperparameters (one parameter group). Names and defaults are `torch.optim.SGD`'s.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SgdConfig {
    /// Learning rate (1e-3).
    pub lr: f64,
    /// Momentum factor μ (0: plain SGD, no state).
    pub momentum: f64,
    /// Dampening of the gradient in the momentum buffer: buf ← μ·buf + (1 − dampening)·g (0).
    pub dampening: f64,
    /// Coupled L2 penalty: g ← g + λ·p before the momentum (0).
    pub weight_decay: f64,
    /// Nesterov momentum: the step is g + μ·buf (needs momentum > 0 and dampening = 0).
    pub nesterov: bool,
    /// Maximize the objective instead of minimizing it.
    pub maximize: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
            maximize: false,
        }
    }
}

// cuda-params
/// SGD's step scalars as `kernels/sgd.cu` reads them (`kernels/params.cuh`, generated from this
/// definition).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdParams {
    /// lr (the step is p + (−lr)·g).
    pub(crate) lr: f64,
    /// The momentum μ; 0 means no momentum buffer.
    pub(crate) momentum: f64,
    /// 1 − dampening.
    pub(crate) one_minus_dampening: f64,
    /// The coupled weight decay λ; 0 means the gradient is used as it is.
    pub(crate) weight_decay: f64,
    /// The gradient scale (clipping; negative for `maximize`).
    pub(crate) grad_scale: f64,
    /// 1 at this parameter's first update (the buffer starts as a copy of g), else 0.
    pub(crate) first: u32,
    /// 1 with Nesterov momentum, else 0.
    pub(crate) nesterov: u32,
}

/// SGD's step scalars for one parameter.
#[derive(Clone, Copy, Debug)]
pub struct SgdKernel {
    lr: f64,
    momentum: f64,
    one_minus_dampening: f64,
    weight_decay: f64,
    grad_scale: f64,
    first: bool,
    nesterov: bool,
}

/// The momentum cases of [`run`], one loop each.
const PLAIN: u8 = 0;
const FIRST: u8 = 1;
const FIRST_NESTEROV: u8 = 2;
const HEAVY_BALL: u8 = 3;
const NESTEROV: u8 = 4;

/// One loop of the update: `WD` whether the weight decay is added, `MODE` the momentum case
/// (`buf` is empty for [`PLAIN`]).
#[inline(always)]
fn run<P: Elem, const WD: bool, const MODE: u8>(
    k: &SgdKernel,
    p: &mut [P],
    g: &[P],
    buf: &mut [P::Math],
) {
    let of = <P::Math as Real>::of;
    let (neg_lr, gs, wd) = (of(-k.lr), of(k.grad_scale), of(k.weight_decay));
    let (mu, one_d) = (of(k.momentum), of(k.one_minus_dampening));
    let n = p.len();
    let g = &g[..n];
    let buf = if MODE == PLAIN { buf } else { &mut buf[..n] };
    for i in 0..n {
        let pi = p[i].load();
        let mut gi = g[i].load() * gs;
        if WD {
            gi += wd * pi;
        }
        let d = match MODE {
            PLAIN => gi,
            FIRST => {
                buf[i] = gi;
                gi
            }
            FIRST_NESTEROV => {
                buf[i] = gi;
                gi + mu * gi
            }
            HEAVY_BALL => {
                let b = buf[i] * mu + one_d * gi;
                buf[i] = b;
                b
            }
            _ => {
                let b = buf[i] * mu + one_d * gi;
                buf[i] = b;
                gi + mu * b
            }
        };
        p[i] = P::store(pi + neg_lr * d);
    }
}

impl SgdKernel {
    #[inline(always)]
    fn with_decay<P: Elem, const WD: bool>(&self, p: &mut [P], g: &[P], s: &mut [&mut [P::Math]]) {
        match (s, self.first, self.nesterov) {
            ([], _, _) => run::<P, WD, PLAIN>(self, p, g, &mut []),
            ([b], true, false) => run::<P, WD, FIRST>(self, p, g, b),
            ([b], true, true) => run::<P, WD, FIRST_NESTEROV>(self, p, g, b),
            ([b], false, false) => run::<P, WD, HEAVY_BALL>(self, p, g, b),
            ([b], false, true) => run::<P, WD, NESTEROV>(self, p, g, b),
            _ => unreachable!("SGD has 1 state slot with momentum, 0 without"),
        }
    }
}

impl Kernel for SgdKernel {
    const CUDA_MODULE: &'static str = "sgd";
    type Execution = ElementWise;

    type Params = SgdParams;

    fn params(&self) -> SgdParams {
        SgdParams {
            lr: self.lr,
            momentum: self.momentum,
            one_minus_dampening: self.one_minus_dampening,
            weight_decay: self.weight_decay,
            grad_scale: self.grad_scale,
            first: self.first.into(),
            nesterov: self.nesterov.into(),
        }
    }

    #[inline(always)]
    fn apply<P: Elem>(&self, p: &mut [P], g: &[P], s: &mut [&mut [P::Math]]) {
        if self.weight_decay != 0.0 {
            self.with_decay::<P, true>(p, g, s)
        } else {
            self.with_decay::<P, false>(p, g, s)
        }
    }
}

impl Algorithm for SgdConfig {
    const NAME: &'static str = "sgd";
    type Kernel = SgdKernel;
    type ParamExtra = ();
    type Global = ();

    /// torch's checks (lr, momentum, weight_decay ≥ 0; Nesterov needs momentum > 0 and zero
    /// dampening), with every value also required to be finite.
    fn validate(&self) -> Result<()> {
        check_nonneg("lr", self.lr)?;
        check_nonneg("momentum", self.momentum)?;
        check_finite("dampening", self.dampening)?;
        check_nonneg("weight_decay", self.weight_decay)?;
        if self.nesterov && self.momentum <= 0.0 {
            return Err(Error::hyper(
                "momentum",
                self.momentum,
                "nesterov requires momentum > 0",
            ));
        }
        if self.nesterov && self.dampening != 0.0 {
            return Err(Error::hyper(
                "dampening",
                self.dampening,
                "nesterov requires dampening = 0",
            ));
        }
        Ok(())
    }
    crate::algorithm::lr_and_weight_decay!();
    fn slots(&self) -> &'static [Slot] {
        if self.momentum != 0.0 {
            &[Slot {
                name: "momentum_buffer",
                signed: true,
            }]
        } else {
            &[]
        }
    }

    fn kernel(&self, meta: &ParamMeta<'_>, _: &(), _: &(), grad_scale: f64) -> SgdKernel {
        SgdKernel {
            lr: meta.lr,
            momentum: self.momentum,
            one_minus_dampening: 1.0 - self.dampening,
            weight_decay: self.weight_decay,
            grad_scale: if self.maximize {
                -grad_scale
            } else {
                grad_scale
            },
            first: meta.fresh,
            nesterov: self.nesterov,
        }
    }
}
