// Shared pieces of the fused optimizer kernels: element types, the multi-tensor tables, and
// the loop that walks them.
//
// One launch updates many tensors. The host passes two tables:
//   TensorEntry[t]: device pointers of parameter t, its gradient and up to four state slots,
//                   its length, and its step scalars `w` (computed on the host in f64 by the
//                   algorithm's Rust module, in the order documented in each .cu file);
//   BlockEntry[b]:  which tensor and which chunk of CO_CHUNK elements block b processes.
// Parameters are float, double, __nv_bfloat16 or __half; math and state are float (double
// for double parameters), exactly as on the CPU.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define CO_CHUNK 16384
#define CO_THREADS 256
#define CO_MAX_SLOTS 4
#define CO_WORDS 16

struct TensorEntry {
  unsigned long long p, g, s[CO_MAX_SLOTS];
  unsigned long long n;        // elements
  unsigned long long rows;     // AdamP: shape[0]
  unsigned long long row_len;  // AdamP: n / rows
  unsigned long long off;      // AdamP: index of the tensor's first row in the row buffers
  double w[CO_WORDS];
};
static_assert(sizeof(TensorEntry) == 208, "TensorEntry layout is shared with src/backend/cuda.rs");

struct BlockEntry {
  unsigned int tensor;
  unsigned int chunk;
};

template <typename P> struct Elem;
template <> struct Elem<float> {
  typedef float M;
  static __device__ __forceinline__ float load(float x) { return x; }
  static __device__ __forceinline__ float store(float x) { return x; }
};
template <> struct Elem<double> {
  typedef double M;
  static __device__ __forceinline__ double load(double x) { return x; }
  static __device__ __forceinline__ double store(double x) { return x; }
};
template <> struct Elem<__nv_bfloat16> {
  typedef float M;
  static __device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};
template <> struct Elem<__half> {
  typedef float M;
  static __device__ __forceinline__ float load(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half store(float x) { return __float2half_rn(x); }
};

// ±1, and the value itself for ±0 and NaN: torch.sign for every non-NaN input; NaN stays NaN
// (torch's CPU sign gives 0), so a NaN gradient is never turned into "no update".
template <typename M> __device__ __forceinline__ M sign0(M x) {
  return x > M(0) ? M(1) : (x < M(0) ? M(-1) : x);
}

// torch.maximum: NaN if either side is NaN.
template <typename M> __device__ __forceinline__ M max_nan(M a, M b) {
  return (a != a || a > b) ? a : b;
}

// The tensor of this block (`t`, a reference into the table) ...
#define CO_TENSOR(t)                     \
  const BlockEntry co_b = bs[blockIdx.x]; \
  const TensorEntry& t = ts[co_b.tensor];
// ... and the loop over the block's chunk of it. Scalars read from t.w between the two are
// computed once per block, not per element.
#define CO_LOOP(t, i)                                                                    \
  const unsigned long long co_start = (unsigned long long)co_b.chunk * CO_CHUNK;          \
  const unsigned long long co_end = min(co_start + (unsigned long long)CO_CHUNK, t.n);    \
  _Pragma("unroll 4") for (unsigned long long i = co_start + threadIdx.x; i < co_end;     \
                           i += blockDim.x)

// Declares `extern "C"` entry points NAME_f32, NAME_f64, NAME_bf16, NAME_f16 for a templated
// device function NAME<P>(ts, bs).
#define CO_ENTRY_POINTS(NAME)                                                              \
  extern "C" __global__ void __launch_bounds__(CO_THREADS)                                 \
      NAME##_f32(const TensorEntry* ts, const BlockEntry* bs) { NAME<float>(ts, bs); }      \
  extern "C" __global__ void __launch_bounds__(CO_THREADS)                                 \
      NAME##_f64(const TensorEntry* ts, const BlockEntry* bs) { NAME<double>(ts, bs); }     \
  extern "C" __global__ void __launch_bounds__(CO_THREADS)                                 \
      NAME##_bf16(const TensorEntry* ts, const BlockEntry* bs) { NAME<__nv_bfloat16>(ts, bs); } \
  extern "C" __global__ void __launch_bounds__(CO_THREADS)                                 \
      NAME##_f16(const TensorEntry* ts, const BlockEntry* bs) { NAME<__half>(ts, bs); }

// Sum over the block (blockDim.x == CO_THREADS) in a fixed order; the result is valid in
// thread 0.
__device__ __forceinline__ double block_sum(double x) {
  __shared__ double co_smem[CO_THREADS / 32];
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) co_smem[warp] = x;
  __syncthreads();
  x = 0.0;
  if (warp == 0) {
    x = lane < CO_THREADS / 32 ? co_smem[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  }
  return x;
}

__device__ __forceinline__ double warp_sum(double x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  return x;
}
