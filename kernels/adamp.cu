// AdamP (clovaai/AdamP 0.3.0) on the GPU. Mirrors src/algorithms/adamp.rs.
// Slots: s[0] exp_avg, s[1] exp_avg_sq. Scalars: AdamPParams (params.cuh, generated from
// src/algorithms/adamp.rs, which documents each field; AdamPKernel::params fills it).
//
// Tensors of rank >= 2 (t.rows rows of t.row_len elements; their rows start at t.off in the
// row buffers) take five launches:
//   adamp_pass1: update m, v; per-row g·p, g·g, p·p into rows[3*(off+r) + 0..3]
//                (one warp per segment of ADAMP_SEG elements of a row, atomics per segment);
//   adamp_decide: per tensor, the reference's projection test (channel view, then layer
//                view) -> mode[4*t] = 0 none, 1 channel, 2 layer; mode[4*t+1] = ||p|| (layer);
//   adamp_pu:    for projected tensors, Σ p·u per row (channel) or per tensor (layer) into
//                pu[off + r] (pu[off] for the layer view);
//   adamp_coef:  per row, the projector 1/(||p_r|| + eps) and coefficient (p̂_r·u_r) into
//                coef[2*(off + r)] (row 0's slot for the layer view);
//   adamp_pass2: u, projected; decay by (1 - lr*wd*r), r = wd_ratio if projected; p update.
// Tensors of rank < 2 take adamp_plain (no projection); adamp_plain_fmt_* for state in bf16
// or 8 bits and stochastic rounding (co_apply). Tensors of rank >= 2 with such state are
// decoded into dense copies first (kernels/codec.cu), as the CPU does.
#include "common.cuh"

#define ADAMP_SEG CO_ROW_SEG
#define ADAMP_WARPS (CO_THREADS / 32)

template <typename M> struct AdamPScalars {
  M b1, ob1, b2, ob2, bc2s, eps, gs, neg_ss;
  bool nesterov;
  __device__ __forceinline__ AdamPScalars(const TensorEntry& t, const AdamPParams& q)
      : b1((M)q.beta1), ob1((M)(1.0 - q.beta1)), b2((M)q.beta2), ob2((M)(1.0 - q.beta2)),
        bc2s((M)q.bc2_sqrt), eps((M)q.eps), gs((M)co_grad_scale(t, q.grad_scale)),
        neg_ss((M)(-q.step_size)),
        nesterov(q.nesterov != 0) {}
  __device__ __forceinline__ M u(M mi, M vi, M gi) const {
    const M denom = sqrt(vi) / bc2s + eps;
    return nesterov ? (b1 * mi + ob1 * gi) / denom : mi / denom;
  }
};

// Whether a segment starting at element `a` can take the four-wide path (every pointer and `a`
// aligned for it; slots 0 and 1 are float state).
template <typename P>
__device__ __forceinline__ bool vec_ok(const TensorEntry& t, unsigned long long a) {
  typedef typename Elem<P>::M M;
  return Elem<P>::VEC && a % 4 == 0 && ((t.p | t.g) % (4 * sizeof(P))) == 0 &&
         ((t.s[0] | t.s[1]) % (4 * sizeof(M))) == 0;
}

// The segment a warp works on: row r, elements [a, b) of the tensor.
struct Segment {
  bool valid;
  unsigned long long r, a, b;
};
__device__ __forceinline__ Segment segment_of(const TensorEntry& t, unsigned int chunk) {
  const unsigned long long spr = (t.row_len + ADAMP_SEG - 1) / ADAMP_SEG;
  const unsigned long long seg = (unsigned long long)chunk * ADAMP_WARPS + (threadIdx.x >> 5);
  Segment s;
  s.valid = t.row_len > 0 && seg < t.rows * spr;
  s.r = s.valid ? seg / spr : 0;
  const unsigned long long sub = s.valid ? seg % spr : 0;
  s.a = s.r * t.row_len + sub * ADAMP_SEG;
  s.b = s.r * t.row_len + min((sub + 1) * ADAMP_SEG, t.row_len);
  return s;
}

