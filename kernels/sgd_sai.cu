// SGD-SaI (authors' code, all three gsnr modes: the per-tensor factor is folded into the step
// size on the host), one fused pass. Mirrors src/algorithms/sgd_sai.rs.
// Slots: s[0] momentum_buffer (absent when momentum = 0).
// Scalars: SgdSaiParams (params.cuh, generated from src/algorithms/sgd_sai.rs, which documents
// each field).
#include "common.cuh"

template <typename P>
__device__ void sgd_sai(const TensorEntry* __restrict__ ts, const BlockEntry* __restrict__ bs) {
  typedef typename Elem<P>::M M;
  CO_TENSOR(t)
  const SgdSaiParams& q = co_params<SgdSaiParams>(t);
  const M decay = (M)q.decay, neg_s = (M)(-q.step_size), mu = (M)q.momentum;
  const M omu = (M)q.one_minus_momentum, gs = (M)co_grad_scale(t, q.grad_scale);
  const bool first = q.first != 0, has_buf = t.s[0] != 0;
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
