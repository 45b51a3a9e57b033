// The step ops on tensors (PyTorch's bindings call these): checks, allocation, then the loops of step_core_isa.h.
#include "step_core_isa.h"

namespace {
void check_bf16(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.is_contiguous() && t.device().is_cpu(), what,
              " must be a contiguous bf16 CPU tensor");
}

// a small contiguous bf16 or fp32 CPU tensor (a norm weight, a conv kernel) as Floats
Floats floats(const torch::Tensor& t) {
  TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "step ops: weights must be contiguous CPU tensors");
  if (t.scalar_type() == at::kFloat) return {t.data_ptr<float>(), nullptr};
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, "step ops: weights must be bf16 or fp32");
  return {nullptr, t.data_ptr<bf16>()};
}
}  // namespace

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps, bool offset) {
  check_bf16(x, "rms_norm: x");
  const int64_t H = x.size(-1), R = x.numel() / H;
  TORCH_CHECK(weight.numel() == H, "rms_norm: weight must have ", H, " elements");
  const Floats w = floats(weight);
  auto out = torch::empty_like(x);
  const bf16* xp = x.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  std::vector<float> row(H);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t i = 0; i < H; ++i) row[i] = static_cast<float>(xp[r * H + i]);
    const float inv = inverse_rms(row.data(), H, eps);
    for (int64_t i = 0; i < H; ++i) op[r * H + i] = static_cast<bf16>(row[i] * inv * (offset ? 1.0f + w[i] : w[i]));
  }
  return out;
}

// [R, 2I] (gate | up) -> [R, I]: silu(gate) * up, rounded like PyTorch's bf16 ops (silu, then the product)
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  check_bf16(gate_up, "silu_mul: gate_up");
  const int64_t I = gate_up.size(-1) / 2, R = gate_up.numel() / (2 * I);
  auto sizes = gate_up.sizes().vec();
  sizes.back() = I;
  auto out = torch::empty(sizes, gate_up.options());
  const bf16* gp = gate_up.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  constexpr int64_t kBlock = 512;  // blocks at fixed offsets in a row: a row's bits do not depend on R
  const int64_t blocks = (I + kBlock - 1) / kBlock;
  // threads take at least 4 blocks each: on less work a parallel region costs more than it saves
  at::parallel_for(0, R * blocks, 4, [&](int64_t begin, int64_t end) {
    float g[kBlock];
    for (int64_t job = begin; job < end; ++job) {
      const int64_t r = job / blocks, i0 = (job % blocks) * kBlock, n = std::min(kBlock, I - i0);
      const bf16* gate = gp + r * 2 * I + i0;
      for (int64_t i = 0; i < n; ++i) g[i] = static_cast<float>(gate[i]);
      silu_row(g, n);
      for (int64_t i = 0; i < n; ++i)
        op[r * I + i0 + i] = static_cast<bf16>(round_bf16(g[i]) * static_cast<float>(gate[I + i]));
    }
  });
  return out;
}

// attention_rows (step_core_isa.h) on tensors: qkv [T, 2 * nh * D + 2 * nkv * D], cos, sin [T, rd], the caches
// [nkv, max_len, D]; returns [T, nh * D], the o_proj input.
torch::Tensor attention_step(const torch::Tensor& qkv, const torch::Tensor& q_norm, const torch::Tensor& k_norm,
                             const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor cache_k,
                             torch::Tensor cache_v, int64_t start, int64_t nh, int64_t nkv, int64_t D, double eps) {
  check_bf16(qkv, "attention_step: qkv");
  check_bf16(cos, "attention_step: cos");
  check_bf16(sin, "attention_step: sin");
  check_bf16(cache_k, "attention_step: cache_k");
  check_bf16(cache_v, "attention_step: cache_v");
  const int64_t T = qkv.size(0), width = 2 * nh * D + 2 * nkv * D, rd = cos.size(-1);
  const int64_t max_len = cache_k.size(1);
  TORCH_CHECK(qkv.size(1) == width, "attention_step: qkv width ", qkv.size(1), " != ", width);
  TORCH_CHECK(cos.numel() == T * rd && sin.numel() == T * rd && rd <= D, "attention_step: cos, sin [T, rd]");
  TORCH_CHECK(cache_k.size(0) == nkv && cache_k.size(2) == D && cache_v.sizes() == cache_k.sizes(),
              "attention_step: caches [nkv, max_len, D]");
  TORCH_CHECK(start >= 0 && start + T <= max_len, "attention_step: positions ", start, "..", start + T,
              " exceed the cache (", max_len, ")");
  TORCH_CHECK(nh % nkv == 0, "attention_step: query heads must be a multiple of kv heads");
  auto out = torch::empty({T, nh * D}, qkv.options());
  attention_rows(qkv.data_ptr<bf16>(), T, floats(q_norm), floats(k_norm), cos.data_ptr<bf16>(), sin.data_ptr<bf16>(),
                 rd, cache_k.data_ptr<bf16>(), cache_v.data_ptr<bf16>(), max_len, start, nh, nkv, D, eps,
                 out.data_ptr<bf16>());
  return out;
}

