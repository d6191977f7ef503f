// Lion (google/automl lion_pytorch.py), one fused pass. Mirrors src/algorithms/lion.rs.
// Slots: s[0] exp_avg. Words: 0 decay = 1 - lr*wd, 1 lr, 2 beta1, 3 beta2, 4 grad scale.
#include "common.cuh"

template <typename P>
__device__ void lion(const TensorEntry* __restrict__ ts, const BlockEntry* __restrict__ bs) {
  typedef typename Elem<P>::M M;
  CO_TENSOR(t)
  const double* w = t.w;
  const M decay = (M)w[0], neg_lr = (M)(-w[1]), b1 = (M)w[2], ob1 = (M)(1.0 - w[2]);
  const M b2 = (M)w[3], ob2 = (M)(1.0 - w[3]), gs = (M)w[4];
  co_apply<P, true>(t, co_b, [&](unsigned long long, M& p, M g, M* s) {
    const M gi = g * gs;
    const M mi = s[0];
    const M c = mi * b1 + gi * ob1;  // from the old momentum
    p = p * decay + neg_lr * sign0(c);
    s[0] = mi * b2 + ob2 * gi;
  });
}

CO_ENTRY_POINTS(lion)
