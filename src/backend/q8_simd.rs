//! AVX-512 (VBMI) codecs for 8-bit blockwise state: the same codes, absmax and decoded values
//! as [`Quantizer::encode`] / [`Quantizer::decode`], bit for bit, at a fraction of the cost.
//!
//! * **Decode:** the 256-entry f32 map is held as four 256-byte planes (byte `b` of every
//!   entry); 64 codes look up each plane with two `vpermi2b` (128 entries each) and a blend, and
//!   the planes interleave back into f32. A gather would cost ~7× more on Zen 4.
//! * **Encode:** the grid index `j` (0..65535) of §12.1 is computed in f32 exactly as the scalar
//!   code does; its code `LUT[j]` is then found without touching the 64 KiB table. The LUT is a
//!   non-decreasing step function, so split `j` into a cell `hi = j >> 8` and `lo = j & 255`:
//!   `LUT[j] = base[hi] + #{in-cell steps of hi at or below lo}`. Every cell has at most `K`
//!   steps except a few dense ones near 0, whose codes are looked up directly by `lo`. `K` and
//!   the dense cells are derived from the LUT, and a test compares all 65,536 grid points.

use crate::state::{Quantizer, BLOCK};
use std::sync::OnceLock;

/// A 256-byte table indexed by a byte, aligned for whole-register loads.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Table([u8; 256]);

/// The lookup tables of one map.
pub(crate) struct Tables {
    /// `planes[b][k]`: byte `b` (little-endian) of `map[k]`'s bits.
    planes: [Table; 4],
    /// The code of each cell's first grid point.
    base: Table,
    /// The cells' steps: `steps[s][hi] = lo − 1` of the `s`-th step inside cell `hi` (a step at
    /// `lo` adds 1 for every `lo' ≥ lo`; a code that rises by 2 at one point is two steps), 255
    /// where the cell has fewer. Cells with more steps than this are dense.
    steps: Vec<Table>,
    /// Dense cells: (cell, code of each grid point in it).
    dense: Vec<(u8, Table)>,
}

impl Tables {
    fn new(q: &Quantizer) -> Self {
        let planes = std::array::from_fn(|b| {
            Table(std::array::from_fn(|k| q.map[k].to_bits().to_le_bytes()[b]))
        });
        let lut = &q.lut;
        let base = Table(std::array::from_fn(|c| lut[c << 8]));
        // Each cell's steps, with multiplicity (the LUT never decreases: built by a rising count).
        let cells: Vec<Vec<u8>> = (0..256)
            .map(|c| {
                let mut s = Vec::new();
                for lo in 1..256usize {
                    let rise = lut[c << 8 | lo] - lut[c << 8 | (lo - 1)];
                    s.extend(std::iter::repeat_n((lo - 1) as u8, rise as usize));
                }
                s
            })
            .collect();
        // Each step slot and each dense cell costs about the same (two permutes, a blend, a
        // compare and an add or blend per 64 elements): minimise their sum.
        let most = cells.iter().map(Vec::len).max().unwrap_or(0);
        let dense_over = |k: usize| cells.iter().filter(|s| s.len() > k).count();
        let k = (0..=most).min_by_key(|&k| k + dense_over(k)).unwrap_or(0);
        let steps = (0..k)
            .map(|s| {
                Table(std::array::from_fn(|c| {
                    cells[c].get(s).copied().unwrap_or(255)
                }))
            })
            .collect();
        let dense = (0..256)
            .filter(|&c| cells[c].len() > k)
            .map(|c| (c as u8, Table(std::array::from_fn(|lo| lut[c << 8 | lo]))))
            .collect();
        Self {
            planes,
            base,
            steps,
            dense,
        }
    }
}

