// AdamW (torch.optim.AdamW, single-tensor math), one fused pass. Mirrors
// src/algorithms/adamw.rs (AdamWKernel::words gives the scalars in this order).
// Slots: s[0] exp_avg, s[1] exp_avg_sq, s[2] max_exp_avg_sq (amsgrad).
// Words: 0 decay = 1 - lr*wd, 1 lerp weight 1 - beta1, 2 beta2, 3 1 - beta2,
//        4 sqrt(bias_correction2), 5 step size lr/bias_correction1, 6 eps,
//        7 grad scale (clipping; negative for maximize), 8 amsgrad (0/1).
#include "common.cuh"

template <typename P>
__device__ void adamw(const TensorEntry* __restrict__ ts, const BlockEntry* __restrict__ bs) {
  typedef typename Elem<P>::M M;
  CO_TENSOR(t)
  const double* w = t.w;
  const M decay = (M)w[0], lw = (M)w[1], lw1 = M(1) - lw, b2 = (M)w[2], ob2 = (M)w[3];
  const M bc2s = (M)w[4], neg_step = (M)(-w[5]), eps = (M)w[6], gs = (M)w[7];
  const bool small_w = w[1] < 0.5, amsgrad = w[8] != 0.0;
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
