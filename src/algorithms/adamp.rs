//! AdamP (Heo et al., ICLR 2021), exactly as the authors' `clovaai/AdamP` 0.3.0.
//! Spec: ALGORITHMS.md §3.
//!
//! For tensors of rank ≥ 2 the Adam step `u` is projected onto the tangent space of the weight
//! when the gradient is nearly orthogonal to it: first tested on the channel view (one row per
//! `shape[0]`), then on the layer view (one row), with `|cos|`, the maximum over rows and the
//! threshold `delta/sqrt(row_len)` in f64. On the CPU this is two passes over the tensor: the
//! first updates m and v and accumulates per-row g·p, ‖g‖² and ‖p‖² (f64, in a scratch buffer
//! reused across steps), which decide the projection; the second computes u, projects it (the
//! per-row Σ p·u from the row while it is in cache; the layer view's Σ p·u in an extra read
//! pass, only when it fires) and writes p. The projector multiplies by 1/(‖p‖ + eps) where the
//! reference divides by ‖p‖ + eps: a rounding-level difference, far inside the tolerance.

use crate::algorithm::{Algorithm, Kernel, ParamMeta, Slots, Words};
use crate::backend::cpu::{leaf_len, split_point, REDUCE_GRAIN};
use crate::backend::simd;
use crate::elem::{Elem, Real};
use crate::error::{check_betas, check_nonneg, Result};
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

    /// The order of `kernels/adamp.cu`.
    fn words(&self) -> Words {
        [
            self.beta1,
            self.beta2,
            self.bc2_sqrt,
            self.eps,
            self.step_size,
            self.lr_wd,
            self.wd_ratio,
            self.delta,
            self.nesterov as u8 as f64,
            self.grad_scale,
        ]
        .into_iter()
        .collect()
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

    #[cfg(feature = "cuda")]
    fn update_cuda(items: &[crate::backend::Work<'_, Self>]) -> Result<()> {
        cuda::update(items)
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
            sums.resize(rows, [0.0; 3]);
            let c = self.consts::<P::Math>();
            let leaf = leaf_len(n);
            pass1(&c, p, g, m, v, sums, row_len, leaf);
            let mut proj = self.decide(sums, row_len, n);
            if let Some(Proj::Layer { norm, coef }) = &mut proj {
                // Σ p̂·u over the whole tensor needs every u before any p changes.
                let pu = if self.nesterov {
                    dot_pu::<P, true>(&c, p, g, m, v)
                } else {
                    dot_pu::<P, false>(&c, p, g, m, v)
                };
                *coef = pu / (*norm + self.eps);
            }
            let r = if proj.is_some() { self.wd_ratio } else { 1.0 };
            let decay = self.decay(r).map(<P::Math as Real>::of);
            let eps = self.eps;
            if self.nesterov {
                pass2::<P, true>(&c, p, g, m, v, sums, row_len, leaf, proj, decay, eps);
            } else {
                pass2::<P, false>(&c, p, g, m, v, sums, row_len, leaf, proj, decay, eps);
            }
        });
    }
}

/// Per-row sums of pass 1: g·p, g·g, p·p (f64).
type RowSums = [f64; 3];

/// Which view the projection uses.
#[derive(Clone, Copy, Debug)]
enum Proj {
    /// Per row j: u ← u − p̂_j (p̂_j·u_j), p̂_j = p_j/(‖p_j‖ + eps).
    Channel,
    /// Whole tensor: u ← u − p̂ (p̂·u), with ‖p‖ and the coefficient p̂·u.
    Layer { norm: f64, coef: f64 },
}

impl AdamPKernel {
    /// The reference's `_projection` decision: channel view first, then layer view, with
    /// `F.cosine_similarity`'s per-vector norm floor at eps, |cos| and the maximum over rows.
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
        let total = sums
            .iter()
            .fold([0.0; 3], |a, s| [a[0] + s[0], a[1] + s[1], a[2] + s[2]]);
        if max_cos < self.delta / (row_len as f64).sqrt() {
            // A single row is the whole tensor: use the layer form, which splits over threads.
            return Some(if sums.len() == 1 {
                Proj::Layer {
                    norm: total[2].sqrt(),
                    coef: 0.0,
                }
            } else {
                Proj::Channel
            });
        }
        (cos(&total) < self.delta / (n as f64).sqrt()).then(|| Proj::Layer {
            norm: total[2].sqrt(),
            coef: 0.0,
        })
    }
}

