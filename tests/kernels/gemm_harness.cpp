// A test of the few-row matmul's inner loops (src/mtpx/kernels/gemm_core.h) without PyTorch, so that it can be
// cross-compiled for an architecture whose PyTorch is not installed and run under qemu-user (test_neon.py): every
// instruction set built here, and the integer loops' VNNI (x86) or SDOT (aarch64) builds where the CPU has them,
// gives the scalar loops' bits for bf16, int8, int4 and int8-block weights (scales in two levels, super-blocks of 1
// to 16 groups), and each row's result is the same whatever the row count (1..8). Prints "ok <checks>" and exits 0,
// or the first mismatch and 1.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#endif

#include "gemm_types.h"

#include "isa_names.h"

#define MTPX_ISA MTPX_ISA_SCALAR
namespace isa_scalar {
#include "gemm_core.h"
}
#undef MTPX_ISA

#if defined(__aarch64__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#define MTPX_ISA MTPX_ISA_NEON
namespace isa_neon {
#include "gemm_core.h"
}
// the integer loops' SDOT build, nested as in isa_neon.cpp
#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod")
#define MTPX_INT_DOT_VNNI
namespace isa_neon::vnni {
#include "gemm_core.h"
}
#undef MTPX_INT_DOT_VNNI
#pragma GCC pop_options
#undef MTPX_ISA
#endif

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define MTPX_ISA MTPX_ISA_AVX2
namespace isa_avx2 {
#include "gemm_core.h"
}
#undef MTPX_ISA
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define MTPX_ISA MTPX_ISA_AVX512
namespace isa_avx512 {
#include "gemm_core.h"
}
#undef MTPX_ISA
#pragma GCC pop_options
// the integer loops' VNNI builds, nested as in isa_avx2.cpp and isa_avx512.cpp
#define MTPX_INT_DOT_VNNI
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
#define MTPX_ISA MTPX_ISA_AVX2
namespace isa_avx2::vnni {
#include "gemm_core.h"
}
#undef MTPX_ISA
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512vnni")
#define MTPX_ISA MTPX_ISA_AVX512
namespace isa_avx512::vnni {
#include "gemm_core.h"
}
#undef MTPX_ISA
#pragma GCC pop_options
#undef MTPX_INT_DOT_VNNI
#endif

namespace {

uint64_t state = 88172645463325252ull;
uint32_t next() {
  state ^= state << 13, state ^= state >> 7, state ^= state << 17;
  return static_cast<uint32_t>(state >> 11);
}
float uniform() { return (next() & 0xFFFFFF) / float(1 << 24) * 2.f - 1.f; }

uint16_t to_bf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return static_cast<uint16_t>((b + 0x7FFF + ((b >> 16) & 1)) >> 16);
}

struct Serial {
  template <typename Fn>
  void operator()(int64_t blocks, int64_t, const Fn& fn) const { fn(0, blocks); }
};

// what one instruction set computes: out[M, N] for x [M, K] (row-major, not yet deinterleaved)
using Matmul = void (*)(int64_t M, const float* x, const void* w, int64_t K, int64_t N, float* out, int kind);

// a grouped weight (int4 or int8 blocks): codes, the groups' (sc, m) and the super-blocks' fp16 (d, dmin)
struct Grouped {
  const void* codes;
  const int8_t* groups;
  const uint16_t* supers;
  int64_t n_groups, shift;
};


