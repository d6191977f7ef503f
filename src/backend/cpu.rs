//! The CPU path: one fused pass per tensor, split over the current rayon pool.
//!
//! Parameters are mutated only through candle's in-place ops: the parameter through
//! `inplace_op2` (with the gradient as the read-only operand), and inside it each state tensor
//! through a nested `inplace_op1`, so that the innermost call holds `&mut` to the parameter and
//! every slot at once and runs the single loop. No shared reference is ever written through.

use super::split::{leaf_len, GRAIN};
use super::staged::{self, Codec};
use super::{simd, Work};
use crate::algorithm::{Execution, Kernel, Slots, MAX_SLOTS};
use crate::elem::{Elem, Real};
use crate::error::{Error, Result};
use crate::reduce::GradStats;
use crate::state::{quantizer, StateTensor, BLOCK};
use arrayvec::ArrayVec;
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, DType, InplaceOp1, InplaceOp2, Layout, Storage, Tensor, WithDType,
};
use half::{bf16, f16};
use std::cell::RefCell;

/// Split points are multiples of this many elements, so two threads never write the same
/// 64-byte cache line of any array (64 elements is a whole line even for f64/bf16 mixes).
const ALIGN: usize = 64;

/// Runs one fused update in place (see [`super::update`]).
pub(crate) fn update<K: Kernel>(w: &Work<'_, K>) -> Result<()> {
    w.param.inplace_op2(w.grad, &ParamOp { w })?;
    Ok(())
}

struct ParamOp<'a, 'b, K> {
    w: &'a Work<'b, K>,
}

impl<K: Kernel> InplaceOp2 for ParamOp<'_, '_, K> {
    fn name(&self) -> &'static str {
        "candle-optim-step"
    }

    fn cpu_fwd(
        &self,
        p: &mut CpuStorage,
        pl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        match (p, g) {
            (CpuStorage::F32(p), CpuStorage::F32(g)) => {
                self.run(contig_mut(p, pl)?, contig(g, gl)?)
            }
            (CpuStorage::F64(p), CpuStorage::F64(g)) => {
                self.run(contig_mut(p, pl)?, contig(g, gl)?)
            }
            (CpuStorage::BF16(p), CpuStorage::BF16(g)) => {
                self.run(contig_mut(p, pl)?, contig(g, gl)?)
            }
            (CpuStorage::F16(p), CpuStorage::F16(g)) => {
                self.run(contig_mut(p, pl)?, contig(g, gl)?)
            }
            (p, g) => bail!(
                "candle-optim: unsupported param/grad dtypes {:?}/{:?}",
                p.dtype(),
                g.dtype()
            ),
        }
    }
}

impl<K: Kernel> ParamOp<'_, '_, K> {
    fn run<P: Elem>(&self, p: &mut [P], g: &[P]) -> candle_core::Result<()> {
        let w = self.w;
        let mut tensors: ArrayVec<(&Tensor, Kind), { 2 * MAX_SLOTS }> = ArrayVec::new();
        for s in w.slots {
            let pieces: &[(&Tensor, Kind)] = &match s {
                StateTensor::Dense(t) if t.dtype() == <P::Math as WithDType>::DTYPE => {
                    [(t, Kind::Math), (t, Kind::None)]
                }
                StateTensor::Dense(t) if t.dtype() == DType::BF16 => {
                    [(t, Kind::Bf16), (t, Kind::None)]
                }
                StateTensor::Dense(t) => bail!(
                    "candle-optim: state tensor of dtype {:?} for a {:?} parameter",
                    t.dtype(),
                    P::DTYPE
                ),
                StateTensor::Blockwise8 { codes, absmax, .. } => {
                    [(codes, Kind::Codes), (absmax, Kind::Absmax)]
                }
            };
            for &(t, kind) in pieces {
                if kind != Kind::None {
                    if tensors.is_full() {
                        bail!("candle-optim: too many state slots")
                    }
                    tensors.push((t, kind));
                }
            }
        }
        with_slots::<P::Math>(&tensors, Raws::new(), &mut |raws| {
            let n = p.len();
            let mut raws = raws.into_iter();
            let mut codecs: ArrayVec<Codec<'_, P::Math>, MAX_SLOTS> = ArrayVec::new();
            for s in w.slots {
                let c = match (s, raws.next(), raws.as_slice().first()) {
                    (StateTensor::Dense(_), Some(RawMut::Math(v)), _) => Codec::Full(v),
                    (StateTensor::Dense(_), Some(RawMut::Bf16(v)), _) => Codec::Bf16(v),
                    (
                        StateTensor::Blockwise8 { signed, .. },
                        Some(RawMut::Codes(codes)),
                        Some(RawMut::Absmax(_)),
                    ) => {
                        let Some(RawMut::Absmax(absmax)) = raws.next() else {
                            bail!("candle-optim: 8-bit state without its absmax")
                        };
                        if absmax.len() != n.div_ceil(BLOCK) {
                            bail!(
                                "candle-optim: 8-bit state has {} absmax values for {n} elements",
                                absmax.len()
                            );
                        }
                        Codec::Q8 {
                            codes,
                            absmax,
                            q: quantizer(*signed),
                        }
                    }
                    _ => bail!("candle-optim: state tensors do not match their format"),
                };
                if c.len() != n {
                    bail!(
                        "candle-optim: state slot has {} elements, param {n}",
                        c.len()
                    );
                }
                codecs.push(c);
            }
            if w.rounding.is_none() && codecs.iter().all(|c| matches!(c, Codec::Full(_))) {
                let slots: Slots<'_, P::Math> = codecs
                    .into_iter()
                    .filter_map(|c| match c {
                        Codec::Full(v) => Some(v),
                        _ => None,
                    })
                    .collect();
                <K::Execution as Execution<K>>::update_cpu(&w.kernel, &mut *p, g, slots, w.shape);
            } else {
                staged::update(&w.kernel, &mut *p, g, codecs, w.shape, w.rounding);
            }
            Ok(())
        })
    }
}

