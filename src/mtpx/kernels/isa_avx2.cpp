// The kernels for x86 CPUs with AVX2 and FMA (Intel since Haswell, AMD since Zen), compiled for them by a target
// pragma whatever the build's own flags: the one build holds every instruction set, picked at load (dispatch.cpp).
// The integer matmuls are built a second time with AVX-VNNI (Intel since Alder Lake, AMD since Zen 5), used where the
// CPU has it (int_dot_vnni).
#if defined(__x86_64__) || defined(_M_X64)  // (the whole file: elsewhere it compiles to nothing, without parsing PyTorch)
#include "isa_prelude.h"

#define MTPX_ISA MTPX_ISA_AVX2
#define MTPX_ISA_TARGET "avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"
#define MTPX_ISA_NAMESPACE mtpx_avx2
#define MTPX_VNNI_TARGET "avxvnni"
#include "isa_body.h"
#endif
