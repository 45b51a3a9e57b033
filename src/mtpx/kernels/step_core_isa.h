// The small ops of a step forward (decode / verify / draft: a few positions of one sequence), fused: their loops on
// plain pointers, without PyTorch's types, so that a test can build them for another architecture and run them
// under qemu (tests/kernels/step_harness.cpp); step_ops_isa.h calls them on tensors. The includer provides
// mtpx_host::bf16 (a bf16 value type), mtpx_host::parallel_for(begin, end, grain, fn) and mtpx_host::num_threads().
// Longer than 400 lines because every fused op group of a step shares these vector helpers and must round alike.
//
// Why: a step of a small model (or the non-matmul part of a large one) is a few hundred tiny PyTorch ops, each
// costing several microseconds of dispatch and allocation; the work itself is microseconds in all. These kernels do
// the same arithmetic in one call per op group. Each position is computed by the same code whatever the number of
// positions in the call (rows are independent, loops over a row run in a fixed order), so results stay
// row-invariant and greedy speculation stays bit-exact. Intermediate results are rounded to bf16 where the PyTorch
// step path rounds them (the model runs in bf16), so both paths compute the same function.
// Compiled once per instruction set, inside that set's namespace (isa_*.cpp, which include the headers): AVX-512 and
// AVX2 helpers below, the scalar loops elsewhere (on aarch64 the compiler vectorises those for NEON). exp is
// PyTorch's own vectorised Sleef (exported by libtorch_cpu) on x86, so the instruction sets' results differ in the
// last bits of an exp; within one, rows stay invariant.

#if MTPX_ISA == MTPX_ISA_AVX512
extern "C" __m512 Sleef_expf16_u10avx512f(__m512);  // PyTorch's vectorised exp (libtorch_cpu exports it)
#elif MTPX_ISA == MTPX_ISA_AVX2
extern "C" __m256 Sleef_expf8_u10avx2(__m256);
#endif

namespace {

using mtpx_host::bf16;
using mtpx_host::num_threads;
using mtpx_host::parallel_for;

inline const Bf16* bits(const bf16* p) { return reinterpret_cast<const Bf16*>(p); }

inline float round_bf16(float x) { return static_cast<float>(static_cast<bf16>(x)); }
inline float silu(float x) { return x / (1.0f + std::exp(-x)); }
inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }
inline float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }  // PyTorch's threshold

// Vector helpers. Each works along one row in a fixed order (16 lanes, then a fixed reduction tree, then the
// scalar tail), so a row's result never depends on how many rows a call has: row invariance is kept.
float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#if MTPX_ISA == MTPX_ISA_AVX512
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  s = reduce16(acc);
#elif MTPX_ISA == MTPX_ISA_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  s = reduce8(acc);
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// dst[D] = the bf16 row src as floats (exact)
void widen_row(const bf16* src, int64_t D, float* dst) {
  int64_t i = 0;
#if MTPX_ISA == MTPX_ISA_AVX512
  for (; i + 16 <= D; i += 16) _mm512_storeu_ps(dst + i, widen16(bits(src + i)));
#elif MTPX_ISA == MTPX_ISA_AVX2
  for (; i + 8 <= D; i += 8) _mm256_storeu_ps(dst + i, widen8(bits(src + i)));
#endif
  for (; i < D; ++i) dst[i] = static_cast<float>(src[i]);
}

// x <- silu(x) over one row
void silu_row(float* x, int64_t n) {
  int64_t i = 0;
#if MTPX_ISA == MTPX_ISA_AVX512
  const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    __m512 v = _mm512_loadu_ps(x + i);
    _mm512_storeu_ps(x + i, _mm512_div_ps(v, _mm512_add_ps(one, Sleef_expf16_u10avx512f(_mm512_sub_ps(zero, v)))));
  }
#elif MTPX_ISA == MTPX_ISA_AVX2
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    _mm256_storeu_ps(x + i, _mm256_div_ps(v, _mm256_add_ps(one, Sleef_expf8_u10avx2(_mm256_sub_ps(zero, v)))));
  }