/// What a borrowed state tensor holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Values in the compute type.
    Math,
    /// bf16 values.
    Bf16,
    /// 8-bit codes.
    Codes,
    /// f32 absmax per block.
    Absmax,
    /// Nothing (padding in a fixed-size list).
    None,
}

/// One borrowed state tensor.
enum RawMut<'a, F> {
    Math(&'a mut [F]),
    Bf16(&'a mut [bf16]),
    Codes(&'a mut [u8]),
    Absmax(&'a mut [f32]),
}

type Raws<'a, F> = ArrayVec<RawMut<'a, F>, { 2 * MAX_SLOTS }>;

type Body<'f, F> = dyn for<'s> FnMut(Raws<'s, F>) -> candle_core::Result<()> + 'f;

/// Borrows each tensor of `tensors` mutably, one nested in-place op per tensor, and calls
/// `body` with all their slices (after those already in `acc`).
fn with_slots<F: Real>(
    tensors: &[(&Tensor, Kind)],
    acc: Raws<'_, F>,
    body: &mut Body<'_, F>,
) -> candle_core::Result<()> {
    match tensors.split_first() {
        None => body(acc),
        Some(((t, kind), rest)) => t.inplace_op1(&SlotOp {
            kind: *kind,
            rest,
            acc: RefCell::new(Some(acc)),
            body: RefCell::new(body),
        }),
    }
}

struct SlotOp<'a, 'b, 'c, 'd, F: Real> {
    kind: Kind,
    rest: &'a [(&'d Tensor, Kind)],
    acc: RefCell<Option<Raws<'b, F>>>,
    body: RefCell<&'a mut Body<'c, F>>,
}

impl<F: Real> InplaceOp1 for SlotOp<'_, '_, '_, '_, F> {
    fn name(&self) -> &'static str {
        "candle-optim-state"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let dtype = s.dtype();
        let raw = match (self.kind, s) {
            (Kind::Math, s) => match F::cpu_vec_mut(s) {
                Some(v) => RawMut::Math(contig_mut(v, l)?),
                None => bail!("candle-optim: state tensor has dtype {dtype:?}"),
            },
            (Kind::Bf16, CpuStorage::BF16(v)) => RawMut::Bf16(contig_mut(v, l)?),
            (Kind::Codes, CpuStorage::U8(v)) => RawMut::Codes(contig_mut(v, l)?),
            (Kind::Absmax, CpuStorage::F32(v)) => RawMut::Absmax(contig_mut(v, l)?),
            (kind, _) => bail!("candle-optim: {kind:?} state tensor has dtype {dtype:?}"),
        };
        let Some(mut acc) = self.acc.borrow_mut().take() else {
            bail!("candle-optim: state op entered twice")
        };
        if acc.is_full() {
            bail!("candle-optim: too many state slots")
        }
        acc.push(raw);
        let mut body = self.body.borrow_mut();
        with_slots(self.rest, acc, &mut **body)
    }
}

fn contig_mut<'a, T>(v: &'a mut [T], l: &Layout) -> candle_core::Result<&'a mut [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) if b <= v.len() => Ok(&mut v[a..b]),
        _ => bail!("candle-optim: tensor is not contiguous"),
    }
}

