//! AdamP (Heo et al., ICLR 2021), exactly as the authors' `clovaai/AdamP` 0.3.0.
//! Spec: ALGORITHMS.md §3.
//!
//! For tensors of rank ≥ 2 the Adam step `u` is projected onto the tangent space of the weight
//! when the gradient is nearly orthogonal to it: first tested on the channel view (one row per
//! `shape[0]`), then on the layer view (one row), with `|cos|`, the maximum over rows and the
//! threshold `delta/sqrt(row_len)` in f64. On the CPU this is two passes over the tensor: the
//! first updates m and v and accumulates per-row g·p, ‖g‖², ‖p‖² and p·u (f64, in a scratch
//! buffer reused across steps); the second recomputes u, projects it and writes p.

use crate::algorithm::{Algorithm, Kernel, ParamMeta, Slots};
use crate::backend::cpu::{leaf_len, split_point, REDUCE_GRAIN};
use crate::elem::{Elem, Real};
use crate::error::{check_nonneg, check_range, Result};
use candle_core::Shape;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;

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

/// Per-row sums of pass 1: g·p, g·g, p·p, p·u.
type RowSums = [f64; 4];

/// Scalars rounded once to the compute type.
struct Consts<F> {
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
        (self.lr_wd > 0.0).then(|| 1.0 - self.lr_wd * r)
    }
}

impl<F: Real> Consts<F> {
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
    /// The unprojected step (tensors of rank < 2).
    #[inline]
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
                pi = pi * d;
            }
            p[i] = P::store(pi + c.neg_ss * u);
        }
    }

    fn update_cpu<P: Elem>(&self, p: &mut [P], g: &[P], s: Slots<'_, P::Math>, shape: &Shape) {
        let dims = shape.dims();
        let n = p.len();
        if dims.len() < 2 || n == 0 {
            crate::backend::cpu::par_apply(self, p, g, s);
            return;
        }
        let rows = dims[0];
        let row_len = n / rows;
        let mut s = s;
        let [m, v] = s.as_mut_slice() else {
            unreachable!("AdamP has 2 state slots")
        };
        thread_local! {
            static SCRATCH: RefCell<Vec<RowSums>> = const { RefCell::new(Vec::new()) };
        }
        SCRATCH.with(|cell| {
            let mut local;
            let mut borrowed = cell.try_borrow_mut();
            // Another AdamP update running on this thread (a stolen rayon job) holds the
            // scratch: fall back to a buffer of our own.
            let sums: &mut Vec<RowSums> = match borrowed.as_deref_mut() {
                Ok(v) => v,
                Err(_) => {
                    local = Vec::new();
                    &mut local
                }
            };
            sums.clear();
            sums.resize(rows, [0.0; 4]);
            let c = self.consts::<P::Math>();
            let leaf = leaf_len(n);
            pass1(&c, p, g, m, v, sums, row_len, leaf);
            let proj = self.decide(sums, row_len, n);
            let r = if proj.is_some() { self.wd_ratio } else { 1.0 };
            let decay = self.decay(r).map(<P::Math as Real>::of);
            pass2(&c, p, g, m, v, sums, row_len, leaf, proj, decay, self.eps);
        });
    }
}

/// Which view the projection uses.
#[derive(Clone, Copy, Debug)]
enum Proj {
    Channel,
    /// The layer view, with the whole-tensor norm of p and Σ p·u.
    Layer {
        norm: f64,
        pu: f64,
    },
}

impl AdamPKernel {
    /// The reference's `_projection` decision: channel view first, then layer view.
    fn decide(&self, sums: &[RowSums], row_len: usize, n: usize) -> Option<Proj> {
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
        if max_cos < self.delta / (row_len as f64).sqrt() {
            return Some(Proj::Channel);
        }
        let total = sums.iter().fold([0.0; 4], |a, s| {
            [a[0] + s[0], a[1] + s[1], a[2] + s[2], a[3] + s[3]]
        });
        (cos(&total) < self.delta / (n as f64).sqrt()).then(|| Proj::Layer {
            norm: total[2].sqrt(),
            pu: total[3],
        })
    }
}

/// Pass 1 over whole rows: update m, v and accumulate the row sums.
#[allow(clippy::too_many_arguments)]
fn pass1<P: Elem>(
    c: &Consts<P::Math>,
    p: &[P],
    g: &[P],
    m: &mut [P::Math],
    v: &mut [P::Math],
    sums: &mut [RowSums],
    row_len: usize,
    leaf: usize,
) {
    let rows = sums.len();
    if rows >= 2 && p.len() > leaf {
        let mid = (rows / 2) * row_len;
        let (pl, pr) = p.split_at(mid);
        let (gl, gr) = g.split_at(mid);
        let (ml, mr) = m.split_at_mut(mid);
        let (vl, vr) = v.split_at_mut(mid);
        let (sl, sr) = sums.split_at_mut(rows / 2);
        rayon::join(
            || pass1(c, pl, gl, ml, vl, sl, row_len, leaf),
            || pass1(c, pr, gr, mr, vr, sr, row_len, leaf),
        );
    } else if rows == 1 {
        // A fixed split tree, so the row sums do not depend on the number of threads.
        sums[0] = row_pass1(c, p, g, m, v, REDUCE_GRAIN);
    } else {
        for (r, s) in sums.iter_mut().enumerate() {
            let a = r * row_len;
            let b = a + row_len;
            *s = row_pass1(
                c,
                &p[a..b],
                &g[a..b],
                &mut m[a..b],
                &mut v[a..b],
                usize::MAX,
            );
        }
    }
}

