// Shared pieces of the fused optimizer kernels: element types, the multi-tensor tables, and
// the loop that walks them.
//
// One launch updates many tensors. The host passes two tables:
//   TensorEntry[t]: device pointers of parameter t, its gradient and up to four state slots,
//                   its length, how the slots are stored (formats, 8-bit absmax, the quantizer
//                   table) and whether the parameter is rounded stochastically, and its step
//                   scalars: the kernel's parameter struct (computed on the host in f64 by the
//                   algorithm's Rust module; declared in params.cuh, generated from the Rust
//                   definition), read with co_params<XParams>(t);
//   BlockEntry[b]:  which tensor and which chunk of CO_CHUNK elements block b processes.
// Parameters are float, double, __nv_bfloat16 or __half; math is float (double for double
// parameters), exactly as on the CPU. State is kept in the math type, in bf16, or as 8-bit
// blockwise codes (src/state.rs, ALGORITHMS.md §12); bf16 parameters may be written back with
// stochastic rounding. Both are bit for bit the CPU's.
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
  // How the slots are stored. Byte k of `fmt` is slot k's format: CO_FMT_FULL (the math type at
  // s[k]; fmt == 0: every slot, today's path), CO_FMT_BF16 (bf16 at s[k]) or CO_FMT_Q8 (u8
  // codes at s[k], an f32 absmax per CO_QBLOCK elements at absmax[k], the signed map where bit
  // k of `flags` is set, else the unsigned one).
  unsigned long long absmax[CO_MAX_SLOTS];
  unsigned long long qtab;  // the device's quantizer table (maps, LUTs; CO_QTAB_*) for 8-bit slots
  unsigned long long key;   // the stochastic-rounding stream of a bf16 parameter (CO_FLAG_SR)
  // The step's verdict decided on the device (StepControl, written by reduce.cu's step_verdict
  // earlier on the same stream), or 0: see co_skipped and co_grad_scale.
  unsigned long long ctl;
  unsigned int fmt;
  unsigned int flags;       // bits 0..CO_MAX_SLOTS: signed map; CO_FLAG_SR: stochastic rounding
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

// Whether the step this tensor belongs to was skipped on the device (a non-finite gradient): every
// kernel that writes a parameter or its state returns before touching it. The test is per
// tensor, so a whole block returns together (no __syncthreads is left waiting).
__device__ __forceinline__ bool co_skipped(const TensorEntry& t) {
  return t.ctl != 0ull && reinterpret_cast<const StepControl*>(t.ctl)->skip != 0u;
}

