// The kernels for aarch64 (NEON is part of its baseline): the matmuls in NEON intrinsics (gemm_core.h), the step
// ops' loops as the compiler vectorises them.
#if defined(__aarch64__)  // (the whole file: elsewhere it compiles to nothing, without parsing PyTorch)
#include "isa_prelude.h"

#define MTPX_ISA MTPX_ISA_NEON
namespace mtpx_neon {
#include "gemm_core.h"
#include "rowgemm_isa.h"
#include "step_ops_isa.h"
}  // namespace mtpx_neon
#undef MTPX_ISA
#endif
