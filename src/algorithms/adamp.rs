//! AdamP (Heo et al., ICLR 2021), exactly as the authors' `clovaai/AdamP` 0.3.0.
//! Spec: ALGORITHMS.md §3.
//!
//! For tensors of rank ≥ 2 the Adam step `u` is projected onto the tangent space of the weight
//! when the gradient is nearly orthogonal to it: first tested on the channel view (one row per
//! `shape[0]`), then on the layer view (one row), with `|cos|`, the maximum over rows and the
//! threshold `delta/sqrt(row_len)` in f64. It runs under the [`RowProjected`] strategy: pass 1
//! updates m and v and the backend accumulates per-row g·p, ‖g‖² and ‖p‖², which decide the
//! projection ([`RowRule::decide`]); pass 2 computes u, projects it and writes p. The projector
//! multiplies by 1/(‖p‖ + eps) where the reference divides by ‖p‖ + eps: a rounding-level
//! difference, far inside the tolerance.

use crate::algorithm::{
    Algorithm, Kernel, ParamMeta, Projection, RowProjected, RowRule, RowSums, Slot,
};
use crate::elem::{Elem, Real};
use crate::error::{check_betas, check_nonneg, Result};
use serde::{Deserialize, Serialize};

/// AdamP hyperparameters (one parameter group). Defaults are the authors'.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamPConfig {
    /// Learning rate (1e-3).
    pub lr: f64,
    /// (β1, β2) = (0.9, 0.999).
    pub betas: (f64, f64),
    /// Added to the bias-corrected √v; also the norm floor of the cosine and the projector (1e-8).
    pub eps: f64,
    /// Decoupled weight decay p ← p·(1 − lr·λ·r), r = `wd_ratio` when projected (0).
    pub weight_decay: f64,
    /// Projection threshold: project when max |cos| < delta/sqrt(row_len) (0.1).
    pub delta: f64,
    /// Weight-decay factor for projected tensors (0.1).
    pub wd_ratio: f64,
    /// Nesterov momentum: u = (β1·m + (1 − β1)·g)/denom (false).
    pub nesterov: bool,
}

impl Default for AdamPConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            delta: 0.1,
            wd_ratio: 0.1,
            nesterov: false,
        }
    }
}

// cuda-params
/// AdamP's step scalars as `kernels/adamp.cu` reads them (`kernels/params.cuh`, generated
/// from this definition).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamPParams {
    /// beta1.
    pub(crate) beta1: f64,
    /// beta2.
    pub(crate) beta2: f64,
    /// √(bias correction 2).
    pub(crate) bc2_sqrt: f64,
    /// eps (the denominator's and the projection's).
    pub(crate) eps: f64,
    /// lr / bias correction 1.
    pub(crate) step_size: f64,
    /// lr·wd.
    pub(crate) lr_wd: f64,
    /// The decay ratio of projected tensors.
    pub(crate) wd_ratio: f64,
    /// The cosine threshold of the projection test.
    pub(crate) delta: f64,
    /// The gradient scale (clipping).
    pub(crate) grad_scale: f64,
    /// 1 with Nesterov momentum, else 0.
    pub(crate) nesterov: u32,
}

/// AdamP's step scalars.
#[derive(Clone, Copy, Debug)]
pub struct AdamPKernel {
    beta1: f64,
    beta2: f64,
    bc2_sqrt: f64,
    eps: f64,
    step_size: f64,
    lr_wd: f64,
    wd_ratio: f64,
    delta: f64,
    nesterov: bool,
    grad_scale: f64,
}

/// Scalars rounded once to the compute type.
pub struct Consts<F> {
    b1: F,
    one_b1: F,
    b2: F,
    one_b2: F,
    bc2s: F,
    eps: F,
    gs: F,
    neg_ss: F,
    nesterov: bool,
}

impl AdamPKernel {
    fn consts<F: Real>(&self) -> Consts<F> {
        let of = F::of;
        Consts {
            b1: of(self.beta1),
            one_b1: of(1.0 - self.beta1),
            b2: of(self.beta2),
            one_b2: of(1.0 - self.beta2),
            bc2s: of(self.bc2_sqrt),
            eps: of(self.eps),
            gs: of(self.grad_scale),
            neg_ss: of(-self.step_size),
            nesterov: self.nesterov,
        }
    }

    /// `p·(1 − lr·λ·r)`, only when weight decay is on (as in the reference).
    fn decay(&self, r: f64) -> Option<f64> {
        (self.lr_wd > 0.0).then_some(1.0 - self.lr_wd * r)
    }
}

impl<F: Real> Consts<F> {
    /// u at one element; the gradient is read only with Nesterov (`NEST` is fixed per loop).
    #[inline(always)]
    fn u_at<P: Elem<Math = F>, const NEST: bool>(&self, mi: F, vi: F, g: &P) -> F {
        let denom = vi.sqrt() / self.bc2s + self.eps;
        if NEST {
            (self.b1 * mi + self.one_b1 * (g.load() * self.gs)) / denom
        } else {
            mi / denom
        }
    }

    /// The Adam direction u from the updated m, v (identical in both passes).
    #[inline(always)]
    fn u(&self, mi: F, vi: F, gi: F) -> F {
        let denom = vi.sqrt() / self.bc2s + self.eps;
        if self.nesterov {
            (self.b1 * mi + self.one_b1 * gi) / denom
        } else {
            mi / denom
        }
    }
}

impl Kernel for AdamPKernel {
    const CUDA_MODULE: &'static str = "adamp";
    type Execution = RowProjected;

    type Params = AdamPParams;

