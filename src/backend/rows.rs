//! The CPU execution of [`RowProjected`] kernels (AdamP): two passes over whole rows with
//! per-row reductions between them; the kernel supplies only the math ([`RowRule`]).
//!
//! Pass 1 updates the state and accumulates per-row x·p, x·x and p·p (f64, in a scratch buffer
//! reused across steps), which decide the projection; pass 2 computes u, projects it (the
//! per-row Σ p·u from the row while it is in cache; the layer view's Σ p·u in an extra read
//! pass, only when it fires) and writes p. Sums use fixed split trees, so results do not
//! depend on the number of threads.

use super::cpu::{par_apply, split_point, REDUCE_GRAIN};
use super::simd;
use super::split::leaf_len;
use crate::algorithm::{
    Execution, ExecutionKind, Projection, RowProjected, RowRule, RowSums, Slots,
};
use crate::elem::{Elem, Real};
use candle_core::Shape;
use std::cell::RefCell;

impl<K: RowRule> Execution<K> for RowProjected {
    const KIND: ExecutionKind = ExecutionKind::RowProjected;
    type Aux = K;

    fn update_cpu<P: Elem>(k: &K, p: &mut [P], g: &[P], s: Slots<'_, P::Math>, shape: &Shape) {
        update(k, p, g, s, shape)
    }
}

/// Which view the projection uses, with the layer view's coefficient once known.
#[derive(Clone, Copy, Debug)]
enum Proj {
    /// Per row j: u ← u − p̂_j (p̂_j·u_j), p̂_j = p_j/(‖p_j‖ + eps).
    Channel,
    /// Whole tensor: u ← u − p̂ (p̂·u), with ‖p‖ and the coefficient p̂·u.
    Layer { norm: f64, coef: f64 },
}

fn update<K: RowRule, P: Elem>(k: &K, p: &mut [P], g: &[P], s: Slots<'_, P::Math>, shape: &Shape) {
    let dims = shape.dims();
    let n = p.len();
    if dims.len() < 2 || n == 0 {
        par_apply(k, p, g, s);
        return;
    }
    let rows = dims[0];
    let row_len = n / rows;
    let mut s = s;
    let [m, v] = s.as_mut_slice() else {
        unreachable!("a row-projected kernel has 2 state slots")
    };
    thread_local! {
        static SCRATCH: RefCell<Vec<RowSums>> = const { RefCell::new(Vec::new()) };
    }
    SCRATCH.with(|cell| {
        let mut local;
        let mut borrowed = cell.try_borrow_mut();
        // Another row-projected update running on this thread (a stolen rayon job) holds the
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
        let c = k.consts::<P::Math>();
        let leaf = leaf_len(n);
        pass1::<K, P>(&c, p, g, m, v, sums, row_len, leaf);
        let eps = k.projection_eps();
        let mut proj = k.decide(sums, row_len, n).map(|d| match d {
            Projection::Channel => Proj::Channel,
            Projection::Layer { norm } => Proj::Layer { norm, coef: 0.0 },
        });
        let nest = k.direction_reads_grad();
        if let Some(Proj::Layer { norm, coef }) = &mut proj {
            // Σ p̂·u over the whole tensor needs every u before any p changes.
            let pu = if nest {
                dot_pu::<K, P, true>(&c, p, g, m, v)
            } else {
                dot_pu::<K, P, false>(&c, p, g, m, v)
            };
            *coef = pu / (*norm + eps);
        }
        let decay = k.decay(proj.is_some()).map(<P::Math as Real>::of);
        if nest {
            pass2::<K, P, true>(&c, p, g, m, v, sums, row_len, leaf, proj, decay, eps);
        } else {
            pass2::<K, P, false>(&c, p, g, m, v, sums, row_len, leaf, proj, decay, eps);
        }
    });
}

/// Independent accumulators per sum, so the f64 reductions vectorize.
const LANES: usize = 16;

/// Rows up to this length keep their u on the stack between the two halves of a projected
/// row (Σ p·u, then the update); longer rows compute u twice.
const ROW_BUF: usize = 4096;

