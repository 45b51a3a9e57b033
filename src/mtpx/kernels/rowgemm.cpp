// y[M, N] = x[M, K] @ w[N, K]^T for a few rows (M <= 8): bf16 weights, fp32 accumulation, bf16 output.
// Longer than 400 lines because the bf16, int8, int4 and AMX-tile variants share one blocking and threading scheme.
//
// Why: on CPUs without native bf16 dot products (no AVX512_BF16 / AMX) oneDNN's bf16 matmul costs 2-3x more for
// 2-5 rows than for one, and one row can round differently alone than among others. Here every (row, column) is
// the same dot product whatever M is: the weight row is widened to fp32 once and fed to one 16-lane fp32
// accumulator per input row, summed over K in the same order, then reduced by the same fixed tree. So a verify pass
// over k + 1 positions gives each position exactly the bits a one-token decode step gives, and costs about the
// same, because the weights (the bandwidth) are read once for all rows.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>

namespace {

constexpr int kLanes = 16;
// int4 weights: two 4-bit codes a byte (the even element of each pair in the low nibble), each group of kGroup4
// along K with an fp32 scale and offset (w = code * scale + offset). A group's 16 possible values are computed once
// (one FMA) and its 32 codes looked up in them (a permute per 16), then used like the other weight types: the
// dequantized value depends only on the weight, so each row's result is again the same whatever the row count.
constexpr int64_t kGroup4 = 32;
struct Int4 {
  const uint8_t* codes;         // [N, K / 2]
  const float* scale_offset;    // [N, K / kGroup4, 2]
};
// Output columns computed together (each loaded x vector is reused that many times) and how far ahead in each
// weight row to prefetch. The hardware prefetcher alone left decode at ~75% of the read bandwidth; one bf16 row:
// 4 columns, 1 KiB ahead (17 -> 22 GB/s at 2 threads). With 2+ rows the FMAs take longer per cache line, and fewer
// streams each prefetched further ahead keep more of the bandwidth: 2 columns, 4 KiB ahead took 4 rows from 18 to
// 21 GB/s and 5 rows from 16.5 to 19.7. int8 rows (twice the weights per byte) want 4 KiB too: one row 11 -> 19 GB/s.
// (2 threads, 888 MB of weights, scratch benchmarks.)
// (3-4 columns for bf16 with 2-6 rows ran 10-20 % faster with the weights in cache, and made verify passes of the
// 0.8B body, weights from DRAM at 2 threads, 4-12 % slower: more streams, less bandwidth. BENCHMARKS.md X.)
template <int M>
constexpr int kColumns = M == 1 ? 4 : 2;
template <int M, typename W>
constexpr int64_t kPrefetchBytes = M == 1 && sizeof(W) == 2 ? 1024 : 4096;

#ifdef __AVX512F__
inline __m512 widen(const at::BFloat16* p) { return widen_bf16(p); }

inline __m512 widen(const int8_t* p) {
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
}

template <int M, int C, typename W>
void columns(const float* x, const W* w, int64_t K, int64_t n, float* out, int64_t N) {
  __m512 acc[C][M];
  for (int c = 0; c < C; ++c)
    for (int m = 0; m < M; ++m) acc[c][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += kLanes) {
    __m512 xv[M];
    for (int m = 0; m < M; ++m) xv[m] = _mm512_loadu_ps(x + m * K + k);
    if ((k * sizeof(W)) % 64 == 0)  // once per cache line
      for (int c = 0; c < C; ++c)
        _mm_prefetch(reinterpret_cast<const char*>(w + (n + c) * K + k) + kPrefetchBytes<M, W>, _MM_HINT_T0);
    for (int c = 0; c < C; ++c) {
      __m512 wv = widen(w + (n + c) * K + k);
      for (int m = 0; m < M; ++m) acc[c][m] = _mm512_fmadd_ps(wv, xv[m], acc[c][m]);
    }
  }
  for (int c = 0; c < C; ++c)
    for (int m = 0; m < M; ++m) out[m * N + n + c] = _mm512_reduce_add_ps(acc[c][m]);
}
// bf16 weights, 32 per step: one 64-byte load holds them in pairs per 32-bit lane, and a shift (even elements)
// and a mask (odd elements) widen them, two instructions per 32 weights instead of four. x comes split to match
// (deinterleave_pairs): even elements of each 32-block first, then odd.
// The empty asm statements pin x and the weights in registers: left alone, GCC folded them into the FMAs as memory
// operands, loading each x vector once per column and each weight line twice, which made 2-5 rows 20-30 % slower
// than the four-instruction widening (scratch benchmark, weights in cache, 1 thread); pinned, 1 / 2 / 5 rows run
// at 59 / 39 / 20 GB/s against its 50 / 35 / 17.5.
template <int M, int C>
void columns_bf16_pairs(const float* x, const at::BFloat16* w, int64_t K, int64_t n, float* out, int64_t N) {
  __m512 acc[C][M];
  for (int c = 0; c < C; ++c)
    for (int m = 0; m < M; ++m) acc[c][m] = _mm512_setzero_ps();
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t k = 0; k < K; k += 2 * kLanes) {
    __m512 even[M], odd[M], lo[C], hi[C];
    for (int m = 0; m < M; ++m) {
      even[m] = _mm512_loadu_ps(x + m * K + k);
      odd[m] = _mm512_loadu_ps(x + m * K + k + kLanes);
      asm volatile("" : "+v"(even[m]), "+v"(odd[m]));
    }
    for (int c = 0; c < C; ++c) {
      const at::BFloat16* row = w + (n + c) * K + k;
      _mm_prefetch(reinterpret_cast<const char*>(row) + kPrefetchBytes<M, at::BFloat16>, _MM_HINT_T0);
      __m512i raw = _mm512_loadu_si512(row);
      asm volatile("" : "+v"(raw));
      lo[c] = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
      hi[c] = _mm512_castsi512_ps(_mm512_and_si512(raw, high));
    }
    // per accumulator: even pair first, then odd (the order fixes the bits)
    for (int c = 0; c < C; ++c)
      for (int m = 0; m < M; ++m) acc[c][m] = _mm512_fmadd_ps(lo[c], even[m], acc[c][m]);
    for (int c = 0; c < C; ++c)
      for (int m = 0; m < M; ++m) acc[c][m] = _mm512_fmadd_ps(hi[c], odd[m], acc[c][m]);
  }
  for (int c = 0; c < C; ++c)
    for (int m = 0; m < M; ++m) out[m * N + n + c] = _mm512_reduce_add_ps(acc[c][m]);
}

