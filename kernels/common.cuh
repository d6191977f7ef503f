// Shared pieces of the fused optimizer kernels: element types, the multi-tensor tables, and
// the loop that walks them.
//
// One launch updates many tensors. The host passes two tables:
//   TensorEntry[t]: device pointers of parameter t, its gradient and up to four state slots,
//                   its length, and its step scalars: the kernel's parameter struct (computed
//                   on the host in f64 by the algorithm's Rust module; declared in params.cuh,
//                   generated from the Rust definition), read with co_params<XParams>(t);
//   BlockEntry[b]:  which tensor and which chunk of CO_CHUNK elements block b processes.
// Parameters are float, double, __nv_bfloat16 or __half; math and state are float (double
// for double parameters), exactly as on the CPU.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// CO_CHUNK, CO_THREADS, CO_MAX_SLOTS, CO_PARAM_BYTES, CO_ENTRY_BYTES, CO_ROW_SEG: generated
// from src/backend/kernel_abi.rs, the host's own constants.
#include "abi.cuh"
// Every kernel's parameter struct (SgdSaiParams, AdamWParams, ..., ReduceParams): generated
// from the `// cuda-params` structs of the Rust modules, layouts asserted on both sides.
#include "params.cuh"

struct TensorEntry {
  unsigned long long p, g, s[CO_MAX_SLOTS];
  unsigned long long n;        // elements
  unsigned long long rows;     // AdamP: shape[0]
  unsigned long long row_len;  // AdamP: n / rows
  unsigned long long off;      // AdamP: index of the tensor's first row in the row buffers
  // The kernel's parameter struct, written by the host field by field at the offsets
  // params.cuh asserts (padding zero); read only through co_params.
  alignas(8) unsigned char params[CO_PARAM_BYTES];
};
static_assert(sizeof(TensorEntry) == CO_ENTRY_BYTES, "TensorEntry layout is shared with src/backend/cuda.rs");

// The parameter struct T of tensor entry t (T one of params.cuh's structs, which are asserted to
// fit the area; the area is 8-aligned, as every field is at most 8 bytes).
template <typename T> __device__ __forceinline__ const T& co_params(const TensorEntry& t) {
  static_assert(sizeof(T) <= CO_PARAM_BYTES && alignof(T) <= 8, "fits TensorEntry::params");
  return *reinterpret_cast<const T*>(t.params);
}

struct BlockEntry {
  unsigned int tensor;
  unsigned int chunk;
};

template <typename P> struct Elem;
// load4/store4 move four consecutive elements with one vector access (16 bytes for float, 8
// for the 16-bit types); callers check alignment first. VEC is false where no such path is
// worth having (double runs the scalar loop).
template <> struct Elem<float> {
  typedef float M;
  static constexpr bool VEC = true;
  static __device__ __forceinline__ float load(float x) { return x; }
  static __device__ __forceinline__ float store(float x) { return x; }
  static __device__ __forceinline__ void load4(const float* p, float* o) {
    const float4 x = *reinterpret_cast<const float4*>(p);
    o[0] = x.x; o[1] = x.y; o[2] = x.z; o[3] = x.w;
  }
  static __device__ __forceinline__ void store4(float* p, const float* o) {
    *reinterpret_cast<float4*>(p) = make_float4(o[0], o[1], o[2], o[3]);
  }
};
template <> struct Elem<double> {
  typedef double M;
  static constexpr bool VEC = false;
  static __device__ __forceinline__ double load(double x) { return x; }
  static __device__ __forceinline__ double store(double x) { return x; }
  static __device__ __forceinline__ void load4(const double* p, double* o) {
    for (int k = 0; k < 4; ++k) o[k] = p[k];
  }
  static __device__ __forceinline__ void store4(double* p, const double* o) {
    for (int k = 0; k < 4; ++k) p[k] = o[k];
  }
};
template <> struct Elem<__nv_bfloat16> {
  typedef float M;
  static constexpr bool VEC = true;
  static __device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ void load4(const __nv_bfloat16* p, float* o) {
    const uint2 x = *reinterpret_cast<const uint2*>(p);
    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&x.x));
    const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&x.y));
    o[0] = a.x; o[1] = a.y; o[2] = b.x; o[3] = b.y;
  }
  static __device__ __forceinline__ void store4(__nv_bfloat16* p, const float* o) {
    const __nv_bfloat162 a = __floats2bfloat162_rn(o[0], o[1]);
    const __nv_bfloat162 b = __floats2bfloat162_rn(o[2], o[3]);
    uint2 x;
    x.x = *reinterpret_cast<const unsigned int*>(&a);
    x.y = *reinterpret_cast<const unsigned int*>(&b);
    *reinterpret_cast<uint2*>(p) = x;
  }
};
template <> struct Elem<__half> {
  typedef float M;
  static constexpr bool VEC = true;
  static __device__ __forceinline__ float load(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half store(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ void load4(const __half* p, float* o) {
    const uint2 x = *reinterpret_cast<const uint2*>(p);
    const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&x.x));
    const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&x.y));
    o[0] = a.x; o[1] = a.y; o[2] = b.x; o[3] = b.y;
  }
  static __device__ __forceinline__ void store4(__half* p, const float* o) {
    const __half2 a = __floats2half2_rn(o[0], o[1]);
    const __half2 b = __floats2half2_rn(o[2], o[3]);
    uint2 x;
    x.x = *reinterpret_cast<const unsigned int*>(&a);
    x.y = *reinterpret_cast<const unsigned int*>(&b);
    *reinterpret_cast<uint2*>(p) = x;
  }
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
// ... and the loop over the block's chunk of it. Scalars read from co_params between the two are
// computed once per block, not per element.
#define CO_LOOP(t, i)                                                                    \
  const unsigned long long co_start = (unsigned long long)co_b.chunk * CO_CHUNK;          \
  const unsigned long long co_end = min(co_start + (unsigned long long)CO_CHUNK, t.n);    \
  _Pragma("unroll 4") for (unsigned long long i = co_start + threadIdx.x; i < co_end;     \
                           i += blockDim.x)

