// The kernels built once per instruction set: declared at global scope (kernels.h, where dispatch.cpp defines them
// to call the selected set's) and inside each set's namespace (dispatch.cpp). No include guard, on purpose.
torch::Tensor rowgemm(const torch::Tensor& x, const torch::Tensor& w);
torch::Tensor rowgemm_int8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale);
torch::Tensor rowgemm_int4(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& groups,
                           const torch::Tensor& supers);
torch::Tensor rowgemm_int8_blocks(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& groups,
                                  const torch::Tensor& supers);
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
std::vector<int64_t> argmax_rows(const torch::Tensor& x);