#else
template <int M, int C, typename W>
void columns(const float* x, const W* w, int64_t K, int64_t n, float* out, int64_t N) {
  float acc[C][M][kLanes] = {};
  for (int64_t k = 0; k < K; k += kLanes)
    for (int c = 0; c < C; ++c)
      for (int l = 0; l < kLanes; ++l) {
        float wv = static_cast<float>(w[(n + c) * K + k + l]);
        for (int m = 0; m < M; ++m) acc[c][m][l] = std::fma(wv, x[m * K + k + l], acc[c][m][l]);
      }
  for (int c = 0; c < C; ++c)
    for (int m = 0; m < M; ++m) {
      float s = 0.f;
      for (int l = 0; l < kLanes; ++l) s += acc[c][m][l];
      out[m * N + n + c] = s;
    }
}
#endif

#ifdef __AVX512F__
constexpr bool kPairs = true;
#else
constexpr bool kPairs = false;
#endif

// Whether bf16 weights of this K run 32 at a time (columns_bf16_pairs), with x deinterleaved to match.
template <typename W>
bool pairs(int64_t K) {
  return kPairs && (std::is_same_v<W, at::BFloat16> || std::is_same_v<W, Int4>) && K % (2 * kLanes) == 0;
}

// Each 32-block of each row of x [M, K]: its 16 even elements, then its 16 odd ones.
void deinterleave_pairs(float* x, int64_t M, int64_t K) {
  float block[2 * kLanes];
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; k += 2 * kLanes) {
      float* p = x + m * K + k;
      for (int l = 0; l < kLanes; ++l) block[l] = p[2 * l], block[kLanes + l] = p[2 * l + 1];
      std::copy(block, block + 2 * kLanes, p);
    }
}