#endif
  for (; i < n; ++i) x[i] = silu(x[i]);
}

// s[j] <- exp(s[j] - top) for j < n; returns their sum. 16 lanes at a time (the tail masked; AVX2: 8, the tail
// scalar), summed lane-wise in order and then by a fixed tree: a function of (s, n) only.
float exp_shifted(float* s, int64_t n, float top) {
  int64_t j = 0;
#if MTPX_ISA == MTPX_ISA_AVX512
  const __m512 shift = _mm512_set1_ps(top);
  __m512 sum = _mm512_setzero_ps();
  for (; j < n; j += 16) {
    const __mmask16 live = j + 16 <= n ? 0xFFFF : static_cast<__mmask16>((1u << (n - j)) - 1);
    const __m512 e = Sleef_expf16_u10avx512f(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + j), shift));
    _mm512_mask_storeu_ps(s + j, live, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(live, e));
  }
  return reduce16(sum);
#elif MTPX_ISA == MTPX_ISA_AVX2
  const __m256 shift = _mm256_set1_ps(top);
  __m256 sum = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 e = Sleef_expf8_u10avx2(_mm256_sub_ps(_mm256_loadu_ps(s + j), shift));
    _mm256_storeu_ps(s + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  float total = reduce8(sum);
  for (; j < n; ++j) total += (s[j] = std::exp(s[j] - top));
  return total;
#else
  float total = 0.f;
  for (; j < n; ++j) total += (s[j] = std::exp(s[j] - top));
  return total;
#endif
}