#define MTPX_RUNNER(ns)                                                                                        \
  void run_##ns(int64_t M, const float* x, const void* w, int64_t K, int64_t N, float* out, int kind) {      \
    std::vector<float> xs(x, x + M * K);                                                                       \
    if (kind == 0) {                                                                                           \
      if (ns::pairs<ns::Bf16>(K)) ns::deinterleave_pairs(xs.data(), M, K);                                     \
      ns::matmul_rows(M, xs.data(), static_cast<const ns::Bf16*>(w), K, N, out, Serial{});                     \
    } else if (kind == 1) {                                                                                    \
      ns::matmul_rows(M, xs.data(), static_cast<const int8_t*>(w), K, N, out, Serial{});                       \
    } else {                                                                                                   \
      const auto* g = static_cast<const Grouped*>(w);                                                          \
      const ns::GroupScales s{g->groups, g->supers, g->n_groups, g->shift};                                   \
      if (kind == 2) {                                                                                         \
        ns::deinterleave_pairs(xs.data(), M, K);                                                               \
        const ns::Int4 w4{static_cast<const uint8_t*>(g->codes), s};                                          \
        ns::matmul_rows(M, xs.data(), &w4, K, N, out, Serial{});                                               \
      } else {                                                                                                 \
        const ns::Int8Blocks w8{static_cast<const int8_t*>(g->codes), s};                                     \
        ns::matmul_rows(M, xs.data(), &w8, K, N, out, Serial{});                                               \
      }                                                                                                        \
    }                                                                                                          \
  }

MTPX_RUNNER(isa_scalar)
#define MTPX_VNNI_RUNNER(ns)                                                                                   \
  void run_##ns##_vnni(int64_t M, const float* x, const void* w, int64_t K, int64_t N, float* out, int kind) { \
    if (kind == 0) return run_##ns(M, x, w, K, N, out, kind);                                                  \
    std::vector<float> xs(x, x + M * K);                                                                       \
    if (kind == 1) return ns::vnni::matmul_rows(M, xs.data(), static_cast<const int8_t*>(w), K, N, out, Serial{}); \
    const auto* g = static_cast<const Grouped*>(w);                                                            \
    const ns::GroupScales s{g->groups, g->supers, g->n_groups, g->shift};                                     \
    if (kind == 2) {                                                                                           \
      ns::deinterleave_pairs(xs.data(), M, K);                                                                 \
      const ns::Int4 w4{static_cast<const uint8_t*>(g->codes), s};                                            \
      return ns::vnni::matmul_rows(M, xs.data(), &w4, K, N, out, Serial{});                                    \
    }                                                                                                          \
    const ns::Int8Blocks w8{static_cast<const int8_t*>(g->codes), s};                                         \
    ns::vnni::matmul_rows(M, xs.data(), &w8, K, N, out, Serial{});                                             \
  }
#if defined(__aarch64__)
MTPX_RUNNER(isa_neon)
MTPX_VNNI_RUNNER(isa_neon)
#endif
#if defined(__x86_64__)
MTPX_RUNNER(isa_avx2)
MTPX_RUNNER(isa_avx512)
MTPX_VNNI_RUNNER(isa_avx2)
MTPX_VNNI_RUNNER(isa_avx512)
#endif

}  // namespace

int main() {
  struct Level { const char* name; Matmul run; };
  std::vector<Level> levels;
#if defined(__aarch64__)
  levels.push_back({"neon", run_isa_neon});
  if (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) levels.push_back({"neon sdot", run_isa_neon_vnni});
#endif
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) levels.push_back({"avx2", run_isa_avx2});
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (avx512) levels.push_back({"avx512", run_isa_avx512});
  // AVX-VNNI: CPUID 7.1 EAX bit 4
  unsigned a = 0, b, c, d;
  __asm__("cpuid" : "+a"(a = 7), "=b"(b), "+c"(c = 1), "=d"(d));
  if ((a >> 4) & 1) levels.push_back({"avx2 vnni", run_isa_avx2_vnni});
  if (avx512 && __builtin_cpu_supports("avx512vnni"))
    levels.push_back({"avx512 vnni", run_isa_avx512_vnni});