#ifdef __AVX512F__
// x comes deinterleaved (deinterleave_pairs): a byte's low nibbles are the even elements of a 32-block, its high
// nibbles the odd ones. Per 32 weights: one 16-byte load, two masks, two widenings and two permutes.
template <int M, int C>
void columns_int4(const float* x, const Int4* w, int64_t K, int64_t n, float* out, int64_t N) {
  __m512 acc[C][M];
  for (int c = 0; c < C; ++c)
    for (int m = 0; m < M; ++m) acc[c][m] = _mm512_setzero_ps();
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int64_t groups = K / kGroup4;
  for (int64_t k = 0; k < K; k += kGroup4) {
    __m512 even[M], odd[M];
    for (int m = 0; m < M; ++m) {
      even[m] = _mm512_loadu_ps(x + m * K + k);
      odd[m] = _mm512_loadu_ps(x + m * K + k + kLanes);
    }
    for (int c = 0; c < C; ++c) {
      const float* so = w->scale_offset + 2 * ((n + c) * groups + k / kGroup4);
      const __m512 values = _mm512_fmadd_ps(iota, _mm512_set1_ps(so[0]), _mm512_set1_ps(so[1]));
      const uint8_t* row = w->codes + (n + c) * (K / 2) + k / 2;
      if (k % 128 == 0) _mm_prefetch(reinterpret_cast<const char*>(row) + 4096, _MM_HINT_T0);  // once per line
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row));
      const __m512 lo = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, low4)), values);
      const __m512 hi = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), low4)), values);
      for (int m = 0; m < M; ++m) acc[c][m] = _mm512_fmadd_ps(lo, even[m], acc[c][m]);
      for (int m = 0; m < M; ++m) acc[c][m] = _mm512_fmadd_ps(hi, odd[m], acc[c][m]);
    }
  }
  for (int c = 0; c < C; ++c)
    for (int m = 0; m < M; ++m) out[m * N + n + c] = _mm512_reduce_add_ps(acc[c][m]);
}
#else
template <int M, int C>
void columns_int4(const float* x, const Int4* w, int64_t K, int64_t n, float* out, int64_t N) {
  const int64_t groups = K / kGroup4;
  for (int c = 0; c < C; ++c) {
    float acc[M][kLanes] = {};
    for (int64_t k = 0; k < K; k += kLanes) {
      const float* so = w->scale_offset + 2 * ((n + c) * groups + k / kGroup4);
      const float s = so[0], o = so[1];
      for (int l = 0; l < kLanes; ++l) {
        const uint8_t byte = w->codes[(n + c) * (K / 2) + (k + l) / 2];
        const float wv = std::fma(static_cast<float>((l % 2) ? byte >> 4 : byte & 15), s, o);
        for (int m = 0; m < M; ++m) acc[m][l] = std::fma(wv, x[m * K + k + l], acc[m][l]);
      }
    }
    for (int m = 0; m < M; ++m) {
      float sum = 0.f;
      for (int l = 0; l < kLanes; ++l) sum += acc[m][l];
      out[m * N + n + c] = sum;
    }
  }
}
#endif

template <int M, int C, typename W>
void column_block(const float* x, const W* w, int64_t K, int64_t n, float* out, int64_t N) {
  if constexpr (std::is_same_v<W, Int4>) return columns_int4<M, C>(x, w, K, n, out, N);
  else {
#ifdef __AVX512F__
  if constexpr (std::is_same_v<W, at::BFloat16>)
    if (pairs<W>(K)) return columns_bf16_pairs<M, C>(x, w, K, n, out, N);
#endif
  columns<M, C>(x, w, K, n, out, N);
  }
}

template <int M, typename W>
void rows(const float* x, const W* w, int64_t K, int64_t N, float* out) {
  constexpr int C = kColumns<M>;
  const int64_t blocks = N / C;
  // a block's result does not depend on which thread computes it, so any thread count gives the same bits
  at::parallel_for(0, blocks, 64 / C, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) column_block<M, C>(x, w, K, b * C, out, N);
  });
  for (int64_t n = blocks * C; n < N; ++n) column_block<M, 1>(x, w, K, n, out, N);
}