// gdn_rows (step_core_isa.h) on tensors: proj [T, conv_dim + nv * dv + 2 * nv], conv_state [conv_dim, K - 1] (any
// strides), state fp32 [nv, dk, dv]. Returns out [T, nv * dv], the conv inputs [conv_dim, K - 1 + T], the state
// after the last position and `replay` (see gdn_replay).
std::vector<torch::Tensor> gdn_step(const torch::Tensor& proj, const torch::Tensor& conv_state,
                                    const torch::Tensor& conv_weight, const torch::Tensor& A_log,
                                    const torch::Tensor& dt_bias, const torch::Tensor& norm_weight,
                                    const torch::Tensor& state, int64_t nk, int64_t dk, int64_t dv, double eps) {
  check_bf16(proj, "gdn_step: proj");
  TORCH_CHECK(conv_state.scalar_type() == at::kBFloat16 && conv_state.device().is_cpu(),
              "gdn_step: conv_state must be a bf16 CPU tensor");  // any strides: a view into the last call's conv inputs
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.is_contiguous() && state.dim() == 3 && state.size(1) == dk &&
              state.size(2) == dv, "gdn_step: state must be contiguous fp32 [nv, dk, dv]");
  const int64_t nv = state.size(0), key_dim = nk * dk, conv_dim = 2 * key_dim + nv * dv;
  const int64_t T = proj.size(0), K = conv_weight.size(-1), width = conv_dim + nv * dv + 2 * nv;
  TORCH_CHECK(proj.dim() == 2 && proj.size(1) == width, "gdn_step: proj must be [T, ", width, "]");
  TORCH_CHECK(conv_state.dim() == 2 && conv_state.size(0) == conv_dim && conv_state.size(1) == K - 1,
              "gdn_step: conv_state must be [", conv_dim, ", ", K - 1, "]");
  TORCH_CHECK(T >= 1 && conv_weight.numel() == conv_dim * K, "gdn_step: conv_weight [conv_dim, K]");
  TORCH_CHECK(nv % nk == 0, "gdn_step: value heads must be a multiple of key heads");
  std::vector<torch::Tensor> result{torch::empty({T, nv * dv}, proj.options()),
                                    torch::empty({conv_dim, K - 1 + T}, proj.options()), torch::empty_like(state),
                                    torch::empty({T, nv * (dk + dv + 2)}, state.options())};
  gdn_rows(proj.data_ptr<bf16>(), T, conv_state.data_ptr<bf16>(), conv_state.stride(0), conv_state.stride(1),
           floats(conv_weight), K, floats(A_log), floats(dt_bias), floats(norm_weight), state.data_ptr<float>(), nk, nv,
           dk, dv, eps, result[0].data_ptr<bf16>(), result[1].data_ptr<bf16>(), result[2].data_ptr<float>(),
           result[3].data_ptr<float>());
  return result;
}

