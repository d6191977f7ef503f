// Muon (torch.optim.Muon), its two element-wise passes; Newton–Schulz between them runs as
// batched matmuls (src/backend/matrix.rs). Mirrors MuonKernel::apply in src/algorithms/muon.rs.
// Blend (pass 0): slots s[0] momentum B, s[1] the Newton–Schulz input U (written), p unchanged.
// Update (pass 1): slot s[0] the Newton–Schulz output O; p = p*decay - lr_adj*O, g unread.
// Scalars: MuonParams (params.cuh, generated from src/algorithms/muon.rs, which documents them).
#include "common.cuh"

template <typename P>
__device__ void muon(const TensorEntry* __restrict__ ts, const BlockEntry* __restrict__ bs) {
  typedef typename Elem<P>::M M;
  CO_TENSOR(t)
  const MuonParams& q = co_params<MuonParams>(t);
  if (q.pass == 0u) {
    const M w = (M)q.lerp_w, w1 = M(1) - w, gs = (M)co_grad_scale(t, q.grad_scale);
    const M mu = (M)q.mu, mu1 = M(1) - mu;
    const bool w_small = q.lerp_w < 0.5, mu_small = q.mu < 0.5, nesterov = q.nesterov != 0u;
    co_apply<P, true>(t, co_b, [&](unsigned long long, M& p, M g, M* s) {
      const M gi = g * gs;
      const M b0 = s[0];
      const M bi = w_small ? b0 + w * (gi - b0) : gi - (gi - b0) * w1;  // torch.lerp
      s[0] = bi;
      s[1] = nesterov ? (mu_small ? gi + mu * (bi - gi) : bi - (bi - gi) * mu1) : bi;
    });
  } else if (q.pass == 1u) {
    const M decay = (M)q.decay, neg_lr = (M)(-q.lr_adj);
    co_apply<P, false>(
        t, co_b, [&](unsigned long long, M& p, M, M* s) { p = p * decay + neg_lr * s[0]; },
        false);
  }
}

CO_ENTRY_POINTS(muon)