// The factor the gradient is multiplied by: the host's `grad_scale` (loss scale, maximize sign)
// times the clipping factor decided on the device, in double as the host forms it.
__device__ __forceinline__ double co_grad_scale(const TensorEntry& t, double host_scale) {
  return t.ctl != 0ull ? host_scale * reinterpret_cast<const StepControl*>(t.ctl)->grad_mul
                       : host_scale;
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
  static constexpr bool SR = false;
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
  static constexpr bool SR = false;
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
  static constexpr bool SR = true;  // written back stochastically under CO_FLAG_SR
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
  static constexpr bool SR = false;
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

// The parameter type P through the general element loop. The kernels are templates over
// their parameter type, and CO_ENTRY_POINTS instantiates each twice: NAME_<dtype> as NAME<P>
// (every slot in the math type, no stochastic rounding: co_apply's four-wide loop alone, so
// its registers, and with them its occupancy and speed, are those of a kernel without state
// formats) and NAME_fmt_<dtype> as NAME<CoFmt<P>> (per tensor: slots in bf16 or 8 bits,
// stochastic rounding of bf16 parameters, or neither). The host picks the entry point per
// launch from its tensors. Elem<CoFmt<P>> is Elem<P>; CoParam<X>::T is the storage type.
template <typename P> struct CoFmt;
template <typename P> struct Elem<CoFmt<P>> : Elem<P> {};
template <typename P> struct CoParam {
  typedef P T;
  static constexpr bool FMT = false;
};
template <typename P> struct CoParam<CoFmt<P>> {
  typedef P T;
  static constexpr bool FMT = true;
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

// The tensor of this block (`t`, a reference into the table; the block returns when its step was
// skipped on the device) ...
#define CO_TENSOR(t)                     \
  const BlockEntry co_b = bs[blockIdx.x]; \
  const TensorEntry& t = ts[co_b.tensor]; \
  if (co_skipped(t)) return;
// ... and the loop over the block's chunk of it. Scalars read from co_params between the two are
// computed once per block, not per element.
#define CO_LOOP(t, i)                                                                    \
  const unsigned long long co_start = (unsigned long long)co_b.chunk * CO_CHUNK;          \
  const unsigned long long co_end = min(co_start + (unsigned long long)CO_CHUNK, t.n);    \
  _Pragma("unroll 4") for (unsigned long long i = co_start + threadIdx.x; i < co_end;     \
                           i += blockDim.x)

// ---- Stochastic rounding of bf16 parameters (src/state.rs random_bits, src/elem.rs
// bf16_stochastic, bit for bit) ----

// 32 random bits for element i of stream key: the SplitMix64 finalizer of key ^ i·φ.
__device__ __forceinline__ unsigned int co_random_bits(unsigned long long key, unsigned long long i) {
  unsigned long long z = key ^ (i * 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return (unsigned int)(z ^ (z >> 31));
}

// The bits of bf16 from x rounded up with the probability of the dropped fraction (16 random
// bits added below the kept part, then truncated); infinities and NaN as the CPU's
// `bf16::from_f32`.
__device__ __forceinline__ unsigned int co_bf16_sr_bits(float x, unsigned int r) {
  const unsigned int b = __float_as_uint(x);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return (b >> 16) | 0x0040u;  // NaN: quiet, payload kept
  if ((b & 0x7FFFFFFFu) == 0x7F800000u) return b >> 16;             // ±inf
  return (b + (r & 0xFFFFu)) >> 16;
}

__device__ __forceinline__ __nv_bfloat16 co_bf16_sr(float x, unsigned int r) {
  return __ushort_as_bfloat16((unsigned short)co_bf16_sr_bits(x, r));
}

// The parameter element i from x: stochastically for bf16 under SR, else Elem<P>::store.
template <typename P, bool SR>
__device__ __forceinline__ P co_store_p(typename Elem<P>::M x, unsigned long long key,
                                        unsigned long long i) {
  if constexpr (SR && Elem<P>::SR) {
    return co_bf16_sr(x, co_random_bits(key, i));
  } else {
    return Elem<P>::store(x);
  }
}

// Four parameter elements [i, i + 4) from o (p + i aligned as for Elem<P>::store4).
template <typename P, bool SR>
__device__ __forceinline__ void co_store4_p(P* p, const typename Elem<P>::M* o,
                                            unsigned long long key, unsigned long long i) {
  if constexpr (SR && Elem<P>::SR) {
    unsigned int h[4];
#pragma unroll
    for (int l = 0; l < 4; ++l) h[l] = co_bf16_sr_bits(o[l], co_random_bits(key, i + l));
    uint2 x;
    x.x = h[0] | h[1] << 16;
    x.y = h[2] | h[3] << 16;
    *reinterpret_cast<uint2*>(p + i) = x;
  } else {
    Elem<P>::store4(p + i, o);
  }
}

// ---- The element loop ----

// The element loop of a block's chunk [co_b.chunk * CO_CHUNK, ...) of tensor t, for kernels
// written as a per-element `op(i, p, g, s)`: p (in/out) and g in the math type, s[k] the
// tensor's state slot k (present where t.s[k] != 0) in the math type, whatever its storage.
// p is always written back; slots too when STORE_SLOTS. With load_g false the gradient is not
// read (g is 0).
//
// Two paths (co_apply, at the end, picks one per tensor, uniform over the block): every slot
// in the math type (t.fmt == 0) takes co_apply_full (stochastic rounding of a bf16 parameter
// changes only its store); any slot in bf16 or 8 bits takes co_apply_staged, a warp per
// quantization block. The arithmetic of `op` is the same on every path, and so are the
// results: per element, the slots are decoded, `op` runs, the slots are encoded, as on the CPU
// (src/backend/staged.rs).
//
// co_apply_full: where every pointer allows it, each thread moves four consecutive elements
// per access (float4 for state): a memory-bound step needs few, wide accesses in flight to
// reach the bandwidth. The rest runs one element at a time.
template <typename P, bool STORE_SLOTS, bool SR, typename Op>
__device__ __forceinline__ void co_apply_full(const TensorEntry& t, const BlockEntry& b, Op op,
                                              bool load_g) {
  typedef typename Elem<P>::M M;
  const unsigned long long start = (unsigned long long)b.chunk * CO_CHUNK;
  const unsigned long long end = min(start + (unsigned long long)CO_CHUNK, t.n);
  P* __restrict__ p = (P*)t.p;
  const P* __restrict__ g = (const P*)t.g;
  const unsigned long long key = t.key;
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
      co_store4_p<P, SR>(p, pv, key, i);
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
    p[i] = co_store_p<P, SR>(pl, key, i);
    if (STORE_SLOTS) {
#pragma unroll
      for (int k = 0; k < CO_MAX_SLOTS; ++k)
        if (has[k]) s[k][i] = sl[k];
    }
  }
}

// ---- State formats: eight elements per lane, a warp per quantization block ----

// Slot k's format (one byte of t.fmt).
__device__ __forceinline__ unsigned int co_slot_fmt(const TensorEntry& t, int k) {
  return (t.fmt >> (8 * k)) & 0xFFu;
}

// Whether any present slot of t is 8-bit.
__device__ __forceinline__ bool co_has_q8(const TensorEntry& t) {
  bool q = false;
#pragma unroll
  for (int k = 0; k < CO_MAX_SLOTS; ++k) q = q || (t.s[k] != 0 && co_slot_fmt(t, k) == CO_FMT_Q8);
  return q;
}

// Copies both maps (signed at 0, unsigned at 256) of the quantizer table into `maps` when t
// has an 8-bit slot. Every thread of the block must call it (it synchronizes the block).
__device__ __forceinline__ void co_load_maps(const TensorEntry& t, float* maps) {
  if (co_has_q8(t)) {
    const float* m = (const float*)t.qtab;
    for (unsigned int j = threadIdx.x; j < 512; j += blockDim.x) maps[j] = m[j];
    __syncthreads();
  }
}

// Elements [i, i + cnt) (cnt <= 8) of x into o[0..cnt) as M (the rest of o is left as it is);
// with vec (cnt == 8 and x + i aligned for Elem<T>::load4) as two four-wide accesses.
template <typename T, typename M>
__device__ __forceinline__ void co_load8(const T* __restrict__ x, unsigned long long i, int cnt,
                                         bool vec, M* o) {
  if (vec) {
    typename Elem<T>::M a[8];
    Elem<T>::load4(x + i, a);
    Elem<T>::load4(x + i + 4, a + 4);
#pragma unroll
    for (int l = 0; l < 8; ++l) o[l] = (M)a[l];
  } else {
#pragma unroll
    for (int l = 0; l < 8; ++l)
      if (l < cnt) o[l] = (M)Elem<T>::load(x[i + l]);
  }
}

// v[0..cnt) into elements [i, i + cnt) of x, rounded to T (to nearest-even; through float
// first where T's math type is float, as the CPU does); vec as for co_load8.
template <typename T, typename M>
__device__ __forceinline__ void co_store8(T* __restrict__ x, unsigned long long i, int cnt,
                                          bool vec, const M* v) {
  typedef typename Elem<T>::M E;
  if (vec) {
    E a[8];
#pragma unroll
    for (int l = 0; l < 8; ++l) a[l] = (E)v[l];
    Elem<T>::store4(x + i, a);
    Elem<T>::store4(x + i + 4, a + 4);
  } else {
#pragma unroll
    for (int l = 0; l < 8; ++l)
      if (l < cnt) x[i + l] = Elem<T>::store((E)v[l]);
  }
}

// Whether elements [i, i + 8) at address `base` (elements of `size` bytes) take the
// four-wide accesses.
__device__ __forceinline__ bool co_vec8(unsigned long long base, unsigned long long size,
                                        int cnt) {
  return cnt == 8 && base % (4 * size) == 0;
}

// Slot k (format f) of t at elements [i, i + cnt), all in one quantization block, decoded
// into o: 8-bit as map[code] * absmax (one f32 multiply), bf16 widened, full copied.
template <typename M>
__device__ __forceinline__ void co_slot_load8(const TensorEntry& t, int k, unsigned int f,
                                              const float* maps, unsigned long long i, int cnt,
                                              M* o) {
  if (f == CO_FMT_Q8) {
    const unsigned char* c = (const unsigned char*)t.s[k];
    const float a = ((const float*)t.absmax[k])[i / CO_QBLOCK];
    const float* map = maps + (((t.flags >> k) & 1u) ? 0 : 256);
    unsigned char b[8] = {};
    if (cnt == 8 && (t.s[k] + i) % 8 == 0) {
      const uint2 w = *reinterpret_cast<const uint2*>(c + i);
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        b[l] = (unsigned char)(w.x >> (8 * l));
        b[l + 4] = (unsigned char)(w.y >> (8 * l));
      }
    } else {
#pragma unroll
      for (int l = 0; l < 8; ++l)
        if (l < cnt) b[l] = c[i + l];
    }
#pragma unroll
    for (int l = 0; l < 8; ++l)
      if (l < cnt) o[l] = (M)__fmul_rn(map[b[l]], a);
  } else if (f == CO_FMT_BF16) {
    co_load8<__nv_bfloat16, M>((const __nv_bfloat16*)t.s[k], i, cnt,
                               co_vec8(t.s[k], sizeof(__nv_bfloat16), cnt), o);
  } else {
    co_load8<M, M>((const M*)t.s[k], i, cnt, co_vec8(t.s[k], sizeof(M), cnt), o);
  }
}

// v (elements [i, i + cnt)) stored into slot k (format f) of t. For 8-bit slots the 32 lanes
// of a warp call it together for one quantization block (lane l holding its elements
// 8l..8l+8, lanes past the tensor's end with cnt 0): the block's absmax is max |v| over the
// warp (f32; NaN ignored, as the CPU's f32::max), written by lane 0, and each value goes to
// the code of its grid point, with the CPU quantizer's f32 operations one by one (no FMA):
// y = clamp(v * (1/absmax), -1, 1), j = trunc((y + 1) * 0.5 * 65535 + 0.5), code = LUT[j]; an
// all-zero block codes to 0.
template <typename M>
__device__ __forceinline__ void co_slot_store8(const TensorEntry& t, int k, unsigned int f,
                                               unsigned long long i, int cnt, const M* v) {
  if (f == CO_FMT_Q8) {
    float x[8];
    float a = 0.0f;
#pragma unroll
    for (int l = 0; l < 8; ++l) {
      x[l] = l < cnt ? (float)v[l] : 0.0f;
      a = fmaxf(a, fabsf(x[l]));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
    const unsigned char* lut =
        (const unsigned char*)t.qtab + CO_QTAB_LUT + (((t.flags >> k) & 1u) ? 0 : CO_QGRID);
    unsigned char b[8] = {};
    if (a != 0.0f) {
      const float inv = __fdiv_rn(1.0f, a);
#pragma unroll
      for (int l = 0; l < 8; ++l) {
        float y = __fmul_rn(x[l], inv);
        if (y < -1.0f) y = -1.0f;
        if (y > 1.0f) y = 1.0f;
        const float z = __fadd_rn(__fmul_rn(__fmul_rn(__fadd_rn(y, 1.0f), 0.5f), 65535.0f), 0.5f);
        // Rust's saturating `as u32`: NaN -> 0 (z >= 0.5 otherwise).
        const unsigned int j = z == z ? min(__float2uint_rz(z), (unsigned int)(CO_QGRID - 1)) : 0u;
        b[l] = __ldg(lut + j);
      }
    }
    if ((threadIdx.x & 31) == 0) ((float*)t.absmax[k])[i / CO_QBLOCK] = a;
    unsigned char* c = (unsigned char*)t.s[k];
    if (cnt == 8 && (t.s[k] + i) % 8 == 0) {
      uint2 w;
      w.x = (unsigned int)b[0] | (unsigned int)b[1] << 8 | (unsigned int)b[2] << 16 |
            (unsigned int)b[3] << 24;
      w.y = (unsigned int)b[4] | (unsigned int)b[5] << 8 | (unsigned int)b[6] << 16 |
            (unsigned int)b[7] << 24;
      *reinterpret_cast<uint2*>(c + i) = w;
    } else {
#pragma unroll
      for (int l = 0; l < 8; ++l)
        if (l < cnt) c[i + l] = b[l];
    }
  } else if (f == CO_FMT_BF16) {
    co_store8<__nv_bfloat16, M>((__nv_bfloat16*)t.s[k], i, cnt,
                                co_vec8(t.s[k], sizeof(__nv_bfloat16), cnt), v);
  } else {
    co_store8<M, M>((M*)t.s[k], i, cnt, co_vec8(t.s[k], sizeof(M), cnt), v);
  }
}

// Eight parameter elements [i, i + cnt) from v: stochastically rounded (bf16 under
// CO_FLAG_SR of t) or as Elem<P>::store.
template <typename P>
__device__ __forceinline__ void co_param_store8(const TensorEntry& t, unsigned long long i,
                                                int cnt, const typename Elem<P>::M* v) {
  P* p = (P*)t.p;
  const bool vec = Elem<P>::VEC && co_vec8(t.p, sizeof(P), cnt);
  if (Elem<P>::SR && (t.flags & CO_FLAG_SR) != 0) {
    if (vec) {
      co_store4_p<P, true>(p, v, t.key, i);
      co_store4_p<P, true>(p, v + 4, t.key, i + 4);
    } else {
#pragma unroll
      for (int l = 0; l < 8; ++l)
        if (l < cnt) p[i + l] = co_store_p<P, true>(v[l], t.key, i + l);
    }
  } else {
    co_store8<P, typename Elem<P>::M>(p, i, cnt, vec, v);
  }
}

// Runs body(i, cnt) for this lane's share of every quantization block of elements
// [start, end) (start a multiple of CO_QBLOCK): warp w takes blocks w, w + warps, ...; lane l
// elements i = block start + 8l, cnt of them (8, fewer at the end, 0 past it). The loop is
// uniform over each warp, so `body` may use warp shuffles.
template <typename Body>
__device__ __forceinline__ void co_qblocks(unsigned long long start, unsigned long long end,
                                           Body body) {
  const unsigned long long step = (unsigned long long)(blockDim.x >> 5) * CO_QBLOCK;
  for (unsigned long long q = start + (unsigned long long)(threadIdx.x >> 5) * CO_QBLOCK; q < end;
       q += step) {
    const unsigned long long i = q + 8 * (threadIdx.x & 31);
    const int cnt = i < end ? (int)min(end - i, 8ull) : 0;
    body(i, cnt);
  }
}

// co_apply for tensors with a slot in bf16 or 8 bits: per quantization block, decode every
// slot into registers, run `op` on each element, store p, encode the slots.
template <typename P, bool STORE_SLOTS, typename Op>
__device__ __forceinline__ void co_apply_staged(const TensorEntry& t, const BlockEntry& b, Op op,
                                                bool load_g) {
  typedef typename Elem<P>::M M;
  __shared__ float co_maps[512];
  co_load_maps(t, co_maps);
  const unsigned long long start = (unsigned long long)b.chunk * CO_CHUNK;
  const unsigned long long end = min(start + (unsigned long long)CO_CHUNK, t.n);
  const P* p = (const P*)t.p;  // written by co_param_store8
  const P* __restrict__ g = (const P*)t.g;
  unsigned int f[CO_MAX_SLOTS];
  bool has[CO_MAX_SLOTS];
#pragma unroll
  for (int k = 0; k < CO_MAX_SLOTS; ++k) {
    f[k] = co_slot_fmt(t, k);
    has[k] = t.s[k] != 0;
  }
  const bool pvec = Elem<P>::VEC && ((t.p | t.g) % (4 * sizeof(P))) == 0;
  co_qblocks(start, end, [&](unsigned long long i, int cnt) {
    M pv[8] = {}, gv[8] = {}, sv[CO_MAX_SLOTS][8] = {};
    co_load8<P, M>(p, i, cnt, pvec && cnt == 8, pv);
    if (load_g) co_load8<P, M>(g, i, cnt, pvec && cnt == 8, gv);
#pragma unroll
    for (int k = 0; k < CO_MAX_SLOTS; ++k)
      if (has[k]) co_slot_load8<M>(t, k, f[k], co_maps, i, cnt, sv[k]);
#pragma unroll
    for (int l = 0; l < 8; ++l) {
      if (l < cnt) {
        M sl[CO_MAX_SLOTS];
#pragma unroll
        for (int k = 0; k < CO_MAX_SLOTS; ++k) sl[k] = sv[k][l];
        op(i + l, pv[l], gv[l], sl);
#pragma unroll
        for (int k = 0; k < CO_MAX_SLOTS; ++k) sv[k][l] = sl[k];
      }
    }
    co_param_store8<P>(t, i, cnt, pv);
    if (STORE_SLOTS) {
#pragma unroll
      for (int k = 0; k < CO_MAX_SLOTS; ++k)
        if (has[k]) co_slot_store8<M>(t, k, f[k], i, cnt, sv[k]);
    }
  });
}

// The element loop of a kernel (see co_apply_full and co_apply_staged above). P is the
// parameter type, or CoFmt<parameter type> for the entry points that take state formats and
// stochastic rounding (below): with a plain P every tensor must keep its slots in the math
// type (t.fmt == 0) without stochastic rounding, and the loop is co_apply_full alone.
template <typename P, bool STORE_SLOTS, typename Op>
__device__ __forceinline__ void co_apply(const TensorEntry& t, const BlockEntry& b, Op op,
                                         bool load_g = true) {
  typedef typename CoParam<P>::T T;
  if constexpr (!CoParam<P>::FMT) {
    co_apply_full<T, STORE_SLOTS, false>(t, b, op, load_g);
  } else {
    if (t.fmt != 0u) {
      co_apply_staged<T, STORE_SLOTS>(t, b, op, load_g);
    } else if (Elem<T>::SR && (t.flags & CO_FLAG_SR) != 0) {
      co_apply_full<T, STORE_SLOTS, true>(t, b, op, load_g);
    } else {
      co_apply_full<T, STORE_SLOTS, false>(t, b, op, load_g);
    }
  }
}

// Declares `extern "C"` entry points NAME_f32, NAME_f64, NAME_bf16, NAME_f16 for a templated
// device function NAME<P>(ts, bs), and NAME_fmt_f32, ..., the same over CoFmt<P> (state
// formats and stochastic rounding; see CoFmt).
#define CO_ENTRY_POINTS_AS(NAME, P, SUFFIX)                                                \
  extern "C" __global__ void __launch_bounds__(CO_THREADS)                                 \
      NAME##_##SUFFIX(const TensorEntry* ts, const BlockEntry* bs) { NAME<P>(ts, bs); }     \
  extern "C" __global__ void __launch_bounds__(CO_THREADS)                                 \
      NAME##_fmt_##SUFFIX(const TensorEntry* ts, const BlockEntry* bs) {                    \
    NAME<CoFmt<P>>(ts, bs);                                                                \
  }
#define CO_ENTRY_POINTS(NAME)                  \
  CO_ENTRY_POINTS_AS(NAME, float, f32)         \
  CO_ENTRY_POINTS_AS(NAME, double, f64)        \
  CO_ENTRY_POINTS_AS(NAME, __nv_bfloat16, bf16) \
  CO_ENTRY_POINTS_AS(NAME, __half, f16)

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