fn contig<'a, T>(v: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) if b <= v.len() => Ok(&v[a..b]),
        _ => bail!("candle-optim: tensor is not contiguous"),
    }
}

/// Elements before the first 64-byte boundary in `x`.
pub(crate) fn misaligned_head<T>(x: &[T]) -> usize {
    head_at(x.as_ptr() as usize, std::mem::size_of::<T>())
}

/// Elements of `size` bytes from `addr` to the next 64-byte boundary (0 if it cannot be
/// reached in whole elements).
fn head_at(addr: usize, size: usize) -> usize {
    let size = size.max(1);
    let off = addr % 64;
    if off == 0 || !off.is_multiple_of(size) {
        0
    } else {
        (64 - off) / size
    }
}

/// Address of the first element of a float tensor on the CPU.
fn cpu_addr(t: &Tensor) -> Option<usize> {
    let (s, l) = t.storage_and_layout();
    let base = match &*s {
        Storage::Cpu(CpuStorage::F32(v)) => v.as_ptr() as usize,
        Storage::Cpu(CpuStorage::F64(v)) => v.as_ptr() as usize,
        Storage::Cpu(CpuStorage::BF16(v)) => v.as_ptr() as usize,
        Storage::Cpu(CpuStorage::F16(v)) => v.as_ptr() as usize,
        _ => return None,
    };
    Some(base + l.start_offset() * t.dtype().size_in_bytes())
}

/// A zeroed state tensor for `param` (of dtype `dt`). On the CPU it is placed so that it
/// reaches a cache-line boundary at the same element as the parameter: the element loop's
/// scalar head (see [`misaligned_head`]) then aligns the parameter and every state slot at
/// once. Allocations are only 16-byte aligned, so without this the state's 64-byte vector
/// loads and stores would straddle two cache lines. Costs at most 64 bytes per slot.
pub(crate) fn state_zeros(param: &Tensor, dt: DType) -> candle_core::Result<Tensor> {
    let plain = || Tensor::zeros(param.shape(), dt, param.device());
    let Some(p) = cpu_addr(param) else {
        return plain();
    };
    let (n, size) = (param.elem_count(), dt.size_in_bytes());
    let head = head_at(p, param.dtype().size_in_bytes()).min(n);
    let want = (64 - head * size % 64) % 64;
    let buf = Tensor::zeros(n + 64 / size, dt, param.device())?;
    let Some(b) = cpu_addr(&buf) else {
        return plain();
    };
    let skip = (want + 64 - b % 64) % 64;
    if !skip.is_multiple_of(size) {
        return plain();
    }
    buf.narrow(0, skip / size, n)?.reshape(param.shape())
}

/// `loaded` (state read from a checkpoint) copied into a [`state_zeros`] tensor.
pub(crate) fn place_state(param: &Tensor, loaded: Tensor) -> candle_core::Result<Tensor> {
    if !param.device().is_cpu() {
        return Ok(loaded);
    }
    let t = state_zeros(param, loaded.dtype())?;
    t.flatten_all()?.slice_set(&loaded.flatten_all()?, 0, 0)?;
    Ok(t)
}

/// The split point of a run of `n` elements: about half, rounded to [`ALIGN`].
pub(crate) fn split_point(n: usize) -> usize {
    (n / 2).div_ceil(ALIGN) * ALIGN
}

fn split_slots<'a, F>(s: Slots<'a, F>, mid: usize) -> (Slots<'a, F>, Slots<'a, F>) {
    let mut l = Slots::new();
    let mut r = Slots::new();
    for x in s {
        let (a, b) = x.split_at_mut(mid);
        l.push(a);
        r.push(b);
    }
    (l, r)
}

/// One leaf of the element-wise pass, compiled per SIMD level.
struct Apply<'a, 'b, K, P: Elem> {
    k: &'a K,
    p: &'a mut [P],
    g: &'a [P],
    s: &'a mut Slots<'b, P::Math>,
}

