// SGD with momentum (torch.optim.SGD, _single_tensor_sgd), one fused pass. Mirrors
// src/algorithms/sgd.rs. Slots: s[0] momentum_buffer (absent when momentum = 0).
// Scalars: SgdParams (params.cuh, generated from src/algorithms/sgd.rs, which documents each
// field; maximize is the sign of grad_scale).
#include "common.cuh"

template <typename P>
__device__ void sgd(const TensorEntry* __restrict__ ts, const BlockEntry* __restrict__ bs) {
  typedef typename Elem<P>::M M;
  CO_TENSOR(t)
  const SgdParams& q = co_params<SgdParams>(t);
  const M neg_lr = (M)(-q.lr), mu = (M)q.momentum, omd = (M)q.one_minus_dampening;
  const M wd = (M)q.weight_decay, gs = (M)co_grad_scale(t, q.grad_scale);
  const bool has_wd = q.weight_decay != 0.0, has_buf = q.momentum != 0.0;
  const bool first = q.first != 0, nesterov = q.nesterov != 0;
  co_apply<P, true>(t, co_b, [&](unsigned long long, M& p, M g, M* s) {
    M gi = g * gs;
    if (has_wd) gi = gi + wd * p;  // coupled L2
    if (has_buf) {
      const M b = first ? gi : s[0] * mu + omd * gi;  // the first buffer is a copy of g
      s[0] = b;
      gi = nesterov ? gi + mu * b : b;
    }
    p = p + neg_lr * gi;
  });
}

CO_ENTRY_POINTS(sgd)