/// Independent accumulators per sum, so the f64 reductions vectorize.
const LANES: usize = 16;

/// Rows up to this length keep their u on the stack between the two halves of a projected
/// row (Σ p·u, then the update); longer rows compute u twice.
const ROW_BUF: usize = 4096;

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
        sums[0] = row_pass1(c, p, g, m, v);
    } else {
        simd::run(Pass1 {
            c,
            p,
            g,
            m,
            v,
            sums,
            row_len,
        });
    }
}

/// Pass 1 on (part of) one long row, split over threads with a fixed tree so the sums do not
/// depend on the number of threads.
fn row_pass1<P: Elem>(
    c: &Consts<P::Math>,
    p: &[P],
    g: &[P],
    m: &mut [P::Math],
    v: &mut [P::Math],
) -> RowSums {
    let n = p.len();
    if n > REDUCE_GRAIN {
        let mid = split_point(n);
        let (pl, pr) = p.split_at(mid);
        let (gl, gr) = g.split_at(mid);
        let (ml, mr) = m.split_at_mut(mid);
        let (vl, vr) = v.split_at_mut(mid);
        let (a, b) = rayon::join(
            || row_pass1(c, pl, gl, ml, vl),
            || row_pass1(c, pr, gr, mr, vr),
        );
        return [a[0] + b[0], a[1] + b[1], a[2] + b[2]];
    }
    let mut sums = [[0.0; 3]];
    simd::run(Pass1 {
        c,
        p,
        g,
        m,
        v,
        sums: &mut sums,
        row_len: n,
    });
    sums[0]
}

/// Pass 1 over consecutive rows (one leaf), compiled per SIMD level.
struct Pass1<'a, P: Elem> {
    c: &'a Consts<P::Math>,
    p: &'a [P],
    g: &'a [P],
    m: &'a mut [P::Math],
    v: &'a mut [P::Math],
    sums: &'a mut [RowSums],
    row_len: usize,
}

impl<P: Elem> simd::Task for Pass1<'_, P> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        let Pass1 {
            c,
            p,
            g,
            m,
            v,
            sums,
            row_len,
        } = self;
        for (r, out) in sums.iter_mut().enumerate() {
            let a = r * row_len;
            let (p, g) = (&p[a..a + row_len], &g[a..a + row_len]);
            let (m, v) = (&mut m[a..a + row_len], &mut v[a..a + row_len]);
            let mut acc = [[0f64; LANES]; 3];
            let chunks = p
                .chunks_exact(LANES)
                .zip(g.chunks_exact(LANES))
                .zip(m.chunks_exact_mut(LANES).zip(v.chunks_exact_mut(LANES)));
            for ((p, g), (m, v)) in chunks {
                pass1_lanes(c, p, g, m, v, &mut acc);
            }
            let full = row_len / LANES * LANES;
            pass1_lanes(
                c,
                &p[full..],
                &g[full..],
                &mut m[full..],
                &mut v[full..],
                &mut acc,
            );
            *out = acc.map(|lanes| lanes.iter().sum());
        }
    }
}

/// Pass 1 on at most [`LANES`] elements, element `l` into lane `l` of the sums.
#[inline(always)]
fn pass1_lanes<P: Elem>(
    c: &Consts<P::Math>,
    p: &[P],
    g: &[P],
    m: &mut [P::Math],
    v: &mut [P::Math],
    acc: &mut [[f64; LANES]; 3],
) {
    let n = p.len().min(LANES);
    let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
    for l in 0..n {
        let gi = g[l].load() * c.gs;
        let mi = m[l] * c.b1 + c.one_b1 * gi;
        let vi = v[l] * c.b2 + c.one_b2 * gi * gi;
        m[l] = mi;
        v[l] = vi;
        let (gf, pf) = (gi.f64(), p[l].load().f64());
        acc[0][l] += gf * pf;
        acc[1][l] += gf * gf;
        acc[2][l] += pf * pf;
    }
}