// The Gated DeltaNet state after the first n positions of a gdn_step call, from the state before it and that
// call's `replay` tensor: the same instructions as the call itself, so the same bits (rollback after a verify).
torch::Tensor gdn_replay(const torch::Tensor& state, const torch::Tensor& replay, int64_t n) {
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.is_contiguous() && state.dim() == 3,
              "gdn_replay: state must be contiguous fp32 [nv, dk, dv]");
  const int64_t nv = state.size(0), dk = state.size(1), dv = state.size(2), T = replay.size(0);
  TORCH_CHECK(replay.scalar_type() == at::kFloat && replay.is_contiguous() && replay.dim() == 2 &&
                  replay.size(1) == nv * (dk + dv + 2),
              "gdn_replay: replay must be the [T, nv * (dk + dv + 2)] tensor gdn_step returned for this state");
  TORCH_CHECK(n >= 1 && n <= T, "gdn_replay: n must be in 1..", T, ", got ", n);
  const float* k = replay.data_ptr<float>();
  const float* v = k + T * nv * dk;
  const float* decay = v + T * nv * dv;
  const float* beta = decay + T * nv;
  auto out = torch::empty_like(state);
  delta_rule(nullptr, k, v, decay, beta, n, nv, dk, dv, state.data_ptr<float>(), out.data_ptr<float>(), nullptr);
  return out;
}

// The index of the first largest value of each row of x [R, V] (fp32 or bf16), as torch.argmax gives it (a NaN
// counts as the largest), in two vector passes over the row: torch's CPU argmax reads one element at a time, slow
// enough over a vocabulary to show in a verify round.
namespace {
// (functions, not lambdas: GCC does not always give a lambda its enclosing target pragma)
#if MTPX_ISA == MTPX_ISA_AVX512
inline __m512 load(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load(const bf16* p) { return widen16(bits(p)); }
#elif MTPX_ISA == MTPX_ISA_AVX2
inline __m256 load(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load(const bf16* p) { return widen8(bits(p)); }
#endif

template <typename T>
int64_t argmax_row(const T* p, int64_t V) {
  float top = -INFINITY;
  int64_t i = 0;
#if MTPX_ISA == MTPX_ISA_AVX512
  __m512 best = _mm512_set1_ps(-INFINITY);
  __mmask16 nan = 0;
  for (; i + 16 <= V; i += 16) {
    const __m512 v = load(p + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    best = _mm512_max_ps(best, v);
  }
  top = nan ? NAN : _mm512_reduce_max_ps(best);
#elif MTPX_ISA == MTPX_ISA_AVX2
  __m256 best = _mm256_set1_ps(-INFINITY);
  int nan = 0;
  for (; i + 8 <= V; i += 8) {
    const __m256 v = load(p + i);
    nan |= _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    best = _mm256_max_ps(best, v);
  }
  if (nan) {
    top = NAN;
  } else {
    float lanes[8];
    _mm256_storeu_ps(lanes, best);
    for (float v : lanes) top = std::max(top, v);
  }
#endif
  for (int64_t j = i; j < V; ++j) {
    const float v = static_cast<float>(p[j]);
    if (std::isnan(v)) top = NAN;
    else if (!std::isnan(top)) top = std::max(top, v);
  }
  // the first element equal to the top (or the first NaN)
  int64_t j = 0;
#if MTPX_ISA == MTPX_ISA_AVX512
  if (!std::isnan(top)) {
    const __m512 t = _mm512_set1_ps(top);
    for (; j + 16 <= V; j += 16) {
      const __mmask16 hit = _mm512_cmp_ps_mask(load(p + j), t, _CMP_EQ_OQ);
      if (hit) return j + __builtin_ctz(hit);
    }
  }
#elif MTPX_ISA == MTPX_ISA_AVX2
  if (!std::isnan(top)) {
    const __m256 t = _mm256_set1_ps(top);
    for (; j + 8 <= V; j += 8) {
      const int hit = _mm256_movemask_ps(_mm256_cmp_ps(load(p + j), t, _CMP_EQ_OQ));
      if (hit) return j + __builtin_ctz(hit);
    }
  }
#endif
  for (; j < V; ++j) {
    const float v = static_cast<float>(p[j]);
    if (std::isnan(top) ? std::isnan(v) : v == top) return j;
  }
  return 0;  // V == 0 is rejected before
}
}  // namespace

std::vector<int64_t> argmax_rows(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0 && x.device().is_cpu(), "argmax_rows: x must be a CPU tensor [R, V > 0]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "argmax_rows: fp32 or bf16");
  const auto c = x.contiguous();
  const int64_t R = c.size(0), V = c.size(1);
  std::vector<int64_t> out(R);
  for (int64_t r = 0; r < R; ++r)
    out[r] = c.scalar_type() == at::kFloat ? argmax_row(c.data_ptr<float>() + r * V, V)
                                           : argmax_row(c.data_ptr<bf16>() + r * V, V);
  return out;
}