impl<K: Kernel, P: Elem> simd::Task for Apply<'_, '_, K, P> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        self.k.apply(self.p, self.g, self.s);
    }
}

/// Applies `k` to a whole tensor, split into runs of [`leaf_len`] elements over the current
/// rayon pool (run inline when the pool has one thread).
pub(crate) fn par_apply<K: Kernel, P: Elem>(k: &K, p: &mut [P], g: &[P], s: Slots<'_, P::Math>) {
    apply_rec(k, p, g, s, leaf_len(p.len()));
}

fn apply_rec<K: Kernel, P: Elem>(
    k: &K,
    p: &mut [P],
    g: &[P],
    mut s: Slots<'_, P::Math>,
    leaf: usize,
) {
    if p.len() <= leaf {
        // Large allocations (candle's included) start 16 bytes into a cache line, so a 64-byte
        // vector load or store would straddle two lines every time. A short scalar head brings
        // the parameter (and every f32 array allocated alike) onto a line boundary.
        let head = misaligned_head(p).min(p.len());
        if head > 0 {
            let (ph, pr) = p.split_at_mut(head);
            let (gh, gr) = g.split_at(head);
            let (mut sh, mut sr) = split_slots(s, head);
            simd::run(Apply {
                k,
                p: ph,
                g: gh,
                s: &mut sh,
            });
            simd::run(Apply {
                k,
                p: pr,
                g: gr,
                s: &mut sr,
            });
        } else {
            simd::run(Apply { k, p, g, s: &mut s });
        }
        return;
    }
    let mid = split_point(p.len());
    let (pl, pr) = p.split_at_mut(mid);
    let (gl, gr) = g.split_at(mid);
    let (sl, sr) = split_slots(s, mid);
    rayon::join(
        || apply_rec(k, pl, gl, sl, leaf),
        || apply_rec(k, pr, gr, sr, leaf),
    );
}

/// Smallest run summed by one task in a reduction (fixed, so sums do not depend on threads).
pub(crate) const REDUCE_GRAIN: usize = 1 << 16;

/// Reduces `x` with a fixed split tree that depends only on `x.len()`, so the result is the
/// same bit for bit whatever the number of threads or the scheduling.
pub(crate) fn par_reduce<T: Sync, R: Send>(
    x: &[T],
    leaf: &(impl Fn(&[T]) -> R + Sync),
    combine: &(impl Fn(R, R) -> R + Sync),
) -> R {
    if x.len() <= REDUCE_GRAIN {
        return leaf(x);
    }
    let mid = split_point(x.len());
    let (a, b) = rayon::join(
        || par_reduce(&x[..mid], leaf, combine),
        || par_reduce(&x[mid..], leaf, combine),
    );
    combine(a, b)
}

/// Independent accumulators per sum, so the f64 reductions vectorize.
const LANES: usize = 16;

/// Whether Σx² in f64 alone can overflow for finite elements of type `P`: only for f64 (the
/// square of a finite f32, bf16 or f16 value is below 2^256, and no tensor has 2^768 elements).
/// Elsewhere Σx² is finite exactly when every element is, and no probe is needed.
fn needs_probe<P: Elem>() -> bool {
    std::mem::size_of::<P::Math>() == 8
}

/// Σx² in f64 and, for f64 elements, the finiteness probe Σx·0 (one leaf of a reduction).
struct SumSq<'a, P>(&'a [P]);

impl<P: Elem> simd::Task for SumSq<'_, P> {
    type Out = (f64, f64);
    #[inline(always)]
    fn run(self) -> (f64, f64) {
        let mut q = [0f64; LANES];
        let mut z = [0f64; LANES];
        let probe = needs_probe::<P>(); // a constant per instantiation
        let chunks = self.0.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for i in 0..LANES {
                let v = c[i].load().f64();
                q[i] += v * v;
                if probe {
                    z[i] += v * 0.0;
                }
            }
        }
        for (i, v) in tail.iter().enumerate() {
            let v = v.load().f64();
            q[i] += v * v;
            if probe {
                z[i] += v * 0.0;
            }
        }
        let q: f64 = q.iter().sum();
        let z = if probe { z.iter().sum() } else { q * 0.0 };
        (q, z)
    }
}