/// Σ p·u over `p` (f64), with u from the updated m, v.
#[inline(always)]
fn dot_pu_lanes<P: Elem, const NEST: bool>(
    c: &Consts<P::Math>,
    p: &[P],
    g: &[P],
    m: &[P::Math],
    v: &[P::Math],
) -> f64 {
    let mut acc = [0f64; LANES];
    let n = p.len();
    let full = n / LANES * LANES;
    let chunks = p
        .chunks_exact(LANES)
        .zip(g.chunks_exact(LANES))
        .zip(m.chunks_exact(LANES).zip(v.chunks_exact(LANES)));
    for ((p, g), (m, v)) in chunks {
        for l in 0..LANES {
            let u = c.u_at::<P, NEST>(m[l], v[l], &g[l]);
            acc[l] += p[l].load().f64() * u.f64();
        }
    }
    for (l, i) in (full..n).enumerate() {
        let u = c.u_at::<P, NEST>(m[i], v[i], &g[i]);
        acc[l] += p[i].load().f64() * u.f64();
    }
    acc.iter().sum()
}

struct DotPu<'a, P: Elem, const NEST: bool> {
    c: &'a Consts<P::Math>,
    p: &'a [P],
    g: &'a [P],
    m: &'a [P::Math],
    v: &'a [P::Math],
}

impl<P: Elem, const NEST: bool> simd::Task for DotPu<'_, P, NEST> {
    type Out = f64;
    #[inline(always)]
    fn run(self) -> f64 {
        dot_pu_lanes::<P, NEST>(self.c, self.p, self.g, self.m, self.v)
    }
}

/// Σ p·u over a whole tensor, with a fixed split tree.
fn dot_pu<P: Elem, const NEST: bool>(
    c: &Consts<P::Math>,
    p: &[P],
    g: &[P],
    m: &[P::Math],
    v: &[P::Math],
) -> f64 {
    let n = p.len();
    if n > REDUCE_GRAIN {
        let mid = split_point(n);
        let (a, b) = rayon::join(
            || dot_pu::<P, NEST>(c, &p[..mid], &g[..mid], &m[..mid], &v[..mid]),
            || dot_pu::<P, NEST>(c, &p[mid..], &g[mid..], &m[mid..], &v[mid..]),
        );
        return a + b;
    }
    simd::run(DotPu::<P, NEST> { c, p, g, m, v })
}

/// Pass 2 over whole rows: u (projected), decay and step p.
#[allow(clippy::too_many_arguments)]
fn pass2<P: Elem, const NEST: bool>(
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
    if p.len() > leaf && rows >= 2 {
        let mid = (rows / 2) * row_len;
        let (pl, pr) = p.split_at_mut(mid);
        let (gl, gr) = g.split_at(mid);
        let (ml, mr) = m.split_at(mid);
        let (vl, vr) = v.split_at(mid);
        let (sl, sr) = sums.split_at(rows / 2);
        rayon::join(
            || pass2::<P, NEST>(c, pl, gl, ml, vl, sl, row_len, leaf, proj, decay, eps),
            || pass2::<P, NEST>(c, pr, gr, mr, vr, sr, row_len, leaf, proj, decay, eps),
        );
        return;
    }
    if rows == 1 && p.len() > leaf {
        // One long row (never `Channel`: see `decide`): element-wise, so split it.
        let n = p.len();
        let mid = split_point(n);
        let (pl, pr) = p.split_at_mut(mid);
        let (gl, gr) = g.split_at(mid);
        let (ml, mr) = m.split_at(mid);
        let (vl, vr) = v.split_at(mid);
        rayon::join(
            || pass2::<P, NEST>(c, pl, gl, ml, vl, sums, mid, leaf, proj, decay, eps),
            || pass2::<P, NEST>(c, pr, gr, mr, vr, sums, n - mid, leaf, proj, decay, eps),
        );
        return;
    }
    simd::run(Pass2::<P, NEST> {
        c,
        p,
        g,
        m,
        v,
        sums,
        row_len,
        proj,
        decay,
        eps,
    });
}

/// Pass 2 over consecutive rows (one leaf), compiled per SIMD level.
struct Pass2<'a, P: Elem, const NEST: bool> {
    c: &'a Consts<P::Math>,
    p: &'a mut [P],
    g: &'a [P],
    m: &'a [P::Math],
    v: &'a [P::Math],
    sums: &'a [RowSums],
    row_len: usize,
    proj: Option<Proj>,
    decay: Option<P::Math>,
    eps: f64,
}