// Returns x's dtype; each result is scaled by scale[n] (int8 weights) before its one rounding.
template <typename W>
torch::Tensor run(const torch::Tensor& x, const W* wp, int64_t N, const float* scale = nullptr) {
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M >= 1 && M <= 8, "rowgemm: 1..8 rows, got ", M);
  TORCH_CHECK(K % kLanes == 0, "rowgemm: K must be a multiple of ", kLanes, ", got ", K);
  // widen x and narrow the result here rather than with tensor ops: two fewer dispatches per matmul
  std::vector<float> xs(M * K), ys(M * N);
  if (x.scalar_type() == at::kBFloat16 && x.is_contiguous()) {
    const at::BFloat16* xb = x.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < M * K; ++i) xs[i] = static_cast<float>(xb[i]);
  } else {
    auto xf = x.to(at::kFloat).contiguous();
    std::copy(xf.data_ptr<float>(), xf.data_ptr<float>() + M * K, xs.begin());
  }
  if (pairs<W>(K)) deinterleave_pairs(xs.data(), M, K);
  const float* xp = xs.data();
  float* op = ys.data();
  switch (M) {
    case 1: rows<1>(xp, wp, K, N, op); break;
    case 2: rows<2>(xp, wp, K, N, op); break;
    case 3: rows<3>(xp, wp, K, N, op); break;
    case 4: rows<4>(xp, wp, K, N, op); break;
    case 5: rows<5>(xp, wp, K, N, op); break;
    case 6: rows<6>(xp, wp, K, N, op); break;
    case 7: rows<7>(xp, wp, K, N, op); break;
    default: rows<8>(xp, wp, K, N, op); break;
  }
  if (scale != nullptr)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) ys[m * N + n] *= scale[n];
  auto out = torch::empty({M, N}, x.options());
  if (x.scalar_type() == at::kBFloat16) {
    at::BFloat16* ob = out.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < M * N; ++i) ob[i] = static_cast<at::BFloat16>(ys[i]);
    return out;
  }
  return torch::from_blob(ys.data(), {M, N}, x.options().dtype(at::kFloat)).clone().to(x.scalar_type());
}

void check(const torch::Tensor& x, const torch::Tensor& w, at::ScalarType type, const char* what) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "rowgemm: x [M, K], w [N, K]");
  TORCH_CHECK(w.scalar_type() == type && w.is_contiguous() && w.device().is_cpu(),
              "rowgemm: w must be a contiguous ", what, " CPU tensor");
}

}  // namespace

torch::Tensor rowgemm(const torch::Tensor& x, const torch::Tensor& w) {
  check(x, w, at::kBFloat16, "bf16");
  return run(x, w.data_ptr<at::BFloat16>(), w.size(0));
}

// int8 weights with one fp32 scale per output row (w = q * scale): the scale is applied after the sum
torch::Tensor rowgemm_int8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale) {
  check(x, q, at::kChar, "int8");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == q.size(0), "rowgemm_int8: fp32 scale [N]");
  return run(x, q.data_ptr<int8_t>(), q.size(0), scale.contiguous().data_ptr<float>());
}

// int4 weights (codes [N, K / 2] uint8, scale and offset [N, K / 32, 2] fp32; see Int4 above)
torch::Tensor rowgemm_int4(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scale_offset) {
  TORCH_CHECK(x.dim() == 2 && codes.dim() == 2 && x.size(1) == 2 * codes.size(1), "rowgemm_int4: x [M, K], codes [N, K / 2]");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous(), "rowgemm_int4: contiguous uint8 codes");
  const int64_t N = codes.size(0), K = x.size(1);
  TORCH_CHECK(K % kGroup4 == 0, "rowgemm_int4: K must be a multiple of ", kGroup4, ", got ", K);
  TORCH_CHECK(scale_offset.scalar_type() == at::kFloat && scale_offset.is_contiguous() &&
              scale_offset.numel() == N * (K / kGroup4) * 2, "rowgemm_int4: fp32 scale and offset [N, K / ", kGroup4, ", 2]");
  const Int4 w{codes.data_ptr<uint8_t>(), scale_offset.data_ptr<float>()};
  return run(x, &w, N);
}