/// The tables for `q`, if this CPU runs the AVX-512 VBMI codecs, the element loops are not
/// capped below AVX-512 ([`super::simd::force_level`]) and the scalar codecs are not forced
/// ([`super::simd::force_scalar_codecs`]).
#[inline]
pub(crate) fn tables(q: &Quantizer) -> Option<&'static Tables> {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        let ok = *AVAILABLE.get_or_init(|| super::simd::all_detected(x86::FEATURES));
        if !ok
            || super::simd::level() < super::simd::SimdLevel::Avx512
            || super::simd::scalar_codecs()
        {
            return None;
        }
        static SIGNED: OnceLock<Tables> = OnceLock::new();
        static UNSIGNED: OnceLock<Tables> = OnceLock::new();
        let cell = if q.map[0] < 0.0 { &SIGNED } else { &UNSIGNED };
        Some(cell.get_or_init(|| Tables::new(q)))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = q;
        None
    }
}

/// [`Quantizer::decode`] for f32 (`t` from [`tables`]).
#[inline]
pub(crate) fn decode(t: &Tables, codes: &[u8], absmax: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `t` exists only when `tables` found every feature in `x86::FEATURES`, the
    // features `decode` is compiled with.
    unsafe {
        x86::decode(t, codes, absmax, out)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (t, codes, absmax, out);
        unreachable!("no tables on this architecture")
    }
}

