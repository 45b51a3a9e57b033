#include "kernels.h"

// The kernels use only ATen's C++ API, so they run without the GIL: a server's HTTP threads keep streaming while
// the model computes (PyTorch's own ops release it the same way).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("rowgemm", &rowgemm, "few-row bf16 matmul, row-invariant", release());
  m.def("rowgemm_int8", &rowgemm_int8, "few-row int8-weight matmul, row-invariant", release());
  m.def("rowgemm_int4", &rowgemm_int4, "few-row int4-weight matmul (groups of 32), row-invariant", release());
  m.def("rowgemm_int8_blocks", &rowgemm_int8_blocks, "few-row int8-weight matmul (groups of 16), row-invariant",
        release());
  m.def("amx_available", &amx_available, "whether this process can use AMX tiles (rowgemm_tiles)");
  m.def("int_dot_vnni", &int_dot_vnni, "whether the integer matmuls run on VNNI dot products now");
  m.def("set_int_dot_vnni", &set_int_dot_vnni, "run the integer matmuls on VNNI where the CPU has it, or not");
  m.def("rowgemm_tiles", &rowgemm_tiles, "bf16 matmul on AMX with weights in tile order, row-invariant", release());
  m.def("rms_norm", &rms_norm, "RMSNorm of bf16 rows", release());
  m.def("silu_mul", &silu_mul, "silu(gate) * up", release());
  m.def("attention_step", &attention_step, "gated attention of a few positions over a KV cache", release());
  m.def("gdn_step", &gdn_step, "Gated DeltaNet layer core for a few positions", release());
  m.def("attention_layer_step", &attention_layer_step, "a full-attention decoder layer of a step, one call", release());
  m.def("gdn_layer_step", &gdn_layer_step, "a Gated DeltaNet decoder layer of a step, one call", release());
  m.def("mtp_greedy_drafts", &mtp_greedy_drafts, "k greedy drafts of a one-layer MTP module, one call", release());
  // module-local: an extension compiled on first use (sources edited since the install) is loaded beside the
  // installed one, which was imported to read its source_hash; two global registrations of one type would clash
  pybind11::class_<StackStep>(m, "StackStep", pybind11::module_local())
      .def(pybind11::init<torch::Tensor, torch::Tensor, double>())
      .def("add_attention", &StackStep::add_attention)
      .def("add_gdn", &StackStep::add_gdn)
      .def("run", &StackStep::run, "the whole stack over a step's positions of one sequence", release());
  m.def("argmax_rows", &argmax_rows, "index of the first largest value of each row, as torch.argmax", release());
  m.def("penalize_rows", &penalize_rows, "repetition, frequency and presence penalties of verify rows", release());
  m.def("flush_denormals", &flush_denormals, "flush subnormal floats to zero on every intra-op worker thread");
  m.def("gdn_replay", &gdn_replay, "Gated DeltaNet state after the first n positions of a gdn_step call", release());
  m.def("cpu_isas", &cpu_isas, "the instruction sets this CPU and build can run, best first");
  m.def("isa", &isa, "the instruction set the kernels run on");
  m.def("set_isa", &set_isa, "run the kernels on another instruction set this CPU has");
#ifdef MTPX_SOURCE_HASH  // -DMTPX_SOURCE_HASH=<hex> (kernels/sources.py): spelled as a string here
#define MTPX_STRING(x) #x
#define MTPX_EXPAND(x) MTPX_STRING(x)
  m.attr("source_hash") = MTPX_EXPAND(MTPX_SOURCE_HASH);
#else
  m.attr("source_hash") = "";
#endif
}
