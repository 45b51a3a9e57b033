// A test of the step ops' loops (src/mtpx/kernels/step_core_isa.h) without PyTorch, so that it can be
// cross-compiled for aarch64 and run under qemu-user (test_neon.py). What makes speculation lossless there: a pass
// over T positions gives, position by position, the bits of T one-position steps (the Gated DeltaNet layer's outputs,
// conv inputs and state, the attention's outputs and KV cache), a rollback replay of the first n positions gives the
// state after n steps, and neither depends on the thread count. On aarch64 the NEON build must also give the scalar
// build's bits. Prints "ok <checks>" and exits 0, or the first mismatch and 1.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__aarch64__)
#include <arm_neon.h>
#endif

#include "gemm_types.h"
using mtpx_gemm::Bf16;  // as gemm_core.h has it in each instruction set's namespace

// What step_core_isa.h takes from its host: a bf16 value type (rounding to nearest even, as PyTorch's does) and a
// thread pool (here std::thread, the thread count set per check).
namespace mtpx_host {
struct bf16 {
  uint16_t x = 0;
  bf16() = default;
  bf16(float f) {  // NOLINT: converts implicitly, like at::BFloat16
    uint32_t u;
    std::memcpy(&u, &f, 4);
    x = std::isnan(f) ? 0x7FC0 : static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
  }
  operator float() const {  // NOLINT
    const uint32_t u = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
int64_t threads = 1;
inline int64_t num_threads() { return threads; }
template <typename Fn>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const Fn& fn) {
  const int64_t n = end - begin, parts = std::max<int64_t>(1, std::min(threads, n / std::max<int64_t>(grain, 1)));
  std::vector<std::thread> pool;
  for (int64_t p = 0; p < parts; ++p) {
    const int64_t b = begin + n * p / parts, e = begin + n * (p + 1) / parts;
    if (b < e) pool.emplace_back([&fn, b, e] { fn(b, e); });
  }
  for (auto& t : pool) t.join();
}
}  // namespace mtpx_host
using mtpx_host::bf16;

#include "isa_names.h"

#define MTPX_ISA MTPX_ISA_SCALAR
namespace isa_scalar {
#include "step_core_isa.h"
}
#undef MTPX_ISA
#if defined(__aarch64__)
#define MTPX_ISA MTPX_ISA_NEON
namespace isa_neon {
#include "step_core_isa.h"
}
#undef MTPX_ISA
#endif

namespace {

int64_t checks = 0;
uint64_t seed = 12345;
float uniform() {  // in [-1, 1)
  seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
  return static_cast<float>(seed >> 40) / static_cast<float>(1 << 23) - 1.0f;
}
template <typename T>
std::vector<T> randoms(int64_t n, float lo, float hi) {
  std::vector<T> v(n);
  for (auto& x : v) x = T(lo + (hi - lo) * (uniform() + 1.0f) / 2.0f);
  return v;
}
template <typename T>
bool same(const char* what, const T* a, const T* b, int64_t n) {
  ++checks;
  if (std::memcmp(a, b, n * sizeof(T)) == 0) return true;
  for (int64_t i = 0; i < n; ++i)
    if (std::memcmp(a + i, b + i, sizeof(T)) != 0) {
      std::printf("%s: element %lld differs (%g vs %g)\n", what, static_cast<long long>(i),
                  static_cast<double>(static_cast<float>(a[i])), static_cast<double>(static_cast<float>(b[i])));
      break;
    }
  return false;
}

// One Gated DeltaNet layer: 2 key heads of 16 dims, 4 value heads of 24 (a whole 16-column tile and a tail of 8),
// a conv of width 4.
struct Gdn {
  static constexpr int64_t nk = 2, nv = 4, dk = 16, dv = 24, K = 4, conv_dim = 2 * nk * dk + nv * dv;
  static constexpr int64_t width = conv_dim + nv * dv + 2 * nv, T_max = 5;
  std::vector<bf16> proj = randoms<bf16>(T_max * width, -1.5f, 1.5f);
  std::vector<bf16> conv_state = randoms<bf16>(conv_dim * (K - 1), -1, 1);
  std::vector<bf16> conv_w = randoms<bf16>(conv_dim * K, -0.7f, 0.7f);
  std::vector<float> A_log = randoms<float>(nv, -1, 1.5f), dt = randoms<float>(nv, -0.5f, 0.5f);
  std::vector<bf16> norm_w = randoms<bf16>(dv, 0.5f, 1.5f);
  std::vector<float> state = randoms<float>(nv * dk * dv, -0.3f, 0.3f);

