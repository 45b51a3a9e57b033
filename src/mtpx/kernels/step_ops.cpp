// The small ops of a step forward (decode / verify / draft: a few positions of one sequence), fused.
//
// Why: a step of a small model (or the non-matmul part of a large one) is a few hundred tiny PyTorch ops, each
// costing several microseconds of dispatch and allocation; the work itself is microseconds in all. These kernels do
// the same arithmetic in one call per op group. Each position is computed by the same code whatever the number of
// positions in the call (rows are independent, loops over a row run in a fixed order), so results stay
// row-invariant and greedy speculation stays bit-exact. Intermediate results are rounded to bf16 where the PyTorch
// step path rounds them (the model runs in bf16), so both paths compute the same function.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <cmath>

namespace {

using bf16 = at::BFloat16;

inline float round_bf16(float x) { return static_cast<float>(static_cast<bf16>(x)); }
inline float silu(float x) { return x / (1.0f + std::exp(-x)); }
inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }
inline float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }  // PyTorch's threshold

float inverse_rms(const float* x, int64_t n, double eps) {
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  return 1.0f / std::sqrt(ss / static_cast<float>(n) + static_cast<float>(eps));
}

void check_bf16(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.is_contiguous() && t.device().is_cpu(), what,
              " must be a contiguous bf16 CPU tensor");
}

std::vector<float> as_floats(const torch::Tensor& t) {
  auto f = t.to(at::kFloat).contiguous();
  return std::vector<float>(f.data_ptr<float>(), f.data_ptr<float>() + f.numel());
}

// Gated DeltaNet recurrence of value head h over T tokens. q, k [T, nv, dk] (l2-normalised, q scaled), v [T, nv, dv],
// decay, beta [T, nv]; s0 the state before the first token, states[t] receives the state after token t.
void delta_rule_head(const float* q_all, const float* k_all, const float* v_all, const float* decay_all,
                     const float* beta_all, int64_t T, int64_t nv, int64_t h, int64_t dk, int64_t dv,
                     const float* s0, const std::vector<float*>& states, float* out) {
  std::vector<float> kv(dv), delta(dv);
  for (int64_t t = 0; t < T; ++t) {
    const float* q = q_all + (t * nv + h) * dk;
    const float* k = k_all + (t * nv + h) * dk;
    const float* v = v_all + (t * nv + h) * dv;
    const float decay = decay_all[t * nv + h], b = beta_all[t * nv + h];
    const float* S = (t == 0 ? s0 : states[t - 1]) + h * dk * dv;
    float* S_new = states[t] + h * dk * dv;
    float* o = out + (t * nv + h) * dv;
    for (int64_t j = 0; j < dv; ++j) kv[j] = 0.f;
    for (int64_t i = 0; i < dk; ++i) {
      const float ki = k[i] * decay;
      for (int64_t j = 0; j < dv; ++j) kv[j] += ki * S[i * dv + j];
    }
    for (int64_t j = 0; j < dv; ++j) {
      delta[j] = (v[j] - kv[j]) * b;
      o[j] = 0.f;
    }
    for (int64_t i = 0; i < dk; ++i) {
      const float ki = k[i], qi = q[i];
      for (int64_t j = 0; j < dv; ++j) {
        const float s = decay * S[i * dv + j] + ki * delta[j];
        S_new[i * dv + j] = s;
        o[j] += qi * s;
      }
    }
  }
}

void l2_normalise(float* x, int64_t n, float scale) {
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float f = scale / std::sqrt(ss + 1e-6f);
  for (int64_t i = 0; i < n; ++i) x[i] *= f;
}

}  // namespace

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps, bool offset) {
  check_bf16(x, "rms_norm: x");
  const int64_t H = x.size(-1), R = x.numel() / H;
  TORCH_CHECK(weight.numel() == H, "rms_norm: weight must have ", H, " elements");
  const auto w = as_floats(weight);
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
  for (int64_t r = 0; r < R; ++r)
    for (int64_t i = 0; i < I; ++i) {
      const float g = round_bf16(silu(static_cast<float>(gp[r * 2 * I + i])));
      op[r * I + i] = static_cast<bf16>(g * static_cast<float>(gp[r * 2 * I + I + i]));
    }
  return out;
}

