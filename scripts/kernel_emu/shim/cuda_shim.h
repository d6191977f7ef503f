// Host emulation of the CUDA features the kernels use: SIMT threads (one std::thread per CUDA
// thread, blocks run one after another), __syncthreads and warp shuffles through barriers,
// IEEE float intrinsics as plain float ops (compiled without contraction), bf16/f16 types.
#pragma once
#include <barrier>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __restrict__
using std::min;
using std::max;
using std::sqrt;
using std::fabs;
using std::isfinite;
struct dim3 { unsigned x = 1, y = 1, z = 1; };
extern thread_local dim3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;
struct uint2 { unsigned x, y; };
struct float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fdiv_rn(float a, float b) { volatile float r = a / b; return r; }
inline unsigned __float2uint_rz(float f) {
  if (!(f == f) || f <= 0.0f) return 0;
  if (f >= 4294967296.0f) return UINT_MAX;
  return (unsigned)f;
}
template <class T> inline T __ldg(const T* p) { return *p; }
// bf16 as CUDA rounds it (RNE, NaN -> canonical 0x7FFF).
struct __nv_bfloat16 { unsigned short x; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float((unsigned)h.x << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  unsigned u = __float_as_uint(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return {0x7FFF};
  u += 0x7FFFu + ((u >> 16) & 1u);
  return {(unsigned short)(u >> 16)};
}
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {__bfloat162float(v.x), __bfloat162float(v.y)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short s) { return {s}; }
struct __half { _Float16 v; };
struct __half2 { __half x, y; };
inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half_rn(float f) { return {(_Float16)f}; }
inline float2 __half22float2(__half2 v) { return {__half2float(v.x), __half2float(v.y)}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
void __syncthreads();
float __shfl_xor_sync(unsigned mask, float v, int o);
double __shfl_down_sync(unsigned mask, double v, int o);
double atomicAdd(double* p, double v);
