// One whole decoder layer of a step forward (decode / verify / draft: a few positions of one sequence) in one call.
//
// Why: on a small model the kernels of a layer take ~100 us and the Python around them (module calls, projection
// lookups, reshapes) more than that again (the demo model: 250-270 us a layer, BENCHMARKS.md). These functions chain
// exactly the kernels the module path calls (rms_norm, the row-invariant matmuls, attention_step / gdn_step,
// silu_mul, the residual adds) in the same order on the same shapes, so they return the same bits; only the Python
// between them is gone.
//
// A weight is given as the tensors of its format: {w} bf16, {q, scale} int8, {codes, scale_offset} int4.
#include "kernels.h"

namespace {

// x [T, K] @ w.T on the row-invariant kernel of w's format, in blocks of at most 8 rows (as linear.py's _in_blocks)
torch::Tensor matmul(const torch::Tensor& x, const std::vector<torch::Tensor>& w) {
  auto block = [&](const torch::Tensor& rows) {
    if (w.size() == 1) return rowgemm(rows, w[0]);
    TORCH_CHECK(w.size() == 2, "layer step: a weight is {w}, {q, scale} or {codes, scale_offset}");
    return w[0].scalar_type() == at::kChar ? rowgemm_int8(rows, w[0], w[1]) : rowgemm_int4(rows, w[0], w[1]);
  };
  const int64_t T = x.size(0);
  if (T <= 8) return block(x);
  std::vector<torch::Tensor> parts;
  for (int64_t s = 0; s < T; s += 8) parts.push_back(block(x.narrow(0, s, std::min<int64_t>(8, T - s))));
  return torch::cat(parts);
}

// x + down(silu(gate) * up) of the post-attention-normed x
torch::Tensor mlp_residual(const torch::Tensor& x, const torch::Tensor& post_norm, const std::vector<torch::Tensor>& gate_up,
                           const std::vector<torch::Tensor>& down, double eps) {
  return x + matmul(silu_mul(matmul(rms_norm(x, post_norm, eps, true), gate_up)), down);
}

}  // namespace

torch::Tensor attention_layer_step(const torch::Tensor& x, const torch::Tensor& input_norm,
                                   const std::vector<torch::Tensor>& qkv, const torch::Tensor& q_norm,
                                   const torch::Tensor& k_norm, const std::vector<torch::Tensor>& o,
                                   const torch::Tensor& post_norm, const std::vector<torch::Tensor>& gate_up,
                                   const std::vector<torch::Tensor>& down, const torch::Tensor& cos,
                                   const torch::Tensor& sin, torch::Tensor cache_k, torch::Tensor cache_v,
                                   int64_t start, int64_t nh, int64_t nkv, int64_t D, double eps) {
  TORCH_CHECK(x.dim() == 2, "attention_layer_step: x must be [T, hidden]");
  auto mixed = attention_step(matmul(rms_norm(x, input_norm, eps, true), qkv), q_norm, k_norm, cos, sin, cache_k,
                              cache_v, start, nh, nkv, D, eps);
  return mlp_residual(x + matmul(mixed, o), post_norm, gate_up, down, eps);
}

std::vector<torch::Tensor> gdn_layer_step(const torch::Tensor& x, const torch::Tensor& input_norm,
                                          const std::vector<torch::Tensor>& proj, const torch::Tensor& conv_weight,
                                          const torch::Tensor& A_log, const torch::Tensor& dt_bias,
                                          const torch::Tensor& norm_weight, const std::vector<torch::Tensor>& out,
                                          const torch::Tensor& post_norm, const std::vector<torch::Tensor>& gate_up,
                                          const std::vector<torch::Tensor>& down, const torch::Tensor& conv_state,
                                          const torch::Tensor& state, int64_t nk, int64_t dk, int64_t dv, double eps) {
  TORCH_CHECK(x.dim() == 2, "gdn_layer_step: x must be [T, hidden]");
  auto core = gdn_step(matmul(rms_norm(x, input_norm, eps, true), proj), conv_state, conv_weight, A_log, dt_bias,
                       norm_weight, state, nk, dk, dv, eps);
  core[0] = mlp_residual(x + matmul(core[0], out), post_norm, gate_up, down, eps);
  return core;  // the layer's output, then gdn_step's conv inputs, state after the last position, replay
}
