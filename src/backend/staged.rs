//! The CPU update for state that is not kept in the compute type (bf16 or 8-bit blockwise
//! slots) and for bf16 parameters written back with stochastic rounding.
//!
//! Element-wise kernels run in one fused pass per block of [`BLOCK`] elements: decode each slot
//! into a buffer on the stack, run the algorithm's own [`Kernel::apply`] on it, encode it
//! again (a new absmax and codes for 8-bit slots). The block never leaves L1. Other strategies
//! (AdamP's row passes) decode the whole tensor into scratch, run their full-precision update,
//! and encode it: the same values, in more passes.

use super::split::leaf_len;
use super::{q8_simd, simd};
use crate::algorithm::{Execution, ExecutionKind, Kernel, Slots, MAX_SLOTS};
use crate::elem::{Elem, Real};
use crate::state::{random_bits, Quantizer, BLOCK};
use arrayvec::ArrayVec;
use candle_core::Shape;
use half::bf16;

/// One state slot's storage, borrowed for an update.
pub(crate) enum Codec<'a, F> {
    /// Values in the compute type.
    Full(&'a mut [F]),
    /// bf16 values (rounded to nearest-even when written).
    Bf16(&'a mut [bf16]),
    /// 8-bit codes with an absmax per [`BLOCK`] elements.
    Q8 {
        codes: &'a mut [u8],
        absmax: &'a mut [f32],
        q: &'static Quantizer,
    },
}

impl<'a, F: Real> Codec<'a, F> {
    /// Elements held.
    pub(crate) fn len(&self) -> usize {
        match self {
            Codec::Full(v) => v.len(),
            Codec::Bf16(v) => v.len(),
            Codec::Q8 { codes, .. } => codes.len(),
        }
    }

    /// Splits at element `mid`, a multiple of [`BLOCK`] (or the end).
    fn split_at(self, mid: usize) -> (Self, Self) {
        match self {
            Codec::Full(v) => {
                let (a, b) = v.split_at_mut(mid);
                (Codec::Full(a), Codec::Full(b))
            }
            Codec::Bf16(v) => {
                let (a, b) = v.split_at_mut(mid);
                (Codec::Bf16(a), Codec::Bf16(b))
            }
            Codec::Q8 { codes, absmax, q } => {
                let (ca, cb) = codes.split_at_mut(mid);
                let (aa, ab) = absmax.split_at_mut(mid.div_ceil(BLOCK).min(absmax.len()));
                (
                    Codec::Q8 {
                        codes: ca,
                        absmax: aa,
                        q,
                    },
                    Codec::Q8 {
                        codes: cb,
                        absmax: ab,
                        q,
                    },
                )
            }
        }
    }

    /// Writes elements `[at, at + out.len())` into `out` (the range lies in one block).
    #[inline(always)]
    fn decode(&self, at: usize, out: &mut [F]) {
        let n = out.len();
        match self {
            Codec::Full(v) => out.copy_from_slice(&v[at..at + n]),
            Codec::Bf16(v) => {
                for (o, x) in out.iter_mut().zip(&v[at..at + n]) {
                    *o = F::of(x.to_f32() as f64);
                }
            }
            Codec::Q8 { codes, absmax, q } => {
                let (codes, absmax) = (&codes[at..at + n], absmax[at / BLOCK]);
                match (q8_simd::tables(q), F::as_f32_mut(out)) {
                    (Some(t), Some(out)) => q8_simd::decode(t, codes, absmax, out),
                    (_, _) => q.decode(codes, absmax, out),
                }
            }
        }
    }

    /// Stores `x` as elements `[at, at + x.len())`, a whole block (or the tensor's last part).
    #[inline(always)]
    fn encode(&mut self, at: usize, x: &[F]) {
        let n = x.len();
        match self {
            Codec::Full(v) => v[at..at + n].copy_from_slice(x),
            Codec::Bf16(v) => {
                for (o, x) in v[at..at + n].iter_mut().zip(x) {
                    *o = bf16::from_f32(x.f64() as f32);
                }
            }
            Codec::Q8 { codes, absmax, q } => {
                let codes = &mut codes[at..at + n];
                absmax[at / BLOCK] = match (q8_simd::tables(q), F::as_f32(x)) {
                    (Some(t), Some(x)) => q8_simd::encode(t, x, codes),
                    (_, _) => q.encode(x, codes),
                };
            }
        }
    }
}

/// Updates one tensor whose slots are `codecs` (each the parameter's length). `rounding`: the
/// stochastic-rounding stream of a bf16 parameter.
pub(crate) fn update<K: Kernel, P: Elem>(
    k: &K,
    p: &mut [P],
    g: &[P],
    codecs: ArrayVec<Codec<'_, P::Math>, MAX_SLOTS>,
    shape: &Shape,
    rounding: Option<u64>,
) {
    let elementwise = <K::Execution as Execution<K>>::KIND == ExecutionKind::ElementWise;
    if elementwise {
        let leaf = leaf_len(p.len()).max(BLOCK);
        blocks_rec(k, p, g, codecs, rounding, 0, leaf);
    } else {
        whole(k, p, g, codecs, shape, rounding);
    }
}

fn blocks_rec<K: Kernel, P: Elem>(
    k: &K,
    p: &mut [P],
    g: &[P],
    codecs: ArrayVec<Codec<'_, P::Math>, MAX_SLOTS>,
    rounding: Option<u64>,
    offset: usize,
    leaf: usize,
) {
    if p.len() <= leaf {
        let mut codecs = codecs;
        simd::run(Blocks {
            k,
            p,
            g,
            codecs: &mut codecs,
            rounding,
            offset,
        });
        return;
    }
    let mid = (p.len() / 2).div_ceil(BLOCK) * BLOCK;
    let (pl, pr) = p.split_at_mut(mid);
    let (gl, gr) = g.split_at(mid);
    let mut left = ArrayVec::new();
    let mut right = ArrayVec::new();
    for c in codecs {
        let (a, b) = c.split_at(mid);
        left.push(a);
        right.push(b);
    }
    rayon::join(
        || blocks_rec(k, pl, gl, left, rounding, offset, leaf),
        || blocks_rec(k, pr, gr, right, rounding, offset + mid, leaf),
    );
}

/// The fused block loop over one run of whole blocks, compiled per SIMD level.
struct Blocks<'a, 'b, K, P: Elem> {
    k: &'a K,
    p: &'a mut [P],
    g: &'a [P],
    codecs: &'a mut ArrayVec<Codec<'b, P::Math>, MAX_SLOTS>,
    rounding: Option<u64>,
    /// Index of `p[0]` in the whole tensor (the stochastic-rounding counter).
    offset: usize,
}

impl<K: Kernel, P: Elem> simd::Task for Blocks<'_, '_, K, P> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        let Blocks {
            k,
            p,
            g,
            codecs,
            rounding,
            offset,
        } = self;
        let z = <P::Math as Real>::ZERO;
        let mut bufs = [[z; BLOCK]; MAX_SLOTS];
        let mut pbuf = [z; BLOCK];
        let mut gbuf = [z; BLOCK];
        let n = p.len();
        let mut at = 0;
        while at < n {
            let len = BLOCK.min(n - at);
            let mut views: Slots<'_, P::Math> = ArrayVec::new();
            for (c, buf) in codecs.iter().zip(bufs.iter_mut()) {
                let buf = &mut buf[..len];
                c.decode(at, buf);
                views.push(buf);
            }
            match rounding {
                None => k.apply(&mut p[at..at + len], &g[at..at + len], &mut views),
                Some(key) => {
                    let (pb, gb) = (&mut pbuf[..len], &mut gbuf[..len]);
                    for i in 0..len {
                        pb[i] = p[at + i].load();
                        gb[i] = g[at + i].load();
                    }
                    k.apply::<P::Math>(pb, gb, &mut views);
                    for i in 0..len {
                        let r = random_bits(key, (offset + at + i) as u64);
                        p[at + i] = P::store_stochastic(pb[i], r);
                    }
                }
            }
            drop(views);
            for (c, buf) in codecs.iter_mut().zip(bufs.iter()) {
                c.encode(at, &buf[..len]);
            }
            at += len;
        }
    }
}

