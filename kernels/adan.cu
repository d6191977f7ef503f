// Adan (sail-sg/Adan adan.py, code-convention betas), one fused pass. Mirrors
// src/algorithms/adan.rs. Slots: s[0] exp_avg m, s[1] exp_avg_sq n, s[2] exp_avg_diff d,
// s[3] neg_pre_grad q (= -previous clipped gradient).
// Scalars: AdanParams (params.cuh, generated from src/algorithms/adan.rs, which documents each
// field).
#include "common.cuh"

template <typename P>
__device__ void adan(const TensorEntry* __restrict__ ts, const BlockEntry* __restrict__ bs) {
  typedef typename Elem<P>::M M;
  CO_TENSOR(t)
  const AdanParams& q = co_params<AdanParams>(t);
  const M b1 = (M)q.beta1, ob1 = (M)(1.0 - q.beta1), b2 = (M)q.beta2, ob2 = (M)(1.0 - q.beta2);
  const M b3 = (M)q.beta3, ob3 = (M)(1.0 - q.beta3), bc3s = (M)q.bc3_sqrt, eps = (M)q.eps;
  const M neg_ss = (M)(-q.step_size), neg_ssd = (M)(-q.step_size_diff), decay = (M)q.decay;
  const M prox = (M)q.prox_div, gs = (M)co_grad_scale(t, q.grad_scale);
  const bool no_prox = q.no_prox != 0, first = q.first != 0;
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