/// Pass 1 on (part of) one row, split over threads beyond `leaf` elements with a fixed tree.
fn row_pass1<P: Elem>(
    c: &Consts<P::Math>,
    p: &[P],
    g: &[P],
    m: &mut [P::Math],
    v: &mut [P::Math],
    leaf: usize,
) -> RowSums {
    let n = p.len();
    if n > leaf {
        let mid = split_point(n);
        let (pl, pr) = p.split_at(mid);
        let (gl, gr) = g.split_at(mid);
        let (ml, mr) = m.split_at_mut(mid);
        let (vl, vr) = v.split_at_mut(mid);
        let (a, b) = rayon::join(
            || row_pass1(c, pl, gl, ml, vl, leaf),
            || row_pass1(c, pr, gr, mr, vr, leaf),
        );
        return [a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3]];
    }
    let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
    let mut acc = [0f64; 4];
    for i in 0..n {
        let gi = g[i].load() * c.gs;
        let pi = p[i].load();
        let mi = m[i] * c.b1 + c.one_b1 * gi;
        let vi = v[i] * c.b2 + c.one_b2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        let u = c.u(mi, vi, gi).f64();
        let (gf, pf) = (gi.f64(), pi.f64());
        acc[0] += gf * pf;
        acc[1] += gf * gf;
        acc[2] += pf * pf;
        acc[3] += pf * u;
    }
    acc
}

/// Pass 2 over whole rows: recompute u, project it, decay and step p.
#[allow(clippy::too_many_arguments)]
fn pass2<P: Elem>(
    c: &Consts<P::Math>,
    p: &mut [P],
    g: &[P],
    m: &[P::Math],
    v: &[P::Math],
    sums: &[RowSums],
    row_len: usize,
    leaf: usize,
    proj: Option<Proj>,
    decay: Option<P::Math>,
    eps: f64,
) {
    let rows = sums.len();
    if rows >= 2 && p.len() > leaf {
        let mid = (rows / 2) * row_len;
        let (pl, pr) = p.split_at_mut(mid);
        let (gl, gr) = g.split_at(mid);
        let (ml, mr) = m.split_at(mid);
        let (vl, vr) = v.split_at(mid);
        let (sl, sr) = sums.split_at(rows / 2);
        rayon::join(
            || pass2(c, pl, gl, ml, vl, sl, row_len, leaf, proj, decay, eps),
            || pass2(c, pr, gr, mr, vr, sr, row_len, leaf, proj, decay, eps),
        );
        return;
    }
    for (r, s) in sums.iter().enumerate() {
        // Projector p̂ = p/(‖p‖ + eps) (eps added, not a clamp) and Σ p̂·u.
        let (pn_div, coef) = match proj {
            None => (1.0, 0.0),
            Some(Proj::Channel) => {
                let d = s[2].sqrt() + eps;
                (d, s[3] / d)
            }
            Some(Proj::Layer { norm, pu }) => {
                let d = norm + eps;
                (d, pu / d)
            }
        };
        let (pn_div, coef) = (<P::Math as Real>::of(pn_div), <P::Math as Real>::of(coef));
        let a = r * row_len;
        let b = a + row_len;
        row_pass2(
            c,
            &mut p[a..b],
            &g[a..b],
            &m[a..b],
            &v[a..b],
            proj.is_some(),
            pn_div,
            coef,
            decay,
            if rows == 1 { leaf } else { usize::MAX },
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn row_pass2<P: Elem>(
    c: &Consts<P::Math>,
    p: &mut [P],
    g: &[P],
    m: &[P::Math],
    v: &[P::Math],
    project: bool,
    pn_div: P::Math,
    coef: P::Math,
    decay: Option<P::Math>,
    leaf: usize,
) {
    let n = p.len();
    if n > leaf {
        let mid = split_point(n);
        let (pl, pr) = p.split_at_mut(mid);
        let (gl, gr) = g.split_at(mid);
        let (ml, mr) = m.split_at(mid);
        let (vl, vr) = v.split_at(mid);
        rayon::join(
            || row_pass2(c, pl, gl, ml, vl, project, pn_div, coef, decay, leaf),
            || row_pass2(c, pr, gr, mr, vr, project, pn_div, coef, decay, leaf),
        );
        return;
    }
    let (g, m, v) = (&g[..n], &m[..n], &v[..n]);
    for i in 0..n {
        let pi = p[i].load();
        let gi = g[i].load() * c.gs;
        let mut u = c.u(m[i], v[i], gi);
        if project {
            u = u - (pi / pn_div) * coef;
        }
        let pd = match decay {
            Some(d) => pi * d,
            None => pi,
        };
        p[i] = P::store(pd + c.neg_ss * u);
    }
}

impl Algorithm for AdamPConfig {
    const NAME: &'static str = "adamp";
    type Kernel = AdamPKernel;
    type ParamExtra = ();
    type Global = ();

    fn validate(&self) -> Result<()> {
        check_nonneg("lr", self.lr)?;
        check_range("betas[0]", self.betas.0, 0.0, 1.0)?;
        check_range("betas[1]", self.betas.1, 0.0, 1.0)?;
        check_nonneg("eps", self.eps)?;
        check_nonneg("weight_decay", self.weight_decay)?;
        check_nonneg("delta", self.delta)?;
        check_nonneg("wd_ratio", self.wd_ratio)
    }
    fn lr(&self) -> f64 {
        self.lr
    }
    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }
    fn weight_decay(&self) -> f64 {
        self.weight_decay
    }
    fn set_weight_decay(&mut self, wd: f64) {
        self.weight_decay = wd;
    }
    fn slots(&self) -> &'static [&'static str] {
        &["exp_avg", "exp_avg_sq"]
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
            step_size: self.lr / bc1,
            lr_wd: self.lr * self.weight_decay,
            wd_ratio: self.wd_ratio,
            delta: self.delta,
            nesterov: self.nesterov,
            grad_scale,
        }
    }
}