/// The finiteness probe alone, in the compute type: Σx·0 is ±0 when every element is finite
/// and NaN otherwise. One multiply-add per element, so the pass runs at memory speed.
struct Probe<'a, P>(&'a [P]);

impl<P: Elem> simd::Task for Probe<'_, P> {
    type Out = bool;
    #[inline(always)]
    fn run(self) -> bool {
        const W: usize = 32;
        let zero = <P::Math as Real>::ZERO;
        let mut z = [zero; W];
        let chunks = self.0.chunks_exact(W);
        let tail = chunks.remainder();
        for c in chunks {
            for i in 0..W {
                z[i] += c[i].load() * zero;
            }
        }
        for (i, v) in tail.iter().enumerate() {
            z[i] += v.load() * zero;
        }
        z.iter().fold(zero, |a, &b| a + b).is_finite()
    }
}

/// Whether every element of a contiguous CPU tensor is finite (a finite-only pass, for the
/// non-finite check when no norm is needed).
pub(crate) fn all_finite(t: &Tensor) -> Result<bool> {
    struct F;
    impl SliceFn for F {
        type Out = bool;
        fn call<P: Elem>(self, x: &[P]) -> bool {
            par_reduce(x, &|c: &[P]| simd::run(Probe(c)), &|a, b| a && b)
        }
    }
    with_slice(t, F)
}

/// A computation over the elements of a float CPU tensor, whatever their type.
trait SliceFn {
    type Out;
    fn call<P: Elem>(self, x: &[P]) -> Self::Out;
}

/// Runs `f` over the elements of a contiguous float CPU tensor.
fn with_slice<F: SliceFn>(t: &Tensor, f: F) -> Result<F::Out> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(Error::Unsupported("expected a CPU tensor".into()));
    };
    let Some((a, b)) = layout.contiguous_offsets() else {
        return Err(Error::Unsupported("expected a contiguous tensor".into()));
    };
    Ok(match cpu {
        CpuStorage::F32(v) => f.call::<f32>(&v[a..b]),
        CpuStorage::F64(v) => f.call::<f64>(&v[a..b]),
        CpuStorage::BF16(v) => f.call::<bf16>(&v[a..b]),
        CpuStorage::F16(v) => f.call::<f16>(&v[a..b]),
        other => {
            return Err(Error::Unsupported(format!(
                "gradient dtype {:?} is not supported",
                other.dtype()
            )))
        }
    })
}

/// Σx, Σx² and the finiteness probe Σx·0 in f64 (one leaf of a reduction).
struct SumAndSq<'a, P>(&'a [P]);

impl<P: Elem> simd::Task for SumAndSq<'_, P> {
    type Out = (f64, f64, f64);
    #[inline(always)]
    fn run(self) -> (f64, f64, f64) {
        let mut s = [0f64; LANES];
        let mut q = [0f64; LANES];
        let mut z = [0f64; LANES];
        let chunks = self.0.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for i in 0..LANES {
                let v = c[i].load().f64();
                s[i] += v;
                q[i] += v * v;
                z[i] += v * 0.0;
            }
        }
        for (i, v) in tail.iter().enumerate() {
            let v = v.load().f64();
            s[i] += v;
            q[i] += v * v;
            z[i] += v * 0.0;
        }
        (s.iter().sum(), q.iter().sum(), z.iter().sum())
    }
}

/// Σ(x − mean)² in f64 (one leaf of the second pass of a two-pass variance).
struct CenteredSq<'a, P>(&'a [P], f64);

impl<P: Elem> simd::Task for CenteredSq<'_, P> {
    type Out = f64;
    #[inline(always)]
    fn run(self) -> f64 {
        let mean = self.1;
        let mut q = [0f64; LANES];
        let chunks = self.0.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for i in 0..LANES {
                let d = c[i].load().f64() - mean;
                q[i] += d * d;
            }
        }
        for (i, v) in tail.iter().enumerate() {
            let d = v.load().f64() - mean;
            q[i] += d * d;
        }
        q.iter().sum()
    }
}

fn add2(a: (f64, f64), b: (f64, f64)) -> (f64, f64) {
    (a.0 + b.0, a.1 + b.1)
}

fn add3(a: (f64, f64, f64), b: (f64, f64, f64)) -> (f64, f64, f64) {
    (a.0 + b.0, a.1 + b.1, a.2 + b.2)
}