// acc[r * D ..] = sum over j < n[r] of p[r][j] * rows[j] (bf16 rows of D, a KV cache's values) for R rows (a verify
// pass's positions and a kv head's query heads), each lane of each row one FMA chain over j in order, from zero:
// vector width, row grouping and the tiling below do not change a lane's operations, so a row's result is
// bit-identical whatever R.
#if MTPX_ISA == MTPX_ISA_AVX512 || MTPX_ISA == MTPX_ISA_AVX2
#if MTPX_ISA == MTPX_ISA_AVX512
using Lanes = __m512;
constexpr int64_t kVec = 16;
inline Lanes lanes_zero() { return _mm512_setzero_ps(); }
inline Lanes lanes_load(const float* src) { return _mm512_loadu_ps(src); }
inline Lanes lanes_widen(const Bf16* r) { return widen16(r); }
inline Lanes lanes_fma(float w, Lanes v, Lanes a) { return _mm512_fmadd_ps(_mm512_set1_ps(w), v, a); }
inline void lanes_store(float* dst, Lanes a) { _mm512_storeu_ps(dst, a); }
#else
using Lanes = __m256;
constexpr int64_t kVec = 8;
inline Lanes lanes_zero() { return _mm256_setzero_ps(); }
inline Lanes lanes_load(const float* src) { return _mm256_loadu_ps(src); }
inline Lanes lanes_widen(const Bf16* r) { return widen8(r); }
inline Lanes lanes_fma(float w, Lanes v, Lanes a) { return _mm256_fmadd_ps(_mm256_set1_ps(w), v, a); }
inline void lanes_store(float* dst, Lanes a) { _mm256_storeu_ps(dst, a); }
#endif
// R rows x V vectors of lanes at column i over keys [j0, j1), the accumulators in registers (R * V independent FMA
// chains), continued from acc (from zero at j0 = 0)
template <int R, int V>
void weighted_block(const float* const* p, const int64_t* n, const bf16* rows, int64_t D, int64_t i, int64_t j0,
                    int64_t j1, float* acc) {
  Lanes a[R][V];
  int64_t first = n[0], last = n[0];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) a[r][v] = j0 == 0 ? lanes_zero() : lanes_load(acc + r * D + i + v * kVec);
    first = std::min(first, n[r]);
    last = std::max(last, n[r]);
  }
  for (int64_t j = j0; j < std::min(last, j1); ++j) {
    const Bf16* src = bits(rows + j * D + i);
    Lanes x[V];
    for (int v = 0; v < V; ++v) x[v] = lanes_widen(src + v * kVec);
    for (int r = 0; r < R; ++r) {
      if (j < first || j < n[r]) {
        for (int v = 0; v < V; ++v) a[r][v] = lanes_fma(p[r][j], x[v], a[r][v]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) lanes_store(acc + r * D + i + v * kVec, a[r][v]);
}

// weighted_block for m rows (1 .. kSumRows), V vectors wide where registers allow
template <int V>
void weighted_blocks(int64_t m, const float* const* p, const int64_t* n, const bf16* rows, int64_t D, int64_t i,
                     int64_t j0, int64_t j1, float* acc) {
  switch (m) {
    case 1: return weighted_block<1, V>(p, n, rows, D, i, j0, j1, acc);
    case 2: return weighted_block<2, V>(p, n, rows, D, i, j0, j1, acc);
    case 3: return weighted_block<3, V>(p, n, rows, D, i, j0, j1, acc);
    case 4: return weighted_block<4, (V > 2 ? 2 : V)>(p, n, rows, D, i, j0, j1, acc);
#if MTPX_ISA == MTPX_ISA_AVX512
    case 5: return weighted_block<5, 2>(p, n, rows, D, i, j0, j1, acc);
    case 6: return weighted_block<6, 2>(p, n, rows, D, i, j0, j1, acc);
    case 7: return weighted_block<7, 2>(p, n, rows, D, i, j0, j1, acc);
    default: return weighted_block<8, 2>(p, n, rows, D, i, j0, j1, acc);
#endif
  }
}
#endif

// rows summed together, their accumulators in registers: AVX-512 has 32 of them, AVX2 16
#if MTPX_ISA == MTPX_ISA_AVX512
constexpr int64_t kSumRows = 8;
#else
constexpr int64_t kSumRows = 4;
#endif
// Keys are taken in tiles of about this many bytes, every column of a tile's rows summed while they are in L1: a
// column block at a time over the whole cache would stride through memory a row apart, which the hardware
// prefetcher does not follow across pages (a long context's cache read at a fraction of the memory's speed).
constexpr int64_t kKeyTileBytes = 16384;

void weighted_sum_rows(const float* const* p, const int64_t* n, int64_t R, const bf16* rows, int64_t D,
                       float* acc) {
  const int64_t longest = *std::max_element(n, n + R);
  const int64_t tile = std::max<int64_t>(8, kKeyTileBytes / (D * static_cast<int64_t>(sizeof(bf16))));
  for (int64_t j0 = 0; j0 == 0 || j0 < longest; j0 += tile) {
    const int64_t j1 = std::min(j0 + tile, longest);
    for (int64_t r0 = 0; r0 < R; r0 += kSumRows) {
      const int64_t m = std::min<int64_t>(kSumRows, R - r0);
      float* out = acc + r0 * D;
      int64_t i = 0;
#if MTPX_ISA == MTPX_ISA_AVX512 || MTPX_ISA == MTPX_ISA_AVX2
      // 4 vectors (up to three rows on AVX-512, two on AVX2: 12 or 8 chains) where registers hold them, else 2
      if (m <= (kVec == 16 ? 3 : 2))
        for (; i + 4 * kVec <= D; i += 4 * kVec) weighted_blocks<4>(m, p + r0, n + r0, rows, D, i, j0, j1, out);
      for (; i + 2 * kVec <= D; i += 2 * kVec) weighted_blocks<2>(m, p + r0, n + r0, rows, D, i, j0, j1, out);
#endif
      for (; i < D; ++i) {
        for (int64_t r = r0; r < r0 + m; ++r) {
          float a = j0 == 0 ? 0.f : acc[r * D + i];
          for (int64_t j = j0; j < std::min(j1, n[r]); ++j)
            a = std::fma(p[r][j], static_cast<float>(rows[j * D + i]), a);
          acc[r * D + i] = a;
        }
      }
    }
  }
}

float inverse_rms(const float* x, int64_t n, double eps) {
  return 1.0f / std::sqrt(dot(x, x, n) / static_cast<float>(n) + static_cast<float>(eps));
}

// A small bf16 or fp32 weight (a norm weight, a conv kernel), read as it is stored: a conversion would be a tensor
// op, and those dispatches are what these kernels remove.
struct Floats {
  const float* f = nullptr;
  const bf16* b = nullptr;
  float operator[](int64_t i) const { return f != nullptr ? f[i] : static_cast<float>(b[i]); }
};

// Sixteen columns of a state row: one 64-byte line, in registers (one zmm on AVX-512, two ymm on AVX2, four q
// registers on NEON). `float` is the one-column form, for columns past the last whole line.
#if MTPX_ISA == MTPX_ISA_AVX2
struct Line {
  __m256 lo, hi;
};
// (free functions, not friends: GCC does not give functions defined in a class the enclosing target pragma)
inline Line operator-(const Line& a, const Line& b) { return {a.lo - b.lo, a.hi - b.hi}; }
inline Line operator+(const Line& a, const Line& b) { return {a.lo + b.lo, a.hi + b.hi}; }
inline Line operator*(float a, const Line& b) { return {_mm256_set1_ps(a) * b.lo, _mm256_set1_ps(a) * b.hi}; }
inline Line operator*(const Line& b, float a) { return {b.lo * _mm256_set1_ps(a), b.hi * _mm256_set1_ps(a)}; }
inline Line fmadd(float a, const Line& b, const Line& c) {
  const __m256 av = _mm256_set1_ps(a);
  return {_mm256_fmadd_ps(av, b.lo, c.lo), _mm256_fmadd_ps(av, b.hi, c.hi)};
}
inline Line load_line(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void store_line(float* p, const Line& x) {
  _mm256_storeu_ps(p, x.lo);
  _mm256_storeu_ps(p + 8, x.hi);
}
#else
typedef float Line __attribute__((vector_size(64)));
inline Line fmadd(float a, Line b, Line c) {
#if MTPX_ISA == MTPX_ISA_AVX512
  return (Line)_mm512_fmadd_ps(_mm512_set1_ps(a), (__m512)b, (__m512)c);
#else
  for (int i = 0; i < 16; ++i) c[i] = std::fma(a, b[i], c[i]);
  return c;
#endif
}
inline Line load_line(const float* p) {
  Line x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
inline void store_line(float* p, const Line& x) { std::memcpy(p, &x, sizeof x); }
#endif
constexpr int64_t kLineFloats = sizeof(Line) / sizeof(float);  // 16
inline float fmadd(float a, float b, float c) { return std::fma(a, b, c); }
template <typename V> V load_cols(const float* p) {
  if constexpr (std::is_same_v<V, Line>) return load_line(p); else return *p;
}
template <typename V> void store_cols(float* p, const V& x) {
  if constexpr (std::is_same_v<V, Line>) store_line(p, x); else *p = x;
}
// A state row's line that the next step reads from DRAM anyway: straight to memory, no read-for-ownership.
template <typename V> void stream_cols(float* p, const V& x) {
  if constexpr (std::is_same_v<V, Line>) {
    if (reinterpret_cast<uintptr_t>(p) % 64 == 0) {
#if MTPX_ISA == MTPX_ISA_AVX512
      return _mm512_stream_ps(p, (__m512)x);
#elif MTPX_ISA == MTPX_ISA_AVX2
      _mm256_stream_ps(p, x.lo);
      return _mm256_stream_ps(p + 8, x.hi);
#endif
    }
  }
  store_cols(p, x);
}

// The gated delta rule on one tile of columns [j0, j0 + width of V) of value head h's state, over T tokens, the
// only place its arithmetic is written. Per token t, with kS = k^T S_{t-1} and qS = q^T S_{t-1} on the tile:
//   delta = (v - decay * kS) * beta,   out = q^T S_t = decay * qS + (q.k) delta,   S_t = decay * S_{t-1} + k delta.
// Each column of the state evolves on its own, so the tile stays in `tile` (dk lines, in L1) for all T tokens: the
// state is read once per call and written once, and the next token's kS and qS are summed in registers while S_t
// is made. Explicit FMAs in a fixed order per column: a verify pass, a decode step and a rollback replay compute
// every element alike, whatever T.
template <typename V>
void delta_rule_tile(const float* q_all, const float* k_all, const float* v_all, const float* decay_all,
                     const float* beta_all, const float* qk, int64_t T, int64_t nv, int64_t h, int64_t dk, int64_t dv,
                     int64_t j0, const float* s0, float* s_final, float* tile, float* out) {
  constexpr int64_t W = sizeof(V) / sizeof(float);
  V kS{}, qS{};
  const float* q0 = q_all != nullptr ? q_all + h * dk : nullptr;
  const float* k0 = k_all + h * dk;
  // the next tile's lines are fetched while this one is summed
  const bool ahead = std::is_same_v<V, Line> && j0 + kLineFloats < dv;
  for (int64_t i = 0; i < dk; ++i) {
    const V r = load_cols<V>(s0 + i * dv + j0);
    if (ahead) __builtin_prefetch(s0 + i * dv + j0 + kLineFloats, 0, 3);
    if (T > 1) store_cols(tile + i * W, r);  // one token reads s0's lines again, still in L1
    kS = fmadd(k0[i], r, kS);
    if (q0 != nullptr) qS = fmadd(q0[i], r, qS);
  }
  for (int64_t t = 0; t < T; ++t) {
    const int64_t at = t * nv + h;
    const float* k = k_all + at * dk;
    const float decay = decay_all[at], beta = beta_all[at];
    const V delta = (load_cols<V>(v_all + at * dv + j0) - decay * kS) * beta;
    if (out != nullptr) store_cols(out + at * dv + j0, decay * qS + qk[t] * delta);
    if (t + 1 == T) {
      for (int64_t i = 0; i < dk; ++i) {
        const V before = load_cols<V>(T > 1 ? tile + i * W : s0 + i * dv + j0);
        stream_cols(s_final + i * dv + j0, fmadd(k[i], delta, decay * before));
      }
      break;
    }
    const float* kn = k + nv * dk;
    const float* qn = q_all != nullptr ? q_all + (at + nv) * dk : nullptr;
    V kS_next{}, qS_next{};
    for (int64_t i = 0; i < dk; ++i) {
      const V s = fmadd(k[i], delta, decay * load_cols<V>(tile + i * W));
      store_cols(tile + i * W, s);
      kS_next = fmadd(kn[i], s, kS_next);
      if (qn != nullptr) qS_next = fmadd(qn[i], s, qS_next);
    }
    kS = kS_next;
    qS = qS_next;
  }
}

// Gated DeltaNet recurrence of one value head h over T tokens, tile by tile (delta_rule_tile). q, k [T, nv, dk]
// (l2-normalised, q scaled), v [T, nv, dv], decay, beta [T, nv]; s0 and s_final point at this head's state before
// the first token and after the last; out [T, nv, dv] receives q^T S_t (q and out may be null: a replay). Not
// inlined: a verify pass and a rollback replay must run the same instructions.
__attribute__((noinline)) void delta_rule_head(const float* q_all, const float* k_all, const float* v_all,
                                               const float* decay_all, const float* beta_all, int64_t T, int64_t nv,
                                               int64_t h, int64_t dk, int64_t dv, const float* s0, float* s_final,
                                               float* out) {
  // per thread and reused: the tile (dk lines, 64-byte aligned) and q.k per token
  thread_local std::vector<float> room, qk;
  room.resize(dk * kLineFloats + kLineFloats);
  float* tile = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(room.data()) + 63) & ~uintptr_t{63});
  qk.assign(T, 0.f);
  if (q_all != nullptr)
    for (int64_t t = 0; t < T; ++t) qk[t] = dot(q_all + (t * nv + h) * dk, k_all + (t * nv + h) * dk, dk);
  int64_t j0 = 0;
  for (; j0 + kLineFloats <= dv; j0 += kLineFloats)
    delta_rule_tile<Line>(q_all, k_all, v_all, decay_all, beta_all, qk.data(), T, nv, h, dk, dv, j0, s0, s_final,
                          tile, out);
  for (; j0 < dv; ++j0)
    delta_rule_tile<float>(q_all, k_all, v_all, decay_all, beta_all, qk.data(), T, nv, h, dk, dv, j0, s0, s_final,
                           tile, out);
#if MTPX_ISA == MTPX_ISA_AVX512 || MTPX_ISA == MTPX_ISA_AVX2
  _mm_sfence();  // this thread's streamed state stores are visible before anyone reads the state
#endif
}

// Runs delta_rule_head for every value head (threads split the heads); states are [nv, dk, dv] fp32.
void delta_rule(const float* q, const float* k, const float* v, const float* decay, const float* beta, int64_t T,
                int64_t nv, int64_t dk, int64_t dv, const float* s0, float* s_final, float* out) {
  parallel_for(0, nv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h)
      delta_rule_head(q, k, v, decay, beta, T, nv, h, dk, dv, s0 + h * dk * dv, s_final + h * dk * dv, out);
  });
}

