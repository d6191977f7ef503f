// diffGrad v2 (authors' diffGrad_v2.py), one fused pass. Mirrors src/algorithms/diffgrad.rs.
// Slots: s[0] exp_avg, s[1] exp_avg_sq, s[2] previous_grad.
// Words: 0 weight decay (coupled L2), 1 beta1, 2 beta2, 3 eps,
//        4 step size lr*sqrt(bc2)/bc1, 5 grad scale.
#include "common.cuh"

template <typename P>
__device__ void diffgrad(const TensorEntry* __restrict__ ts, const BlockEntry* __restrict__ bs) {
  typedef typename Elem<P>::M M;
  CO_TENSOR(t)
  const double* w = t.w;
  const M wd = (M)w[0], b1 = (M)w[1], ob1 = (M)(1.0 - w[1]), b2 = (M)w[2], ob2 = (M)(1.0 - w[2]);
  const M eps = (M)w[3], neg_ss = (M)(-w[4]), gs = (M)w[5];
  const bool coupled = w[0] != 0.0;
  P* __restrict__ p = (P*)t.p;
  const P* __restrict__ g = (const P*)t.g;
  M* __restrict__ m = (M*)t.s[0];
  M* __restrict__ v = (M*)t.s[1];
  M* __restrict__ gp = (M*)t.s[2];
  CO_LOOP(t, i) {
    const M pi = Elem<P>::load(p[i]);
    M gi = Elem<P>::load(g[i]) * gs;
    if (coupled) gi = gi + wd * pi;
    const M mi = m[i] * b1 + ob1 * gi;
    const M vi = v[i] * b2 + ob2 * gi * gi;
    const M denom = sqrt(vi) + eps;
    const M dfc = M(1) / (M(1) + exp(-fabs(gp[i] - gi)));
    m[i] = mi;
    v[i] = vi;
    gp[i] = gi;
    p[i] = Elem<P>::store(pi + neg_ss * ((mi * dfc) / denom));
  }
}

CO_ENTRY_POINTS(diffgrad)
