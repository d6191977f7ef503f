// Runs the CUDA kernels of kernels/adamw.cu and kernels/codec.cu on the CPU, one std::thread
// per CUDA thread (shim/cuda_shim.h), and compares the result of three AdamW steps, bit for
// bit, with the crate's CPU optimizer (reference data written by ref/, see README.md).
//
//   emu DATA CASE [direct|copies] [SKEW] [verdict]
//
// direct: the host's launches (plain entry point for tensors with state in the math type, the
// _fmt_ one for the others); copies: the others through codec_unpack, the plain kernel on dense
// copies, codec_pack (AdamP's path on CUDA). SKEW offsets every buffer by that many elements
// from 64-byte alignment (1: every unaligned path). Bytes around each buffer are checked too.
// verdict: every table entry carries a step verdict decided on the device (TensorEntry::ctl, a
// StepControl): each step first runs all its launches under a verdict that says skip (they
// must write nothing), then under one that multiplies the gradients by 1/4, with the host's
// grad_scale ×4 in the parameter bytes (exact in binary: the CPU's result, bit for bit). Also
// checks reduce.cu's step_verdict on a few totals.
#include "cuda_shim.h"
#include "adamw.cu"
#include "codec.cu"
#include "reduce.cu"
#include <cassert>
#include <cmath>
#include <limits>
#include <cstdio>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <unistd.h>
#include <vector>

thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
static std::barrier<>* g_block_bar;
struct Warp {
  std::barrier<> bar{32};
  float f[32];
  double d[32];
};
static Warp* g_warps;
static std::mutex g_atomic;
void __syncthreads() { g_block_bar->arrive_and_wait(); }
float __shfl_xor_sync(unsigned, float v, int o) {
  Warp& w = g_warps[threadIdx.x >> 5];
  unsigned l = threadIdx.x & 31;
  w.f[l] = v;
  w.bar.arrive_and_wait();
  float r = w.f[l ^ o];
  w.bar.arrive_and_wait();
  return r;
}
double __shfl_down_sync(unsigned, double v, int o) {
  Warp& w = g_warps[threadIdx.x >> 5];
  unsigned l = threadIdx.x & 31;
  w.d[l] = v;
  w.bar.arrive_and_wait();
  double r = l + o < 32 ? w.d[l + o] : v;
  w.bar.arrive_and_wait();
  return r;
}
double atomicAdd(double* p, double v) {
  std::lock_guard<std::mutex> g(g_atomic);
  double o = *p;
  *p += v;
  return o;
}

typedef void (*Kern)(const TensorEntry*, const BlockEntry*);
static unsigned long long g_blocks_run = 0;
static void launch(Kern k, const std::vector<TensorEntry>& ts, const std::vector<BlockEntry>& bs) {
  blockDim.x = CO_THREADS;
  gridDim.x = bs.size();
  for (unsigned b = 0; b < bs.size(); ++b) {
    std::barrier<> bb(CO_THREADS);
    g_block_bar = &bb;
    std::vector<Warp> ws(CO_THREADS / 32);
    g_warps = ws.data();
    std::vector<std::thread> th;
    for (unsigned t = 0; t < CO_THREADS; ++t)
      th.emplace_back([=, &ts, &bs] {
        threadIdx.x = t;
        blockIdx.x = b;
        k(ts.data(), bs.data());
      });
    for (auto& x : th) x.join();
    ++g_blocks_run;
  }
}

static std::vector<unsigned char> readf(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  if (!f) { fprintf(stderr, "missing %s\n", p.c_str()); exit(2); }
  return std::vector<unsigned char>((std::istreambuf_iterator<char>(f)), {});
}

// A device buffer: aligned to 64 bytes, plus `skew` bytes (to exercise the unaligned paths).
struct Buf {
  std::vector<unsigned char> mem;
  size_t skew = 0, len = 0;
  unsigned char* ptr() { return mem.data() + pad() + skew; }
  size_t pad() const { return (64 - ((uintptr_t)mem.data() % 64)) % 64; }
  void init(size_t n, size_t sk) { len = n; skew = sk; mem.assign(n + 128 + sk, 0xAB); memset(ptr(), 0, n); }
  void set(const std::vector<unsigned char>& v) { init(v.size(), skew); memcpy(ptr(), v.data(), v.size()); }
  unsigned long long addr() { return (unsigned long long)ptr(); }
  bool guards_ok() {  // the bytes around the buffer are untouched
    for (size_t i = 0; i < pad() + skew; ++i) if (mem[i] != 0xAB) return false;
    for (size_t i = pad() + skew + len; i < mem.size(); ++i) if (mem[i] != 0xAB) return false;
    return true;
  }
};