// Runs op(p, g, m, v) (math-type values; m and v by reference) over the elements of a warp's
// segment, four per access where aligned (as in co_apply), the rest one at a time. m and v are
// written back when WRITE_MV; g is read only when READ_G (zero otherwise).
template <typename P, bool WRITE_MV, bool READ_G, typename Op>
__device__ __forceinline__ void seg_apply(const TensorEntry& t, const Segment& s, Op op) {
  typedef typename Elem<P>::M M;
  const P* __restrict__ p = (const P*)t.p;
  const P* __restrict__ g = (const P*)t.g;
  M* __restrict__ m = (M*)t.s[0];
  M* __restrict__ v = (M*)t.s[1];
  const unsigned long long lane = threadIdx.x & 31;
  unsigned long long rest = s.a;
  if (vec_ok<P>(t, s.a)) {
    const unsigned long long nv = (s.b - s.a) / 4;
    for (unsigned long long j = lane; j < nv; j += 32) {
      const unsigned long long i = s.a + 4 * j;
      M pv[4], gv[4] = {M(0), M(0), M(0), M(0)}, mv[4], vv[4];
      Elem<P>::load4(p + i, pv);
      if (READ_G) Elem<P>::load4(g + i, gv);
      Elem<M>::load4(m + i, mv);
      Elem<M>::load4(v + i, vv);
#pragma unroll
      for (int l = 0; l < 4; ++l) op(pv[l], gv[l], mv[l], vv[l]);
      if (WRITE_MV) {
        Elem<M>::store4(m + i, mv);
        Elem<M>::store4(v + i, vv);
      }
    }
    rest = s.a + 4 * nv;
  }
  for (unsigned long long i = rest + lane; i < s.b; i += 32) {
    M mi = m[i], vi = v[i];
    op(Elem<P>::load(p[i]), READ_G ? Elem<P>::load(g[i]) : M(0), mi, vi);
    if (WRITE_MV) {
      m[i] = mi;
      v[i] = vi;
    }
  }
}

template <typename P>
__device__ void adamp_pass1(const TensorEntry* __restrict__ ts, const BlockEntry* __restrict__ bs,
                            double* __restrict__ rows) {
  typedef typename Elem<P>::M M;
  const BlockEntry blk = bs[blockIdx.x];
  const TensorEntry& t = ts[blk.tensor];
  if (co_skipped(t)) return;
  const AdamPScalars<M> c(t, co_params<AdamPParams>(t));
  const Segment s = segment_of(t, blk.chunk);
  if (!s.valid) return;
  double gp = 0.0, gg = 0.0, pp = 0.0;
  seg_apply<P, true, true>(t, s, [&](M pi, M g, M& mi, M& vi) {
    const M gi = g * c.gs;
    mi = mi * c.b1 + c.ob1 * gi;
    vi = vi * c.b2 + c.ob2 * gi * gi;
    const double gf = (double)gi, pf = (double)pi;
    gp += gf * pf;
    gg += gf * gf;
    pp += pf * pf;
  });
  gp = warp_sum(gp);
  gg = warp_sum(gg);
  pp = warp_sum(pp);
  if ((threadIdx.x & 31) == 0) {
    double* out = rows + 3 * (t.off + s.r);
    atomicAdd(out + 0, gp);
    atomicAdd(out + 1, gg);
    atomicAdd(out + 2, pp);
  }
}