  struct Out {
    std::vector<bf16> out, conv_in;
    std::vector<float> state, replay;
  };
  // positions [t0, t0 + T) from the given conv state (strides cs0, cs1) and state
  template <typename Isa>
  Out run(int64_t t0, int64_t T, const bf16* cs, int64_t cs0, int64_t cs1, const float* s0) const {
    Out o{std::vector<bf16>(T * nv * dv), std::vector<bf16>(conv_dim * (K - 1 + T)), std::vector<float>(state.size()),
          std::vector<float>(T * nv * (dk + dv + 2))};
    using F = typename Isa::Floats;
    Isa::gdn_rows(proj.data() + t0 * width, T, cs, cs0, cs1, F{nullptr, conv_w.data()}, K, F{A_log.data(), nullptr},
                  F{dt.data(), nullptr}, F{nullptr, norm_w.data()}, s0, nk, nv, dk, dv, 1e-6, o.out.data(),
                  o.conv_in.data(), o.state.data(), o.replay.data());
    return o;
  }
};

// One instruction set's build of the loops, as the checks call it (a replay: delta_rule without q and out).
#define STEP_OPS(name, ns)                                                                                   \
  struct name {                                                                                              \
    using Floats = ns::Floats;                                                                               \
    static constexpr auto gdn_rows = &ns::gdn_rows;                                                          \
    static constexpr auto attention_rows = &ns::attention_rows;                                              \
    static void delta_rule(const float* k, const float* v, const float* decay, const float* beta, int64_t n, \
                           int64_t nv, int64_t dk, int64_t dv, const float* s0, float* s_final) {            \
      ns::delta_rule(nullptr, k, v, decay, beta, n, nv, dk, dv, s0, s_final, nullptr);                       \
    }                                                                                                        \
  };
STEP_OPS(ScalarOps, isa_scalar)
#if defined(__aarch64__)
STEP_OPS(NeonOps, isa_neon)
#endif

// A T-position pass against T one-position steps, replays of its first n positions, and the thread counts; the
// T_max-position pass's outputs are returned for comparison across instruction sets.
template <typename Isa>
bool check_gdn(const Gdn& g, std::vector<bf16>* all_out) {
  using O = Gdn::Out;
  constexpr int64_t nv = Gdn::nv, dk = Gdn::dk, dv = Gdn::dv, K = Gdn::K, conv_dim = Gdn::conv_dim;
  // steps: each from the last one's conv inputs (columns 1 .. K - 1) and state
  std::vector<O> steps;
  for (int64_t t = 0; t < Gdn::T_max; ++t) {
    if (t == 0)
      steps.push_back(g.run<Isa>(0, 1, g.conv_state.data(), K - 1, 1, g.state.data()));
    else
      steps.push_back(g.run<Isa>(t, 1, steps.back().conv_in.data() + 1, K, 1, steps.back().state.data()));
  }
  for (int64_t threads : {1, 3}) {
    mtpx_host::threads = threads;
    for (int64_t T = 1; T <= Gdn::T_max; ++T) {
      const O pass = g.run<Isa>(0, T, g.conv_state.data(), K - 1, 1, g.state.data());
      for (int64_t t = 0; t < T; ++t) {
        if (!same("gdn out row vs step", pass.out.data() + t * nv * dv, steps[t].out.data(), nv * dv)) return false;
        for (int64_t c = 0; c < conv_dim; ++c)  // the conv state after position t: columns t + 1 .. t + K - 1
          if (!same("gdn conv inputs vs step", pass.conv_in.data() + c * (K - 1 + T) + t + 1,
                    steps[t].conv_in.data() + c * K + 1, K - 1))
            return false;
      }
      if (!same("gdn state vs steps", pass.state.data(), steps[T - 1].state.data(), pass.state.size())) return false;
      const float* k = pass.replay.data();
      const float* v = k + T * nv * dk;
      const float* decay = v + T * nv * dv;
      const float* beta = decay + T * nv;
      for (int64_t n = 1; n <= T; ++n) {
        std::vector<float> replayed(g.state.size());
        Isa::delta_rule(k, v, decay, beta, n, nv, dk, dv, g.state.data(), replayed.data());
        if (!same("gdn replay vs steps", replayed.data(), steps[n - 1].state.data(), replayed.size())) return false;
      }
      if (T == Gdn::T_max && threads == 1) *all_out = pass.out;
    }
  }
  return true;
}

// Gated attention: 4 query heads over 2 kv heads of 32 dims, RoPE on 16, a cache of 12 positions with 3 filled.
struct Attention {
  static constexpr int64_t nh = 4, nkv = 2, D = 32, rd = 16, max_len = 12, start = 3, T_max = 5;
  static constexpr int64_t width = 2 * nh * D + 2 * nkv * D;
  std::vector<bf16> in = randoms<bf16>(T_max * width, -2, 2), cos = randoms<bf16>(T_max * rd, -1, 1);
  std::vector<bf16> sin = randoms<bf16>(T_max * rd, -1, 1), cache = randoms<bf16>(nkv * max_len * D, -1, 1);
  std::vector<float> qw = randoms<float>(D, -0.3f, 0.3f);
  std::vector<bf16> kw = randoms<bf16>(D, -0.3f, 0.3f);

