// The kernels for x86 CPUs with AVX-512 (F, BW, VL, DQ), and the AMX-tile matmul for those with AMX_BF16, compiled
// for them by a target pragma whatever the build's own flags (see isa_avx2.cpp). The integer matmuls are built a
// second time with AVX512_VNNI (Intel since Cascade Lake, AMD since Zen 4), used where the CPU has it.
#if defined(__x86_64__) || defined(_M_X64)  // (the whole file: elsewhere it compiles to nothing, without parsing PyTorch)
#include "isa_prelude.h"

#include <sys/syscall.h>
#include <unistd.h>
#define MTPX_ISA MTPX_ISA_AVX512
#define MTPX_ISA_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512cd,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"
#define MTPX_ISA_NAMESPACE mtpx_avx512
#define MTPX_VNNI_TARGET "avx512vnni"
#include "isa_body.h"
#endif
