// Lion (google/automl lion_pytorch.py), one fused pass. Mirrors src/algorithms/lion.rs.
// Slots: s[0] exp_avg. Scalars: LionParams (params.cuh, generated from src/algorithms/lion.rs,
// which documents each field).
#include "common.cuh"

template <typename P>
__device__ void lion(const TensorEntry* __restrict__ ts, const BlockEntry* __restrict__ bs) {
  typedef typename Elem<P>::M M;
  CO_TENSOR(t)
  const LionParams& q = co_params<LionParams>(t);
  const M decay = (M)q.decay, neg_lr = (M)(-q.lr), b1 = (M)q.beta1, ob1 = (M)(1.0 - q.beta1);
  const M b2 = (M)q.beta2, ob2 = (M)(1.0 - q.beta2), gs = (M)co_grad_scale(t, q.grad_scale);
  co_apply<P, true>(t, co_b, [&](unsigned long long, M& p, M g, M* s) {
    const M gi = g * gs;
    const M mi = s[0];
    const M c = mi * b1 + gi * ob1;  // from the old momentum
    p = p * decay + neg_lr * sign0(c);
    s[0] = mi * b2 + ob2 * gi;
  });
}

CO_ENTRY_POINTS(lion)