/// Strategies that need whole tensors: decode every slot (and a stochastically rounded
/// parameter) into scratch, run the full-precision update, encode. The scratch is kept per
/// thread and reused from step to step (it grows to the largest such tensor), so a step does
/// not allocate; a nested call on the same thread (a stolen rayon job) gets its own.
fn whole<K: Kernel, P: Elem>(
    k: &K,
    p: &mut [P],
    g: &[P],
    codecs: ArrayVec<Codec<'_, P::Math>, MAX_SLOTS>,
    shape: &Shape,
    rounding: Option<u64>,
) {
    <P::Math as Real>::with_scratch(|scratch| {
        let n = p.len();
        let staged = if rounding.is_some() { 2 } else { 0 };
        let len = n * (codecs.len() + staged);
        if scratch.len() < len {
            scratch.resize(len, <P::Math as Real>::ZERO);
        }
        let (bufs, pg) = scratch[..len].split_at_mut(n * codecs.len());
        let mut codecs = codecs;
        for (c, buf) in codecs.iter().zip(bufs.chunks_mut(n.max(1))) {
            for (at, b) in (0..n).step_by(BLOCK).zip(buf.chunks_mut(BLOCK)) {
                c.decode(at, b);
            }
        }
        {
            let slots: Slots<'_, P::Math> = bufs.chunks_mut(n.max(1)).collect();
            match rounding {
                None => <K::Execution as Execution<K>>::update_cpu(k, p, g, slots, shape),
                Some(key) => {
                    let (pb, gb) = pg.split_at_mut(n);
                    for ((pb, gb), (p, g)) in pb.iter_mut().zip(gb.iter_mut()).zip(p.iter().zip(g))
                    {
                        (*pb, *gb) = (p.load(), g.load());
                    }
                    <K::Execution as Execution<K>>::update_cpu::<P::Math>(k, pb, gb, slots, shape);
                    for (i, (dst, x)) in p.iter_mut().zip(pb.iter()).enumerate() {
                        *dst = P::store_stochastic(*x, random_bits(key, i as u64));
                    }
                }
            }
        }
        for (c, buf) in codecs.iter_mut().zip(bufs.chunks(n.max(1))) {
            for (at, b) in (0..n).step_by(BLOCK).zip(buf.chunks(BLOCK)) {
                c.encode(at, b);
            }
        }
    })
}