    fn params(&self) -> AdamPParams {
        AdamPParams {
            beta1: self.beta1,
            beta2: self.beta2,
            bc2_sqrt: self.bc2_sqrt,
            eps: self.eps,
            step_size: self.step_size,
            lr_wd: self.lr_wd,
            wd_ratio: self.wd_ratio,
            delta: self.delta,
            grad_scale: self.grad_scale,
            nesterov: self.nesterov.into(),
        }
    }

    /// The unprojected step (tensors of rank < 2).
    #[inline(always)]
    fn apply<P: Elem>(&self, p: &mut [P], g: &[P], s: &mut [&mut [P::Math]]) {
        let c = self.consts::<P::Math>();
        let decay = self.decay(1.0).map(<P::Math as Real>::of);
        let [m, v] = s else {
            unreachable!("AdamP has 2 state slots")
        };
        let n = p.len();
        let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
        for i in 0..n {
            let gi = g[i].load() * c.gs;
            let mi = m[i] * c.b1 + c.one_b1 * gi;
            let vi = v[i] * c.b2 + c.one_b2 * gi * gi;
            m[i] = mi;
            v[i] = vi;
            let u = c.u(mi, vi, gi);
            let mut pi = p[i].load();
            if let Some(d) = decay {
                pi *= d;
            }
            p[i] = P::store(pi + c.neg_ss * u);
        }
    }
}

impl RowRule for AdamPKernel {
    type Consts<F: Real> = Consts<F>;

    fn consts<F: Real>(&self) -> Consts<F> {
        AdamPKernel::consts(self)
    }

    fn direction_reads_grad(&self) -> bool {
        self.nesterov
    }

    #[inline(always)]
    fn pass1<F: Real>(c: &Consts<F>, g: F, m: &mut F, v: &mut F) -> F {
        let gi = g * c.gs;
        let mi = *m * c.b1 + c.one_b1 * gi;
        let vi = *v * c.b2 + c.one_b2 * gi * gi;
        *m = mi;
        *v = vi;
        gi
    }

    #[inline(always)]
    fn direction<P: Elem, const NEST: bool>(
        c: &Consts<P::Math>,
        m: P::Math,
        v: P::Math,
        g: &P,
    ) -> P::Math {
        c.u_at::<P, NEST>(m, v, g)
    }

    #[inline(always)]
    fn write<F: Real>(c: &Consts<F>, p: F, decay: F, u: F) -> F {
        p * decay + c.neg_ss * u
    }

    /// The reference's `_projection` decision: channel view first, then layer view, with
    /// `F.cosine_similarity`'s per-vector norm floor at eps, |cos| and the maximum over rows.
    fn decide(&self, sums: &[RowSums], row_len: usize, n: usize) -> Option<Projection> {
        let eps = self.eps;
        let cos = |s: &RowSums| s[0].abs() / (s[1].sqrt().max(eps) * s[2].sqrt().max(eps));
        let max_cos =
            sums.iter().map(cos).fold(
                f64::NEG_INFINITY,
                |a, b| {
                    if a.is_nan() || b > a {
                        b
                    } else {
                        a
                    }
                },
            );
        let total = sums
            .iter()
            .fold([0.0; 3], |a, s| [a[0] + s[0], a[1] + s[1], a[2] + s[2]]);
        if max_cos < self.delta / (row_len as f64).sqrt() {
            // A single row is the whole tensor: use the layer form, which splits over threads.
            return Some(if sums.len() == 1 {
                Projection::Layer {
                    norm: total[2].sqrt(),
                }
            } else {
                Projection::Channel
            });
        }
        (cos(&total) < self.delta / (n as f64).sqrt()).then(|| Projection::Layer {
            norm: total[2].sqrt(),
        })
    }

    fn projection_eps(&self) -> f64 {
        self.eps
    }

    /// `p·(1 − lr·λ·r)`, r = `wd_ratio` when projected, only when weight decay is on (as in
    /// the reference).
    fn decay(&self, projected: bool) -> Option<f64> {
        AdamPKernel::decay(self, if projected { self.wd_ratio } else { 1.0 })
    }
}

impl Algorithm for AdamPConfig {
    const NAME: &'static str = "adamp";
    type Kernel = AdamPKernel;
    type ParamExtra = ();
    type Global = ();

    fn validate(&self) -> Result<()> {
        check_nonneg("lr", self.lr)?;
        check_betas(self.betas)?;
        check_nonneg("eps", self.eps)?;
        check_nonneg("weight_decay", self.weight_decay)?;
        check_nonneg("delta", self.delta)?;
        check_nonneg("wd_ratio", self.wd_ratio)
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
        ]
    }

    /// Rank ≥ 2: pass 1 reads p, g, m, v and writes m, v (28 B per f32 element); pass 2 reads
    /// p, m, v (and g with Nesterov) and writes p (16 B, 20 with Nesterov): 44 B in all (48).
    /// Vectors: one pass, 28 B.
    fn traffic_bytes(&self, numel: usize, rank: usize, pb: usize) -> usize {
        let one_pass = numel * (3 * pb + 16);
        if rank < 2 {
            one_pass
        } else {
            one_pass + numel * (2 * pb + 8 + if self.nesterov { pb } else { 0 })
        }
    }

    fn kernel(&self, meta: &ParamMeta<'_>, _: &(), _: &(), grad_scale: f64) -> AdamPKernel {
        let (b1, b2) = self.betas;
        let t = meta.t as f64;
        let bc1 = 1.0 - b1.powf(t);
        let bc2 = 1.0 - b2.powf(t);
        AdamPKernel {
            beta1: b1,
            beta2: b2,
            bc2_sqrt: bc2.sqrt(),
            eps: self.eps,
            step_size: meta.lr / bc1,
            lr_wd: meta.lr * self.weight_decay,
            wd_ratio: self.wd_ratio,
            delta: self.delta,
            nesterov: self.nesterov,
            grad_scale,
        }
    }
}