// ---- AMX: bf16 weights in tile order ----
//
// Why: a verify pass multiplies k + 1 rows by every weight. The vector kernels above spend two FMAs per row on each
// pair of weights, so while the weights are in cache (the demo model, an MTP layer, a draft head) 5 rows cost ~3x
// one row, and from DRAM the FMAs of 5 rows already limit the 0.8B body's verify. AMX's tile unit multiplies up to
// 16 rows of x by a 32 x 16 block of weights in one instruction, in about the same time for 1 row as for 5.
// x is the A operand, read in place (a tile row is 32 elements of one x row). The weights are the B operand,
// packed once (TileWeight in models/linear.py) as [ceil(N / 16), K / 32, 16, 32]: per 16 output columns and 32 of
// K, 16 rows of pairs (w[n][k], w[n][k + 1]) for the 16 columns, 1 KiB of contiguous memory, so the weights stream
// sequentially. (Read in place from the [N, K] layout a tile spans 16 rows 2K bytes apart; one row then ran ~10 %
// slower from L3 / DRAM than the vector kernel. Packed, it runs as fast.)
// Each output is a fixed sequence of pair products accumulated along K in its own C tile element, from its own x
// row and weight column, whatever the other rows are: the same bits for a row alone or among others, and no
// horizontal reductions. (The bits differ from the vector kernels': a weight is tiles or not, for all its matmuls.)
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
namespace {

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

constexpr int64_t kTile = 16;              // output columns per tile, and x rows per tile at most
constexpr int64_t kTileK = 32;             // K per tile product
constexpr int64_t kChunkBytes = 1 << 20;   // x rows per pass over the weights (see rowgemm_tiles)

// C tiles 0-3 (two blocks of mb rows x two blocks of 16 columns), A tiles 4-5 (the row blocks of x), B tiles 6-7
// (the column blocks' weights)
void load_tile_config(int64_t mb) {
  TileConfig cfg;
  for (int t = 0; t < 4; ++t) cfg.rows[t] = static_cast<uint8_t>(mb), cfg.colsb[t] = 4 * kTile;
  for (int t = 4; t < 6; ++t) cfg.rows[t] = static_cast<uint8_t>(mb), cfg.colsb[t] = 2 * kTileK;
  for (int t = 6; t < 8; ++t) cfg.rows[t] = kTileK / 2, cfg.colsb[t] = 4 * kTile;
  _tile_loadconfig(&cfg);
}

// C tile rows (fp32, 16 a row) -> bf16 out rows, the first `cols` columns
void store_rows(const float* c, int64_t rows, int64_t cols, at::BFloat16* out, int64_t N) {
  for (int64_t m = 0; m < rows; ++m) {
    if (cols == kTile) {
      const __m256i v = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(c + m * kTile)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * N), v);
    } else {
      for (int64_t i = 0; i < cols; ++i) out[m * N + i] = static_cast<at::BFloat16>(c[m * kTile + i]);
    }
  }
}

// out[R, N] = x[R, K] @ w.T for the 16-column blocks [b0, b1); x rows come in blocks of mb (R a multiple of mb).
// Two row blocks and two column blocks at a time: four products per four tile loads.
void tile_blocks(const at::BFloat16* x, const at::BFloat16* w, int64_t R, int64_t mb, int64_t K, int64_t N,
                 int64_t b0, int64_t b1, at::BFloat16* out) {
  load_tile_config(mb);
  const int64_t KB = K / kTileK, tile = kTile * kTileK, xs = 2 * K;
  float c[4][kTile * kTile];
  for (int64_t b = b0; b < b1; b += 2) {
    const bool two = b + 1 < b1;
    const at::BFloat16* w0 = w + b * KB * tile;
    const at::BFloat16* w1 = w0 + KB * tile;
    for (int64_t r = 0; r < R; r += 2 * mb) {
      const bool tworows = r + mb < R;
      const at::BFloat16* x0 = x + r * K;
      const at::BFloat16* x1 = x0 + mb * K;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t kb = 0; kb < KB; ++kb) {
        _tile_loadd(4, x0 + kb * kTileK, xs);
        _tile_loadd(6, w0 + kb * tile, 4 * kTile);
        _tile_dpbf16ps(0, 4, 6);
        if (tworows) {
          _tile_loadd(5, x1 + kb * kTileK, xs);
          _tile_dpbf16ps(2, 5, 6);
        }
        if (two) {
          _tile_loadd(7, w1 + kb * tile, 4 * kTile);
          _tile_dpbf16ps(1, 4, 7);
          if (tworows) _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, c[0], 4 * kTile);
      if (two) _tile_stored(1, c[1], 4 * kTile);
      if (tworows) _tile_stored(2, c[2], 4 * kTile);
      if (two && tworows) _tile_stored(3, c[3], 4 * kTile);
      for (int t = 0; t < 4; ++t) {
        if (((t & 1) && !two) || ((t >> 1) && !tworows)) continue;
        const int64_t n0 = (b + (t & 1)) * kTile, r0 = r + (t >> 1) * mb;
        store_rows(c[t], mb, std::min(kTile, N - n0), out + r0 * N + n0, N);
      }
    }
  }
  _tile_release();
}

}  // namespace