// Gated full attention over a KV cache for T new positions of one sequence, from the fused q|k|v projection output
// [T, 2 * nh * D + 2 * nkv * D] (q interleaved with its gate per head). Per position: q/k RMSNorm (zero-centred
// weights), rotate-half RoPE on the first rd dims (cos, sin [T, rd]), k and v written to the cache at start + t,
// softmax attention of each head over cache positions 0..start + t (GQA: head h reads kv head h / (nh / nkv)),
// then multiplied by sigmoid(gate). Returns [T, nh * D], the o_proj input.
torch::Tensor attention_step(const torch::Tensor& qkv, const torch::Tensor& q_norm, const torch::Tensor& k_norm,
                             const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor cache_k,
                             torch::Tensor cache_v, int64_t start, int64_t nh, int64_t nkv, int64_t D, double eps) {
  check_bf16(qkv, "attention_step: qkv");
  check_bf16(cos, "attention_step: cos");
  check_bf16(sin, "attention_step: sin");
  check_bf16(cache_k, "attention_step: cache_k");
  check_bf16(cache_v, "attention_step: cache_v");
  const int64_t T = qkv.size(0), width = 2 * nh * D + 2 * nkv * D, rd = cos.size(-1), half = rd / 2;
  const int64_t max_len = cache_k.size(1);
  TORCH_CHECK(qkv.size(1) == width, "attention_step: qkv width ", qkv.size(1), " != ", width);
  TORCH_CHECK(cos.numel() == T * rd && sin.numel() == T * rd && rd <= D, "attention_step: cos, sin [T, rd]");
  TORCH_CHECK(cache_k.size(0) == nkv && cache_k.size(2) == D && cache_v.sizes() == cache_k.sizes(),
              "attention_step: caches [nkv, max_len, D]");
  TORCH_CHECK(start >= 0 && start + T <= max_len, "attention_step: positions ", start, "..", start + T,
              " exceed the cache (", max_len, ")");
  TORCH_CHECK(nh % nkv == 0, "attention_step: query heads must be a multiple of kv heads");
  const auto qw = as_floats(q_norm), kw = as_floats(k_norm);
  const bf16* in = qkv.data_ptr<bf16>();
  const bf16* cp = cos.data_ptr<bf16>();
  const bf16* sp = sin.data_ptr<bf16>();
  bf16* Kc = cache_k.data_ptr<bf16>();
  bf16* Vc = cache_v.data_ptr<bf16>();
  // normalise + rotate one head vector, rounding as the PyTorch path does (norm -> bf16, x*cos, r*sin, sum -> bf16)
  auto prepare = [&](const bf16* src, const std::vector<float>& w, int64_t t, float* dst) {
    std::vector<float> x(D);
    for (int64_t i = 0; i < D; ++i) x[i] = static_cast<float>(src[i]);
    const float inv = inverse_rms(x.data(), D, eps);
    for (int64_t i = 0; i < D; ++i) x[i] = round_bf16(x[i] * inv * (1.0f + w[i]));
    for (int64_t i = 0; i < D; ++i) {
      if (i >= rd) {
        dst[i] = x[i];
        continue;
      }
      const float rotated = i < half ? -x[i + half] : x[i - half];
      const float c = static_cast<float>(cp[t * rd + i]), s = static_cast<float>(sp[t * rd + i]);
      dst[i] = round_bf16(round_bf16(x[i] * c) + round_bf16(rotated * s));
    }
  };
  std::vector<float> buf(D);
  for (int64_t t = 0; t < T; ++t) {
    const bf16* row = in + t * width;
    for (int64_t h = 0; h < nkv; ++h) {
      prepare(row + 2 * nh * D + h * D, kw, t, buf.data());
      bf16* kdst = Kc + (h * max_len + start + t) * D;
      bf16* vdst = Vc + (h * max_len + start + t) * D;
      const bf16* vsrc = row + 2 * nh * D + nkv * D + h * D;
      for (int64_t i = 0; i < D; ++i) {
        kdst[i] = static_cast<bf16>(buf[i]);
        vdst[i] = vsrc[i];
      }
    }
  }
  auto out = torch::empty({T, nh * D}, qkv.options());
  bf16* op = out.data_ptr<bf16>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t group = nh / nkv;
  at::parallel_for(0, T * nh, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(D), acc(D), scores;
    for (int64_t job = begin; job < end; ++job) {
      const int64_t t = job / nh, h = job % nh, kvh = h / group, n = start + t + 1;
      const bf16* row = in + t * width;
      prepare(row + h * 2 * D, qw, t, q.data());
      scores.resize(n);
      float top = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        const bf16* key = Kc + (kvh * max_len + j) * D;
        float s = 0.f;
        for (int64_t i = 0; i < D; ++i) s += q[i] * static_cast<float>(key[i]);
        scores[j] = s * scale;
        top = std::max(top, scores[j]);
      }
      float total = 0.f;
      for (int64_t j = 0; j < n; ++j) {
        scores[j] = std::exp(scores[j] - top);
        total += scores[j];
      }
      for (int64_t i = 0; i < D; ++i) acc[i] = 0.f;
      for (int64_t j = 0; j < n; ++j) {
        const bf16* value = Vc + (kvh * max_len + j) * D;
        const float p = scores[j];
        for (int64_t i = 0; i < D; ++i) acc[i] += p * static_cast<float>(value[i]);
      }
      const bf16* gate = row + h * 2 * D + D;
      for (int64_t i = 0; i < D; ++i) {
        const float o = round_bf16(acc[i] / total);
        op[t * nh * D + h * D + i] = static_cast<bf16>(o * round_bf16(sigmoid(static_cast<float>(gate[i]))));
      }
    }
  });
  return out;
}