// One block per tensor (launched with one BlockEntry per tensor, chunk unused).
extern "C" __global__ void __launch_bounds__(CO_THREADS)
    adamp_decide(const TensorEntry* __restrict__ ts, const double* __restrict__ rows,
                 double* __restrict__ mode) {
  const TensorEntry& t = ts[blockIdx.x];
  if (co_skipped(t)) return;
  const AdamPParams& q = co_params<AdamPParams>(t);
  const double eps = q.eps, delta = q.delta;
  double mx = -1.0, gp = 0.0, gg = 0.0, pp = 0.0;
  for (unsigned long long r = threadIdx.x; r < t.rows; r += blockDim.x) {
    const double* s = rows + 3 * (t.off + r);
    const double cos = fabs(s[0]) / (fmax(sqrt(s[1]), eps) * fmax(sqrt(s[2]), eps));
    mx = fmax(mx, cos);
    gp += s[0];
    gg += s[1];
    pp += s[2];
  }
  __shared__ double smax[CO_THREADS];
  smax[threadIdx.x] = mx;
  __syncthreads();
  for (int h = CO_THREADS / 2; h > 0; h >>= 1) {
    if (threadIdx.x < h) smax[threadIdx.x] = fmax(smax[threadIdx.x], smax[threadIdx.x + h]);
    __syncthreads();
  }
  gp = block_sum(gp);
  gg = block_sum(gg);
  pp = block_sum(pp);
  if (threadIdx.x == 0) {
    double m = 0.0;
    if (smax[0] < delta / sqrt((double)t.row_len)) {
      m = t.rows == 1 ? 2.0 : 1.0;  // one row: the channel view is the layer view
    } else {
      const double cos = fabs(gp) / (fmax(sqrt(gg), eps) * fmax(sqrt(pp), eps));
      if (cos < delta / sqrt((double)t.n)) m = 2.0;
    }
    mode[4 * blockIdx.x] = m;
    mode[4 * blockIdx.x + 1] = sqrt(pp);
  }
}

template <typename P>
__device__ void adamp_pu(const TensorEntry* __restrict__ ts, const BlockEntry* __restrict__ bs,
                         const double* __restrict__ mode, double* __restrict__ pu) {
  typedef typename Elem<P>::M M;
  const BlockEntry blk = bs[blockIdx.x];
  const double md = mode[4 * blk.tensor];
  if (md == 0.0) return;
  const TensorEntry& t = ts[blk.tensor];
  if (co_skipped(t)) return;
  const AdamPScalars<M> c(t, co_params<AdamPParams>(t));
  const Segment s = segment_of(t, blk.chunk);
  if (!s.valid) return;
  double acc = 0.0;
  auto op = [&](M pi, M g, M& mi, M& vi) { acc += (double)pi * (double)c.u(mi, vi, g * c.gs); };
  // u needs the gradient only with Nesterov.
  if (c.nesterov) {
    seg_apply<P, false, true>(t, s, op);
  } else {
    seg_apply<P, false, false>(t, s, op);
  }
  acc = warp_sum(acc);
  if ((threadIdx.x & 31) == 0) atomicAdd(pu + t.off + (md == 1.0 ? s.r : 0), acc);
}

// One thread per row of every rank >= 2 tensor (launched with one BlockEntry per tensor and
// as many blocks as its rows need: chunk = first row / CO_THREADS).
extern "C" __global__ void __launch_bounds__(CO_THREADS)
    adamp_coef(const TensorEntry* __restrict__ ts, const BlockEntry* __restrict__ bs,
               const double* __restrict__ rows, const double* __restrict__ mode,
               const double* __restrict__ pu, double* __restrict__ coef) {
  const BlockEntry blk = bs[blockIdx.x];
  const TensorEntry& t = ts[blk.tensor];
  if (co_skipped(t)) return;
  const unsigned long long r = (unsigned long long)blk.chunk * CO_THREADS + threadIdx.x;
  const double md = mode[4 * blk.tensor], eps = co_params<AdamPParams>(t).eps;
  if (md == 0.0 || r >= t.rows || (md == 2.0 && r > 0)) return;
  // p̂ = p/(||p|| + eps): eps added to the norm, not a clamp.
  const double d = (md == 1.0 ? sqrt(rows[3 * (t.off + r) + 2]) : mode[4 * blk.tensor + 1]) + eps;
  coef[2 * (t.off + r)] = 1.0 / d;
  coef[2 * (t.off + r) + 1] = pu[t.off + r] / d;
}