/// Pass 1 over whole rows: update the state and accumulate the row sums.
#[allow(clippy::too_many_arguments)]
fn pass1<K: RowRule, P: Elem>(
    c: &K::Consts<P::Math>,
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
            || pass1::<K, P>(c, pl, gl, ml, vl, sl, row_len, leaf),
            || pass1::<K, P>(c, pr, gr, mr, vr, sr, row_len, leaf),
        );
    } else if rows == 1 {
        sums[0] = row_pass1::<K, P>(c, p, g, m, v);
    } else {
        simd::run(Pass1::<K, P> {
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
fn row_pass1<K: RowRule, P: Elem>(
    c: &K::Consts<P::Math>,
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
            || row_pass1::<K, P>(c, pl, gl, ml, vl),
            || row_pass1::<K, P>(c, pr, gr, mr, vr),
        );
        return [a[0] + b[0], a[1] + b[1], a[2] + b[2]];
    }
    let mut sums = [[0.0; 3]];
    simd::run(Pass1::<K, P> {
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
struct Pass1<'a, K: RowRule, P: Elem> {
    c: &'a K::Consts<P::Math>,
    p: &'a [P],
    g: &'a [P],
    m: &'a mut [P::Math],
    v: &'a mut [P::Math],
    sums: &'a mut [RowSums],
    row_len: usize,
}

impl<K: RowRule, P: Elem> simd::Task for Pass1<'_, K, P> {
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
                pass1_lanes::<K, P>(c, p, g, m, v, &mut acc);
            }
            let full = row_len / LANES * LANES;
            pass1_lanes::<K, P>(
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
fn pass1_lanes<K: RowRule, P: Elem>(
    c: &K::Consts<P::Math>,
    p: &[P],
    g: &[P],
    m: &mut [P::Math],
    v: &mut [P::Math],
    acc: &mut [[f64; LANES]; 3],
) {
    let n = p.len().min(LANES);
    let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
    for l in 0..n {
        let gi = K::pass1(c, g[l].load(), &mut m[l], &mut v[l]);
        let (gf, pf) = (gi.f64(), p[l].load().f64());
        acc[0][l] += gf * pf;
        acc[1][l] += gf * gf;
        acc[2][l] += pf * pf;
    }
}

/// Σ p·u over `p` (f64), with u from the updated state.
#[inline(always)]
fn dot_pu_lanes<K: RowRule, P: Elem, const NEST: bool>(
    c: &K::Consts<P::Math>,
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
            let u = K::direction::<P, NEST>(c, m[l], v[l], &g[l]);
            acc[l] += p[l].load().f64() * u.f64();
        }
    }
    for (l, i) in (full..n).enumerate() {
        let u = K::direction::<P, NEST>(c, m[i], v[i], &g[i]);
        acc[l] += p[i].load().f64() * u.f64();
    }
    acc.iter().sum()
}

struct DotPu<'a, K: RowRule, P: Elem, const NEST: bool> {
    c: &'a K::Consts<P::Math>,
    p: &'a [P],
    g: &'a [P],
    m: &'a [P::Math],
    v: &'a [P::Math],
}

impl<K: RowRule, P: Elem, const NEST: bool> simd::Task for DotPu<'_, K, P, NEST> {
    type Out = f64;
    #[inline(always)]
    fn run(self) -> f64 {
        dot_pu_lanes::<K, P, NEST>(self.c, self.p, self.g, self.m, self.v)
    }
}

/// Σ p·u over a whole tensor, with a fixed split tree.
fn dot_pu<K: RowRule, P: Elem, const NEST: bool>(
    c: &K::Consts<P::Math>,
    p: &[P],
    g: &[P],
    m: &[P::Math],
    v: &[P::Math],
) -> f64 {
    let n = p.len();
    if n > REDUCE_GRAIN {
        let mid = split_point(n);
        let (a, b) = rayon::join(
            || dot_pu::<K, P, NEST>(c, &p[..mid], &g[..mid], &m[..mid], &v[..mid]),
            || dot_pu::<K, P, NEST>(c, &p[mid..], &g[mid..], &m[mid..], &v[mid..]),
        );
        return a + b;
    }
    simd::run(DotPu::<K, P, NEST> { c, p, g, m, v })
}

/// Pass 2 over whole rows: u (projected), decay and step p.
#[allow(clippy::too_many_arguments)]
fn pass2<K: RowRule, P: Elem, const NEST: bool>(
    c: &K::Consts<P::Math>,
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
            || pass2::<K, P, NEST>(c, pl, gl, ml, vl, sl, row_len, leaf, proj, decay, eps),
            || pass2::<K, P, NEST>(c, pr, gr, mr, vr, sr, row_len, leaf, proj, decay, eps),
        );
        return;
    }
    if rows == 1 && p.len() > leaf {
        // One long row (never `Channel`: a single row decides the layer view): element-wise,
        // so split it.
        let n = p.len();
        let mid = split_point(n);
        let (pl, pr) = p.split_at_mut(mid);
        let (gl, gr) = g.split_at(mid);
        let (ml, mr) = m.split_at(mid);
        let (vl, vr) = v.split_at(mid);
        rayon::join(
            || pass2::<K, P, NEST>(c, pl, gl, ml, vl, sums, mid, leaf, proj, decay, eps),
            || pass2::<K, P, NEST>(c, pr, gr, mr, vr, sums, n - mid, leaf, proj, decay, eps),
        );
        return;
    }
    simd::run(Pass2::<K, P, NEST> {
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
struct Pass2<'a, K: RowRule, P: Elem, const NEST: bool> {
    c: &'a K::Consts<P::Math>,
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

impl<K: RowRule, P: Elem, const NEST: bool> simd::Task for Pass2<'_, K, P, NEST> {
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
                        let u = K::direction::<P, NEST>(c, m[i], v[i], &g[i]);
                        p[i] = P::store(K::write(c, p[i].load(), decay, u));
                    }
                }
                Some(Proj::Layer { norm, coef }) => {
                    let (inv, coef) = (of(1.0 / (norm + eps)), of(coef));
                    for i in 0..n {
                        let pi = p[i].load();
                        let u = K::direction::<P, NEST>(c, m[i], v[i], &g[i]) - (pi * inv) * coef;
                        p[i] = P::store(K::write(c, pi, decay, u));
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
                            *b = K::direction::<P, NEST>(c, m[i], v[i], &g[i]);
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
                            p[i] = P::store(K::write(c, pi, decay, u));
                        }
                    } else {
                        let coef = of(dot_pu_lanes::<K, P, NEST>(c, p, g, m, v) / d);
                        for i in 0..n {
                            let pi = p[i].load();
                            let u =
                                K::direction::<P, NEST>(c, m[i], v[i], &g[i]) - (pi * inv) * coef;
                            p[i] = P::store(K::write(c, pi, decay, u));
                        }
                    }
                }
            }
        }
    }
}