  template <typename Isa>
  std::vector<bf16> run(int64_t t0, int64_t T, std::vector<bf16>& Kc, std::vector<bf16>& Vc) const {
    std::vector<bf16> out(T * nh * D);
    Isa::attention_rows(in.data() + t0 * width, T, typename Isa::Floats{qw.data(), nullptr},
                        typename Isa::Floats{nullptr, kw.data()}, cos.data() + t0 * rd, sin.data() + t0 * rd, rd,
                        Kc.data(), Vc.data(), max_len, start + t0, nh, nkv, D, 1e-6, out.data());
    return out;
  }
};

template <typename Isa>
bool check_attention(const Attention& a, std::vector<bf16>* all_out) {
  constexpr int64_t nh = Attention::nh, D = Attention::D;
  std::vector<bf16> Ks = a.cache, Vs = a.cache;
  std::vector<std::vector<bf16>> steps;
  for (int64_t t = 0; t < Attention::T_max; ++t) steps.push_back(a.run<Isa>(t, 1, Ks, Vs));
  for (int64_t threads : {1, 3}) {
    mtpx_host::threads = threads;
    for (int64_t T = 1; T <= Attention::T_max; ++T) {
      std::vector<bf16> Kc = a.cache, Vc = a.cache;
      const std::vector<bf16> pass = a.run<Isa>(0, T, Kc, Vc);
      for (int64_t t = 0; t < T; ++t)
        if (!same("attention row vs step", pass.data() + t * nh * D, steps[t].data(), nh * D)) return false;
      if (T == Attention::T_max) {
        if (!same("k cache vs steps", Kc.data(), Ks.data(), Kc.size()) ||
            !same("v cache vs steps", Vc.data(), Vs.data(), Vc.size()))
          return false;
        if (threads == 1) *all_out = pass;
      }
    }
  }
  return true;
}

}  // namespace

int main() {
  const Gdn gdn;
  const Attention attention;
  std::vector<bf16> gdn_scalar, attention_scalar;
  if (!check_gdn<ScalarOps>(gdn, &gdn_scalar) || !check_attention<ScalarOps>(attention, &attention_scalar)) return 1;
#if defined(__aarch64__)
  std::vector<bf16> gdn_neon, attention_neon;
  if (!check_gdn<NeonOps>(gdn, &gdn_neon) || !check_attention<NeonOps>(attention, &attention_neon)) return 1;
  if (!same("gdn out, NEON vs scalar", gdn_neon.data(), gdn_scalar.data(), gdn_scalar.size()) ||
      !same("attention out, NEON vs scalar", attention_neon.data(), attention_scalar.data(), attention_scalar.size()))
    return 1;
#endif
  std::printf("ok %lld\n", static_cast<long long>(checks));
  return 0;
}