void l2_normalise(float* x, int64_t n, float scale) {
  const float f = scale / std::sqrt(dot(x, x, n) + 1e-6f);
  for (int64_t i = 0; i < n; ++i) x[i] *= f;
}

// Causal depthwise conv + silu of channels [c0, c0 + n) over T positions: out [T, n], rounded to bf16 like the
// PyTorch path's `mixed`. Channel c's window is its K - 1 conv-state inputs (cs, strides cs0, cs1) and then its T
// new inputs (proj rows, stride width); with `keep` the window also goes to conv_in's row c (len = K - 1 + T).
// The conv state was written a whole step ago, so it is read from memory: prefetched for all n channels first, so
// that the misses overlap instead of stalling one small channel at a time.
void conv_channels(const bf16* cs, int64_t cs0, int64_t cs1, const bf16* pp, int64_t width, const Floats& w,
                   int64_t K, int64_t T, int64_t c0, int64_t n, bf16* conv_in, bool keep, float* out) {
  const int64_t len = K - 1 + T;
  for (int64_t c = c0; c < c0 + n; ++c) __builtin_prefetch(cs + c * cs0, 0, 3);
  thread_local std::vector<float> win;
  win.resize(len);
  for (int64_t c = c0; c < c0 + n; ++c) {
    for (int64_t j = 0; j < K - 1; ++j) win[j] = static_cast<float>(cs[c * cs0 + j * cs1]);
    for (int64_t t = 0; t < T; ++t) win[K - 1 + t] = static_cast<float>(pp[t * width + c]);
    if (keep)
      for (int64_t j = 0; j < len; ++j) conv_in[c * len + j] = static_cast<bf16>(win[j]);
    for (int64_t t = 0; t < T; ++t) {
      float acc = win[t] * w[c * K];
      for (int64_t j = 1; j < K; ++j) acc = acc + win[t + j] * w[c * K + j];
      out[t * n + c - c0] = acc;
    }
  }
  for (int64_t t = 0; t < T; ++t) {
    float* row = out + t * n;
    silu_row(row, n);
    for (int64_t c = 0; c < n; ++c) row[c] = round_bf16(row[c]);
  }
}

