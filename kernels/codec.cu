// Dense copies of optimizer state kept in bf16 or 8 bits, and back: for updates that need
// whole tensors in the math type (AdamP's row passes, src/backend/cuda_rows.rs), as the CPU
// does (src/backend/staged.rs, `whole`). The element-wise kernels never need them: co_apply
// decodes and encodes per quantization block in registers.
//
// A launch takes a table of entry pairs and a block table of chunks (tensor t, chunk c):
//   ts[2t]     the stored tensor: its slots in their formats (fmt, absmax, flags, qtab), its
//              parameter p (with CO_FLAG_SR and key where it is rounded stochastically);
//   ts[2t + 1] the copies in the math type: s[k] for each stored slot k to convert (0: none),
//              p the parameter's copy (0: none).
//   codec_unpack_<dtype>: copy s[k] = slot k decoded (map[code] * absmax; bf16 widened).
//   codec_pack_<dtype>:   slot k = copy s[k] encoded (8-bit: per quantization block, a new
//                         absmax and codes, exactly as co_apply_staged), and the parameter =
//                         copy p rounded (stochastically under CO_FLAG_SR).
// <dtype> is the parameter's; copies are float (double for double parameters).
#include "common.cuh"

template <typename P>
__device__ void codec_unpack(const TensorEntry* __restrict__ ts, const BlockEntry* __restrict__ bs) {
  typedef typename Elem<P>::M M;
  __shared__ float maps[512];
  const BlockEntry b = bs[blockIdx.x];
  const TensorEntry& t = ts[2 * b.tensor];
  const TensorEntry& d = ts[2 * b.tensor + 1];
  co_load_maps(t, maps);
  const unsigned long long start = (unsigned long long)b.chunk * CO_CHUNK;
  const unsigned long long end = min(start + (unsigned long long)CO_CHUNK, t.n);
  co_qblocks(start, end, [&](unsigned long long i, int cnt) {
#pragma unroll
    for (int k = 0; k < CO_MAX_SLOTS; ++k) {
      if (t.s[k] != 0 && d.s[k] != 0) {
        M v[8] = {};
        co_slot_load8<M>(t, k, co_slot_fmt(t, k), maps, i, cnt, v);
        co_store8<M, M>((M*)d.s[k], i, cnt, co_vec8(d.s[k], sizeof(M), cnt), v);
      }
    }
  });
}

template <typename P>
__device__ void codec_pack(const TensorEntry* __restrict__ ts, const BlockEntry* __restrict__ bs) {
  typedef typename Elem<P>::M M;
  const BlockEntry b = bs[blockIdx.x];
  const TensorEntry& t = ts[2 * b.tensor];
  const TensorEntry& d = ts[2 * b.tensor + 1];
  if (co_skipped(t)) return;  // the stored state stays as it was
  const unsigned long long start = (unsigned long long)b.chunk * CO_CHUNK;
  const unsigned long long end = min(start + (unsigned long long)CO_CHUNK, t.n);
  // Both conditions are per tensor, so every lane of a warp encodes the same slots.
  co_qblocks(start, end, [&](unsigned long long i, int cnt) {
#pragma unroll
    for (int k = 0; k < CO_MAX_SLOTS; ++k) {
      if (t.s[k] != 0 && d.s[k] != 0) {
        M v[8] = {};
        co_load8<M, M>((const M*)d.s[k], i, cnt, co_vec8(d.s[k], sizeof(M), cnt), v);
        co_slot_store8<M>(t, k, co_slot_fmt(t, k), i, cnt, v);
      }
    }
    if (d.p != 0) {
      M v[8] = {};
      co_load8<M, M>((const M*)d.p, i, cnt, co_vec8(d.p, sizeof(M), cnt), v);
      co_param_store8<P>(t, i, cnt, v);
    }
  });
}

#define CODEC_ENTRIES(P, SUFFIX)                                                              \
  extern "C" __global__ void __launch_bounds__(CO_THREADS)                                    \
      codec_unpack_##SUFFIX(const TensorEntry* ts, const BlockEntry* bs) {                     \
    codec_unpack<P>(ts, bs);                                                                  \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(CO_THREADS)                                    \
      codec_pack_##SUFFIX(const TensorEntry* ts, const BlockEntry* bs) {                       \
    codec_pack<P>(ts, bs);                                                                    \
  }
CODEC_ENTRIES(float, f32)
CODEC_ENTRIES(double, f64)
CODEC_ENTRIES(__nv_bfloat16, bf16)
CODEC_ENTRIES(__half, f16)
