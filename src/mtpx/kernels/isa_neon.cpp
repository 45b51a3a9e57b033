// The kernels for aarch64 (NEON is part of its baseline): the matmuls in NEON intrinsics (gemm_core.h), the step
// ops' loops as the compiler vectorises them. The integer matmuls are built a second time with the dot-product
// extension (SDOT: Apple M1+, Graviton 2+, Cortex-A76+), used where the CPU has it (int_dot_vnni), unless the
// compiler's baseline has it already (then the first build uses it).
#if defined(__aarch64__)  // (the whole file: elsewhere it compiles to nothing, without parsing PyTorch)
#include "isa_prelude.h"

#define MTPX_ISA MTPX_ISA_NEON
namespace mtpx_neon {
#include "gemm_core.h"
}  // namespace mtpx_neon

#if MTPX_HAVE_VNNI
#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod")
#define MTPX_INT_DOT_VNNI
namespace mtpx_neon::vnni {
#include "gemm_core.h"
}  // namespace mtpx_neon::vnni
#undef MTPX_INT_DOT_VNNI
#pragma GCC pop_options
#endif

namespace mtpx_neon {
#include "rowgemm_isa.h"
#include "step_ops_isa.h"
}  // namespace mtpx_neon
#undef MTPX_ISA
#endif