// The element loop of a block's chunk [co_b.chunk * CO_CHUNK, ...) of tensor t, for kernels
// written as a per-element `op(i, p, g, s)`: p (in/out) and g in the math type, s[k] the
// tensor's state slot k (present where t.s[k] != 0; slots are M). p is always written back;
// slots too when STORE_SLOTS. With load_g false the gradient is not read (g is 0). Where every pointer allows it, each thread moves four
// consecutive elements per access (float4 for state): a memory-bound step needs few, wide
// accesses in flight to reach the bandwidth. The rest runs one element at a time. The
// arithmetic is the same on both paths, so results do not depend on alignment.
template <typename P, bool STORE_SLOTS, typename Op>
__device__ __forceinline__ void co_apply(const TensorEntry& t, const BlockEntry& b, Op op,
                                         bool load_g = true) {
  typedef typename Elem<P>::M M;
  const unsigned long long start = (unsigned long long)b.chunk * CO_CHUNK;
  const unsigned long long end = min(start + (unsigned long long)CO_CHUNK, t.n);
  P* __restrict__ p = (P*)t.p;
  const P* __restrict__ g = (const P*)t.g;
  M* s[CO_MAX_SLOTS];
  bool has[CO_MAX_SLOTS];
  bool vec = Elem<P>::VEC && ((t.p | t.g) % (4 * sizeof(P))) == 0;
#pragma unroll
  for (int k = 0; k < CO_MAX_SLOTS; ++k) {
    s[k] = (M*)t.s[k];
    has[k] = t.s[k] != 0;
    if (has[k]) vec = vec && (t.s[k] % (4 * sizeof(M))) == 0;
  }
  unsigned long long rest = start;
  if (vec) {
    const unsigned long long nv = (end - start) / 4;
#pragma unroll 2
    for (unsigned long long j = threadIdx.x; j < nv; j += blockDim.x) {
      const unsigned long long i = start + 4 * j;
      M pv[4], gv[4] = {}, sv[CO_MAX_SLOTS][4] = {};
      Elem<P>::load4(p + i, pv);
      if (load_g) Elem<P>::load4(g + i, gv);
#pragma unroll
      for (int k = 0; k < CO_MAX_SLOTS; ++k)
        if (has[k]) Elem<M>::load4(s[k] + i, sv[k]);
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        M sl[CO_MAX_SLOTS];
#pragma unroll
        for (int k = 0; k < CO_MAX_SLOTS; ++k) sl[k] = sv[k][l];
        op(i + l, pv[l], gv[l], sl);
#pragma unroll
        for (int k = 0; k < CO_MAX_SLOTS; ++k) sv[k][l] = sl[k];
      }
      Elem<P>::store4(p + i, pv);
      if (STORE_SLOTS) {
#pragma unroll
        for (int k = 0; k < CO_MAX_SLOTS; ++k)
          if (has[k]) Elem<M>::store4(s[k] + i, sv[k]);
      }
    }
    rest = start + 4 * nv;
  }
  for (unsigned long long i = rest + threadIdx.x; i < end; i += blockDim.x) {
    M pl = Elem<P>::load(p[i]);
    M sl[CO_MAX_SLOTS] = {};
#pragma unroll
    for (int k = 0; k < CO_MAX_SLOTS; ++k)
      if (has[k]) sl[k] = s[k][i];
    op(i, pl, load_g ? Elem<P>::load(g[i]) : M(0), sl);
    p[i] = Elem<P>::store(pl);
    if (STORE_SLOTS) {
#pragma unroll
      for (int k = 0; k < CO_MAX_SLOTS; ++k)
        if (has[k]) s[k][i] = sl[k];
    }
  }
}

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
