// AdaBelief (adabelief-pytorch 0.2.1), one fused pass. Mirrors src/algorithms/adabelief.rs.
// Slots: s[0] exp_avg, s[1] exp_avg_var, s[2] max_exp_avg_var (amsgrad).
// Words: 0 decay (1 - lr*wd, 1 - wd with fixed_decay, 1 for L2), 1 coupled L2 coefficient,
//        2 beta1, 3 beta2, 4 eps, 5 sqrt(bc2), 6 step (lr/bc1, k*lr rectified, lr/bc1 SGD),
//        7 mode (0 Adam, 1 rectified, 2 SGD, 3 no step), 8 grad scale, 9 amsgrad (0/1).
#include "common.cuh"

template <typename P>
__device__ void adabelief(const TensorEntry* __restrict__ ts, const BlockEntry* __restrict__ bs) {
  typedef typename Elem<P>::M M;
  CO_TENSOR(t)
  const double* w = t.w;
  const M decay = (M)w[0], l2 = (M)w[1], b1 = (M)w[2], ob1 = (M)(1.0 - w[2]);
  const M b2 = (M)w[3], ob2 = (M)(1.0 - w[3]), eps = (M)w[4], bc2s = (M)w[5];
  const M neg_step = (M)(-w[6]), gs = (M)w[8];
  const int mode = (int)w[7];
  const bool coupled = w[1] != 0.0, amsgrad = w[9] != 0.0;
  // s[0] m, s[1] var, s[2] max var (amsgrad)
  co_apply<P, true>(t, co_b, [&](unsigned long long, M& p, M g, M* s) {
    const M p0 = p;
    const M pi = p0 * decay;
    M gi = g * gs;
    if (coupled) gi = gi + l2 * p0;
    const M mi = s[0] * b1 + ob1 * gi;
    const M r = gi - mi;
    const M si = (s[1] * b2 + ob2 * r * r) + eps;
    s[0] = mi;
    s[1] = si;
    M vm = si;
    if (amsgrad) {
      vm = max_nan(s[2], si);
      s[2] = vm;
    }
    M out = pi;
    if (mode == 0) out = pi + neg_step * (mi / (sqrt(vm) / bc2s + eps));
    else if (mode == 1) out = pi + neg_step * (mi / (sqrt(si) + eps));
    else if (mode == 2) out = pi + neg_step * mi;
    p = out;
  });
}

CO_ENTRY_POINTS(adabelief)