#endif
  // 9216: more groups than one chunk of scales (kScaleChunk, kDotChunk) for int4 and int8 blocks
  // super-blocks of every size the loops treat apart: int4 1 (9 x 96, 7 x 160), 2 (37 x 64, 5 x 192), 4 (11 x 128),
  // 8; int8 blocks 1 (odd N), 2 (12 x 96), 4 (10 x 64), 16; groups left after steps of 4 (7 x 160, 5 x 192, 12 x 96)
  const int64_t shapes[][2] = {{37, 64}, {64, 48}, {130, 256}, {16, 1024}, {9, 96}, {6, 9216}, {10, 64}, {11, 128},
                               {7, 160}, {5, 192}, {12, 96}};
  const char* kinds[] = {"bf16", "int8", "int4", "int8 blocks"};
  int64_t checks = 0;
  for (const auto& shape : shapes) {
    const int64_t N = shape[0], K = shape[1];
    std::vector<float> x(8 * K);
    for (float& v : x) v = uniform();
    std::vector<uint16_t> wb(N * K);
    for (auto& v : wb) v = to_bf16(uniform());
    std::vector<int8_t> w8(N * K);
    for (auto& v : w8) v = static_cast<int8_t>(static_cast<int>(next() % 255) - 127);
    std::vector<uint8_t> codes(N * K / 2);
    for (auto& v : codes) v = static_cast<uint8_t>(next());
    // int4 groups of 32 in super-blocks of the most groups up to 8 that divide a row's; int8 blocks: groups of 16
    // in super-blocks of up to 16 groups (as GGUF's Q6_K), or of 1 (an fp16 scale per group) where N is odd
    const int64_t groups4 = K / 32, groups8 = K / 16;
    const int64_t shift4 = groups4 % 8 == 0 ? 3 : groups4 % 4 == 0 ? 2 : groups4 % 2 == 0 ? 1 : 0;
    int64_t shift8 = 0;
    while (N % 2 == 0 && shift8 < 4 && groups8 % (int64_t{2} << shift8) == 0) ++shift8;
    std::vector<int8_t> scales(N * groups8 * 2);
    for (auto& v : scales) v = static_cast<int8_t>(static_cast<int>(next() % 255) - 127);
    // fp16 values below 2^-6, subnormals and zeros among them (exponent field 0..8), any mantissa and sign
    std::vector<uint16_t> supers(N * groups8 * 2);
    for (auto& v : supers) v = static_cast<uint16_t>(((next() % 9) << 10) | (next() & 0x3FF) | (next() & 0x8000));
    const Grouped w4{codes.data(), scales.data(), supers.data(), groups4, shift4};
    const Grouped wg{w8.data(), scales.data(), supers.data(), groups8, shift8};
    for (int kind = 0; kind < 4; ++kind) {
      if (kind == 2 && K % 32 != 0) continue;
      const void* w = kind == 0   ? static_cast<const void*>(wb.data())
                      : kind == 1 ? static_cast<const void*>(w8.data())
                      : kind == 2 ? static_cast<const void*>(&w4)
                                  : static_cast<const void*>(&wg);
      std::vector<float> ref(8 * N);
      run_isa_scalar(8, x.data(), w, K, N, ref.data(), kind);
      std::vector<Level> all = levels;
      all.push_back({"scalar", run_isa_scalar});
      for (const Level& level : all) {
        for (int64_t M = 1; M <= 8; ++M) {
          for (int64_t first = 0; first + M <= 8; first += M) {
            std::vector<float> out(M * N);
            level.run(M, x.data() + first * K, w, K, N, out.data(), kind);
            for (int64_t i = 0; i < M * N; ++i, ++checks) {
              const float want = ref[first * N + i];
              if (std::memcmp(&out[i], &want, 4) != 0) {
                std::printf("mismatch: %s %s N=%lld K=%lld rows %lld..%lld: element %lld = %.9g, scalar 8 rows %.9g\n",
                            level.name, kinds[kind], (long long)N, (long long)K, (long long)first,
                            (long long)(first + M), (long long)i, out[i], want);
                return 1;
              }
            }
          }
        }
      }
    }
  }
  std::printf("ok %lld\n", static_cast<long long>(checks));
  return 0;
}
