// The kernels for x86 CPUs with AVX-512 (F, BW, VL, DQ), and the AMX-tile matmul for those with AMX_BF16, compiled
// for them by a target pragma whatever the build's own flags (see isa_avx2.cpp).
#if defined(__x86_64__) || defined(_M_X64)  // (the whole file: elsewhere it compiles to nothing, without parsing PyTorch)
#include "isa_prelude.h"

#include <sys/syscall.h>
#include <unistd.h>
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512cd,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512cd,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#endif
#define MTPX_ISA MTPX_ISA_AVX512
extern "C" __m512 Sleef_expf16_u10avx512f(__m512);  // PyTorch's vectorised exp (libtorch_cpu exports it)
namespace mtpx_avx512 {
#include "gemm_core.h"
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