template <typename P>
__device__ void adamp_pass2(const TensorEntry* __restrict__ ts, const BlockEntry* __restrict__ bs,
                            const double* __restrict__ mode, const double* __restrict__ coef) {
  typedef typename Elem<P>::M M;
  CO_TENSOR(t)
  const AdamPParams& q = co_params<AdamPParams>(t);
  const AdamPScalars<M> c(t, q);
  const double md = mode[4 * co_b.tensor];
  const double lr_wd = q.lr_wd, r = md != 0.0 ? q.wd_ratio : 1.0;
  const M decay = lr_wd > 0.0 ? (M)(1.0 - lr_wd * r) : M(1);
  const M linv = (M)coef[2 * t.off], lcoef = (M)coef[2 * t.off + 1];  // layer view
  const unsigned int row_len = (unsigned int)t.row_len;
  // m and v were written by pass 1; here they are only read.
  co_apply<P, false>(t, co_b, [&](unsigned long long i, M& p, M g, M* s) {
    const M pi = p;
    M u = c.u(s[0], s[1], g * c.gs);
    if (md == 1.0) {
      const unsigned long long k = 2 * (t.off + (unsigned int)i / row_len);
      u = u - (pi * (M)coef[k]) * (M)coef[k + 1];
    } else if (md == 2.0) {
      u = u - (pi * linv) * lcoef;
    }
    p = pi * decay + c.neg_ss * u;
  }, c.nesterov);  // u needs the gradient only with Nesterov
}

// Rank < 2: the plain Adam step with AdamP's decay (never projected).
template <typename P>
__device__ void adamp_plain(const TensorEntry* __restrict__ ts, const BlockEntry* __restrict__ bs) {
  typedef typename Elem<P>::M M;
  CO_TENSOR(t)
  const AdamPParams& q = co_params<AdamPParams>(t);
  const AdamPScalars<M> c(t, q);
  const M decay = q.lr_wd > 0.0 ? (M)(1.0 - q.lr_wd) : M(1);
  co_apply<P, true>(t, co_b, [&](unsigned long long, M& p, M g, M* s) {
    const M gi = g * c.gs;
    const M mi = s[0] * c.b1 + c.ob1 * gi;
    const M vi = s[1] * c.b2 + c.ob2 * gi * gi;
    s[0] = mi;
    s[1] = vi;
    p = p * decay + c.neg_ss * c.u(mi, vi, gi);
  });
}

#define ADAMP_ENTRIES(P, SUFFIX)                                                            \
  extern "C" __global__ void __launch_bounds__(CO_THREADS) adamp_pass1_##SUFFIX(            \
      const TensorEntry* ts, const BlockEntry* bs, double* rows) {                          \
    adamp_pass1<P>(ts, bs, rows);                                                           \
  }                                                                                         \
  extern "C" __global__ void __launch_bounds__(CO_THREADS) adamp_pu_##SUFFIX(               \
      const TensorEntry* ts, const BlockEntry* bs, const double* mode, double* pu) {        \
    adamp_pu<P>(ts, bs, mode, pu);                                                          \
  }                                                                                         \
  extern "C" __global__ void __launch_bounds__(CO_THREADS) adamp_pass2_##SUFFIX(            \
      const TensorEntry* ts, const BlockEntry* bs, const double* mode, const double* coef) { \
    adamp_pass2<P>(ts, bs, mode, coef);                                                     \
  }                                                                                         \
  CO_ENTRY_POINTS_AS(adamp_plain, P, SUFFIX)
ADAMP_ENTRIES(float, f32)
ADAMP_ENTRIES(double, f64)
ADAMP_ENTRIES(__nv_bfloat16, bf16)
ADAMP_ENTRIES(__half, f16)
