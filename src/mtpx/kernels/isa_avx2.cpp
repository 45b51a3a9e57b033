// The kernels for x86 CPUs with AVX2 and FMA (Intel since Haswell, AMD since Zen), compiled for them by a target
// pragma whatever the build's own flags: the one build holds every instruction set, picked at load (dispatch.cpp).
// The integer matmuls are built a second time with AVX-VNNI (Intel since Alder Lake, AMD since Zen 5), used where the
// CPU has it (int_dot_vnni).
#if defined(__x86_64__) || defined(_M_X64)  // (the whole file: elsewhere it compiles to nothing, without parsing PyTorch)
#include "isa_prelude.h"

#define MTPX_ISA MTPX_ISA_AVX2
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#endif
extern "C" __m256 Sleef_expf8_u10avx2(__m256);  // PyTorch's vectorised exp (libtorch_cpu exports it)
namespace mtpx_avx2 {
#include "gemm_core.h"
}  // namespace mtpx_avx2
#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if MTPX_HAVE_VNNI
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,avxvnni")
#define MTPX_INT_DOT_VNNI
namespace mtpx_avx2::vnni {
#include "gemm_core.h"
}  // namespace mtpx_avx2::vnni
#undef MTPX_INT_DOT_VNNI
#pragma GCC pop_options
#endif

#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#endif
namespace mtpx_avx2 {
#include "rowgemm_isa.h"
#include "step_ops_isa.h"
}  // namespace mtpx_avx2
#undef MTPX_ISA
#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