// Gated DeltaNet layer core for T new positions of one sequence, from the fused projection outputs:
// conv_in [conv_dim, K - 1 + T] (the conv state followed by this call's q|k|v columns), conv_weight [conv_dim, K],
// a, b [T, nv] (decay and beta inputs), z [T, nv * dv] (output gate). Per token: causal depthwise conv + silu,
// l2-normalised q (scaled) and k, g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b), the gated delta rule
// (two passes over the state instead of the six of separate ops), then the gated RMSNorm with weight norm_weight.
// Returns out [T, nv * dv] bf16 (the out_proj input) followed by the T states [nv, dk, dv] after each token
// (separate tensors: a snapshot kept for rollback holds only itself).
std::vector<torch::Tensor> gdn_step(const torch::Tensor& conv_in, const torch::Tensor& conv_weight,
                                    const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& z,
                                    const torch::Tensor& A_log, const torch::Tensor& dt_bias,
                                    const torch::Tensor& norm_weight, const torch::Tensor& state, int64_t nk,
                                    int64_t dk, int64_t dv, double eps) {
  check_bf16(conv_in, "gdn_step: conv_in");
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.is_contiguous() && state.dim() == 3 && state.size(1) == dk &&
              state.size(2) == dv, "gdn_step: state must be contiguous fp32 [nv, dk, dv]");
  const int64_t nv = state.size(0), conv_dim = conv_in.size(0), K = conv_weight.size(-1);
  const int64_t T = conv_in.size(1) - (K - 1), key_dim = nk * dk;
  TORCH_CHECK(conv_dim == 2 * key_dim + nv * dv, "gdn_step: conv_in has ", conv_dim, " channels, expected ",
              2 * key_dim + nv * dv);
  TORCH_CHECK(T >= 1 && conv_weight.numel() == conv_dim * K, "gdn_step: conv_weight [conv_dim, K]");
  TORCH_CHECK(a.numel() == T * nv && b.numel() == T * nv && z.numel() == T * nv * dv, "gdn_step: a, b [T, nv], z [T, nv * dv]");
  TORCH_CHECK(nv % nk == 0, "gdn_step: value heads must be a multiple of key heads");
  const auto w = as_floats(conv_weight), av = as_floats(a), bv = as_floats(b), zv = as_floats(z);
  const auto A = as_floats(A_log), dt = as_floats(dt_bias), nw = as_floats(norm_weight);
  const bf16* xp = conv_in.data_ptr<bf16>();
  const int64_t len = conv_in.size(1);
  // conv + silu, rounded to bf16 like the PyTorch path's `mixed`, laid out [T, conv_dim]
  std::vector<float> mixed(T * conv_dim);
  for (int64_t c = 0; c < conv_dim; ++c)
    for (int64_t t = 0; t < T; ++t) {
      float acc = static_cast<float>(xp[c * len + t]) * w[c * K];
      for (int64_t j = 1; j < K; ++j) acc = acc + static_cast<float>(xp[c * len + t + j]) * w[c * K + j];
      mixed[t * conv_dim + c] = round_bf16(silu(acc));
    }
  const int64_t group = nv / nk;
  const float q_scale = 1.0f / std::sqrt(static_cast<float>(dk));
  // per value head: q, k (of its key head), v, laid out [T, nv, d] so heads are independent
  std::vector<float> q(T * nv * dk), k(T * nv * dk), v(T * nv * dv), decay(T * nv), beta(T * nv);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < nv; ++h) {
      const float* row = mixed.data() + t * conv_dim;
      float* qh = q.data() + (t * nv + h) * dk;
      float* kh = k.data() + (t * nv + h) * dk;
      for (int64_t i = 0; i < dk; ++i) {
        qh[i] = row[(h / group) * dk + i];
        kh[i] = row[key_dim + (h / group) * dk + i];
      }
      l2_normalise(qh, dk, q_scale);
      l2_normalise(kh, dk, 1.0f);
      for (int64_t j = 0; j < dv; ++j) v[(t * nv + h) * dv + j] = row[2 * key_dim + h * dv + j];
      decay[t * nv + h] = std::exp(-std::exp(A[h]) * softplus(av[t * nv + h] + dt[h]));
      beta[t * nv + h] = round_bf16(sigmoid(bv[t * nv + h]));
    }
  auto opts = state.options();
  std::vector<torch::Tensor> result{torch::empty({T, nv * dv}, conv_in.options())};
  std::vector<float*> states;
  for (int64_t t = 0; t < T; ++t) {
    result.push_back(torch::empty({nv, dk, dv}, opts));
    states.push_back(result.back().data_ptr<float>());
  }
  std::vector<float> core(T * nv * dv);
  const float* s0 = state.data_ptr<float>();
  at::parallel_for(0, nv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h)
      delta_rule_head(q.data(), k.data(), v.data(), decay.data(), beta.data(), T, nv, h, dk, dv, s0, states,
                      core.data());
  });
  // gated RMSNorm over each head's dv values: weight * norm(core) (bf16) * silu(z)
  bf16* op = result[0].data_ptr<bf16>();
  std::vector<float> x(dv);
  for (int64_t r = 0; r < T * nv; ++r) {
    for (int64_t j = 0; j < dv; ++j) x[j] = round_bf16(core[r * dv + j]);
    const float inv = inverse_rms(x.data(), dv, eps);
    for (int64_t j = 0; j < dv; ++j) {
      const float normed = round_bf16(nw[j] * round_bf16(x[j] * inv));
      op[r * dv + j] = static_cast<bf16>(normed * silu(zv[r * dv + j]));
    }
  }
  return result;
}
