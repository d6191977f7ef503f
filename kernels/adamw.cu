// AdamW (torch.optim.AdamW, single-tensor math), one fused pass. Mirrors
// src/algorithms/adamw.rs. Slots: s[0] exp_avg, s[1] exp_avg_sq, s[2] max_exp_avg_sq (amsgrad).
// Scalars: AdamWParams (params.cuh, generated from src/algorithms/adamw.rs, which documents each
// field; AdamWKernel::params fills it).
#include "common.cuh"

template <typename P>
__device__ void adamw(const TensorEntry* __restrict__ ts, const BlockEntry* __restrict__ bs) {
  typedef typename Elem<P>::M M;
  CO_TENSOR(t)
  const AdamWParams& q = co_params<AdamWParams>(t);
  const M decay = (M)q.decay, lw = (M)q.lerp_w, lw1 = M(1) - lw, b2 = (M)q.beta2;
  const M ob2 = (M)q.one_minus_beta2, bc2s = (M)q.bc2_sqrt, neg_step = (M)(-q.step_size);
  const M eps = (M)q.eps, gs = (M)co_grad_scale(t, q.grad_scale);
  const bool small_w = q.lerp_w < 0.5, amsgrad = q.amsgrad != 0;
  co_apply<P, true>(t, co_b, [&](unsigned long long, M& p, M g, M* s) {
    const M gi = g * gs;
    const M pi = p * decay;
    const M m0 = s[0];
    const M mi = small_w ? m0 + lw * (gi - m0) : gi - (gi - m0) * lw1;  // torch.lerp
    const M vi = s[1] * b2 + ob2 * gi * gi;
    M vd = vi;
    if (amsgrad) {
      vd = max_nan(s[2], vi);
      s[2] = vd;
    }
    const M denom = sqrt(vd) / bc2s + eps;
    s[0] = mi;
    s[1] = vi;
    p = pi + neg_step * (mi / denom);
  });
}

CO_ENTRY_POINTS(adamw)
