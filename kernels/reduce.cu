// Multi-tensor gradient reductions for the driver (non-finite check, global-norm clipping),
// SGD-SaI's first-step g-SNR and Adan's clipping. Each block writes its partial sums to its
// own slot (no atomics), and `reduce_partials` adds each tensor's partials in block order, so
// results are deterministic. The tensor reduced is TensorEntry::p; `centered` reads the mean
// from its ReduceParams (params.cuh, generated from src/reduce.rs).
#include "common.cuh"

// out[3b] = Σx, out[3b+1] = Σx², out[3b+2] = Σx·0 over block b's chunk, in double. The last
// is ±0 when every element is finite and NaN otherwise: an exact finiteness test in the same
// pass (Σx² can overflow for finite doubles).
template <typename P>
__device__ void sums(const TensorEntry* __restrict__ ts, const BlockEntry* __restrict__ bs,
                     double* __restrict__ out) {
  CO_TENSOR(t)
  const P* __restrict__ x = (const P*)t.p;
  double s = 0.0, q = 0.0, z = 0.0;
  CO_LOOP(t, i) {
    const double v = (double)Elem<P>::load(x[i]);
    s += v;
    q += v * v;
    z += v * 0.0;
  }
  s = block_sum(s);
  q = block_sum(q);
  z = block_sum(z);
  if (threadIdx.x == 0) {
    out[3 * blockIdx.x] = s;
    out[3 * blockIdx.x + 1] = q;
    out[3 * blockIdx.x + 2] = z;
  }
}

// out[b] = Σ(x − mean)² over block b's chunk, mean = ReduceParams::mean.
template <typename P>
__device__ void centered(const TensorEntry* __restrict__ ts, const BlockEntry* __restrict__ bs,
                         double* __restrict__ out) {
  CO_TENSOR(t)
  const P* __restrict__ x = (const P*)t.p;
  const double mean = co_params<ReduceParams>(t).mean;
  double q = 0.0;
  CO_LOOP(t, i) {
    const double d = (double)Elem<P>::load(x[i]) - mean;
    q += d * d;
  }
  q = block_sum(q);
  if (threadIdx.x == 0) out[blockIdx.x] = q;
}

#define CO_REDUCE_ENTRY(NAME, P, SUFFIX)                                                    \
  extern "C" __global__ void __launch_bounds__(CO_THREADS)                                  \
      NAME##_##SUFFIX(const TensorEntry* ts, const BlockEntry* bs, double* out) {          \
    NAME<P>(ts, bs, out);                                                                   \
  }
CO_REDUCE_ENTRY(sums, float, f32)
CO_REDUCE_ENTRY(sums, double, f64)
CO_REDUCE_ENTRY(sums, __nv_bfloat16, bf16)
CO_REDUCE_ENTRY(sums, __half, f16)
CO_REDUCE_ENTRY(centered, float, f32)
CO_REDUCE_ENTRY(centered, double, f64)
CO_REDUCE_ENTRY(centered, __nv_bfloat16, bf16)
CO_REDUCE_ENTRY(centered, __half, f16)

// One block per tensor t: out[t*width + k] = Σ partials[b*width + k] over the tensor's blocks
// b in [first[t], first[t+1]), added in a fixed order.
extern "C" __global__ void __launch_bounds__(CO_THREADS)
    reduce_partials(const double* __restrict__ partials, const unsigned int* __restrict__ first,
                    unsigned int width, double* __restrict__ out) {
  const unsigned int t = blockIdx.x;
  for (unsigned int k = 0; k < width; ++k) {
    double s = 0.0;
    for (unsigned int b = first[t] + threadIdx.x; b < first[t + 1]; b += blockDim.x)
      s += partials[b * width + k];
    s = block_sum(s);
    if (threadIdx.x == 0) out[t * width + k] = s;
  }
}

// The verdict of a step decided on the device (the driver's check_and_clip, without reading
// anything back): from the per-tensor totals of sums_* (width 3: Σx, Σx², Σx·0), row[i] the
// row of the step's i-th gradient in `totals` (n gradients), the host's factor `scale`, the
// clipping threshold (0: none) and whether a non-finite gradient skips the step. One thread adds
// in gradient order, exactly as the host does, so the norm and the factor are the synchronous
// path's bit for bit.
extern "C" __global__ void step_verdict(const double* __restrict__ totals,
                                        const unsigned int* __restrict__ row, unsigned int n,
                                        double scale, double max_norm, unsigned int skip_policy,
                                        StepControl* __restrict__ out) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  double q = 0.0;
  unsigned int bad = 0xFFFFFFFFu;
  for (unsigned int i = 0; i < n; ++i) {
    q += totals[3 * row[i] + 1];
    const double z = totals[3 * row[i] + 2];
    if (z != z && bad == 0xFFFFFFFFu) bad = i;
  }
  StepControl c;
  c.skip = (skip_policy != 0u && bad != 0xFFFFFFFFu) ? 1u : 0u;
  c.bad = bad;
  c.norm = sqrt(q * (scale * scale));
  // torch.nn.utils.clip_grad_norm_: max / (norm + 1e-6), at most 1 (fmin: 1 for a NaN norm, as
  // the host's f64::min).
  c.grad_mul = max_norm > 0.0 ? fmin(max_norm / (c.norm + 1e-6), 1.0) : 1.0;
  *out = c;
}
