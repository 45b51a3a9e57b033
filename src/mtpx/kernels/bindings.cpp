#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rowgemm", &rowgemm, "few-row bf16 matmul, row-invariant");
  m.def("rowgemm_int8", &rowgemm_int8, "few-row int8-weight matmul, row-invariant");
  m.def("rms_norm", &rms_norm, "RMSNorm of bf16 rows");
  m.def("silu_mul", &silu_mul, "silu(gate) * up");
  m.def("attention_step", &attention_step, "gated attention of a few positions over a KV cache");
  m.def("gdn_step", &gdn_step, "Gated DeltaNet layer core for a few positions, with per-token states");
}