// Gated full attention over a KV cache for T new positions of one sequence, from the fused q|k|v projection rows
// `in` [T, 2 * nh * D + 2 * nkv * D] (q interleaved with its gate per head). Per position: q/k RMSNorm (zero-centred
// weights qw, kw), rotate-half RoPE on the first rd dims (cp, sp [T, rd]), k and v written to the caches Kc, Vc
// [nkv, max_len, D] at start + t, softmax attention of each head over cache positions 0..start + t (GQA: head h
// reads kv head h / (nh / nkv)), then multiplied by sigmoid(gate); op [T, nh * D] receives the o_proj input.
void attention_rows(const bf16* in, int64_t T, const Floats& qw, const Floats& kw, const bf16* cp, const bf16* sp,
                    int64_t rd, bf16* Kc, bf16* Vc, int64_t max_len, int64_t start, int64_t nh, int64_t nkv,
                    int64_t D, double eps, bf16* op) {
  const int64_t width = 2 * nh * D + 2 * nkv * D, half = rd / 2;
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
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t group = nh / nkv;
  // A job is some query heads of one kv head over all T positions (rows r = head * T + t): each cache row is read
  // once for all of them, so neither a verify pass's positions nor GQA's heads multiply the cache reads. Heads are
  // split over jobs only as far as needed to give each thread one; a row's arithmetic is the same in any job.
  const int64_t L = start + T;
  const int64_t splits = std::min(group, (num_threads() + nkv - 1) / nkv);
  const int64_t per_job = (group + splits - 1) / splits, jobs_per_kv = (group + per_job - 1) / per_job;
  parallel_for(0, nkv * jobs_per_kv, 1, [&](int64_t begin, int64_t end) {
    const int64_t R = per_job * T;
    std::vector<float> x(D), key(D), q(R * D), acc(R * D), scores(R * L), total(R);
    std::vector<const float*> weights(R);
    std::vector<int64_t> seen(R);
    for (int64_t r = 0; r < R; ++r) {
      weights[r] = scores.data() + r * L;
      seen[r] = start + r % T + 1;  // position t attends to cache positions 0 .. start + t
    }
    for (int64_t job = begin; job < end; ++job) {
      const int64_t kvh = job / jobs_per_kv, h0 = kvh * group + job % jobs_per_kv * per_job;
      const int64_t heads = std::min(per_job, (kvh + 1) * group - h0), rows = heads * T;
      for (int64_t r = 0; r < rows; ++r)
        prepare(in + r % T * width + (h0 + r / T) * 2 * D, qw, r % T, x.data(), q.data() + r * D);
      for (int64_t j = 0; j < L; ++j) {  // a key, widened once for every row that sees it
        widen_row(Kc + (kvh * max_len + j) * D, D, key.data());
        for (int64_t r = 0; r < rows; ++r)
          if (seen[r] > j) scores[r * L + j] = dot(q.data() + r * D, key.data(), D) * scale;
      }
      for (int64_t r = 0; r < rows; ++r) {
        const float* row = scores.data() + r * L;
        float top = -INFINITY;
        for (int64_t j = 0; j < seen[r]; ++j) top = std::max(top, row[j]);
        total[r] = exp_shifted(scores.data() + r * L, seen[r], top);
      }
      weighted_sum_rows(weights.data(), seen.data(), rows, Vc + kvh * max_len * D, D, acc.data());
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t t = r % T, h = h0 + r / T;
        const bf16* gate = in + t * width + h * 2 * D + D;
        for (int64_t i = 0; i < D; ++i) {
          const float o = round_bf16(acc[r * D + i] / total[r]);
          op[t * nh * D + h * D + i] = static_cast<bf16>(o * round_bf16(sigmoid(static_cast<float>(gate[i]))));
        }
      }
    }
  });
}

