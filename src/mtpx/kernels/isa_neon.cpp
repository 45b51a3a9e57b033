// The kernels for aarch64 (NEON is part of its baseline): the matmuls in NEON intrinsics (gemm_core.h), the step
// ops' loops as the compiler vectorises them. The integer matmuls are built a second time with the dot-product
// extension (SDOT: Apple M1+, Graviton 2+, Cortex-A76+), used where the CPU has it (int_dot_vnni), unless the
// compiler's baseline has it already (then the first build uses it).
#if defined(__aarch64__)  // (the whole file: elsewhere it compiles to nothing, without parsing PyTorch)
#include "isa_prelude.h"

#define MTPX_ISA MTPX_ISA_NEON
#define MTPX_ISA_NAMESPACE mtpx_neon
#define MTPX_VNNI_TARGET "arch=armv8.2-a+dotprod"
#include "isa_body.h"
#endif
