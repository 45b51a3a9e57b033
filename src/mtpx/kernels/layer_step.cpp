// One whole decoder layer of a step forward (decode / verify / draft: a few positions of one sequence) in one call.
//
// Why: on a small model the kernels of a layer take about as long as the Python around them (module calls,
// projection lookups, reshapes). These functions chain exactly the kernels the module path calls (rms_norm, the
// row-invariant matmuls, attention_step / gdn_step, silu_mul, the residual adds) in the same order on the same
// shapes, so they return the same bits; only the Python between them is gone.
//
// A weight is given as the tensors of its format: {w} bf16, {q, scale} int8, {codes, groups, supers} int4 (uint8
// codes) or int8 blocks (int8 codes), {tiles, n} bf16 in AMX tile order.
#include <limits>
#include "kernels.h"

namespace {

// x [T, K] @ w.T on the row-invariant kernel of w's format, in blocks of at most 8 rows (as linear.py's _in_blocks;
// AMX tiles take any number)
torch::Tensor matmul(const torch::Tensor& x, const std::vector<torch::Tensor>& w) {
  if (w.size() == 2 && w[0].dim() == 4)  // {tiles, n}: n a CPU int64 scalar, read without a dispatch
    return rowgemm_tiles(x, w[0], *w[1].data_ptr<int64_t>());
  auto block = [&](const torch::Tensor& rows) {
    if (w.size() == 1) return rowgemm(rows, w[0]);
    if (w.size() == 2) return rowgemm_int8(rows, w[0], w[1]);
    TORCH_CHECK(w.size() == 3, "layer step: a weight is {w}, {q, scale}, {codes, groups, supers} or {tiles, n}");
    return w[0].scalar_type() == at::kByte ? rowgemm_int4(rows, w[0], w[1], w[2])
                                           : rowgemm_int8_blocks(rows, w[0], w[1], w[2]);
  };
  const int64_t T = x.size(0);
  if (T <= 8) return block(x);
  std::vector<torch::Tensor> parts;
  for (int64_t s = 0; s < T; s += 8) parts.push_back(block(x.narrow(0, s, std::min<int64_t>(8, T - s))));
  return torch::cat(parts);
}

// x + down(silu(gate) * up) of the post-attention-normed x
torch::Tensor mlp_residual(const torch::Tensor& x, const torch::Tensor& post_norm,
                           const std::vector<torch::Tensor>& gate_up, const std::vector<torch::Tensor>& down,
                           double eps) {
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

// Greedy drafting with a one-layer MTP module for one sequence, all k drafts in one call. The first pass runs the
// n pending pairs (h_i, t_{i+1}) of the accepted sequence (hidden [n, H], tokens [n]); each later pass feeds the
// layer its own normed output and the draft token it chose. A pass: x = fc([rms_norm_e(embed(t)); rms_norm_h(h)]),
// the attention layer (writing the MTP KV cache at start, start + 1, ...), then mtp.norm; a draft is the argmax of
// head(x) (over the rows `head_ids` of the full vocabulary when given, else all of it). The same kernels and ops as
// the Python drafting loop (drafters.py), so the same drafts. cos, sin: [n + k - 1, rd] for positions start... .
// Returns the k draft token ids.
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
                                double repetition, double frequency, double presence) {
  const int64_t n = tokens.size(0);
  TORCH_CHECK(n >= 1 && k >= 1 && hidden.dim() == 2 && hidden.size(0) == n,
              "mtp_greedy_drafts: hidden [n, H], tokens [n], k >= 1");
  TORCH_CHECK(cos.size(0) >= n + k - 1, "mtp_greedy_drafts: cos, sin need n + k - 1 rows");
  auto drafts = torch::empty({k}, tokens.options().dtype(at::kLong));
  TORCH_CHECK(head_ids.numel() == 0 || (head_ids.scalar_type() == at::kLong && head_ids.is_contiguous()),
              "mtp_greedy_drafts: head_ids must be contiguous int64");
  // penalties (sampling.py's apply_penalties, the same formula): each draft follows the earlier ones, so a draft
  // counts as generated for the next; copies, the caller's tensors stay as they were
  const bool penalized = penalty_counts.numel() > 0;
  torch::Tensor counts, seen;
  if (penalized) {
    TORCH_CHECK(penalty_counts.dim() == 1 && penalty_seen.sizes() == penalty_counts.sizes(),
                "mtp_greedy_drafts: penalty counts and seen are [V]");
    counts = penalty_counts.to(at::kFloat).contiguous().clone();
    seen = penalty_seen.to(at::kBool).contiguous().clone();
  }
  TORCH_CHECK(embed.dim() == 2 && embed.is_contiguous(), "mtp_greedy_drafts: embed must be a contiguous [V, H]");
  torch::Tensor h = hidden;
  int64_t pos = 0, previous = -1;  // rows of cos / sin used so far; the last draft's id
  for (int64_t j = 0; j < k; ++j) {
    const int64_t T = j == 0 ? n : 1;
    // the tokens' embeddings: the pending tokens, then the previous draft's row of the table (a view, no copy)
    const auto e = j == 0 ? at::embedding(embed, tokens)
                          : torch::from_blob(static_cast<char*>(embed.data_ptr()) + previous * embed.stride(0) *
                                                 embed.element_size(), {1, embed.size(1)}, embed.options());
    auto x = matmul(torch::cat({rms_norm(e, norm_embedding, eps, true),
                                rms_norm(h.contiguous(), norm_hidden, eps, true)}, -1), fc);
    x = attention_layer_step(x, input_norm, qkv, q_norm, k_norm, o, post_norm, gate_up, down,
                             cos.narrow(0, pos, T), sin.narrow(0, pos, T), cache_k, cache_v, start + pos, nh, nkv,
                             D, eps);
    pos += T;
    h = rms_norm(x.narrow(0, T - 1, 1).contiguous(), final_norm, eps, true);
    auto logits = matmul(h, head);
    int64_t best;
    if (penalized) {  // one pass: penalise each row's logit by its id's history, keep the first largest
      const auto l = logits[0].to(at::kFloat).contiguous();
      const float* lp = l.data_ptr<float>();
      const int64_t* ids = head_ids.numel() > 0 ? head_ids.data_ptr<int64_t>() : nullptr;
      float* cp = counts.data_ptr<float>();
      bool* sp = seen.data_ptr<bool>();
      const float r = static_cast<float>(repetition), f = static_cast<float>(frequency),
                  p = static_cast<float>(presence);
      float top = -std::numeric_limits<float>::infinity();
      int64_t row = 0;
      for (int64_t i = 0; i < l.size(0); ++i) {
        const int64_t id = ids ? ids[i] : i;
        const float v = penalized_logit(lp[i], cp[id], sp[id], r, f, p);
        if (v > top) top = v, row = i;
      }
      best = ids ? ids[row] : row;
      cp[best] += 1;
      sp[best] = true;
    } else {
      best = argmax_rows(logits)[0];
      if (head_ids.numel() > 0) best = head_ids.data_ptr<int64_t>()[best];
    }
    drafts.data_ptr<int64_t>()[j] = best;
    previous = best;
  }
  return drafts;
}

StackStep::StackStep(torch::Tensor embed, torch::Tensor final_norm, double eps)
    : embed_(std::move(embed)), final_norm_(std::move(final_norm)), eps_(eps) {}

void StackStep::add_attention(torch::Tensor input_norm, std::vector<torch::Tensor> qkv, torch::Tensor q_norm,
                              torch::Tensor k_norm, std::vector<torch::Tensor> o, torch::Tensor post_norm,
                              std::vector<torch::Tensor> gate_up, std::vector<torch::Tensor> down, int64_t nh,
                              int64_t nkv, int64_t D) {
  layers_.push_back({true, {input_norm, q_norm, k_norm, post_norm}, {qkv, o, gate_up, down}, {nh, nkv, D}});
}

void StackStep::add_gdn(torch::Tensor input_norm, std::vector<torch::Tensor> proj, torch::Tensor conv_weight,
                        torch::Tensor A_log, torch::Tensor dt_bias, torch::Tensor norm_weight,
                        std::vector<torch::Tensor> out, torch::Tensor post_norm, std::vector<torch::Tensor> gate_up,
                        std::vector<torch::Tensor> down, int64_t nk, int64_t dk, int64_t dv) {
  layers_.push_back({false, {input_norm, conv_weight, A_log, dt_bias, norm_weight, post_norm},
                     {proj, out, gate_up, down}, {nk, dk, dv}});
}

std::vector<torch::Tensor> StackStep::run(const torch::Tensor& tokens, const torch::Tensor& cos,
                                          const torch::Tensor& sin, int64_t start,
                                          const std::vector<torch::Tensor>& kv,
                                          const std::vector<torch::Tensor>& conv_states,
                                          const std::vector<torch::Tensor>& states) const {
  TORCH_CHECK(tokens.dim() == 1, "StackStep.run: tokens must be [T]");
  std::vector<torch::Tensor> out{torch::Tensor()};
  auto x = at::embedding(embed_, tokens);
  size_t attention = 0, gdn = 0;
  for (const Layer& l : layers_) {
    if (l.attention) {
      TORCH_CHECK(2 * attention + 1 < kv.size(), "StackStep.run: a (k, v) cache pair per attention layer");
      x = attention_layer_step(x, l.t[0], l.w[0], l.t[1], l.t[2], l.w[1], l.t[3], l.w[2], l.w[3], cos, sin,
                               kv[2 * attention], kv[2 * attention + 1], start, l.dims[0], l.dims[1], l.dims[2],
                               eps_);
      ++attention;
    } else {
      TORCH_CHECK(gdn < conv_states.size() && gdn < states.size(),
                  "StackStep.run: a conv state and a recurrent state per Gated DeltaNet layer");
      auto r = gdn_layer_step(x, l.t[0], l.w[0], l.t[1], l.t[2], l.t[3], l.t[4], l.w[1], l.t[5], l.w[2], l.w[3],
                              conv_states[gdn], states[gdn].contiguous(), l.dims[0], l.dims[1], l.dims[2], eps_);
      x = r[0];
      out.insert(out.end(), r.begin() + 1, r.end());
      ++gdn;
    }
  }
  out[0] = rms_norm(x, final_norm_, eps_, true);
  return out;
}
