// AdaBelief (adabelief-pytorch 0.2.1), one fused pass. Mirrors src/algorithms/adabelief.rs.
// Slots: s[0] exp_avg, s[1] exp_avg_var, s[2] max_exp_avg_var (amsgrad).
// Scalars: AdaBeliefParams (params.cuh, generated from src/algorithms/adabelief.rs, which
// documents each field; mode: 0 Adam, 1 rectified, 2 SGD, 3 no step).
#include "common.cuh"

template <typename P>
__device__ void adabelief(const TensorEntry* __restrict__ ts, const BlockEntry* __restrict__ bs) {
  typedef typename Elem<P>::M M;
  CO_TENSOR(t)
  const AdaBeliefParams& q = co_params<AdaBeliefParams>(t);
  const M decay = (M)q.decay, l2 = (M)q.l2, b1 = (M)q.beta1, ob1 = (M)(1.0 - q.beta1);
  const M b2 = (M)q.beta2, ob2 = (M)(1.0 - q.beta2), eps = (M)q.eps, bc2s = (M)q.bc2_sqrt;
  const M neg_step = (M)(-q.step), gs = (M)co_grad_scale(t, q.grad_scale);
  const int mode = (int)q.mode;
  const bool coupled = q.l2 != 0.0, amsgrad = q.amsgrad != 0;
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
