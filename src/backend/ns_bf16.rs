//! Newton–Schulz in bfloat16 on CPUs with AVX512-BF16 (`NsDtype::Bfloat16` on the CPU).
//!
//! candle's CPU matmul has no bf16 dot-product path (its bf16 matmul is slower than its f32
//! one), so this module has its own: a packed GEMM whose 8×32 micro-kernel is 16
//! `vdpbf16ps` accumulators (bf16 pairs in, f32 sums out), blocked for the caches and split over
//! rayon's threads by blocks of rows. The Newton–Schulz products A = X Xᵀ and A² are symmetric:
//! only the tiles on and above the diagonal are computed and the rest is mirrored, a quarter
//! fewer multiplications per iteration on the wide matrices of a transformer.
//!
//! Precision: every matmul input is rounded to bf16 (round-to-nearest-even), as
//! `torch.optim.Muon` does; the sums and everything between the matmuls stay f32 (torch rounds
//! them to bf16 too).

use rayon::prelude::*;

/// Rows of the micro-kernel's tile.
const MR: usize = 8;
/// Columns of the micro-kernel's tile (two 16-lane registers).
const NR: usize = 32;
/// Rows of a packed block of A (a multiple of MR): one rayon task.
const MC: usize = 64;
/// Columns of a packed block of B (a multiple of NR): 256 KiB of bf16 pairs, in L2.
const NC: usize = 4096;

/// Whether this CPU runs the bf16 kernel.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// f32 → bf16 bits, round to nearest even (NaN stays NaN).
fn to_bf16(src: &[f32], dst: &mut [u16]) {
    dst.par_chunks_mut(1 << 14)
        .zip(src.par_chunks(1 << 14))
        .for_each(|(d, s)| {
            for (d, s) in d.iter_mut().zip(s) {
                *d = half::bf16::from_f32(*s).to_bits();
            }
        });
}