// reduce.cu's step_verdict on totals (Σx, Σx², Σx·0 per row) against the host's rule
// (src/driver.rs check_and_clip): the sum in gradient order through `row`, the first non-finite
// gradient, the norm and the clipping factor.
static bool verdict_kernel_ok() {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  struct Case { std::vector<double> totals; std::vector<unsigned> row; double scale, max; unsigned skip; };
  std::vector<Case> cases = {
      {{1, 4, 0, 2, 9, 0, 0, 1e-3, 0}, {2, 0, 1}, 0.5, 1.0, 1},       // clipped
      {{1, 4, 0, 2, 9, 0, 0, 1e-3, 0}, {0, 1, 2}, 1.0, 100.0, 1},     // under the threshold
      {{1, 4, 0, 2, 9, nan, 0, 1e-3, nan}, {2, 0, 1}, 1.0, 1.0, 1},   // rows 2 and 1 bad: i = 0
      {{1, 4, 0, 2, 9, nan, 0, 1e-3, 0}, {2, 0, 1}, 1.0, 1.0, 1},     // row 1 bad: i = 2
      {{1, 4, 0, 2, 9, nan, 0, 1e-3, 0}, {2, 0, 1}, 1.0, 1.0, 0},     // propagate: no skip
      {{1, 4, 0}, {0}, 2.0, 0.0, 1},                                  // no clipping
  };
  bool ok = true;
  threadIdx.x = 0;
  blockIdx.x = 0;
  for (size_t c = 0; c < cases.size(); ++c) {
    const Case& k = cases[c];
    StepControl got{};
    step_verdict(k.totals.data(), k.row.data(), (unsigned)k.row.size(), k.scale, k.max, k.skip, &got);
    double q = 0.0;
    unsigned bad = 0xFFFFFFFFu;
    for (size_t i = 0; i < k.row.size(); ++i) {
      q += k.totals[3 * k.row[i] + 1];
      if (std::isnan(k.totals[3 * k.row[i] + 2]) && bad == 0xFFFFFFFFu) bad = (unsigned)i;
    }
    const double norm = std::sqrt(q * (k.scale * k.scale));
    const double mul = k.max > 0.0 ? std::fmin(k.max / (norm + 1e-6), 1.0) : 1.0;
    const unsigned skip = k.skip && bad != 0xFFFFFFFFu;
    const bool same = got.skip == skip && got.bad == bad &&
                      memcmp(&got.norm, &norm, 8) == 0 && memcmp(&got.grad_mul, &mul, 8) == 0;
    if (!same) {
      printf("FAIL step_verdict case %zu: skip %u bad %u norm %g mul %g (want %u %u %g %g)\n", c,
             got.skip, got.bad, got.norm, got.grad_mul, skip, bad, norm, mul);
      ok = false;
    }
  }
  return ok;
}

struct Slot { std::string dt; int signed_ = 0; int fmt = 0; Buf s, a; Buf copy; };
struct Param { size_t n; Buf p, g, pcopy, gcopy; std::vector<Slot> slots; };

static size_t dsize(const std::string& d) { return d == "f64" ? 8 : d == "f32" ? 4 : (d == "bf16" || d == "f16") ? 2 : 1; }