// Gated DeltaNet layer core for T new positions of one sequence. pp [T, conv_dim + nv * dv + 2 * nv] is the fused
// projection output (q|k|v before the conv, then z, b, a); cs (strides cs0, cs1) the last K - 1 conv inputs of each
// of the conv_dim channels, s0 the state [nv, dk, dv] before the call. Per token: causal depthwise conv (kernel w
// [conv_dim, K]) + silu, l2-normalised q (scaled) and k, g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b),
// the gated delta rule (the state read once and written once, where separate ops would pass over it six times),
// then the gated RMSNorm (weight nw, gate silu(z)). Writes op [T, nv * dv] (the out_proj input), xp the conv inputs
// [conv_dim, K - 1 + T] (the state followed by this call's columns: the conv state after token t is columns
// t + 1 .. t + K - 1), s_final the state after the last position, and replay [T, nv * (dk + dv + 2)] (see
// gdn_replay). One job per value head does all of it for that head (its key head's q and k channels, its v
// channels, its state): one parallel region instead of one per stage, and each head's values stay in its thread's
// cache. Every value is computed by the same code whatever T and the thread count, so positions stay row-invariant.
void gdn_rows(const bf16* pp, int64_t T, const bf16* cs, int64_t cs0, int64_t cs1, const Floats& w, int64_t K,
              const Floats& A, const Floats& dt, const Floats& nw, const float* s0, int64_t nk, int64_t nv, int64_t dk,
              int64_t dv, double eps, bf16* op, bf16* xp, float* s_final, float* replay) {
  const int64_t key_dim = nk * dk, conv_dim = 2 * key_dim + nv * dv, width = conv_dim + nv * dv + 2 * nv;
  const bf16* zp = pp + conv_dim;
  const bf16* bp = zp + nv * dv;
  const bf16* ap = bp + nv;
  const int64_t group = nv / nk;
  const float q_scale = 1.0f / std::sqrt(static_cast<float>(dk));
  // q per value head; `replay` holds k, v, decay, beta (with the state before this call they rebuild the state
  // after any of its positions), laid out [T, nv, d]
  std::vector<float> q(T * nv * dk), core(T * nv * dv);
  float* k = replay;
  float* v = k + T * nv * dk;
  float* decay = v + T * nv * dv;
  float* beta = decay + T * nv;
  parallel_for(0, nv, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> mixed;
    mixed.resize(T * (2 * dk + dv));
    float* mq = mixed.data();
    float* mk = mq + T * dk;
    float* mv = mk + T * dk;
    std::vector<float> x(dv), gate(dv);
    for (int64_t h = begin; h < end; ++h) {
      const int64_t key_head = h / group;
      const bool first = h % group == 0;  // the first value head of a key head keeps its q and k conv inputs
      conv_channels(cs, cs0, cs1, pp, width, w, K, T, key_head * dk, dk, xp, first, mq);
      conv_channels(cs, cs0, cs1, pp, width, w, K, T, key_dim + key_head * dk, dk, xp, first, mk);
      conv_channels(cs, cs0, cs1, pp, width, w, K, T, 2 * key_dim + h * dv, dv, xp, true, mv);
      for (int64_t t = 0; t < T; ++t) {
        float* q_row = q.data() + (t * nv + h) * dk;
        float* k_row = k + (t * nv + h) * dk;
        std::copy(mq + t * dk, mq + (t + 1) * dk, q_row);
        std::copy(mk + t * dk, mk + (t + 1) * dk, k_row);
        l2_normalise(q_row, dk, q_scale);
        l2_normalise(k_row, dk, 1.0f);
        std::copy(mv + t * dv, mv + (t + 1) * dv, v + (t * nv + h) * dv);
        const float a = static_cast<float>(ap[t * width + h]), b = static_cast<float>(bp[t * width + h]);
        decay[t * nv + h] = std::exp(-std::exp(A[h]) * softplus(a + dt[h]));
        beta[t * nv + h] = round_bf16(sigmoid(b));
      }
      delta_rule_head(q.data(), k, v, decay, beta, T, nv, h, dk, dv, s0 + h * dk * dv, s_final + h * dk * dv,
                      core.data());
      // gated RMSNorm over the head's dv values: weight * norm(core) (bf16) * silu(z)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t r = t * nv + h;
        const bf16* z = zp + t * width + h * dv;
        for (int64_t j = 0; j < dv; ++j) {
          x[j] = round_bf16(core[r * dv + j]);
          gate[j] = static_cast<float>(z[j]);
        }
        silu_row(gate.data(), dv);
        const float inv = inverse_rms(x.data(), dv, eps);
        for (int64_t j = 0; j < dv; ++j) {
          const float normed = round_bf16(nw[j] * round_bf16(x[j] * inv));
          op[r * dv + j] = static_cast<bf16>(normed * gate[j]);
        }
      }
    }
  });
}

}  // namespace
