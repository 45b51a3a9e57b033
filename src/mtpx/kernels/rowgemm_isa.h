// y[M, N] = x[M, K] @ w[N, K]^T for a few rows (M <= 8): bf16, int8, int4 or int8-block weights (the quantized ones
// on integer dot products with x quantized to int8, gemm_core.h), fp32 accumulation, one rounding to x's dtype; and,
// in the AVX-512 build, the AMX-tile matmul of bf16 weights in tile order.
// Compiled once per instruction set, inside that set's namespace (isa_*.cpp); the inner loops are gemm_core.h's.
//
// Why: on CPUs without native bf16 dot products (no AVX512_BF16 / AMX) oneDNN's bf16 matmul costs several times more
// for 2-5 rows than for one, and one row can round differently alone than among others. Here every (row, column) is
// the same dot product whatever M is (gemm_core.h): a verify pass over k + 1 positions gives each position exactly
// the bits a one-token decode step gives, and costs about the same, because the weights (the bandwidth) are read
// once for all rows.

// gemm_core.h's matmul_rows, on the integer loops' VNNI (SDOT) build where int_dot_vnni() says so
template <typename W>
void matmul_rows_picked(int64_t M, const float* x, const W* w, int64_t K, int64_t N, float* out) {
  const AtenParallel parallel{};
#if MTPX_HAVE_VNNI && MTPX_ISA != MTPX_ISA_SCALAR
  if constexpr (kIntDot<W>)
    if (::int_dot_vnni()) return vnni::matmul_rows(M, x, w, K, N, out, parallel);
#endif
  matmul_rows(M, x, w, K, N, out, parallel);
}

// Returns x's dtype; each result is scaled by scale[n] (int8 weights) before its one rounding.
template <typename W>
torch::Tensor run(const torch::Tensor& x, const W* wp, int64_t N, const float* scale = nullptr) {
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M >= 1 && M <= 8, "rowgemm: 1..8 rows, got ", M);
  TORCH_CHECK(K % kLanes == 0, "rowgemm: K must be a multiple of ", kLanes, ", got ", K);
  // widen x and narrow the result here rather than with tensor ops: two fewer dispatches per matmul
  std::vector<float> x_storage, ys(M * N);
  float* xs = cache_aligned(x_storage, M * K);
  if (x.scalar_type() == at::kBFloat16 && x.is_contiguous()) {
    const at::BFloat16* xb = x.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < M * K; ++i) xs[i] = static_cast<float>(xb[i]);
  } else {
    auto xf = x.to(at::kFloat).contiguous();
    std::copy(xf.data_ptr<float>(), xf.data_ptr<float>() + M * K, xs);
  }
  if (pairs<W>(K)) deinterleave_pairs(xs, M, K);
  matmul_rows_picked(M, xs, wp, K, N, ys.data());
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

inline void check(const torch::Tensor& x, const torch::Tensor& w, at::ScalarType type, const char* what) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "rowgemm: x [M, K], w [N, K]");
  TORCH_CHECK(w.scalar_type() == type && w.is_contiguous() && w.device().is_cpu(),
              "rowgemm: w must be a contiguous ", what, " CPU tensor");
}

torch::Tensor rowgemm(const torch::Tensor& x, const torch::Tensor& w) {
  check(x, w, at::kBFloat16, "bf16");
  return run(x, reinterpret_cast<const Bf16*>(w.data_ptr<at::BFloat16>()), w.size(0));
}

// int8 weights with one fp32 scale per output row (w = q * scale): the scale is applied after the sum
torch::Tensor rowgemm_int8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale) {
  check(x, q, at::kChar, "int8");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == q.size(0), "rowgemm_int8: fp32 scale [N]");
  return run(x, q.data_ptr<int8_t>(), q.size(0), scale.contiguous().data_ptr<float>());
}

// The two levels of a grouped weight's scales (gemm_core.h's GroupScales): groups int8 [N, G, 2] (sc, m), supers
// fp16 [N, S, 2] (d, dmin), each super-block 2^shift groups (S divides G).
inline GroupScales group_scales(const torch::Tensor& groups, const torch::Tensor& supers, int64_t N, int64_t G,
                                const char* what) {
  TORCH_CHECK(groups.scalar_type() == at::kChar && groups.is_contiguous() && groups.dim() == 3 &&
              groups.size(0) == N && groups.size(1) == G && groups.size(2) == 2,
              what, ": groups must be contiguous int8 [N, ", G, ", 2]");
  const int64_t S = supers.dim() == 3 ? supers.size(1) : 0;
  int64_t shift = 0;
  while (S > 0 && (S << shift) < G) ++shift;
  TORCH_CHECK(supers.scalar_type() == at::kHalf && supers.is_contiguous() && supers.dim() == 3 &&
              supers.size(0) == N && supers.size(2) == 2 && S > 0 && (S << shift) == G,
              what, ": supers must be contiguous fp16 [N, S, 2], S dividing ", G, " by a power of two");
  return GroupScales{groups.data_ptr<int8_t>(), reinterpret_cast<const uint16_t*>(supers.data_ptr<at::Half>()), G,
                     shift};
}