int main(int argc, char** argv) {
  alarm(1800);
  std::string root = argv[1], cname = argv[2];
  bool copies = argc > 3 && std::string(argv[3]) == "copies";
  size_t skew = argc > 4 ? atoi(argv[4]) : 0;
  const bool verdict = argc > 5 && std::string(argv[5]) == "verdict";
  // The two verdicts of every step (see the header), at fixed host addresses.
  static StepControl skip_ctl{std::numeric_limits<double>::quiet_NaN(), 0.0, 1u, 0u};
  static StepControl quarter_ctl{0.25, 0.0, 0u, 0xFFFFFFFFu};
  if (verdict && !verdict_kernel_ok()) return 1;
  std::string dir = root + "/" + cname + "/";
  std::vector<unsigned char> qt = readf(root + "/qtab.bin");
  Buf qtab; qtab.set(qt);
  std::ifstream mf(dir + "meta.txt");
  std::string line, dt;
  int np = 0, steps = 0;
  std::map<std::pair<int, int>, unsigned long long> keys;
  std::vector<Param> ps;
  while (std::getline(mf, line)) {
    std::istringstream is(line);
    std::string w;
    is >> w;
    if (w == "dtype") is >> dt;
    else if (w == "params") { is >> np; ps.resize(np); }
    else if (w == "steps") is >> steps;
    else if (w == "key") { int i, t; unsigned long long k; is >> i >> t >> k; keys[{i, t}] = k; }
    else if (w == "param") { int i; size_t n; is >> i >> n; ps[i].n = n; }
    else if (w == "slot") {
      int i, k; Slot s; is >> i >> k >> s.dt >> s.signed_;
      s.fmt = s.dt == "q8" ? CO_FMT_Q8 : s.dt == "bf16" ? CO_FMT_BF16 : CO_FMT_FULL;
      ps[i].slots.resize(k + 1);
      ps[i].slots[k] = s;
    }
  }
  const std::string mdt = dt == "f64" ? "f64" : "f32";
  bool sr = false;
  for (auto& kv : keys) sr |= kv.second != 0;
  sr = sr && dt == "bf16";
  for (int i = 0; i < np; ++i) {
    Param& P = ps[i];
    P.p.skew = skew * dsize(dt); P.p.set(readf(dir + "p" + std::to_string(i) + ".init.bin"));
    for (auto& s : P.slots) {
      if (s.fmt == CO_FMT_Q8) {
        s.s.init(P.n, skew);
        s.a.init(4 * ((P.n + 255) / 256), 0);
      } else {
        s.s.init(P.n * dsize(s.dt), skew * dsize(s.dt));
      }
    }
  }
  Kern plain = nullptr, fmtk = nullptr, unpack = nullptr, pack = nullptr, plain32 = adamw_f32;
  if (dt == "f32") { plain = adamw_f32; fmtk = adamw_fmt_f32; unpack = codec_unpack_f32; pack = codec_pack_f32; }
  if (dt == "f64") { plain = adamw_f64; fmtk = adamw_fmt_f64; unpack = codec_unpack_f64; pack = codec_pack_f64; }
  if (dt == "f16") { plain = adamw_f16; fmtk = adamw_fmt_f16; unpack = codec_unpack_f16; pack = codec_pack_f16; }
  if (dt == "bf16") { plain = adamw_bf16; fmtk = adamw_fmt_bf16; unpack = codec_unpack_bf16; pack = codec_pack_bf16; }
  for (int t = 1; t <= steps; ++t) {
    std::vector<TensorEntry> es(np);
    std::vector<bool> nf(np);
    for (int i = 0; i < np; ++i) {
      Param& P = ps[i];
      P.g.skew = skew * dsize(dt);
      P.g.set(readf(dir + "g" + std::to_string(i) + "." + std::to_string(t) + ".bin"));
      TensorEntry e;
      memset(&e, 0, sizeof e);
      e.p = P.p.addr(); e.g = P.g.addr(); e.n = P.n;
      for (size_t k = 0; k < P.slots.size(); ++k) {
        Slot& s = P.slots[k];
        e.s[k] = s.s.addr();
        e.fmt |= (unsigned)s.fmt << (8 * k);
        if (s.fmt == CO_FMT_Q8) { e.absmax[k] = s.a.addr(); e.qtab = qtab.addr(); if (s.signed_) e.flags |= 1u << k; }
      }
      if (sr) { e.flags |= CO_FLAG_SR; e.key = keys[{i, t}]; }
      auto kb = readf(dir + "k" + std::to_string(i) + "." + std::to_string(t) + ".bin");
      memcpy(e.params, kb.data(), CO_PARAM_BYTES);
      if (verdict) {
        double gs;
        memcpy(&gs, e.params + offsetof(AdamWParams, grad_scale), 8);
        gs *= 4.0;  // the device's factor 1/4 takes it back exactly
        memcpy(e.params + offsetof(AdamWParams, grad_scale), &gs, 8);
        e.ctl = (unsigned long long)&quarter_ctl;
      }
      es[i] = e;
      nf[i] = e.fmt != 0 || (e.flags & CO_FLAG_SR);
    }
    // With `verdict`, the step's launches run twice: under a verdict that skips, then as the
    // host launches them.
    std::vector<std::vector<TensorEntry>> passes;
    if (verdict) {
      std::vector<TensorEntry> skipped = es;
      for (auto& e : skipped) e.ctl = (unsigned long long)&skip_ctl;
      passes.push_back(skipped);
    }
    passes.push_back(es);
    for (const auto& es : passes)
    // As the host: plain tensors in one launch of the plain entry point, the others in one of
    // the general one (or, with `copies`, through codec_unpack, the plain kernel, codec_pack).
    for (int which = 0; which < 2; ++which) {
      std::vector<TensorEntry> ts;
      std::vector<int> idx;
      for (int i = 0; i < np; ++i) if (nf[i] == (which == 1)) { ts.push_back(es[i]); idx.push_back(i); }
      if (ts.empty()) continue;
      std::vector<BlockEntry> bs;
      for (unsigned j = 0; j < ts.size(); ++j)
        for (unsigned long long c = 0; c * CO_CHUNK < ts[j].n; ++c) bs.push_back({j, (unsigned)c});
      if (which == 0) { launch(plain, ts, bs); continue; }
      if (!copies) { launch(fmtk, ts, bs); continue; }
      std::vector<TensorEntry> pairs, dense;
      bool any_sr = false;
      for (unsigned j = 0; j < ts.size(); ++j) {
        Param& P = ps[idx[j]];
        TensorEntry d;
        memset(&d, 0, sizeof d);
        d.n = P.n;
        TensorEntry run = ts[j];
        run.fmt = 0; run.flags = 0; run.key = 0; run.qtab = 0;
        for (int k = 0; k < CO_MAX_SLOTS; ++k) run.absmax[k] = 0;
        if (ts[j].flags & CO_FLAG_SR) {
          any_sr = true;
          // f32 copies of p and g (bf16 widened, as candle's to_dtype).
          P.pcopy.skew = 4 * skew; P.pcopy.init(4 * P.n, 4 * skew);
          P.gcopy.skew = 4 * skew; P.gcopy.init(4 * P.n, 4 * skew);
          for (size_t e = 0; e < P.n; ++e) {
            float a = __bfloat162float(((__nv_bfloat16*)P.p.ptr())[e]);
            float b = __bfloat162float(((__nv_bfloat16*)P.g.ptr())[e]);
            ((float*)P.pcopy.ptr())[e] = a; ((float*)P.gcopy.ptr())[e] = b;
          }
          d.p = P.pcopy.addr(); run.p = d.p; run.g = P.gcopy.addr();
        }
        for (size_t k = 0; k < P.slots.size(); ++k) {
          Slot& s = P.slots[k];
          if (s.fmt != CO_FMT_FULL) {
            s.copy.init(P.n * dsize(mdt), skew * dsize(mdt));
            d.s[k] = s.copy.addr();
            run.s[k] = d.s[k];
          }
        }
        pairs.push_back(ts[j]); pairs.push_back(d);
        dense.push_back(run);
      }
      launch(unpack, pairs, bs);
      if (any_sr) {
        // all tensors of a bf16 SR case have copies (f32 now)
        launch(plain32, dense, bs);
      } else {
        launch(plain, dense, bs);
      }
      launch(pack, pairs, bs);
    }
  }
  // Compare with the CPU.
  long bad = 0, total = 0;
  long nan_pairs = 0;
  // Elements of `es` bytes that differ, NaN matching NaN of any sign or payload (es: 1 codes,
  // 2 bf16, 4 f32, 8 f64).
  auto isnan_at = [](const unsigned char* p, size_t es) {
    if (es == 2) { unsigned short h; memcpy(&h, p, 2); return (h & 0x7FFF) > 0x7F80; }
    if (es == 4) { float f; memcpy(&f, p, 4); return f != f; }
    if (es == 8) { double f; memcpy(&f, p, 8); return f != f; }
    return false;
  };
  auto cmp = [&](const std::string& what, Buf& b, const std::string& file, size_t es) {
    auto want = readf(dir + file);
    total += want.size();
    if (!b.guards_ok()) { printf("  %s: GUARD BYTES CHANGED\n", what.c_str()); bad += 1; }
    if (want.size() != b.len) { printf("  %s: size %zu vs %zu\n", what.c_str(), b.len, want.size()); bad += want.size(); return; }
    long d = 0; long first = -1;
    for (size_t i = 0; i < want.size(); i += es) {
      if (memcmp(&want[i], b.ptr() + i, es) == 0) continue;
      if (isnan_at(&want[i], es) && isnan_at(b.ptr() + i, es)) { ++nan_pairs; continue; }
      if (first < 0) first = i;
      ++d;
    }
    if (d) printf("  %s: %ld of %zu bytes differ (first at byte %ld: %d vs %d)\n", what.c_str(), d, want.size(), first, b.ptr()[first], want[first]);
    bad += d;
  };
  for (int i = 0; i < np; ++i) {
    Param& P = ps[i];
    cmp("p" + std::to_string(i), P.p, "p" + std::to_string(i) + ".final.bin", dsize(dt));
    for (size_t k = 0; k < P.slots.size(); ++k) {
      Slot& s = P.slots[k];
      cmp("p" + std::to_string(i) + " slot " + std::to_string(k) + " (" + s.dt + ")", s.s, "s" + std::to_string(i) + "." + std::to_string(k) + ".final.bin", s.fmt == CO_FMT_Q8 ? 1 : dsize(s.dt));
      if (s.fmt == CO_FMT_Q8) cmp("p" + std::to_string(i) + " absmax " + std::to_string(k), s.a, "a" + std::to_string(i) + "." + std::to_string(k) + ".final.bin", 4);
    }
  }
  printf("%s %s%s%s skew %zu: %s (%ld values differ in %ld bytes; %ld NaN pairs; %llu blocks run)\n", bad ? "FAIL" : "PASS", cname.c_str(), copies ? " (copies)" : "", verdict ? " (device verdicts)" : "", skew, bad ? "differs" : nan_pairs ? "bit-identical to the CPU, NaN payloads aside" : "bit-identical to the CPU", bad, total, nan_pairs, g_blocks_run);
  return bad ? 1 : 0;
}