impl<P: Elem, const NEST: bool> simd::Task for Pass2<'_, P, NEST> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        let Pass2 {
            c,
            p,
            g,
            m,
            v,
            sums,
            row_len,
            proj,
            decay,
            eps,
        } = self;
        let of = <P::Math as Real>::of;
        let decay = decay.unwrap_or(<P::Math as Real>::ONE);
        let mut buf = [<P::Math as Real>::ZERO; ROW_BUF];
        for (r, s) in sums.iter().enumerate() {
            let a = r * row_len;
            let n = row_len.min(p.len() - a);
            let (p, g, m, v) = (&mut p[a..a + n], &g[a..a + n], &m[a..a + n], &v[a..a + n]);
            match proj {
                None => {
                    for i in 0..n {
                        let u = c.u_at::<P, NEST>(m[i], v[i], &g[i]);
                        p[i] = P::store(p[i].load() * decay + c.neg_ss * u);
                    }
                }
                Some(Proj::Layer { norm, coef }) => {
                    let (inv, coef) = (of(1.0 / (norm + eps)), of(coef));
                    for i in 0..n {
                        let pi = p[i].load();
                        let u = c.u_at::<P, NEST>(m[i], v[i], &g[i]) - (pi * inv) * coef;
                        p[i] = P::store(pi * decay + c.neg_ss * u);
                    }
                }
                Some(Proj::Channel) => {
                    let d = s[2].sqrt() + eps;
                    let inv = of(1.0 / d);
                    if n <= ROW_BUF {
                        // u once, kept on the stack between Σ p·u and the update.
                        let buf = &mut buf[..n];
                        let mut acc = [0f64; LANES];
                        for (i, b) in buf.iter_mut().enumerate() {
                            *b = c.u_at::<P, NEST>(m[i], v[i], &g[i]);
                        }
                        let full = n / LANES * LANES;
                        for base in (0..full).step_by(LANES) {
                            for l in 0..LANES {
                                acc[l] += p[base + l].load().f64() * buf[base + l].f64();
                            }
                        }
                        for (l, i) in (full..n).enumerate() {
                            acc[l] += p[i].load().f64() * buf[i].f64();
                        }
                        let coef = of(acc.iter().sum::<f64>() / d);
                        for i in 0..n {
                            let pi = p[i].load();
                            let u = buf[i] - (pi * inv) * coef;
                            p[i] = P::store(pi * decay + c.neg_ss * u);
                        }
                    } else {
                        let coef = of(dot_pu_lanes::<P, NEST>(c, p, g, m, v) / d);
                        for i in 0..n {
                            let pi = p[i].load();
                            let u = c.u_at::<P, NEST>(m[i], v[i], &g[i]) - (pi * inv) * coef;
                            p[i] = P::store(pi * decay + c.neg_ss * u);
                        }
                    }
                }
            }
        }
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
    fn slots(&self) -> &'static [&'static str] {
        &["exp_avg", "exp_avg_sq"]
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

/// AdamP on CUDA: vectors take one element-wise launch (`adamp_plain`); tensors of rank ≥ 2 take
/// the five launches described in `kernels/adamp.cu`, with per-row sums and decisions kept on
/// the device (no host round trip).
#[cfg(feature = "cuda")]
mod cuda {
    use super::AdamPKernel;
    use crate::backend::cuda::{
        block_table, cuda_device, dtype_suffix, function, grid, launch_elementwise, launches,
        upload_blocks, upload_table, with_entries, CHUNK, THREADS,
    };
    use crate::backend::Work;
    use crate::error::{Error, Result};
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::cuda_backend::WrapErr;

    /// Elements per warp segment (`ADAMP_SEG`) and warps per block.
    const SEG: u64 = 1024;
    const WARPS: u64 = THREADS as u64 / 32;

    pub(super) fn update(items: &[Work<'_, AdamPKernel>]) -> Result<()> {
        for (dt, ws) in launches(items) {
            let (mats, vecs): (Vec<_>, Vec<_>) = ws.into_iter().partition(|w| w.shape.rank() >= 2);
            launch_elementwise(&vecs, dt, "adamp", "adamp_plain")?;
            if mats.is_empty() {
                continue;
            }
            let dev = cuda_device(mats[0].param)?;
            let stream = dev.cuda_stream();
            let sfx = dtype_suffix(dt)?;
            let pass1 = function(dev, "adamp", &format!("adamp_pass1_{sfx}"))?;
            let decide = function(dev, "adamp", "adamp_decide")?;
            let pu_k = function(dev, "adamp", &format!("adamp_pu_{sfx}"))?;
            let coef_k = function(dev, "adamp", "adamp_coef")?;
            let pass2 = function(dev, "adamp", &format!("adamp_pass2_{sfx}"))?;
            // Row layout, and the three block tables: warp segments, row threads, chunks.
            let mut rows = Vec::with_capacity(mats.len());
            for w in &mats {
                let n = w.param.elem_count() as u64;
                if n >= 1 << 32 {
                    return Err(Error::Unsupported(
                        "AdamP on CUDA handles tensors of fewer than 2^32 elements".into(),
                    ));
                }
                let r = w.shape.dims()[0] as u64;
                rows.push((r, n / r.max(1)));
            }
            let total_rows: u64 = rows.iter().map(|r| r.0).sum();
            // Warp segments per tensor (rows × segments per row), WARPS to a block.
            let segs: Vec<u64> = rows.iter().map(|&(r, l)| r * l.div_ceil(SEG)).collect();
            let (seg_blocks, _) = block_table(&segs, WARPS);
            let row_threads: Vec<u64> = rows.iter().map(|&(r, _)| r).collect();
            let (row_blocks, _) = block_table(&row_threads, THREADS as u64);
            let n: Vec<u64> = mats.iter().map(|w| w.param.elem_count() as u64).collect();
            let (chunk_blocks, _) = block_table(&n, CHUNK as u64);
            with_entries(&mats, &stream, &mut |entries| {
                let mut off = 0;
                for (e, &(r, l)) in entries.iter_mut().zip(&rows) {
                    (e.rows, e.row_len, e.off) = (r, l, off);
                    off += r;
                }
                let table = upload_table(&stream, entries)?;
                let seg_d = upload_blocks(&stream, &seg_blocks)?;
                let row_d = upload_blocks(&stream, &row_blocks)?;
                let chunk_d = upload_blocks(&stream, &chunk_blocks)?;
                let t = entries.len();
                let mut sums = stream.alloc_zeros::<f64>(3 * total_rows as usize).w()?;
                let mut mode = stream.alloc_zeros::<f64>(4 * t).w()?;
                let mut pu = stream.alloc_zeros::<f64>(total_rows as usize).w()?;
                let mut coef = stream.alloc_zeros::<f64>(2 * total_rows as usize).w()?;
                // SAFETY (all five launches): the signatures are those of kernels/adamp.cu; the
                // table's pointers stay held until the launches are enqueued; `sums`, `mode`,
                // `pu` and `coef` hold 3, 4 (per tensor), 1 and 2 doubles per row, indexed by
                // the rows' offsets set above; each block table only names blocks within its
                // tensor's segments, rows or chunks (in parts: kernels index rows and tensors
                // through the tables, `decide` alone by block, one per tensor).
                for (seg, nb) in &seg_d {
                    let mut b = stream.launch_builder(&pass1);
                    b.arg(&table).arg(seg).arg(&mut sums);
                    unsafe { b.launch(grid(*nb)) }.w()?;
                }
                let mut b = stream.launch_builder(&decide);
                b.arg(&table).arg(&sums).arg(&mut mode);
                unsafe { b.launch(grid(t)) }.w()?;
                for (seg, nb) in &seg_d {
                    let mut b = stream.launch_builder(&pu_k);
                    b.arg(&table).arg(seg).arg(&mode).arg(&mut pu);
                    unsafe { b.launch(grid(*nb)) }.w()?;
                }
                for (row, nb) in &row_d {
                    let mut b = stream.launch_builder(&coef_k);
                    b.arg(&table)
                        .arg(row)
                        .arg(&sums)
                        .arg(&mode)
                        .arg(&pu)
                        .arg(&mut coef);
                    unsafe { b.launch(grid(*nb)) }.w()?;
                }
                for (chunk, nb) in &chunk_d {
                    let mut b = stream.launch_builder(&pass2);
                    b.arg(&table).arg(chunk).arg(&mode).arg(&coef);
                    unsafe { b.launch(grid(*nb)) }.w()?;
                }
                Ok(())
            })?;
        }
        Ok(())
    }
}