/// [`Quantizer::encode`] for f32 (`t` from [`tables`]): the block's absmax, and its codes.
#[inline]
pub(crate) fn encode(t: &Tables, x: &[f32], codes: &mut [u8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as in `decode`.
    unsafe {
        x86::encode(t, x, codes)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (t, x, codes);
        unreachable!("no tables on this architecture")
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Table, Tables, BLOCK};
    use std::arch::x86_64::*;

    /// Every feature the functions below are compiled with (their `target_feature` lists).
    pub(super) const FEATURES: &[&str] = &["avx512f", "avx512bw", "avx512vl", "avx512vbmi"];

    /// Lanes `..n` of a mask (n ≤ 64).
    #[inline(always)]
    fn lanes(n: usize) -> u64 {
        if n >= 64 {
            u64::MAX
        } else {
            (1u64 << n) - 1
        }
    }

    /// The first `min(16, x.len())` values, zeros after.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
    fn load_f32(x: &[f32]) -> __m512 {
        if x.len() >= 16 {
            // SAFETY: x holds at least the 16 values read.
            return unsafe { _mm512_loadu_ps(x.as_ptr()) };
        }
        let k = lanes(x.len()) as u16;
        // SAFETY: the mask enables only lanes below x.len(); masked-off lanes are not read.
        unsafe { _mm512_maskz_loadu_ps(k, x.as_ptr()) }
    }

    /// Stores the first `min(16, out.len())` lanes of `v`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
    fn store_f32(out: &mut [f32], v: __m512) {
        if out.len() >= 16 {
            // SAFETY: out holds at least the 16 values written.
            return unsafe { _mm512_storeu_ps(out.as_mut_ptr(), v) };
        }
        let k = lanes(out.len()) as u16;
        // SAFETY: the mask enables only lanes below out.len(); others are not written.
        unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr(), k, v) }
    }

    /// The first `min(64, x.len())` bytes, zeros after.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
    fn load_u8(x: &[u8]) -> __m512i {
        if x.len() >= 64 {
            // SAFETY: x holds at least the 64 bytes read.
            return unsafe { _mm512_loadu_si512(x.as_ptr().cast()) };
        }
        let k = lanes(x.len());
        // SAFETY: the mask enables only lanes below x.len(); masked-off lanes are not read.
        unsafe { _mm512_maskz_loadu_epi8(k, x.as_ptr().cast()) }
    }

    /// Stores the first `min(64, out.len())` bytes of `v`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
    fn store_u8(out: &mut [u8], v: __m512i) {
        if out.len() >= 64 {
            // SAFETY: out holds at least the 64 bytes written.
            return unsafe { _mm512_storeu_si512(out.as_mut_ptr().cast(), v) };
        }
        let k = lanes(out.len());
        // SAFETY: the mask enables only lanes below out.len(); others are not written.
        unsafe { _mm512_mask_storeu_epi8(out.as_mut_ptr().cast(), k, v) }
    }

    /// `table[idx]` for 64 byte indices.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
    fn lookup(table: &Table, idx: __m512i) -> __m512i {
        let part = |i: usize| {
            let quarter: &[u8; 64] = table.0[64 * i..64 * i + 64].try_into().expect("64 bytes");
            // SAFETY: reads the 64 bytes of `quarter` (an unmasked load folds into vpermi2b).
            unsafe { _mm512_loadu_si512(quarter.as_ptr().cast()) }
        };
        // vpermi2b reads the low 7 index bits: entries 0..127 and 128..255, then bit 7 picks.
        let low = _mm512_permutex2var_epi8(part(0), idx, part(1));
        let high = _mm512_permutex2var_epi8(part(2), idx, part(3));
        _mm512_mask_blend_epi8(_mm512_movepi8_mask(idx), low, high)
    }

    /// A 64-byte constant.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
    fn bytes(b: &[u8; 64]) -> __m512i {
        // SAFETY: reads the 64 bytes of `b`.
        unsafe { _mm512_loadu_si512(b.as_ptr().cast()) }
    }

    /// Decode's code order: interleaving four byte planes within 128-bit lanes yields, in
    /// output `q`, lane `L`, element `e`, the code at `16L + 4q + e`; placing there the code of
    /// element `16q + 4L + e` makes the outputs come out in order.
    const DECODE_ORDER: [u8; 64] = {
        let mut o = [0u8; 64];
        let mut i = 0;
        while i < 64 {
            let (lane, q, e) = (i / 16, i % 16 / 4, i % 4);
            o[i] = (16 * q + 4 * lane + e) as u8;
            i += 1;
        }
        o
    };

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
    pub(super) fn decode(t: &Tables, codes: &[u8], absmax: f32, out: &mut [f32]) {
        let n = codes.len().min(out.len());
        let scale = _mm512_set1_ps(absmax);
        let order = bytes(&DECODE_ORDER);
        for (c, o) in codes[..n].chunks(64).zip(out[..n].chunks_mut(64)) {
            let idx = _mm512_permutexvar_epi8(order, load_u8(c));
            let [b0, b1, b2, b3] = t.planes.each_ref().map(|p| lookup(p, idx));
            let (l01, h01) = (_mm512_unpacklo_epi8(b0, b1), _mm512_unpackhi_epi8(b0, b1));
            let (l23, h23) = (_mm512_unpacklo_epi8(b2, b3), _mm512_unpackhi_epi8(b2, b3));
            let words = [
                _mm512_unpacklo_epi16(l01, l23),
                _mm512_unpackhi_epi16(l01, l23),
                _mm512_unpacklo_epi16(h01, h23),
                _mm512_unpackhi_epi16(h01, h23),
            ];
            for (o, w) in o.chunks_mut(16).zip(words) {
                store_f32(o, _mm512_mul_ps(_mm512_castsi512_ps(w), scale));
            }
        }
    }

    /// Byte 0 of 32 dwords, then byte 1 of the same (two registers' worth).
    const PACK: [u8; 64] = {
        let mut o = [0u8; 64];
        let mut i = 0;
        while i < 64 {
            o[i] = if i < 32 { 4 * i } else { 4 * (i - 32) + 1 } as u8;
            i += 1;
        }
        o
    };

    /// The §12.1 grid index of `x · inv`, equal to the scalar `Quantizer::encode`'s
    /// `trunc(fl(fl(fl(clamp(y) + 1)·0.5)·65535) + 0.5)` with NaN → 0, in fewer operations:
    /// * `fl(y + 1)·0.5` is exact, so `fl(fl(y + 1)·0.5·65535) = fl(fl(y + 1)·32767.5)`;
    /// * clamping at −1 changes nothing: below −1, `t` stays in (0, 0.5) and truncates to 0;
    /// * `y ≤ 1` gives `t ≤ 65535.5`, so no upper clamp of the index (y = x·fl(1/absmax)
    ///   never exceeds 1 when the reciprocal is finite; the clamp is for an infinite one);
    /// * NaN (vminps returns its second operand, NaN) truncates to 0x8000_0000, whose low
    ///   16 bits, all that is read of the index, are 0.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
    fn grid_index(x: __m512, inv: __m512) -> __m512i {
        let y = _mm512_min_ps(_mm512_set1_ps(1.0), _mm512_mul_ps(x, inv));
        let t = _mm512_mul_ps(
            _mm512_add_ps(y, _mm512_set1_ps(1.0)),
            _mm512_set1_ps(32767.5),
        );
        _mm512_cvttps_epi32(_mm512_add_ps(t, _mm512_set1_ps(0.5)))
    }

    /// `LUT[j]` for the 64 grid indices in `j` (16 per register).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
    fn codes_of(t: &Tables, j: [__m512i; 4]) -> __m512i {
        let pack = bytes(&PACK);
        let a = _mm512_permutex2var_epi8(j[0], pack, j[1]);
        let b = _mm512_permutex2var_epi8(j[2], pack, j[3]);
        let lo = _mm512_shuffle_i64x2::<0x44>(a, b);
        let hi = _mm512_shuffle_i64x2::<0xEE>(a, b);
        let mut code = lookup(&t.base, hi);
        let one = _mm512_set1_epi8(1);
        for s in &t.steps {
            let above = _mm512_cmpgt_epu8_mask(lo, lookup(s, hi));
            code = _mm512_mask_add_epi8(code, above, code, one);
        }
        for (cell, direct) in &t.dense {
            let here = _mm512_cmpeq_epi8_mask(hi, _mm512_set1_epi8(*cell as i8));
            code = _mm512_mask_mov_epi8(code, here, lookup(direct, lo));
        }
        code
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
    pub(super) fn encode(t: &Tables, x: &[f32], codes: &mut [u8]) -> f32 {
        let n = x.len().min(codes.len()).min(BLOCK);
        let (x, codes) = (&x[..n], &mut codes[..n]);
        // max |x|; a NaN lane keeps the running maximum (the second operand), as the scalar
        // comparison does. Padding lanes are 0.
        let mut acc = _mm512_setzero_ps();
        for c in x.chunks(16) {
            acc = _mm512_max_ps(_mm512_abs_ps(load_f32(c)), acc);
        }
        let absmax = _mm512_reduce_max_ps(acc);
        if absmax == 0.0 {
            codes.fill(0);
            return absmax;
        }
        let inv = _mm512_set1_ps(1.0f32 / absmax);
        for (x, c) in x.chunks(64).zip(codes.chunks_mut(64)) {
            let mut j = [_mm512_setzero_si512(); 4];
            for (j, x) in j.iter_mut().zip(x.chunks(16)) {
                *j = grid_index(load_f32(x), inv);
            }
            store_u8(c, codes_of(t, j));
        }
        absmax
    }

    /// `LUT[j]` for every `j` in `js` (tests).
    #[cfg(test)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
    pub(super) fn codes_of_indices(t: &Tables, js: &[u32], out: &mut [u8]) {
        for (js, out) in js.chunks(64).zip(out.chunks_mut(64)) {
            let mut j = [_mm512_setzero_si512(); 4];
            for (j, c) in j.iter_mut().zip(js.chunks(16)) {
                let k = lanes(c.len()) as u16;
                // SAFETY: the mask enables only lanes below c.len().
                *j = unsafe { _mm512_maskz_loadu_epi32(k, c.as_ptr().cast()) };
            }
            store_u8(out, codes_of(t, j));
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::state::{quantizer, GRID};

    fn both() -> Vec<(&'static Quantizer, &'static Tables)> {
        [true, false]
            .into_iter()
            .filter_map(|s| {
                let q = quantizer(s);
                tables(q).map(|t| (q, t))
            })
            .collect()
    }

    /// Detection checks exactly the features the functions are compiled with.
    #[test]
    fn every_function_is_compiled_with_the_detected_features() {
        let src = include_str!("q8_simd.rs");
        // Split so that this test's own text does not match.
        let attr = concat!("#[target_", "feature(enable = \"");
        let lists: Vec<&str> = src
            .match_indices(attr)
            .map(|(i, _)| {
                let rest = &src[i + attr.len()..];
                &rest[..rest.find('"').unwrap()]
            })
            .collect();
        assert!(lists.len() >= 8);
        for list in lists {
            let feats: Vec<&str> = list.split(',').map(str::trim).collect();
            assert_eq!(feats, x86::FEATURES);
        }
        for f in x86::FEATURES {
            assert!(crate::backend::simd::x86_feature(f).is_some(), "{f}");
        }
    }

    #[test]
    fn every_grid_point_gets_its_lut_code() {
        for (q, t) in both() {
            let js: Vec<u32> = (0..GRID as u32).collect();
            let mut out = vec![0u8; GRID];
            // SAFETY: `tables` returned Some, so the features were detected.
            unsafe { x86::codes_of_indices(t, &js, &mut out) };
            assert!(out.iter().eq(q.lut.iter()), "signed: {}", q.map[0] < 0.0);
            assert!(!t.dense.is_empty() && t.steps.len() <= 8);
        }
    }

    #[test]
    fn grid_boundaries_and_clamps_round_as_the_scalar_code() {
        // Blocks of several absmaxes (1: y = x):
        // every grid cell boundary of §12.1 and the map's midpoints, ±3 ulp.
        for (q, t) in both() {
            let mut xs: Vec<f32> = (0..=GRID)
                .map(|b| -1.0 + (2.0 * b as f32 - 1.0) / 65535.0)
                .chain(q.map.windows(2).map(|w| 0.5 * (w[0] + w[1])))
                .flat_map(|v: f32| {
                    (-3i32..=3).map(move |d| f32::from_bits((v.to_bits() as i32 + d) as u32))
                })
                .collect();
            if q.map[0] >= 0.0 {
                xs.retain(|v| *v >= 0.0);
            }
            for (i, chunk) in xs.chunks(255).enumerate() {
                // Subnormal absmaxes have an infinite reciprocal: y = ±inf must clamp.
                let top = [1.0f32, 3.0, 0.7, 1e-30, 1e-39, 1e-45][i % 6];
                let mut block: Vec<f32> = chunk.iter().map(|v| v * top).collect();
                block.push(top);
                let (mut a, mut b) = (vec![0u8; block.len()], vec![0u8; block.len()]);
                assert_eq!(q.encode(&block, &mut a), encode(t, &block, &mut b));
                assert_eq!(a, b, "block {i}");
            }
        }
    }

    /// A deterministic stream of awkward f32 values: Gaussian-like, tiny, huge, exact grid
    /// points and midpoints of the map, zeros, infinities, NaN.
    fn values(seed: u64, n: usize, q: &Quantizer) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let r = (s >> 33) as u32;
                let u = r as f32 / u32::MAX as f32 * 2.0 - 1.0;
                match (r >> 3) % 11 {
                    0 => u * 1e-6,
                    1 => q.map[(r % 256) as usize],
                    2 => 0.5 * (q.map[(r % 255) as usize] + q.map[(r % 255) as usize + 1]),
                    3 => -1.0 + 2.0 * (r % 65536) as f32 / 65535.0,
                    4 if i % 97 == 0 => f32::NAN,
                    5 if i % 89 == 0 => f32::INFINITY,
                    6 if i % 61 == 0 => -0.0,
                    7 => u * u * u,
                    _ => u,
                }
            })
            .collect()
    }

    #[test]
    fn encode_and_decode_equal_the_scalar_codec() {
        for (q, t) in both() {
            for seed in 0..300u64 {
                let n = [256, 255, 64, 63, 17, 16, 1, 130][seed as usize % 8];
                let mut x = values(seed, n, q);
                if q.map[0] >= 0.0 {
                    x.iter_mut().for_each(|v| *v = v.abs());
                }
                if seed % 37 == 0 {
                    x.fill(0.0);
                }
                if seed % 41 == 0 {
                    x.fill(f32::NAN);
                }
                let (mut a, mut b) = (vec![0u8; n], vec![0u8; n]);
                let (ma, mb) = (q.encode(&x, &mut a), encode(t, &x, &mut b));
                assert_eq!(ma.to_bits(), mb.to_bits(), "seed {seed}");
                assert_eq!(a, b, "seed {seed}");
                let (mut da, mut db) = (vec![1f32; n], vec![2f32; n + 3]);
                q.decode(&a, ma, &mut da);
                decode(t, &a, ma, &mut db);
                assert!(da.iter().zip(&db).all(|(u, v)| u.to_bits() == v.to_bits()));
                assert!(db[n..].iter().all(|&v| v == 2.0), "wrote past the codes");
            }
        }
    }
}
