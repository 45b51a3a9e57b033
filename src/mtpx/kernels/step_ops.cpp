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

// Reads a small contiguous bf16 or fp32 tensor (a norm weight, a conv kernel) without converting it: a conversion
// is a tensor op, and those dispatches are what these kernels remove.
class Floats {
 public:
  explicit Floats(const torch::Tensor& t) {
    TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "step ops: weights must be contiguous CPU tensors");
    if (t.scalar_type() == at::kFloat) {
      f_ = t.data_ptr<float>();
    } else {
      TORCH_CHECK(t.scalar_type() == at::kBFloat16, "step ops: weights must be bf16 or fp32");
      b_ = t.data_ptr<bf16>();
    }
  }
  float operator[](int64_t i) const { return f_ != nullptr ? f_[i] : static_cast<float>(b_[i]); }

 private:
  const float* f_ = nullptr;
  const bf16* b_ = nullptr;
};

// Gated DeltaNet recurrence of value head h over T tokens. q, k [T, nv, dk] (l2-normalised, q scaled), v [T, nv, dv],
// decay, beta [T, nv]; s0 the state before the first token, states[t] receives the state after token t.
// Per token t: S_t = decay * S_{t-1} + k ⊗ delta with delta = (v - decay * k^T S_{t-1}) * beta, and the output
// q^T S_t = decay * q^T S_{t-1} + (q.k) delta. So one pass that writes S_t can also accumulate k^T S_t and q^T S_t
// for token t + 1: one read and one write of the state per token (plus one read before the first). The sums for a
// token run in the same order whatever T is.
void delta_rule_head(const float* q_all, const float* k_all, const float* v_all, const float* decay_all,
                     const float* beta_all, int64_t T, int64_t nv, int64_t h, int64_t dk, int64_t dv,
                     const float* s0, const std::vector<float*>& states, float* out) {
  std::vector<float> kS_buf(dv, 0.f), qS_buf(dv, 0.f), delta_buf(dv);
  float* __restrict__ kS = kS_buf.data();
  float* __restrict__ qS = qS_buf.data();
  float* __restrict__ delta = delta_buf.data();
  const float* S = s0 + h * dk * dv;
  const float* q0 = q_all + h * dk;
  const float* k0 = k_all + h * dk;
  for (int64_t i = 0; i < dk; ++i) {
    const float* __restrict__ row = S + i * dv;
    const float ki = k0[i], qi = q0[i];
#pragma omp simd
    for (int64_t j = 0; j < dv; ++j) {
      kS[j] += ki * row[j];
      qS[j] += qi * row[j];
    }
  }
  for (int64_t t = 0; t < T; ++t) {
    const float* q = q_all + (t * nv + h) * dk;
    const float* k = k_all + (t * nv + h) * dk;
    const float* v = v_all + (t * nv + h) * dv;
    const float decay = decay_all[t * nv + h], b = beta_all[t * nv + h];
    float qk = 0.f;
    for (int64_t i = 0; i < dk; ++i) qk += q[i] * k[i];
    float* __restrict__ o = out + (t * nv + h) * dv;
    for (int64_t j = 0; j < dv; ++j) {
      delta[j] = (v[j] - decay * kS[j]) * b;
      o[j] = decay * qS[j] + qk * delta[j];
      kS[j] = 0.f;
      qS[j] = 0.f;
    }
    float* S_new = states[t] + h * dk * dv;
    const bool next = t + 1 < T;
    const float* kn = next ? k + nv * dk : k;
    const float* qn = next ? q + nv * dk : q;
    for (int64_t i = 0; i < dk; ++i) {
      const float* __restrict__ row = S + i * dv;
      float* __restrict__ row_new = S_new + i * dv;
      const float ki = k[i];
      if (next) {
        const float kni = kn[i], qni = qn[i];
#pragma omp simd
        for (int64_t j = 0; j < dv; ++j) {
          const float s = decay * row[j] + ki * delta[j];
          row_new[j] = s;
          kS[j] += kni * s;
          qS[j] += qni * s;
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < dv; ++j) row_new[j] = decay * row[j] + ki * delta[j];
      }
    }
    S = S_new;
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
  const Floats w(weight);
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
  const Floats qw(q_norm), kw(k_norm);
  const bf16* in = qkv.data_ptr<bf16>();
  const bf16* cp = cos.data_ptr<bf16>();
  const bf16* sp = sin.data_ptr<bf16>();
  bf16* Kc = cache_k.data_ptr<bf16>();
  bf16* Vc = cache_v.data_ptr<bf16>();
  // normalise + rotate one head vector, rounding as the PyTorch path does (norm -> bf16, x*cos, r*sin, sum -> bf16)
  auto prepare = [&](const bf16* src, const Floats& w, int64_t t, float* x, float* dst) {
    for (int64_t i = 0; i < D; ++i) x[i] = static_cast<float>(src[i]);
    const float inv = inverse_rms(x, D, eps);
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
  std::vector<float> scratch(D), buf(D);
  for (int64_t t = 0; t < T; ++t) {
    const bf16* row = in + t * width;
    for (int64_t h = 0; h < nkv; ++h) {
      prepare(row + 2 * nh * D + h * D, kw, t, scratch.data(), buf.data());
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
    std::vector<float> x(D), q(D), acc(D), scores;
    for (int64_t job = begin; job < end; ++job) {
      const int64_t t = job / nh, h = job % nh, kvh = h / group, n = start + t + 1;
      const bf16* row = in + t * width;
      prepare(row + h * 2 * D, qw, t, x.data(), q.data());
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

// Gated DeltaNet layer core for T new positions of one sequence. proj [T, conv_dim + nv * dv + 2 * nv] is the fused
// projection output (q|k|v before the conv, then z, b, a); conv_state [conv_dim, K - 1] the last K - 1 conv inputs.
// Per token: causal depthwise conv + silu, l2-normalised q (scaled) and k, g = -exp(A_log) * softplus(a + dt_bias),
// beta = sigmoid(b), the gated delta rule (two passes over the state instead of the six of separate ops), then the
// gated RMSNorm (weight norm_weight, gate silu(z)). Returns out [T, nv * dv] bf16 (the out_proj input), the conv
// inputs [conv_dim, K - 1 + T] (the state followed by this call's columns: the conv state after token t is columns
// t + 1 .. t + K - 1), then the T states [nv, dk, dv] after each token (separate tensors: a snapshot kept for
// rollback holds only itself).
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
  const Floats w(conv_weight), A(A_log), dt(dt_bias), nw(norm_weight);
  const bf16* pp = proj.data_ptr<bf16>();
  const bf16* zp = pp + conv_dim;
  const bf16* bp = zp + nv * dv;
  const bf16* ap = bp + nv;
  const int64_t len = K - 1 + T;
  auto conv_in = torch::empty({conv_dim, len}, proj.options());
  bf16* xp = conv_in.data_ptr<bf16>();
  const bf16* cs = conv_state.data_ptr<bf16>();
  const int64_t cs0 = conv_state.stride(0), cs1 = conv_state.stride(1);
  for (int64_t c = 0; c < conv_dim; ++c) {
    for (int64_t j = 0; j < K - 1; ++j) xp[c * len + j] = cs[c * cs0 + j * cs1];
    for (int64_t t = 0; t < T; ++t) xp[c * len + K - 1 + t] = pp[t * width + c];
  }
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
      const float a = static_cast<float>(ap[t * width + h]), b = static_cast<float>(bp[t * width + h]);
      decay[t * nv + h] = std::exp(-std::exp(A[h]) * softplus(a + dt[h]));
      beta[t * nv + h] = round_bf16(sigmoid(b));
    }
  auto opts = state.options();
  std::vector<torch::Tensor> result{torch::empty({T, nv * dv}, proj.options()), conv_in};
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
    const bf16* z = zp + (r / nv) * width + (r % nv) * dv;
    for (int64_t j = 0; j < dv; ++j) x[j] = round_bf16(core[r * dv + j]);
    const float inv = inverse_rms(x.data(), dv, eps);
    for (int64_t j = 0; j < dv; ++j) {
      const float normed = round_bf16(nw[j] * round_bf16(x[j] * inv));
      op[r * dv + j] = static_cast<bf16>(normed * silu(static_cast<float>(z[j])));
    }
  }
  return result;
}