// int4 weights: codes [N, K / 2] uint8, scales in groups of 32 (see gemm_core.h's Int4)
torch::Tensor rowgemm_int4(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& groups,
                           const torch::Tensor& supers) {
  TORCH_CHECK(x.dim() == 2 && codes.dim() == 2 && x.size(1) == 2 * codes.size(1),
              "rowgemm_int4: x [M, K], codes [N, K / 2]");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous(), "rowgemm_int4: contiguous uint8 codes");
  const int64_t N = codes.size(0), K = x.size(1);
  TORCH_CHECK(K % kGroup4 == 0, "rowgemm_int4: K must be a multiple of ", kGroup4, ", got ", K);
  const Int4 w{codes.data_ptr<uint8_t>(), group_scales(groups, supers, N, K / kGroup4, "rowgemm_int4")};
  return run(x, &w, N);
}

// int8 codes [N, K] with scales in groups of 16 (see gemm_core.h's Int8Blocks)
torch::Tensor rowgemm_int8_blocks(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& groups,
                                  const torch::Tensor& supers) {
  check(x, codes, at::kChar, "int8");
  const int64_t N = codes.size(0), K = x.size(1);
  TORCH_CHECK(K % kGroup8 == 0, "rowgemm_int8_blocks: K must be a multiple of ", kGroup8, ", got ", K);
  const Int8Blocks w{codes.data_ptr<int8_t>(), group_scales(groups, supers, N, K / kGroup8, "rowgemm_int8_blocks")};
  return run(x, &w, N);
}

// ---- AMX: bf16 weights in tile order ----
//
// Why: a verify pass multiplies k + 1 rows by every weight. The vector kernels above spend two FMAs per row on each
// pair of weights, so while the weights are in cache (a small model, an MTP layer, a draft head) 5 rows cost several
// times one row, and from DRAM the FMAs of 5 rows already limit a 0.8B body's verify. AMX's tile unit multiplies up to
// 16 rows of x by a 32 x 16 block of weights in one instruction, in about the same time for 1 row as for 5.
// x is the A operand, read in place (a tile row is 32 elements of one x row). The weights are the B operand,
// packed once (TileWeight in models/linear.py) as [ceil(N / 16), K / 32, 16, 32]: per 16 output columns and 32 of
// K, 16 rows of pairs (w[n][k], w[n][k + 1]) for the 16 columns, 1 KiB of contiguous memory, so the weights stream
// sequentially. (Read in place from the [N, K] layout a tile spans 16 rows 2K bytes apart, and one row runs slower
// from L3 / DRAM than on the vector kernel.)
// Each output is a fixed sequence of pair products accumulated along K in its own C tile element, from its own x
// row and weight column, whatever the other rows are: the same bits for a row alone or among others, and no
// horizontal reductions. (The bits differ from the vector kernels': a weight is tiles or not, for all its matmuls.)
#if MTPX_ISA == MTPX_ISA_AVX512 && MTPX_HAVE_AMX
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512bf16")
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

// x [M, K] (any M) @ w.T, w [n, K] given as tiles [ceil(n / 16), K / 32, 16, 32] bf16 (columns past n zero)
torch::Tensor rowgemm_tiles(const torch::Tensor& x, const torch::Tensor& tiles, int64_t n) {
  TORCH_CHECK(tiles.dim() == 4 && tiles.size(2) == kTileK / 2 && tiles.size(3) == 2 * kTile &&
              tiles.scalar_type() == at::kBFloat16 && tiles.is_contiguous() && tiles.device().is_cpu(),
              "rowgemm_tiles: tiles must be contiguous bf16 [N / 16, K / 32, 16, 32] on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == tiles.size(1) * kTileK,
              "rowgemm_tiles: x [M, K] with K = 32 * tiles.size(1)");
  TORCH_CHECK(n > (tiles.size(0) - 1) * kTile && n <= tiles.size(0) * kTile,
              "rowgemm_tiles: n does not match the tiles");
  TORCH_CHECK(::amx_available(), "rowgemm_tiles: AMX is not available in this process");
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
#pragma GCC pop_options
#endif
