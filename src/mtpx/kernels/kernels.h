// mtpx's CPU kernels: few-row matmuls (rowgemm.cpp), the fused small ops of a step forward (step_ops.cpp) and whole
// decoder layers of a step chained from them (layer_step.cpp).
#pragma once
#include <torch/extension.h>

#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>

// 16 bf16 values -> fp32 lanes (bf16 is the top half of an fp32: widening is exact)
inline __m512 widen_bf16(const at::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
#endif

torch::Tensor rowgemm(const torch::Tensor& x, const torch::Tensor& w);
torch::Tensor rowgemm_int8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale);
torch::Tensor rowgemm_int4(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scale_offset);
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps, bool offset);
torch::Tensor silu_mul(const torch::Tensor& gate_up);
torch::Tensor attention_step(const torch::Tensor& qkv, const torch::Tensor& q_norm, const torch::Tensor& k_norm,
                             const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor cache_k,
                             torch::Tensor cache_v, int64_t start, int64_t nh, int64_t nkv, int64_t D, double eps);
std::vector<torch::Tensor> gdn_step(const torch::Tensor& proj, const torch::Tensor& conv_state,
                                    const torch::Tensor& conv_weight, const torch::Tensor& A_log,
                                    const torch::Tensor& dt_bias, const torch::Tensor& norm_weight,
                                    const torch::Tensor& state, int64_t nk, int64_t dk, int64_t dv, double eps);
torch::Tensor gdn_replay(const torch::Tensor& state, const torch::Tensor& replay, int64_t n);
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
                                double eps);