// Linux gives a process AMX's tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA)
bool amx_available() {
  static const bool ok = [] {
    const char* off = std::getenv("MTPX_AMX");
    if (off != nullptr && std::strcmp(off, "0") == 0) return false;
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  }();
  return ok;
}

// x [M, K] (any M) @ w.T, w [n, K] given as tiles [ceil(n / 16), K / 32, 16, 32] bf16 (columns past n zero)
torch::Tensor rowgemm_tiles(const torch::Tensor& x, const torch::Tensor& tiles, int64_t n) {
  TORCH_CHECK(tiles.dim() == 4 && tiles.size(2) == kTileK / 2 && tiles.size(3) == 2 * kTile &&
              tiles.scalar_type() == at::kBFloat16 && tiles.is_contiguous() && tiles.device().is_cpu(),
              "rowgemm_tiles: tiles must be contiguous bf16 [N / 16, K / 32, 16, 32] on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == tiles.size(1) * kTileK,
              "rowgemm_tiles: x [M, K] with K = 32 * tiles.size(1)");
  TORCH_CHECK(n > (tiles.size(0) - 1) * kTile && n <= tiles.size(0) * kTile,
              "rowgemm_tiles: n does not match the tiles");
  TORCH_CHECK(amx_available(), "rowgemm_tiles: AMX is not available in this process");
  const int64_t M = x.size(0), K = x.size(1), blocks = tiles.size(0);
  auto out = torch::empty({M, n}, x.options().dtype(at::kBFloat16));
  if (M == 0) return out;
  const auto xb = x.scalar_type() == at::kBFloat16 && x.is_contiguous() ? x : x.to(at::kBFloat16).contiguous();
  const at::BFloat16* xp = xb.data_ptr<at::BFloat16>();
  const at::BFloat16* wp = tiles.data_ptr<at::BFloat16>();
  at::BFloat16* ob = out.data_ptr<at::BFloat16>();
  const int64_t mb = std::min(M, kTile);
  // rows past the last whole block of mb: a zero-padded copy of their block and its own output, so tile loads and
  // stores never run past x or out
  const int64_t whole = M / mb * mb, rest = M - whole;
  // x rows per pass over the weights: ~1 MiB of them stays in L2 while each pair of column blocks runs over all of
  // them, so a long prefill reads the weights M / chunk times, not M / 32 times
  const int64_t chunk = std::max<int64_t>(2 * kTile, (kChunkBytes / (2 * K)) / (2 * kTile) * (2 * kTile));
  auto run_rows = [&](const at::BFloat16* xr, int64_t R, at::BFloat16* o) {
    for (int64_t r0 = 0; r0 < R; r0 += chunk) {
      const int64_t rows = std::min(chunk, R - r0);
      // pairs of column blocks share each x tile; a pair is never split between threads
      at::parallel_for(0, (blocks + 1) / 2, 1, [&](int64_t begin, int64_t end) {
        tile_blocks(xr + r0 * K, wp, rows, mb, K, n, 2 * begin, std::min(2 * end, blocks), o + r0 * n);
      });
    }
  };
  if (whole > 0) run_rows(xp, whole, ob);
  if (rest > 0) {
    std::vector<at::BFloat16> xr(mb * K, at::BFloat16(0.f)), o(mb * n);
    std::copy(xp + whole * K, xp + M * K, xr.begin());
    run_rows(xr.data(), mb, o.data());
    std::copy(o.begin(), o.begin() + rest * n, ob + whole * n);
  }
  return out;
}
#else
bool amx_available() { return false; }

torch::Tensor rowgemm_tiles(const torch::Tensor&, const torch::Tensor&, int64_t) {
  TORCH_CHECK(false, "rowgemm_tiles: this build has no AMX (the CPU lacks AMX_BF16)");
}
#endif
