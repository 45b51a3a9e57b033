// One instruction set's kernels (isa_avx2.cpp, isa_avx512.cpp, isa_neon.cpp; no include guard): the includer defines
// MTPX_ISA, MTPX_ISA_NAMESPACE, MTPX_ISA_TARGET (its target string; left undefined where the baseline has it) and
// MTPX_VNNI_TARGET (what the integer loops' second build adds: VNNI, SDOT). The integer loops are built twice, the
// second time with that extension in a namespace nested in the set's (vnni::), picked per call by int_dot_vnni()
// (rowgemm_isa.h's matmul_rows_picked); the weight types are shared (gemm_types.h).
#ifdef MTPX_ISA_TARGET
#define MTPX_ISA_PUSH MTPX_TARGET_PUSH(MTPX_ISA_TARGET)
#define MTPX_VNNI_PUSH MTPX_TARGET_PUSH(MTPX_ISA_TARGET, MTPX_VNNI_TARGET)
#define MTPX_ISA_POP MTPX_TARGET_POP
#else
#define MTPX_ISA_PUSH
#define MTPX_VNNI_PUSH MTPX_TARGET_PUSH(MTPX_VNNI_TARGET)
#define MTPX_ISA_POP
#endif

MTPX_ISA_PUSH
namespace MTPX_ISA_NAMESPACE {
#include "gemm_core.h"
}  // namespace MTPX_ISA_NAMESPACE
MTPX_ISA_POP

#if MTPX_HAVE_VNNI
MTPX_VNNI_PUSH
#define MTPX_INT_DOT_VNNI
namespace MTPX_ISA_NAMESPACE::vnni {
#include "gemm_core.h"
}  // namespace MTPX_ISA_NAMESPACE::vnni
#undef MTPX_INT_DOT_VNNI
MTPX_TARGET_POP
#endif

MTPX_ISA_PUSH
namespace MTPX_ISA_NAMESPACE {
#include "rowgemm_isa.h"
#include "step_ops_isa.h"
}  // namespace MTPX_ISA_NAMESPACE
MTPX_ISA_POP
#undef MTPX_ISA_PUSH
#undef MTPX_VNNI_PUSH
#undef MTPX_ISA_POP
#undef MTPX_ISA
