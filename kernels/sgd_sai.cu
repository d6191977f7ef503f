// SGD-SaI (authors' code, all three gsnr modes: the per-tensor factor is folded into the step
// size on the host), one fused pass. Mirrors src/algorithms/sgd_sai.rs.
// Slots: s[0] momentum_buffer (absent when momentum = 0).
// Words: 0 decay = 1 - wd*lr, 1 step size lr*gsnr (/max), 2 momentum, 3 1 - momentum,
//        4 first step of this tensor (0/1: buf = g), 5 grad scale.
#include "common.cuh"

template <typename P>
__device__ void sgd_sai(const TensorEntry* __restrict__ ts, const BlockEntry* __restrict__ bs) {
  typedef typename Elem<P>::M M;
  CO_TENSOR(t)
  const double* w = t.w;
  const M decay = (M)w[0], neg_s = (M)(-w[1]), mu = (M)w[2], omu = (M)w[3], gs = (M)w[5];
  const bool first = w[4] != 0.0, has_buf = t.s[0] != 0;
  co_apply<P, true>(t, co_b, [&](unsigned long long, M& p, M g, M* s) {
    const M gi = g * gs;
    M b = gi;
    if (has_buf) {
      if (!first) b = s[0] * mu + omu * gi;
      s[0] = b;
    }
    p = p * decay + neg_s * b;
  });
}

CO_ENTRY_POINTS(sgd_sai)
