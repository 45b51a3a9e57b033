// mtpx's CPU kernels: few-row matmuls (rowgemm_isa.h, gemm_core.h), the fused small ops of a step forward
// (step_core_isa.h, on tensors in step_ops_isa.h), both built once per instruction set (isa_*.cpp) and picked at
// load (dispatch.cpp), and whole decoder layers of a step chained from them (layer_step.cpp).
#pragma once
#include <torch/extension.h>

#include <string>
#include <vector>

// A logit after the repetition, frequency and presence penalties (sampling.penalize's formula, in its operation
// order): seen ids (prompt or generated) divided / multiplied by r, then - f * count - p * (count > 0). One place
// for the draft chain (layer_step.cpp) and the verify rows (penalize_rows, dispatch.cpp).
inline float penalized_logit(float v, float count, bool seen, float r, float f, float p) {
  if (seen && r != 1.0f) v = v > 0 ? v / r : v * r;
  v = v - f * count;
  return v - p * (count > 0 ? 1.0f : 0.0f);
}

// the kernels built once per instruction set (isa_*.cpp), these calling the one selected at load (dispatch.cpp)
#include "kernel_decls.h"
bool amx_available();
// whether the integer matmuls run on VNNI dot products now (x86; SDOT on aarch64): the level in use has them on this
// CPU and in this build, and MTPX_VNNI is not 0 (or, on aarch64, the compiler's baseline has SDOT); the same bits
// either way. set_int_dot_vnni(false) turns them off (tests), true back on.
bool int_dot_vnni();
void set_int_dot_vnni(bool on);
torch::Tensor rowgemm_tiles(const torch::Tensor& x, const torch::Tensor& tiles, int64_t n);
int64_t flush_denormals();
torch::Tensor penalize_rows(const torch::Tensor& logits, const torch::Tensor& counts, const torch::Tensor& seen,
                            const torch::Tensor& drafts, double repetition, double frequency, double presence);
// the instruction sets this CPU (and build) can run, best first; the one in use; choosing another (tests, and
// MTPX_CPU_ISA through kernels/__init__.py)
std::vector<std::string> cpu_isas();
std::string isa();
void set_isa(const std::string& name);
torch::Tensor attention_layer_step(const torch::Tensor& x, const torch::Tensor& input_norm,
                                   const std::vector<torch::Tensor>& qkv, const torch::Tensor& q_norm,
                                   const torch::Tensor& k_norm, const std::vector<torch::Tensor>& o,
                                   const torch::Tensor& post_norm, const std::vector<torch::Tensor>& gate_up,
                                   const std::vector<torch::Tensor>& down, const torch::Tensor& cos,
                                   const torch::Tensor& sin, torch::Tensor cache_k, torch::Tensor cache_v,
                                   int64_t start, int64_t nh, int64_t nkv, int64_t D, double eps);
std::vector<torch::Tensor> gdn_layer_step(const torch::Tensor& x, const torch::Tensor& input_norm,
                                          const std::vector<torch::Tensor>& proj, const torch::Tensor& conv_weight,
                                          const torch::Tensor& A_log, const torch::Tensor& dt_bias,
                                          const torch::Tensor& norm_weight, const std::vector<torch::Tensor>& out,
                                          const torch::Tensor& post_norm, const std::vector<torch::Tensor>& gate_up,
                                          const std::vector<torch::Tensor>& down, const torch::Tensor& conv_state,
                                          const torch::Tensor& state, int64_t nk, int64_t dk, int64_t dv, double eps);
torch::Tensor mtp_greedy_drafts(const torch::Tensor& hidden, const torch::Tensor& tokens, const torch::Tensor& embed,
                                const torch::Tensor& norm_embedding, const torch::Tensor& norm_hidden,
                                const std::vector<torch::Tensor>& fc, const torch::Tensor& input_norm,
                                const std::vector<torch::Tensor>& qkv, const torch::Tensor& q_norm,
                                const torch::Tensor& k_norm, const std::vector<torch::Tensor>& o,
                                const torch::Tensor& post_norm, const std::vector<torch::Tensor>& gate_up,
                                const std::vector<torch::Tensor>& down, const torch::Tensor& final_norm,
                                const std::vector<torch::Tensor>& head, const torch::Tensor& head_ids,
                                const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor cache_k,
                                torch::Tensor cache_v, int64_t start, int64_t k, int64_t nh, int64_t nkv, int64_t D,
                                double eps, const torch::Tensor& penalty_counts, const torch::Tensor& penalty_seen,
                                double repetition, double frequency, double presence);

// A decoder stack (embedding, layers, final norm) for whole-stack step calls of one sequence: the layers' weights
// are handed over once (add_attention / add_gdn, in layer order), so a step passes only its tokens and caches
// across the Python boundary. run() chains attention_layer_step / gdn_layer_step (the same bits as calling them one
// by one) and returns the final-normed hidden states [T, H], then per Gated DeltaNet layer what gdn_layer_step
// returns after the layer output (conv inputs, state after the last position, replay).
class StackStep {
 public:
  StackStep(torch::Tensor embed, torch::Tensor final_norm, double eps);
  void add_attention(torch::Tensor input_norm, std::vector<torch::Tensor> qkv, torch::Tensor q_norm,
                     torch::Tensor k_norm, std::vector<torch::Tensor> o, torch::Tensor post_norm,
                     std::vector<torch::Tensor> gate_up, std::vector<torch::Tensor> down, int64_t nh, int64_t nkv,
                     int64_t D);
  void add_gdn(torch::Tensor input_norm, std::vector<torch::Tensor> proj, torch::Tensor conv_weight,
               torch::Tensor A_log, torch::Tensor dt_bias, torch::Tensor norm_weight, std::vector<torch::Tensor> out,
               torch::Tensor post_norm, std::vector<torch::Tensor> gate_up, std::vector<torch::Tensor> down,
               int64_t nk, int64_t dk, int64_t dv);
  // tokens [T]; cos, sin [T, rd] for positions start..; kv: (k, v) per attention layer; conv_states, states: per
  // Gated DeltaNet layer
  std::vector<torch::Tensor> run(const torch::Tensor& tokens, const torch::Tensor& cos, const torch::Tensor& sin,
                                 int64_t start, const std::vector<torch::Tensor>& kv,
                                 const std::vector<torch::Tensor>& conv_states,
                                 const std::vector<torch::Tensor>& states) const;

 private:
  struct Layer {
    bool attention;
    std::vector<torch::Tensor> t;               // norms and small tensors, in the layer kernel's argument order
    std::vector<std::vector<torch::Tensor>> w;  // the matmul weights: mixer in, mixer out, gate_up, down
    std::vector<int64_t> dims;                  // nh, nkv, D | nk, dk, dv
  };
  torch::Tensor embed_, final_norm_;
  double eps_;
  std::vector<Layer> layers_;
};
