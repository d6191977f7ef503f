// diffGrad v2 (authors' diffGrad_v2.py), one fused pass. Mirrors src/algorithms/diffgrad.rs.
// Slots: s[0] exp_avg, s[1] exp_avg_sq, s[2] previous_grad.
// Scalars: DiffGradParams (params.cuh, generated from src/algorithms/diffgrad.rs, which
// documents each field).
#include "common.cuh"

template <typename P>
__device__ void diffgrad(const TensorEntry* __restrict__ ts, const BlockEntry* __restrict__ bs) {
  typedef typename Elem<P>::M M;
  CO_TENSOR(t)
  const DiffGradParams& q = co_params<DiffGradParams>(t);
  const M wd = (M)q.wd, b1 = (M)q.beta1, ob1 = (M)(1.0 - q.beta1), b2 = (M)q.beta2;
  const M ob2 = (M)(1.0 - q.beta2), eps = (M)q.eps, neg_ss = (M)(-q.step_size);
  const M gs = (M)co_grad_scale(t, q.grad_scale);
  const bool coupled = q.wd != 0.0;
  // s[0] m, s[1] v, s[2] previous gradient
  co_apply<P, true>(t, co_b, [&](unsigned long long, M& p, M g, M* s) {
    const M pi = p;
    M gi = g * gs;
    if (coupled) gi = gi + wd * pi;
    const M mi = s[0] * b1 + ob1 * gi;
    const M vi = s[1] * b2 + ob2 * gi * gi;
    const M denom = sqrt(vi) + eps;
    const M dfc = M(1) / (M(1) + exp(-fabs(s[2] - gi)));
    s[0] = mi;
    s[1] = vi;
    s[2] = gi;
    p = pi + neg_ss * ((mi * dfc) / denom);
  });
}

CO_ENTRY_POINTS(diffgrad)
