// The kernels for x86 CPUs with AVX-512 (F, BW, VL, DQ), and the AMX-tile matmul for those with AMX_BF16, compiled
// for them by a target pragma whatever the build's own flags (see isa_avx2.cpp). The integer matmuls are built a
// second time with AVX512_VNNI (Intel since Cascade Lake, AMD since Zen 4), used where the CPU has it.
#if defined(__x86_64__) || defined(_M_X64)  // (the whole file: elsewhere it compiles to nothing, without parsing PyTorch)
#include "isa_prelude.h"

#include <sys/syscall.h>
#include <unistd.h>
#define MTPX_ISA MTPX_ISA_AVX512
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512cd,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512cd,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#endif
extern "C" __m512 Sleef_expf16_u10avx512f(__m512);  // PyTorch's vectorised exp (libtorch_cpu exports it)
namespace mtpx_avx512 {
#include "gemm_core.h"
}  // namespace mtpx_avx512
#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if MTPX_HAVE_VNNI
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512cd,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,avx512vnni")
#define MTPX_INT_DOT_VNNI
namespace mtpx_avx512::vnni {
#include "gemm_core.h"
}  // namespace mtpx_avx512::vnni
#undef MTPX_INT_DOT_VNNI
#pragma GCC pop_options
#endif

#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512cd,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512cd,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#endif
namespace mtpx_avx512 {
#include "rowgemm_isa.h"
#include "step_ops_isa.h"
}  // namespace mtpx_avx512
#undef MTPX_ISA
#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
