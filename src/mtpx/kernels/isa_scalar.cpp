// The kernels for the baseline CPU, plain loops (the reference the vector versions' matmuls match bit for bit):
// what runs where the CPU has none of the instruction sets below, or with MTPX_CPU_ISA=scalar.
#include "isa_prelude.h"

#define MTPX_ISA MTPX_ISA_SCALAR
namespace mtpx_scalar {
#include "gemm_core.h"
#include "rowgemm_isa.h"
#include "step_ops_isa.h"
}  // namespace mtpx_scalar
#undef MTPX_ISA
