// Adan (sail-sg/Adan adan.py, code-convention betas), one fused pass. Mirrors
// src/algorithms/adan.rs. Slots: s[0] exp_avg m, s[1] exp_avg_sq n, s[2] exp_avg_diff d,
// s[3] neg_pre_grad q (= -previous clipped gradient).
// Words: 0 beta1, 1 beta2, 2 beta3, 3 sqrt(bc3), 4 eps, 5 lr/bc1, 6 lr*beta2/bc2,
//        7 decay 1 - lr*wd (no_prox), 8 1 + lr*wd (proximal), 9 no_prox (0/1),
//        10 first step (0/1: previous gradient = current), 11 grad scale (clipping).
#include "common.cuh"

template <typename P>
__device__ void adan(const TensorEntry* __restrict__ ts, const BlockEntry* __restrict__ bs) {
  typedef typename Elem<P>::M M;
  CO_TENSOR(t)
  const double* w = t.w;
  const M b1 = (M)w[0], ob1 = (M)(1.0 - w[0]), b2 = (M)w[1], ob2 = (M)(1.0 - w[1]);
  const M b3 = (M)w[2], ob3 = (M)(1.0 - w[2]), bc3s = (M)w[3], eps = (M)w[4];
  const M neg_ss = (M)(-w[5]), neg_ssd = (M)(-w[6]), decay = (M)w[7], prox = (M)w[8];
  const M gs = (M)w[11];
  const bool no_prox = w[9] != 0.0, first = w[10] != 0.0;
  // s[0] m, s[1] n, s[2] d, s[3] q
  co_apply<P, true>(t, co_b, [&](unsigned long long, M& p, M g, M* s) {
    const M gi = g * gs;
    const M q0 = first ? -gi : s[3];
    const M diff = q0 + gi;
    const M mi = s[0] * b1 + ob1 * gi;
    const M di = s[2] * b2 + ob2 * diff;
    const M u = diff * b2 + gi;
    const M ni = s[1] * b3 + ob3 * u * u;
    const M denom = sqrt(ni) / bc3s + eps;
    M pi = p;
    if (no_prox) pi = pi * decay;
    pi = pi + neg_ss * (mi / denom);
    pi = pi + neg_ssd * (di / denom);
    if (!no_prox) pi = pi / prox;
    s[0] = mi;
    s[2] = di;
    s[1] = ni;
    s[3] = -gi;
    p = pi;
  });
}

CO_ENTRY_POINTS(adan)