// The finiteness probe Σx·0 is ±0 when every element is finite and NaN otherwise (∞·0 and
// NaN·0 are NaN): an exact test in the same pass, where Σx² may overflow for finite f64 values.

fn stats_of<P: Elem>(x: &[P], centered: bool) -> GradStats {
    let add = |a: f64, b: f64| a + b;
    let (s, q, z) = if centered {
        par_reduce(x, &|c: &[P]| simd::run(SumAndSq(c)), &add3)
    } else {
        let (q, z) = par_reduce(x, &|c: &[P]| simd::run(SumSq(c)), &add2);
        (0.0, q, z)
    };
    let all_finite = !z.is_nan();
    let centered_sq = centered.then(|| {
        let mean = if x.is_empty() {
            0.0
        } else {
            s / x.len() as f64
        };
        par_reduce(x, &|c: &[P]| simd::run(CenteredSq(c, mean)), &add)
    });
    let scaled = if all_finite && !q.is_finite() {
        rescaled_sum_sq(x)
    } else {
        (1.0, q)
    };
    GradStats {
        n: x.len(),
        sum_sq: q,
        centered_sq,
        all_finite,
        scaled,
    }
}

/// (m, Σ(x/m)²) with m = max |x|: the sum of squares of finite values whose plain Σx²
/// overflowed. Rare, so plain loops; fixed split trees keep it independent of threads.
pub(crate) fn rescaled_sum_sq<P: Elem>(x: &[P]) -> (f64, f64) {
    let max = par_reduce(
        x,
        &|c: &[P]| c.iter().fold(0f64, |a, v| a.max(v.load().f64().abs())),
        &f64::max,
    );
    let sum = par_reduce(
        x,
        &|c: &[P]| {
            c.iter().fold(0f64, |a, v| {
                let r = v.load().f64() / max;
                a + r * r
            })
        },
        &|a, b| a + b,
    );
    (max, sum)
}

/// Statistics of a contiguous CPU tensor (Σx², and Σ(x-mean)² if `centered`).
pub(crate) fn grad_stats(t: &Tensor, centered: bool) -> Result<GradStats> {
    struct F(bool);
    impl SliceFn for F {
        type Out = GradStats;
        fn call<P: Elem>(self, x: &[P]) -> GradStats {
            stats_of(x, self.0)
        }
    }
    with_slice(t, F(centered))
}

/// `dst += src` in place (same shape and dtype, both contiguous).
pub(crate) fn add_assign(dst: &Tensor, src: &Tensor) -> Result<()> {
    dst.inplace_op2(src, &AddAssign)?;
    Ok(())
}

struct AddAssign;

struct AddTask<'a, T>(&'a mut [T], &'a [T]);

impl<T: Elem> simd::Task for AddTask<'_, T> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        let n = self.0.len().min(self.1.len());
        let (d, s) = (&mut self.0[..n], &self.1[..n]);
        for i in 0..n {
            d[i] = T::store(d[i].load() + s[i].load());
        }
    }
}

fn add_slices<T: Elem>(d: &mut [T], s: &[T]) {
    if d.len() <= GRAIN {
        simd::run(AddTask(d, s));
        return;
    }
    let mid = split_point(d.len());
    let (dl, dr) = d.split_at_mut(mid);
    let (sl, sr) = s.split_at(mid);
    rayon::join(|| add_slices(dl, sl), || add_slices(dr, sr));
}

impl InplaceOp2 for AddAssign {
    fn name(&self) -> &'static str {
        "candle-optim-add-assign"
    }

    fn cpu_fwd(
        &self,
        d: &mut CpuStorage,
        dl: &Layout,
        s: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        match (d, s) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => {
                add_slices(contig_mut(d, dl)?, contig(s, sl)?)
            }
            (CpuStorage::F64(d), CpuStorage::F64(s)) => {
                add_slices(contig_mut(d, dl)?, contig(s, sl)?)
            }
            (CpuStorage::BF16(d), CpuStorage::BF16(s)) => {
                add_slices(contig_mut(d, dl)?, contig(s, sl)?)
            }
            (CpuStorage::F16(d), CpuStorage::F16(s)) => {
                add_slices(contig_mut(d, dl)?, contig(s, sl)?)
            }
            (d, s) => bail!(
                "candle-optim: cannot add {:?} into {:?}",
                s.dtype(),
                d.dtype()
            ),
        }
        Ok(())
    }
}
