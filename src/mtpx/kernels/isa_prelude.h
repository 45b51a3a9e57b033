// What every instruction set's build of the kernels (isa_*.cpp) includes before it opens its namespace: the
// headers (outside any target pragma, so their inline functions are compiled for the baseline CPU, the same in
// every object file) and the instruction set names.
#pragma once
#include "gemm_types.h"
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define MTPX_X86 1
#include <immintrin.h>
#else
#define MTPX_X86 0
#endif
#if defined(__aarch64__)
#define MTPX_ARM 1
#include <arm_neon.h>
#else
#define MTPX_ARM 0
#endif

// Compiling what follows for an instruction set whatever the build's flags, and back: GCC's target pragmas, or
// clang's attribute pragma (which takes one target string)
#define MTPX_PRAGMA(x) _Pragma(#x)
#ifdef __clang__
#define MTPX_TARGET_PUSH(isa) MTPX_PRAGMA(clang attribute push(__attribute__((target(isa))), apply_to = function))
#define MTPX_TARGET_POP MTPX_PRAGMA(clang attribute pop)
#else
#define MTPX_TARGET_PUSH(...) MTPX_PRAGMA(GCC push_options) MTPX_PRAGMA(GCC target(__VA_ARGS__))
#define MTPX_TARGET_POP MTPX_PRAGMA(GCC pop_options)
#endif

#include "isa_names.h"

// the AMX-tile matmul, and the integer matmuls' build on VNNI (x86) or SDOT (aarch64, where the compiler's baseline
// lacks it): GCC 11 and later (its target pragmas)
#if MTPX_X86 && !defined(__clang__) && __GNUC__ >= 11
#define MTPX_HAVE_AMX 1
#define MTPX_HAVE_VNNI 1
#elif MTPX_ARM && !defined(__clang__) && __GNUC__ >= 11 && defined(__linux__) && !defined(__ARM_FEATURE_DOTPROD)
#define MTPX_HAVE_AMX 0
#define MTPX_HAVE_VNNI 1
#else
#define MTPX_HAVE_AMX 0
#define MTPX_HAVE_VNNI 0
#endif

// The few-row matmuls' parallel loop (gemm_core.h's `parallel`): PyTorch's intra-op pool. A type at global scope, so
// that a call passing it finds only the calling namespace's functions (each instruction set's build of the loops, and
// the integer loops' VNNI builds nested in them, define the same names).
struct AtenParallel {
  template <typename Fn>
  void operator()(int64_t blocks, int64_t grain, const Fn& fn) const {
    at::parallel_for(0, blocks, grain, fn);
  }
};

// What the step ops' loops (step_core_isa.h) take from their host: PyTorch's bf16 type and intra-op pool here, the
// test harness's own under qemu.
namespace mtpx_host {
using bf16 = at::BFloat16;
template <typename Fn>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const Fn& fn) {
  at::parallel_for(begin, end, grain, fn);
}
inline int64_t num_threads() { return at::get_num_threads(); }
}  // namespace mtpx_host