/// The B operand of [`gemm`].
#[derive(Clone, Copy)]
enum BSrc<'a> {
    /// B = Sᵀ for S row-major n×k: B[k][j] = S[j·k + k].
    Trans(&'a [u16]),
    /// B row-major k×n: B[k][j] = S[k·n + j].
    Rows(&'a [u16]),
}

/// Two bf16 values as the lanes of one `vdpbf16ps` pair (the first in the low half).
#[inline(always)]
fn pair(lo: u16, hi: u16) -> u32 {
    u32::from(lo) | u32::from(hi) << 16
}

/// How [`gemm`] writes C: `C = alpha·(A·B)`, plus `beta·D` with `d` = (beta, D), D m×n
/// row-major. `upper` (m == n): only the tiles that reach the diagonal or above are written (the
/// caller mirrors the rest).
#[derive(Clone, Copy)]
struct Epilogue<'a> {
    alpha: f32,
    d: Option<(f32, &'a [f32])>,
    upper: bool,
}

/// C (m×n, row-major) per `epi`, with A row-major m×k (bf16 bits). Each tile sums the whole
/// depth in registers and is written once.
fn gemm(m: usize, n: usize, k: usize, a: &[u16], b: BSrc<'_>, c: &mut [f32], epi: Epilogue<'_>) {
    let upper = epi.upper;
    assert!(a.len() >= m * k && c.len() >= m * n);
    // A symmetric product: B = Aᵀ (the same rows), so that A's panels can be read from B's.
    assert!(!upper || (m == n && matches!(b, BSrc::Trans(s) if std::ptr::eq(s, a))));
    assert!(epi.d.is_none_or(|d| d.1.len() >= m * n));
    match b {
        BSrc::Trans(s) => assert!(s.len() >= n * k),
        BSrc::Rows(s) => assert!(s.len() >= k * n),
    }
    if m == 0 || n == 0 {
        return;
    }
    let kp = k.div_ceil(2);
    let fast = available();
    let mut bpack: Vec<u32> = Vec::new();
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        bpack.clear();
        bpack.resize(nc.div_ceil(NR) * kp * NR, 0);
        // B's panels over the whole depth: [panel][pair][NR], zero past n and past k. One
        // task per thread, each over a range of whole panels, reads its source sequentially.
        let panels = nc.div_ceil(NR);
        let per_task = panels.div_ceil(rayon::current_num_threads().max(1));
        bpack
            .par_chunks_mut(per_task * kp * NR)
            .enumerate()
            .for_each(|(ti, panels)| {
                let p0 = ti * per_task;
                match b {
                    BSrc::Trans(s) => {
                        for (pi, panel) in panels.chunks_mut(kp * NR).enumerate() {
                            let j0 = jc + (p0 + pi) * NR;
                            let w = NR.min(n - j0);
                            pack_trans(fast, &s[j0 * k..(j0 + w) * k], k, w, panel);
                        }
                    }
                    BSrc::Rows(s) => {
                        for q in 0..kp {
                            let r0 = &s[2 * q * n..2 * q * n + n];
                            let r1 = (2 * q + 1 < k).then(|| &s[(2 * q + 1) * n..(2 * q + 2) * n]);
                            for (pi, panel) in panels.chunks_mut(kp * NR).enumerate() {
                                let j0 = jc + (p0 + pi) * NR;
                                let w = NR.min(n - j0);
                                let out = &mut panel[q * NR..q * NR + w];
                                let lo = &r0[j0..j0 + w];
                                match r1 {
                                    Some(r1) => {
                                        for ((o, &lo), &hi) in
                                            out.iter_mut().zip(lo).zip(&r1[j0..j0 + w])
                                        {
                                            *o = pair(lo, hi);
                                        }
                                    }
                                    None => {
                                        for (o, &lo) in out.iter_mut().zip(lo) {
                                            *o = pair(lo, 0);
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            });
        let bpack = &bpack;
        c[..m * n]
            .par_chunks_mut(MC * n)
            .enumerate()
            .for_each(|(bi, cblk)| {
                let ic = bi * MC;
                let mc = MC.min(m - ic);
                if upper && jc + nc <= ic {
                    return;
                }
                // A's panels over the whole depth: [panel][pair][MR], zero past m and past k.
                // A symmetric product (A·Aᵀ) whose B block holds every row reads A's rows from
                // B's panels instead (lanes i mod NR, stride NR): no packing of its own.
                let shared = upper && jc == 0 && nc == n;
                let mut apack = Vec::new();
                if !shared {
                    apack.resize(mc.div_ceil(MR) * kp * MR, 0u32);
                    for (pi, panel) in apack.chunks_mut(kp * MR).enumerate() {
                        let i0 = ic + pi * MR;
                        let h = MR.min(mc - pi * MR);
                        pack_rows(|r| &a[(i0 + r) * k..(i0 + r + 1) * k], h, panel, MR);
                    }
                }
                let a_panel = |pi: usize| -> (&[u32], usize) {
                    if shared {
                        let i = ic + pi * MR;
                        (
                            &bpack[(i / NR) * kp * NR + i % NR..(i / NR + 1) * kp * NR],
                            NR,
                        )
                    } else {
                        (&apack[pi * kp * MR..(pi + 1) * kp * MR], MR)
                    }
                };
                let mut tile = [0f32; MR * NR];
                for (pj, bp) in bpack.chunks(kp * NR).enumerate() {
                    let j0 = jc + pj * NR;
                    let w = NR.min(n - j0);
                    for pi in 0..mc.div_ceil(MR) {
                        let i0 = pi * MR;
                        if upper && j0 + NR <= ic + i0 {
                            continue;
                        }
                        let (ap, astride) = a_panel(pi);
                        // The tile's rows of C (and D) are far apart: fetch them while the
                        // micro-kernel runs instead of stalling on each in the epilogue.
                        for r in 0..MR.min(mc - i0) {
                            let at = (i0 + r) * n + j0;
                            prefetch(&cblk[at..at + w]);
                            if let Some((_, d)) = epi.d {
                                prefetch(&d[ic * n + at..ic * n + at + w]);
                            }
                        }
                        micro(fast, kp, ap, astride, bp, &mut tile);
                        for r in 0..MR.min(mc - i0) {
                            let at = (i0 + r) * n + j0;
                            let out = &mut cblk[at..at + w];
                            let t = &tile[r * NR..r * NR + w];
                            match epi.d {
                                Some((beta, d)) => {
                                    let d = &d[ic * n + at..ic * n + at + w];
                                    for ((o, t), d) in out.iter_mut().zip(t).zip(d) {
                                        *o = epi.alpha * t + beta * d;
                                    }
                                }
                                None => {
                                    for (o, t) in out.iter_mut().zip(t) {
                                        *o = epi.alpha * t;
                                    }
                                }
                            }
                        }
                    }
                }
            });
    }
}

/// Writes rows `0..w` (`row(l)`, each `k` bf16 values) as pairs to `panel[q·stride + l]`, an odd
/// last value paired with 0. In blocks of pairs, so that the strided writes stay in L1.
#[inline(always)]
fn pack_rows<'a>(row: impl Fn(usize) -> &'a [u16], w: usize, panel: &mut [u32], stride: usize) {
    const QB: usize = 64;
    let kp = panel.len() / stride;
    for qb in (0..kp).step_by(QB) {
        let qe = (qb + QB).min(kp);
        for l in 0..w {
            let row = row(l);
            let outs = panel[qb * stride + l..].iter_mut().step_by(stride);
            for (q, out) in (qb..qe).zip(outs) {
                let hi = row.get(2 * q + 1).copied().unwrap_or(0);
                *out = pair(row[2 * q], hi);
            }
        }
    }
}

/// B's panel of the rows `s` (`w` ≤ NR rows of `k` bf16 values) as pairs: `panel[q·NR + l]`,
/// by gathers where the CPU has AVX-512 (one per 16 rows and pair), else [`pack_rows`].
fn pack_trans(fast: bool, s: &[u16], k: usize, w: usize, panel: &mut [u32]) {
    assert!(w <= NR && s.len() >= w * k && panel.len() >= k.div_ceil(2) * NR);
    #[cfg(target_arch = "x86_64")]
    if fast && k >= 2 && k <= (i32::MAX as usize) / (2 * NR) {
        // SAFETY: `fast` is `available()` (AVX-512F detected); the bounds `pack_trans_avx512`
        // relies on were asserted above.
        unsafe { pack_trans_avx512(s, k, w, panel) };
        return;
    }
    let _ = fast;
    pack_rows(|l| &s[l * k..(l + 1) * k], w, panel, NR);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_trans_avx512(s: &[u16], k: usize, w: usize, panel: &mut [u32]) {
    use std::arch::x86_64::*;
    // Byte offsets of rows 0..16 from the first (k·2 bytes apart; no overflow: checked k).
    let step = (2 * k) as i32;
    let idx = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(step),
    );
    let full = k / 2;
    for h in 0..NR / 16 {
        let l0 = 16 * h;
        if l0 >= w {
            break;
        }
        let lanes = (w - l0).min(16);
        let mask: __mmask16 = ((1u32 << lanes) - 1) as __mmask16;
        for q in 0..full {
            // SAFETY: lane l < lanes reads the 4 bytes of s[(l0 + l)·k + 2q ..= … + 1], inside
            // `s` because 2q + 1 < k and l0 + l < w (the caller asserted s.len() ≥ w·k); masked
            // lanes read nothing. The store writes panel[q·NR + l0 .. + 16] ⊂ panel, whose
            // length the caller asserted to be ≥ ⌈k/2⌉·NR (l0 + 16 ≤ NR).
            unsafe {
                let base = s.as_ptr().add(l0 * k + 2 * q);
                let v = _mm512_mask_i32gather_epi32::<1>(
                    _mm512_setzero_si512(),
                    mask,
                    idx,
                    base.cast(),
                );
                _mm512_storeu_si512(panel.as_mut_ptr().add(q * NR + l0).cast(), v);
            }
        }
    }
    if k % 2 == 1 {
        // The last value of each row, paired with 0.
        for l in 0..w {
            panel[full * NR + l] = pair(s[l * k + k - 1], 0);
        }
    }
}

/// `tile[r·NR + l] = Σ_q dot(ap[q·MR + r], bp[q·NR + l])` over `kp` bf16 pairs.
/// Hints the cache to load `v` (at most two lines: a tile row).
#[inline(always)]
fn prefetch(v: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for chunk in v.chunks(16) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: a prefetch never faults and has no architectural effect; the address is that
        // of an element of a live slice.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(chunk.as_ptr().cast()) };
    }
}

/// A's pair `q` of row `r` is `ap[q·astride + r]`. `fast`: [`available`]'s answer.
fn micro(fast: bool, kp: usize, ap: &[u32], astride: usize, bp: &[u32], tile: &mut [f32; MR * NR]) {
    assert!(kp == 0 || ap.len() >= (kp - 1) * astride + MR);
    assert!(bp.len() >= kp * NR);
    #[cfg(target_arch = "x86_64")]
    if fast {
        // SAFETY: `fast` is `available()`, which checked that the CPU has AVX-512F and AVX512-BF16, the
        // features `micro_avx512` is compiled with; the lengths it reads were asserted above.
        unsafe { micro_avx512(kp, ap, astride, bp, tile) };
        return;
    }
    // Portable version (other CPUs): the same pair sums.
    let _ = fast;
    *tile = [0f32; MR * NR];
    for q in 0..kp {
        for r in 0..MR {
            let x = ap[q * astride + r];
            let (x0, x1) = (f32::from_bits(x << 16), f32::from_bits(x & 0xFFFF_0000));
            for l in 0..NR {
                let y = bp[q * NR + l];
                let (y0, y1) = (f32::from_bits(y << 16), f32::from_bits(y & 0xFFFF_0000));
                tile[r * NR + l] += x0 * y0 + x1 * y1;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn micro_avx512(
    kp: usize,
    ap: &[u32],
    astride: usize,
    bp: &[u32],
    tile: &mut [f32; MR * NR],
) {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 2 * MR];
    for q in 0..kp {
        // SAFETY: the caller checked bp.len() >= kp·NR, so both 16-lane loads at q·NR and
        // q·NR + 16 are in bounds; loadu has no alignment requirement. `__m512i` and
        // `__m512bh` are both 64 plain bytes.
        let (b0, b1): (__m512bh, __m512bh) = unsafe {
            let p = bp.as_ptr().add(q * NR);
            (
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p.cast())),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p.add(16).cast())),
            )
        };
        let a = &ap[q * astride..q * astride + MR];
        for r in 0..MR {
            // SAFETY: as above, a broadcast pair is 64 plain bytes either way.
            let x =
                unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(a[r] as i32)) };
            acc[2 * r] = _mm512_dpbf16_ps(acc[2 * r], x, b0);
            acc[2 * r + 1] = _mm512_dpbf16_ps(acc[2 * r + 1], x, b1);
        }
    }
    for (r, row) in tile.chunks_exact_mut(16).enumerate() {
        // SAFETY: each chunk holds exactly 16 f32; storeu has no alignment requirement.
        unsafe { _mm512_storeu_ps(row.as_mut_ptr(), acc[r]) };
    }
}

/// Copies the upper triangle of the n×n matrix `c` onto its lower triangle, in blocks.
fn mirror(c: &mut [f32], n: usize) {
    const T: usize = 32;
    for bi in (0..n).step_by(T) {
        for bj in (0..=bi).step_by(T) {
            for i in bi..(bi + T).min(n) {
                for j in bj..(bj + T).min(i) {
                    c[i * n + j] = c[j * n + i];
                }
            }
        }
    }
}

/// `steps` Newton–Schulz iterations on the r×c matrix `x` (row-major, r ≤ c, already divided by
/// its norm), in place: A = X Xᵀ, B = b·A + c·A², X = a·X + B X, each matmul on bf16 inputs.
///
/// The intermediates live in this thread's scratch (kept for the next call: 6 bytes per element of
/// the largest matrix plus 10 per element of its r×r products), so that a step does
/// not fault in fresh pages for every matrix.
pub(crate) fn newton_schulz(
    x: &mut [f32],
    r: usize,
    c: usize,
    coef: (f64, f64, f64),
    steps: usize,
) {
    thread_local! {
        static BF16: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    <f32 as crate::elem::Real>::with_scratch(|fs| {
        BF16.with(|cell| match cell.try_borrow_mut() {
            Ok(mut bs) => iterate(x, r, c, coef, steps, fs, &mut bs),
            Err(_) => iterate(x, r, c, coef, steps, fs, &mut Vec::new()),
        })
    })
}

fn iterate(
    x: &mut [f32],
    r: usize,
    c: usize,
    coef: (f64, f64, f64),
    steps: usize,
    fs: &mut Vec<f32>,
    bs: &mut Vec<u16>,
) {
    assert!(x.len() == r * c && r <= c);
    let (a, b, cc) = (coef.0 as f32, coef.1 as f32, coef.2 as f32);
    if fs.len() < 2 * r * r + r * c {
        fs.resize(2 * r * r + r * c, 0.0);
    }
    if bs.len() < r * c + r * r {
        bs.resize(r * c + r * r, 0);
    }
    let (gram, rest) = fs.split_at_mut(r * r);
    let (sq, rest) = rest.split_at_mut(r * r);
    let bx = &mut rest[..r * c];
    let (xb, hb) = bs.split_at_mut(r * c);
    let hb = &mut hb[..r * r];
    for _ in 0..steps {
        to_bf16(x, xb);
        // A = X Xᵀ.
        symmetric(r, c, xb, gram, 1.0, None);
        to_bf16(gram, hb);
        // B = b·A + c·A², over A's bf16 copy.
        symmetric(r, r, hb, sq, cc, Some((b, gram)));
        to_bf16(sq, hb);
        // X = a·X + B X. The product goes to scratch and X is updated in a separate sequential
        // pass: in the epilogue, reading X's rows (often 4 KiB apart: cache-set conflicts)
        // costs more than the pass.
        let plain = Epilogue {
            alpha: 1.0,
            d: None,
            upper: false,
        };
        gemm(r, c, r, hb, BSrc::Rows(xb), bx, plain);
        x.par_chunks_mut(1 << 14)
            .zip(bx.par_chunks(1 << 14))
            .for_each(|(x, p)| {
                for (x, p) in x.iter_mut().zip(p) {
                    *x = *x * a + p;
                }
            });
    }
}

/// `out = alpha·(S Sᵀ) + beta·D` for S r×k (bf16 bits, `src`) and `d` = (beta, D): the whole
/// symmetric matrix, its upper half computed and mirrored.
fn symmetric(
    r: usize,
    k: usize,
    src: &[u16],
    out: &mut [f32],
    alpha: f32,
    d: Option<(f32, &[f32])>,
) {
    let epi = Epilogue {
        alpha,
        d,
        upper: true,
    };
    gemm(r, r, k, src, BSrc::Trans(src), out, epi);
    mirror(out, r);
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: Epilogue<'static> = Epilogue {
        alpha: 1.0,
        d: None,
        upper: false,
    };
    const UPPER: Epilogue<'static> = Epilogue {
        upper: true,
        ..PLAIN
    };

    fn bf(v: f32) -> f32 {
        half::bf16::from_f32(v).to_f32()
    }

    /// Pseudo-random values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// The product of the bf16-rounded operands in f64.
    fn reference(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| f64::from(bf(a[i * k + p])) * f64::from(bf(b[p * n + j])))
                    .sum();
            }
        }
        c
    }

    fn check(m: usize, n: usize, k: usize) {
        let a = values(m * k, 1);
        let bm = values(k * n, 2);
        let (mut ab, mut bb) = (vec![0u16; m * k], vec![0u16; k * n]);
        to_bf16(&a, &mut ab);
        to_bf16(&bm, &mut bb);
        let want = reference(m, n, k, &a, &bm);
        let mut c = vec![0f32; m * n];
        gemm(m, n, k, &ab, BSrc::Rows(&bb), &mut c, PLAIN);
        // Bᵀ stored row-major n×k, read through Trans.
        let mut bt = vec![0u16; n * k];
        for p in 0..k {
            for j in 0..n {
                bt[j * k + p] = bb[p * n + j];
            }
        }
        let mut c2 = vec![0f32; m * n];
        gemm(m, n, k, &ab, BSrc::Trans(&bt), &mut c2, PLAIN);
        // 2·(A·B) − 3·D, C's previous values ignored.
        let d = values(m * n, 5);
        let mut c3 = vec![f32::NAN; m * n];
        let with_d = Epilogue {
            alpha: 2.0,
            d: Some((-3.0, &d)),
            upper: false,
        };
        gemm(m, n, k, &ab, BSrc::Rows(&bb), &mut c3, with_d);
        for i in 0..m * n {
            assert_eq!(c3[i], 2.0 * c[i] + -3.0 * d[i]);
        }
        for (i, w) in want.iter().enumerate() {
            let tol = 1e-5 * (k as f64).sqrt() + 1e-6 * w.abs();
            assert!(
                (f64::from(c[i]) - w).abs() < tol,
                "{m}x{n}x{k} [{i}]: {} vs {w}",
                c[i]
            );
            assert!(
                (f64::from(c2[i]) - w).abs() < tol,
                "trans {m}x{n}x{k} [{i}]"
            );
        }
    }

    #[test]
    fn gemm_matches_the_bf16_product_on_every_edge() {
        // Tiles, panels and blocks cut at every kind of boundary, odd depths included.
        for (m, n, k) in [
            (1, 1, 1),
            (8, 32, 2),
            (9, 33, 3),
            (70, 100, 257),
            (64, 1030, 513),
        ] {
            check(m, n, k);
        }
    }

    #[test]
    fn the_symmetric_product_equals_the_full_one() {
        // 1100 > NC: the upper product packs A itself.
        for (n, k) in [(5, 7), (70, 300), (130, 64), (1100, 9)] {
            let x = values(n * k, 3);
            let mut xb = vec![0u16; n * k];
            to_bf16(&x, &mut xb);
            let mut full = vec![0f32; n * n];
            gemm(n, n, k, &xb, BSrc::Trans(&xb), &mut full, PLAIN);
            let mut sym = vec![f32::NAN; n * n];
            gemm(n, n, k, &xb, BSrc::Trans(&xb), &mut sym, UPPER);
            mirror(&mut sym, n);
            assert_eq!(full, sym, "{n}x{k}");
        }
    }

    #[test]
    fn the_avx512_kernels_match_the_portable_ones() {
        if !available() {
            return;
        }
        for (w, k) in [(32, 2), (17, 7), (5, 64), (32, 129)] {
            let mut s = vec![0u16; w * k];
            to_bf16(&values(w * k, 6), &mut s);
            let kp = k.div_ceil(2);
            let (mut fast, mut slow) = (vec![0u32; kp * NR], vec![0u32; kp * NR]);
            pack_trans(true, &s, k, w, &mut fast);
            pack_trans(false, &s, k, w, &mut slow);
            assert_eq!(fast, slow, "pack {w}x{k}");
            let mut a = vec![0u32; kp * MR];
            pack_rows(|l| &s[l * k..(l + 1) * k], MR.min(w), &mut a, MR);
            let (mut t1, mut t2) = ([0f32; MR * NR], [0f32; MR * NR]);
            micro(true, kp, &a, MR, &fast, &mut t1);
            micro(false, kp, &a, MR, &fast, &mut t2);
            for (x, y) in t1.iter().zip(&t2) {
                assert!(
                    (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                    "micro {w}x{k}: {x} vs {y}"
                );
            }
        }
    }

    #[test]
    fn newton_schulz_orthogonalizes() {
        // Five iterations of the default coefficients bring the singular values into about
        // [0.7, 1.2]: X Xᵀ ≈ I within that band.
        let (r, c) = (48, 96);
        let mut x = values(r * c, 4);
        let norm = x.iter().map(|v| v * v).sum::<f32>().sqrt();
        x.iter_mut().for_each(|v| *v /= norm);
        newton_schulz(&mut x, r, c, (3.4445, -4.775, 2.0315), 5);
        for i in 0..r {
            let d: f32 = (0..c).map(|p| x[i * c + p] * x[i * c + p]).sum();
            assert!((0.4..1.5).contains(&d), "row {i}: {d}");
            for j in 0..i {
                let o: f32 = (0..c).map(|p| x[i * c + p] * x[j * c + p]).sum();
                assert!(o.abs() < 0.35, "rows {i},{j}: {o}");
            }
        }
    }
}
