// The inner loops of the few-row matmul (rowgemm_isa.h) for one instruction set, without PyTorch: a test harness
// builds them for aarch64 too (tests/kernels/gemm_harness.cpp, run under qemu) and checks NEON against scalar.
// Longer than 400 lines because the scalar, AVX2, AVX-512 and NEON versions of each weight format sit side by side,
// where one can check that they compute the same thing.
//
// No include guard: included once per instruction set, inside that set's namespace, with MTPX_ISA set to one of
// the MTPX_ISA_* values below; the includer has included <algorithm>, <cmath>, <cstdint>, <cstring>,
// <type_traits>, <vector>, "gemm_types.h" and <immintrin.h> (x86) or <arm_neon.h> (aarch64).
//
// One function, every instruction set. Quantized weights (int4, int8 blocks, int8 rows) where K is a multiple of 32
// run on integer dot products with x quantized to int8 ("Integer dot products" below). Otherwise each output is a
// dot product over K in 16 lanes, lane l taking, per block of 16 (int8, int8 blocks, and bf16 where K is not a
// multiple of 32), element l, or, per block of 32 (bf16), elements 2l then 2l + 1 (x comes deinterleaved to match,
// deinterleave_pairs; int4's integer kernels read it so too), each by one fused multiply-add in order; the lanes
// are then summed by one fixed tree (pairs 8 apart, then 4, 2, 1). The scalar loop, AVX2's two 8-lane registers,
// AVX-512's one 16-lane register and NEON's four 4-lane registers hold the same 16 partial sums, so all give the
// same bits; and nothing depends on how many rows are computed together, so a verify pass over k + 1 positions
// gives each position the bits a one-token step gives.

constexpr int kLanes = 16;
using mtpx_gemm::Bf16;
using mtpx_gemm::GroupScales;
using mtpx_gemm::Int4;
using mtpx_gemm::Int8Blocks;
using mtpx_gemm::kGroup4;
using mtpx_gemm::kGroup8;

// n elements of `storage` starting at a 64-byte boundary. The few-row kernels load x's rows (and their int8 codes) in
// every multiply; from malloc's 16-byte alignment every other 32-byte load and every 64-byte one straddles two cache
// lines and costs two loads, which is what bounds a pass over several rows.
template <typename T>
T* cache_aligned(std::vector<T>& storage, int64_t n) {
  storage.resize(n + 64 / sizeof(T));
  const auto p = reinterpret_cast<uintptr_t>(storage.data());
  return reinterpret_cast<T*>((p + 63) & ~static_cast<uintptr_t>(63));
}

// Whether a weight type of this K runs 32 elements at a time in pairs (x deinterleaved to match).
template <typename W>
bool pairs(int64_t K) {
  return (std::is_same_v<W, Bf16> || std::is_same_v<W, Int4>) && K % (2 * kLanes) == 0;
}

// fp16 bits -> fp32, exactly (every fp16 value is an fp32 value), the same on every instruction set
inline float half_to_float(uint16_t h) {
#if MTPX_ISA == MTPX_ISA_AVX2 || MTPX_ISA == MTPX_ISA_AVX512
  return _cvtsh_ss(h);
#elif MTPX_ISA == MTPX_ISA_NEON
  __fp16 v;
  std::memcpy(&v, &h, sizeof v);
  return static_cast<float>(v);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24
    const float f = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  const uint32_t bits = sign | (exp == 0x1F ? 0x7F800000u | (mant << 13) : ((exp + 112) << 23) | (mant << 13));
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

// The fp32 (scale, offset) of groups [g0, g1) of output row n (g0, g1 whole super-blocks) into out[2 * (g1 - g0)]:
// made as the K loop reaches them, so that the inner loops read one fp32 pair per group (converting a group's int8
// pair and its super-block's fp16 pair inside them cost more than the group's FMAs: 2x the time of a step on one
// AVX-512 core). Every product is exact, so each instruction set's version gives the same values.
inline void expand_scales(const GroupScales& s, int64_t n, int64_t g0, int64_t g1, float* out) {
  const int8_t* sm = s.groups + 2 * (n * s.n_groups + g0);
  const uint16_t* sup = s.supers + 2 * ((n * s.n_groups + g0) >> s.shift);
  const int64_t per = int64_t{1} << s.shift, count = g1 - g0;
  int64_t g = 0;  // groups done, at a super-block's start
#if MTPX_ISA == MTPX_ISA_AVX2 || MTPX_ISA == MTPX_ISA_AVX512
  // super-blocks of 1, 2 or 4 groups (GGUF's Q4_0, Q8_0, ...): 4 groups a step, their 4 >> shift (d, dmin) pairs
  // converted together and spread to their groups' lanes (converting them one at a time cost more than the dots)
  if (s.shift <= 2) {
    const __m256i spread = s.shift == 0   ? _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)
                           : s.shift == 1 ? _mm256_setr_epi32(0, 1, 0, 1, 2, 3, 2, 3)
                                          : _mm256_setr_epi32(0, 1, 0, 1, 0, 1, 0, 1);
    for (; g + 4 <= count; g += 4) {
      const uint16_t* p = sup + 2 * (g >> s.shift);
      __m128i halves;
      if (s.shift == 0) {
        halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      } else if (s.shift == 1) {
        halves = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
      } else {
        int32_t pair;
        std::memcpy(&pair, p, sizeof pair);
        halves = _mm_cvtsi32_si128(pair);
      }
      const __m256 dd = _mm256_permutevar8x32_ps(_mm256_cvtph_ps(halves), spread);
      const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sm + 2 * g));
      _mm256_storeu_ps(out + 2 * g, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), dd));
    }
  }
#elif MTPX_ISA == MTPX_ISA_NEON
  // super-blocks of 1 or 2 groups: 2 groups a step, as above
  if (s.shift <= 1) {
    for (; g + 2 <= count; g += 2) {
      const uint16_t* p = sup + 2 * (g >> s.shift);
      uint16x4_t halves;
      if (s.shift == 0) {
        halves = vld1_u16(p);
      } else {
        uint32_t pair;
        std::memcpy(&pair, p, sizeof pair);
        halves = vreinterpret_u16_u32(vdup_n_u32(pair));
      }
      int32_t codes;
      std::memcpy(&codes, sm + 2 * g, sizeof codes);
      const int32x4_t v = vmovl_s16(vget_low_s16(vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(codes)))));
      vst1q_f32(out + 2 * g, vmulq_f32(vcvtq_f32_s32(v), vcvt_f32_f16(vreinterpret_f16_u16(halves))));
    }
  }
#endif
  for (int64_t b = g >> s.shift; b < count >> s.shift; ++b) {
    const float d = half_to_float(sup[2 * b]), dmin = half_to_float(sup[2 * b + 1]);
    int64_t i = 2 * b * per;
    const int64_t end = i + 2 * per;
#if MTPX_ISA == MTPX_ISA_AVX512
    const __m512 dd = _mm512_setr_ps(d, dmin, d, dmin, d, dmin, d, dmin, d, dmin, d, dmin, d, dmin, d, dmin);
    for (; i + 16 <= end; i += 16) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(sm + i));
      _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)), dd));
    }
#endif
#if MTPX_ISA == MTPX_ISA_AVX2 || MTPX_ISA == MTPX_ISA_AVX512
    const __m256 d8 = _mm256_setr_ps(d, dmin, d, dmin, d, dmin, d, dmin);
    for (; i + 8 <= end; i += 8) {
      const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sm + i));
      _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), d8));
    }
#endif
    for (; i < end; i += 2) {
      out[i] = d * static_cast<float>(sm[i]);
      out[i + 1] = dmin * static_cast<float>(sm[i + 1]);
    }
  }
}

// Groups whose (scale, offset) pairs expand_scales makes at a time, onto the stack (C rows of them fit in L1).
constexpr int64_t kScaleChunk = 256;
// Each 32-block of each row of x [M, K]: its 16 even elements, then its 16 odd ones.
inline void deinterleave_pairs(float* x, int64_t M, int64_t K) {
  float block[2 * kLanes];
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; k += 2 * kLanes) {
      float* p = x + m * K + k;
      for (int l = 0; l < kLanes; ++l) block[l] = p[2 * l], block[kLanes + l] = p[2 * l + 1];
      std::copy(block, block + 2 * kLanes, p);
    }
}

inline float bf16_to_float(Bf16 b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// the fixed tree over 16 lane sums
inline float tree16(const float* a) {
  float s8[8], s4[4];
  for (int i = 0; i < 8; ++i) s8[i] = a[i] + a[i + 8];
  for (int i = 0; i < 4; ++i) s4[i] = s8[i] + s8[i + 4];
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// Output columns computed together (each loaded x vector is reused that many times), and how far ahead in each
// weight row to prefetch: with more rows the FMAs take longer per cache line, and fewer streams each prefetched
// further ahead keep more of the memory bandwidth. On x86 one column at a time: a weight's rows lie one after
// another, so each thread then reads one long contiguous stream, which the hardware prefetchers follow; several
// columns at once are several streams a row long each (2 KiB of bf16 at K = 1024), too short for them, and the x
// vectors they would share come from L1 anyway. (Neither changes a result's bits: every column is its own dot
// product.)
// AVX2's 8-lane FMAs do half of AVX-512's work each: 4 rows take 16 of them per 64 bytes of bf16 weights, each also
// loading 8 floats of x, so on one core a 4-row pass is bound by the FMAs and their loads, not by memory, and costs
// more than one row.
template <int M>
constexpr int kColumns = MTPX_ISA == MTPX_ISA_NEON ? (M == 1 ? 4 : M <= 3 ? 2 : 1) : 1;
template <int M, typename W>
constexpr int64_t kPrefetchBytes = M == 1 && sizeof(W) == 2 ? 1024 : 4096;

inline void prefetch(const void* p, int64_t ahead) {
  __builtin_prefetch(static_cast<const char*>(p) + ahead, 0, 3);
}

#if MTPX_ISA == MTPX_ISA_AVX512
inline float reduce16(__m512 a) {
  const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(a),
                                  _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

inline __m512 widen16(const Bf16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline __m512 widen16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
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
      for (int c = 0; c < C; ++c) prefetch(w + (n + c) * K + k, kPrefetchBytes<M, W>);
    for (int c = 0; c < C; ++c) {
      const __m512 wv = widen16(w + (n + c) * K + k);
      for (int m = 0; m < M; ++m) acc[c][m] = _mm512_fmadd_ps(wv, xv[m], acc[c][m]);
    }
  }
  for (int c = 0; c < C; ++c)
    for (int m = 0; m < M; ++m) out[m * N + n + c] = reduce16(acc[c][m]);
}

// bf16 weights, 32 per step: one 64-byte load holds them in pairs per 32-bit lane, and a shift (even elements)
// and a mask (odd elements) widen them, two instructions per 32 weights instead of four.
// The empty asm statements pin x and the weights in registers: left alone, GCC folded them into the FMAs as memory
// operands, loading each x vector once per column and each weight line twice.
template <int M, int C>
void columns_bf16_pairs(const float* x, const Bf16* w, int64_t K, int64_t n, float* out, int64_t N) {
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
      const Bf16* row = w + (n + c) * K + k;
      prefetch(row, kPrefetchBytes<M, Bf16>);
      __m512i raw = _mm512_loadu_si512(row);
      asm volatile("" : "+v"(raw));
      lo[c] = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
      hi[c] = _mm512_castsi512_ps(_mm512_and_si512(raw, high));
    }
    // per accumulator: even element first, then odd (the order fixes the bits)
    for (int c = 0; c < C; ++c)
      for (int m = 0; m < M; ++m) acc[c][m] = _mm512_fmadd_ps(lo[c], even[m], acc[c][m]);
    for (int c = 0; c < C; ++c)
      for (int m = 0; m < M; ++m) acc[c][m] = _mm512_fmadd_ps(hi[c], odd[m], acc[c][m]);
  }
  for (int c = 0; c < C; ++c)
    for (int m = 0; m < M; ++m) out[m * N + n + c] = reduce16(acc[c][m]);
}

// each block of 16 codes widened and turned into weights by one FMA (code * scale + offset)
template <int M, int C>
void columns_int8_blocks(const float* x, const Int8Blocks* w, int64_t K, int64_t n, float* out, int64_t N) {
  __m512 acc[C][M];
  for (int c = 0; c < C; ++c)
    for (int m = 0; m < M; ++m) acc[c][m] = _mm512_setzero_ps();
  float so[C][2 * kScaleChunk];
  for (int64_t k0 = 0; k0 < K; k0 += kScaleChunk * kGroup8) {
    const int64_t k1 = std::min(K, k0 + kScaleChunk * kGroup8);
    for (int c = 0; c < C; ++c) expand_scales(w->s, n + c, k0 / kGroup8, k1 / kGroup8, so[c]);
    for (int64_t k = k0; k < k1; k += kGroup8) {
      __m512 xv[M];
      for (int m = 0; m < M; ++m) xv[m] = _mm512_loadu_ps(x + m * K + k);
      for (int c = 0; c < C; ++c) {
        const int8_t* row = w->codes + (n + c) * K + k;
        if (k % 64 == 0) prefetch(row, 4096);
        const float* sc = so[c] + 2 * ((k - k0) / kGroup8);
        const float scale = sc[0], offset = sc[1];
        const __m512 wv = _mm512_fmadd_ps(widen16(row), _mm512_set1_ps(scale), _mm512_set1_ps(offset));
        for (int m = 0; m < M; ++m) acc[c][m] = _mm512_fmadd_ps(wv, xv[m], acc[c][m]);
      }
    }
  }
  for (int c = 0; c < C; ++c)
    for (int m = 0; m < M; ++m) out[m * N + n + c] = reduce16(acc[c][m]);
}

#elif MTPX_ISA == MTPX_ISA_AVX2
// lanes 0-7 in a, 8-15 in b
inline float reduce16(__m256 a, __m256 b) {
  const __m256 s8 = _mm256_add_ps(a, b);
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

inline __m256 widen8(const Bf16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

inline __m256 widen8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

template <int M, int C, typename W>
void columns(const float* x, const W* w, int64_t K, int64_t n, float* out, int64_t N) {
  __m256 acc[C][M][2];
  for (int c = 0; c < C; ++c)
    for (int m = 0; m < M; ++m) acc[c][m][0] = acc[c][m][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += kLanes) {
    if ((k * sizeof(W)) % 64 == 0)
      for (int c = 0; c < C; ++c) prefetch(w + (n + c) * K + k, kPrefetchBytes<M, W>);
    for (int c = 0; c < C; ++c) {
      const __m256 w0 = widen8(w + (n + c) * K + k), w1 = widen8(w + (n + c) * K + k + 8);
      for (int m = 0; m < M; ++m) {
        acc[c][m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), acc[c][m][0]);
        acc[c][m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), acc[c][m][1]);
      }
    }
  }
  for (int c = 0; c < C; ++c)
    for (int m = 0; m < M; ++m) out[m * N + n + c] = reduce16(acc[c][m][0], acc[c][m][1]);
}

// 32 bf16 weights in two 32-byte loads (lanes 0-7, 8-15), each widened by a shift (even) and a mask (odd)
template <int M, int C>
void columns_bf16_pairs(const float* x, const Bf16* w, int64_t K, int64_t n, float* out, int64_t N) {
  __m256 acc[C][M][2];
  for (int c = 0; c < C; ++c)
    for (int m = 0; m < M; ++m) acc[c][m][0] = acc[c][m][1] = _mm256_setzero_ps();
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t k = 0; k < K; k += 2 * kLanes) {
    for (int c = 0; c < C; ++c) {
      const Bf16* row = w + (n + c) * K + k;
      prefetch(row, kPrefetchBytes<M, Bf16>);
      const __m256i r0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
      const __m256i r1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 16));
      const __m256 lo0 = _mm256_castsi256_ps(_mm256_slli_epi32(r0, 16)), hi0 = _mm256_castsi256_ps(_mm256_and_si256(r0, high));
      const __m256 lo1 = _mm256_castsi256_ps(_mm256_slli_epi32(r1, 16)), hi1 = _mm256_castsi256_ps(_mm256_and_si256(r1, high));
      for (int m = 0; m < M; ++m) {
        const float* xm = x + m * K + k;
        acc[c][m][0] = _mm256_fmadd_ps(lo0, _mm256_loadu_ps(xm), acc[c][m][0]);
        acc[c][m][1] = _mm256_fmadd_ps(lo1, _mm256_loadu_ps(xm + 8), acc[c][m][1]);
        acc[c][m][0] = _mm256_fmadd_ps(hi0, _mm256_loadu_ps(xm + 16), acc[c][m][0]);
        acc[c][m][1] = _mm256_fmadd_ps(hi1, _mm256_loadu_ps(xm + 24), acc[c][m][1]);
      }
    }
  }
  for (int c = 0; c < C; ++c)
    for (int m = 0; m < M; ++m) out[m * N + n + c] = reduce16(acc[c][m][0], acc[c][m][1]);
}

template <int M, int C>
void columns_int8_blocks(const float* x, const Int8Blocks* w, int64_t K, int64_t n, float* out, int64_t N) {
  __m256 acc[C][M][2];
  for (int c = 0; c < C; ++c)
    for (int m = 0; m < M; ++m) acc[c][m][0] = acc[c][m][1] = _mm256_setzero_ps();
  float so[C][2 * kScaleChunk];
  for (int64_t k0 = 0; k0 < K; k0 += kScaleChunk * kGroup8) {
    const int64_t k1 = std::min(K, k0 + kScaleChunk * kGroup8);
    for (int c = 0; c < C; ++c) expand_scales(w->s, n + c, k0 / kGroup8, k1 / kGroup8, so[c]);
    for (int64_t k = k0; k < k1; k += kGroup8) {
      for (int c = 0; c < C; ++c) {
        const int8_t* row = w->codes + (n + c) * K + k;
        if (k % 64 == 0) prefetch(row, 4096);
        const float* sc = so[c] + 2 * ((k - k0) / kGroup8);
        const float scale = sc[0], offset = sc[1];
        const __m256 s = _mm256_set1_ps(scale), o = _mm256_set1_ps(offset);
        const __m256 w0 = _mm256_fmadd_ps(widen8(row), s, o), w1 = _mm256_fmadd_ps(widen8(row + 8), s, o);
        for (int m = 0; m < M; ++m) {
          acc[c][m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), acc[c][m][0]);
          acc[c][m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), acc[c][m][1]);
        }
      }
    }
  }
  for (int c = 0; c < C; ++c)
    for (int m = 0; m < M; ++m) out[m * N + n + c] = reduce16(acc[c][m][0], acc[c][m][1]);
}

#elif MTPX_ISA == MTPX_ISA_NEON
// lanes 0-3, 4-7, 8-11, 12-15
inline float reduce16(const float32x4_t* a) {
  const float32x4_t s4 = vaddq_f32(vaddq_f32(a[0], a[2]), vaddq_f32(a[1], a[3]));
  return (vgetq_lane_f32(s4, 0) + vgetq_lane_f32(s4, 2)) + (vgetq_lane_f32(s4, 1) + vgetq_lane_f32(s4, 3));
}

inline void widen16(const Bf16* p, float32x4_t* v) {
  for (int i = 0; i < 4; ++i) v[i] = vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p + 4 * i), 16));
}

inline void widen16(const int8_t* p, float32x4_t* v) {
  const int8x16_t raw = vld1q_s8(p);
  const int16x8_t lo = vmovl_s8(vget_low_s8(raw)), hi = vmovl_s8(vget_high_s8(raw));
  v[0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo)));
  v[1] = vcvtq_f32_s32(vmovl_s16(vget_high_s16(lo)));
  v[2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi)));
  v[3] = vcvtq_f32_s32(vmovl_s16(vget_high_s16(hi)));
}

template <int M, int C, typename W>
void columns(const float* x, const W* w, int64_t K, int64_t n, float* out, int64_t N) {
  float32x4_t acc[C][M][4];
  for (int c = 0; c < C; ++c)
    for (int m = 0; m < M; ++m)
      for (int i = 0; i < 4; ++i) acc[c][m][i] = vdupq_n_f32(0.f);
  for (int64_t k = 0; k < K; k += kLanes) {
    if ((k * sizeof(W)) % 64 == 0)
      for (int c = 0; c < C; ++c) prefetch(w + (n + c) * K + k, kPrefetchBytes<M, W>);
    for (int c = 0; c < C; ++c) {
      float32x4_t wv[4];
      widen16(w + (n + c) * K + k, wv);
      for (int m = 0; m < M; ++m)
        for (int i = 0; i < 4; ++i) acc[c][m][i] = vfmaq_f32(acc[c][m][i], wv[i], vld1q_f32(x + m * K + k + 4 * i));
    }
  }
  for (int c = 0; c < C; ++c)
    for (int m = 0; m < M; ++m) out[m * N + n + c] = reduce16(acc[c][m]);
}

template <int M, int C>
void columns_bf16_pairs(const float* x, const Bf16* w, int64_t K, int64_t n, float* out, int64_t N) {
  float32x4_t acc[C][M][4];
  for (int c = 0; c < C; ++c)
    for (int m = 0; m < M; ++m)
      for (int i = 0; i < 4; ++i) acc[c][m][i] = vdupq_n_f32(0.f);
  const uint32x4_t high = vdupq_n_u32(0xFFFF0000u);
  for (int64_t k = 0; k < K; k += 2 * kLanes) {
    for (int c = 0; c < C; ++c) {
      const Bf16* row = w + (n + c) * K + k;
      prefetch(row, kPrefetchBytes<M, Bf16>);
      float32x4_t lo[4], hi[4];
      for (int i = 0; i < 4; ++i) {
        const uint32x4_t raw = vld1q_u32(reinterpret_cast<const uint32_t*>(row) + 4 * i);
        lo[i] = vreinterpretq_f32_u32(vshlq_n_u32(raw, 16));
        hi[i] = vreinterpretq_f32_u32(vandq_u32(raw, high));
      }
      for (int m = 0; m < M; ++m) {
        const float* xm = x + m * K + k;
        for (int i = 0; i < 4; ++i) acc[c][m][i] = vfmaq_f32(acc[c][m][i], lo[i], vld1q_f32(xm + 4 * i));
        for (int i = 0; i < 4; ++i) acc[c][m][i] = vfmaq_f32(acc[c][m][i], hi[i], vld1q_f32(xm + kLanes + 4 * i));
      }
    }
  }
  for (int c = 0; c < C; ++c)
    for (int m = 0; m < M; ++m) out[m * N + n + c] = reduce16(acc[c][m]);
}

template <int M, int C>
void columns_int8_blocks(const float* x, const Int8Blocks* w, int64_t K, int64_t n, float* out, int64_t N) {
  float32x4_t acc[C][M][4];
  for (int c = 0; c < C; ++c)
    for (int m = 0; m < M; ++m)
      for (int i = 0; i < 4; ++i) acc[c][m][i] = vdupq_n_f32(0.f);
  float so[C][2 * kScaleChunk];
  for (int64_t k0 = 0; k0 < K; k0 += kScaleChunk * kGroup8) {
    const int64_t k1 = std::min(K, k0 + kScaleChunk * kGroup8);
    for (int c = 0; c < C; ++c) expand_scales(w->s, n + c, k0 / kGroup8, k1 / kGroup8, so[c]);
    for (int64_t k = k0; k < k1; k += kGroup8) {
      for (int c = 0; c < C; ++c) {
        const int8_t* row = w->codes + (n + c) * K + k;
        if (k % 64 == 0) prefetch(row, 4096);
        const float* sc = so[c] + 2 * ((k - k0) / kGroup8);
        const float scale = sc[0], offset = sc[1];
        float32x4_t wv[4];
        widen16(row, wv);
        for (int i = 0; i < 4; ++i) wv[i] = vfmaq_f32(vdupq_n_f32(offset), wv[i], vdupq_n_f32(scale));
        for (int m = 0; m < M; ++m)
          for (int i = 0; i < 4; ++i) acc[c][m][i] = vfmaq_f32(acc[c][m][i], wv[i], vld1q_f32(x + m * K + k + 4 * i));
      }
    }
  }
  for (int c = 0; c < C; ++c)
    for (int m = 0; m < M; ++m) out[m * N + n + c] = reduce16(acc[c][m]);
}

#else  // scalar: the reference the vector versions match, lane by lane
inline float widen1(Bf16 v) { return bf16_to_float(v); }
inline float widen1(int8_t v) { return static_cast<float>(v); }

template <int M, int C, typename W>
void columns(const float* x, const W* w, int64_t K, int64_t n, float* out, int64_t N) {
  for (int c = 0; c < C; ++c) {
    float acc[M][kLanes] = {};
    const W* row = w + (n + c) * K;
    for (int64_t k = 0; k < K; k += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const float wv = widen1(row[k + l]);
        for (int m = 0; m < M; ++m) acc[m][l] = std::fma(wv, x[m * K + k + l], acc[m][l]);
      }
    for (int m = 0; m < M; ++m) out[m * N + n + c] = tree16(acc[m]);
  }
}

template <int M, int C>
void columns_bf16_pairs(const float* x, const Bf16* w, int64_t K, int64_t n, float* out, int64_t N) {
  for (int c = 0; c < C; ++c) {
    float acc[M][kLanes] = {};
    const Bf16* row = w + (n + c) * K;
    for (int64_t k = 0; k < K; k += 2 * kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const float even = bf16_to_float(row[k + 2 * l]), odd = bf16_to_float(row[k + 2 * l + 1]);
        for (int m = 0; m < M; ++m) {
          acc[m][l] = std::fma(even, x[m * K + k + l], acc[m][l]);
          acc[m][l] = std::fma(odd, x[m * K + k + kLanes + l], acc[m][l]);
        }
      }
    for (int m = 0; m < M; ++m) out[m * N + n + c] = tree16(acc[m]);
  }
}

template <int M, int C>
void columns_int8_blocks(const float* x, const Int8Blocks* w, int64_t K, int64_t n, float* out, int64_t N) {
  for (int c = 0; c < C; ++c) {
    float acc[M][kLanes] = {};
    const int8_t* row = w->codes + (n + c) * K;
    float so[2 * kScaleChunk];
    for (int64_t k0 = 0; k0 < K; k0 += kScaleChunk * kGroup8) {
      const int64_t k1 = std::min(K, k0 + kScaleChunk * kGroup8);
      expand_scales(w->s, n + c, k0 / kGroup8, k1 / kGroup8, so);
      for (int64_t k = k0; k < k1; k += kGroup8) {
        const float scale = so[2 * ((k - k0) / kGroup8)], offset = so[2 * ((k - k0) / kGroup8) + 1];
        for (int l = 0; l < kLanes; ++l) {
          const float wv = std::fma(static_cast<float>(row[k + l]), scale, offset);
          for (int m = 0; m < M; ++m) acc[m][l] = std::fma(wv, x[m * K + k + l], acc[m][l]);
        }
      }
    }
    for (int m = 0; m < M; ++m) out[m * N + n + c] = tree16(acc[m]);
  }
}
#endif

// ---- Integer dot products of quantized weights (int4, int8 blocks, int8 rows), as llama.cpp does on CPUs ----
//
// Why: dequantizing each weight to fp32 and multiplying it in 8-lane FMAs costs several instructions per weight per
// row, so a few-row verify pass is bound by the arithmetic, not by reading the weights. Here x is quantized once per
// call, per row and span of elements, to int8 codes with one fp32 scale (d = max|x| / 127, q = x / d rounded to
// nearest, ties to even: llama.cpp's Q8_0 over 32 elements, its Q8_K over 256), and the weights' codes meet x's codes
// in integer dot products (AVX2's vpmaddubsw + vpmaddwd, VNNI's vpdpbusd / vpdpwssd, NEON's widening multiplies and
// pairwise adds or SDOT): 32 weights of one row in one to three instructions, exact in int32, so their order does
// not matter.
//
// The span is a weight's super-block (its groups sharing one fp16 d), at most 256 elements (dot_span): there the
// groups' integer sub-scales sc multiply the integer sums, so that the float part runs once per span instead of once
// per block of 32 (K-quants, mtpx's int4 and int8 blocks; int8 rows take spans of 256 with no sub-scales). Where
// the super-block is one block of 32 (GGUF's Q4_0, Q8_0, ...) the span is that block and sc stays in the fp32 scale.
//
// The float part is one fixed sequence, the same on every instruction set and for any row count. Per output and per
// span s (elements in the weights' order: even then odd elements of each block of 32 for int4, as x is
// deinterleaved), lane l of 8 holds the integer sum I of its elements 4l..4l + 3 of each block of the span (each
// block's sum times the lane's group's sc, for spans of more than one block) and accumulates, span after span,
//   acc[l] = fma(float(I), ds, acc[l]),   ds = d * d_s  (spans of one block: (the lane's group's scale) * d_s;
//                                                        int8 rows: d_s)
// and the lanes are summed by one fixed tree (4 apart, then 2, 1). A group's offset enters as
//   fma(offset, t, O[g % 4]) in group order, t = d_s * float(the sum of x's codes over the group),
// the four sums O added as (O0 + O2) + (O1 + O3), then added to the lanes' sum. (int8 rows: the row's scale
// multiplies the result afterwards, as on the float path.)
// int4 in spans of several blocks ("whole" spans) instead keeps every integer sum whole: per span the exact sum I of
// all its code products times their groups' sc, and the exact sum U of its groups' m times the sums of x's codes
// over them, then one accumulator,
//   acc = fma(float(U), dmin * d_s, fma(float(I), d * d_s, acc))   span after span,
// so that a kernel may gather a span's products in any order (columns_dot_span_order adds 16-bit products of all
// the span's blocks before applying the sub-scales) and makes no float per group. tests/int_dot.py computes all
// of this in PyTorch.
constexpr int64_t kQBlock = 32;
constexpr int64_t kMaxSpan = 256;
// Blocks whose (ds, offset term) pairs are made at a time, onto the stack (a whole number of spans)
constexpr int64_t kDotChunk = 64;

// x's codes, and per weight group and row the pair (d_s, d_s * the sum of the group's codes), groups of `group`
struct Q8Rows {
  const int8_t* q;       // [M, K], in span order where span_order
  const float* dq;       // [M, 2 * K / group]
  const int16_t* qsum;   // [M, K / group]: the sums of each group's codes
  int64_t group, span;
  bool span_order = false;
};

template <typename W>
constexpr bool kIntDot = std::is_same_v<W, Int4> || std::is_same_v<W, Int8Blocks> || std::is_same_v<W, int8_t>;
// The weight group of a format, along K (int8 rows: the block of 32)
template <typename W>
constexpr int64_t kDotGroup = std::is_same_v<W, Int8Blocks> ? kGroup8 : kQBlock;
// whether a format keeps per-group scales and offsets
template <typename W>
constexpr bool kGrouped = !std::is_same_v<W, int8_t>;

// The span of x's scales for weight w: its super-block (int8 rows: kMaxSpan), at most kMaxSpan, at least a block,
// halved until it divides K (a multiple of kQBlock)
template <typename W>
int64_t dot_span(const W* w, int64_t K) {
  int64_t span = kMaxSpan;
  if constexpr (kGrouped<W>) span = std::min(kMaxSpan, std::max(kQBlock, kDotGroup<W> << w->s.shift));
  while (K % span) span /= 2;
  return span;
}

// x [M, K] (fp32) -> codes, pairs and group sums, `group` dividing kQBlock, `span` a multiple of kQBlock dividing K.
// Division and rounding are IEEE operations, so every instruction set's version gives the same codes and scales.
inline void quantize_rows(const float* x, int64_t M, int64_t K, int64_t group, int64_t span, int8_t* q, float* dq,
                          int16_t* qsum) {
  const int64_t per = span / group, G = K / group;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; k += span) {
      const float* xb = x + m * K + k;
      int8_t* qb = q + m * K + k;
      float amax = 0.f;
      int64_t i = 0;
#if MTPX_ISA == MTPX_ISA_AVX2 || MTPX_ISA == MTPX_ISA_AVX512
      const __m256 sign = _mm256_set1_ps(-0.f);
      __m256 mx = _mm256_setzero_ps();
      for (; i < span; i += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + i)));
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, mx);
      for (float v : lanes) amax = std::max(amax, v);
      const float d = amax / 127.f;
      const __m256 dv = _mm256_set1_ps(d);
      for (i = 0; i < span; i += 8) {
        const __m256 r = d > 0.f ? _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(xb + i), dv),
                                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
                                 : _mm256_setzero_ps();
        const __m128i v = _mm_packs_epi32(_mm256_castsi256_si128(_mm256_cvtps_epi32(r)),
                                          _mm256_extracti128_si256(_mm256_cvtps_epi32(r), 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(qb + i), _mm_packs_epi16(v, v));
      }
#elif MTPX_ISA == MTPX_ISA_NEON
      float32x4_t mx = vdupq_n_f32(0.f);
      for (; i < span; i += 4) mx = vmaxq_f32(mx, vabsq_f32(vld1q_f32(xb + i)));
      amax = vmaxvq_f32(mx);
      const float d = amax / 127.f;
      const float32x4_t dv = vdupq_n_f32(d);
      for (i = 0; i < span; i += 8) {
        // vcvtnq: to nearest, ties to even
        const int32x4_t r0 = d > 0.f ? vcvtnq_s32_f32(vdivq_f32(vld1q_f32(xb + i), dv)) : vdupq_n_s32(0);
        const int32x4_t r1 = d > 0.f ? vcvtnq_s32_f32(vdivq_f32(vld1q_f32(xb + i + 4), dv)) : vdupq_n_s32(0);
        vst1_s8(qb + i, vmovn_s16(vcombine_s16(vmovn_s32(r0), vmovn_s32(r1))));
      }
#else
      for (; i < span; ++i) amax = std::max(amax, std::fabs(xb[i]));
      const float d = amax / 127.f;
      for (i = 0; i < span; ++i) qb[i] = d > 0.f ? static_cast<int8_t>(std::nearbyint(xb[i] / d)) : 0;
#endif
      for (int64_t p = 0; p < per; ++p) {
        int32_t sum = 0;
        for (int64_t j = 0; j < group; ++j) sum += qb[p * group + j];
        float* pair = dq + m * 2 * G + 2 * (k / group + p);
        pair[0] = d;
        pair[1] = d * static_cast<float>(sum);
        qsum[m * G + k / group + p] = static_cast<int16_t>(sum);
      }
    }
}

// x's codes [n] (spans of 8 blocks) rearranged for columns_dot_span_order: 32 bytes t of a span hold, in 4-byte
// lane i, elements 4t..4t + 3 of its block kSpanOrder[i] (the order AVX2's in-lane unpacks leave the codes in)
alignas(32) constexpr int32_t kSpanOrder[8] = {0, 2, 4, 6, 1, 3, 5, 7};
inline void span_order(int8_t* q, int64_t n) {
  alignas(32) int8_t ordered[8 * kQBlock];
  for (int64_t k = 0; k < n; k += 8 * kQBlock) {
    for (int t = 0; t < 8; ++t)
      for (int i = 0; i < 8; ++i) std::memcpy(ordered + 32 * t + 4 * i, q + k + kQBlock * kSpanOrder[i] + 4 * t, 4);
    std::memcpy(q + k, ordered, sizeof ordered);
  }
}

// For the groups of `pairs` / 2 (scale, offset) pairs `so` of one output row and x's (d_s, t) pairs `dq` of M rows
// (`stride` floats apart): ds[m][2i] = scale * d_s (where Scales), and O[m][g % 4] = fma(offset, t, O[m][g % 4]) in
// group order, O kept in the odd lanes of o[m][8] (the even lanes are not used). Groups start at a multiple of 4.
// The rows' chains are interleaved: one row's is a chain of dependent FMAs.
template <int M, bool Scales, int64_t Pairs>
inline void scale_pairs(const float* so, const float* dq, int64_t stride, int64_t pairs, float (*ds)[Pairs],
                        float (*o)[8]) {
  int64_t i = 0;
#if MTPX_ISA == MTPX_ISA_AVX2 || MTPX_ISA == MTPX_ISA_AVX512
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_loadu_ps(o[m]);
  for (; i + 8 <= pairs; i += 8) {
    const __m256 a = _mm256_loadu_ps(so + i);
    for (int m = 0; m < M; ++m) {
      const __m256 b = _mm256_loadu_ps(dq + m * stride + i);
      if (Scales) _mm256_storeu_ps(ds[m] + i, _mm256_mul_ps(a, b));
      acc[m] = _mm256_fmadd_ps(a, b, acc[m]);
    }
  }
  for (int m = 0; m < M; ++m) _mm256_storeu_ps(o[m], acc[m]);
#elif MTPX_ISA == MTPX_ISA_NEON
  float32x4_t lo[M], hi[M];
  for (int m = 0; m < M; ++m) lo[m] = vld1q_f32(o[m]), hi[m] = vld1q_f32(o[m] + 4);
  for (; i + 8 <= pairs; i += 8) {
    const float32x4_t a0 = vld1q_f32(so + i), a1 = vld1q_f32(so + i + 4);
    for (int m = 0; m < M; ++m) {
      const float32x4_t b0 = vld1q_f32(dq + m * stride + i), b1 = vld1q_f32(dq + m * stride + i + 4);
      if (Scales) {
        vst1q_f32(ds[m] + i, vmulq_f32(a0, b0));
        vst1q_f32(ds[m] + i + 4, vmulq_f32(a1, b1));
      }
      lo[m] = vfmaq_f32(lo[m], a0, b0);
      hi[m] = vfmaq_f32(hi[m], a1, b1);
    }
  }
  for (int m = 0; m < M; ++m) vst1q_f32(o[m], lo[m]), vst1q_f32(o[m] + 4, hi[m]);
#endif
  for (; i < pairs; i += 2)
    for (int m = 0; m < M; ++m) {
      if (Scales) ds[m][i] = so[i] * dq[m * stride + i];
      o[m][i % 8 + 1] = std::fma(so[i + 1], dq[m * stride + i + 1], o[m][i % 8 + 1]);
    }
}

// output row n's codes
template <typename W>
const void* dot_row(const W* w, int64_t K, int64_t n) {
  if constexpr (std::is_same_v<W, Int4>) return w->codes + n * (K / 2);
  else if constexpr (std::is_same_v<W, Int8Blocks>) return w->codes + n * K;
  else return w + n * K;
}

// What a kernel of C output rows and M rows of x reads per block besides the codes, made a chunk of kDotChunk blocks
// at a time: the offsets' four sums (scale_pairs), and in spans of one block each group's ds, else each group's
// sub-scale sc (as two int16, the pattern vpmaddwd takes) and each span's ds (at its first block). int8 rows have
// none of them: their scale is x's d_s. int4 in spans of several blocks ("whole" spans) takes its offsets a span at
// a time too: the exact integer sum U of the groups' m times the sums of x's codes over them, and dm = dmin * d_s.
template <int M, int C, typename W>
struct DotScales {
  static constexpr int64_t per = kQBlock / kDotGroup<W>;  // groups a block
  static constexpr int64_t kGroups = kGrouped<W> ? kDotChunk * per : 1;  // a chunk's
  static constexpr int64_t kSpans = kGrouped<W> ? kDotChunk : 1;
  static constexpr int64_t kWholeSpans = std::is_same_v<W, Int4> ? kDotChunk : 1;
  float so[2 * kGroups];
  float ds[C][M][2 * kGroups];
  float span_ds[C][kSpans][M];  // each at its span's first block, the rows' side by side
  float span_dm[C][kWholeSpans][M];
  int32_t span_u[C][kWholeSpans][M];
  int32_t subs[C][kGroups];
  float o[C][M][8] = {};
  const Q8Rows& x;
  int64_t K, G, span_blocks;
  bool whole;

  DotScales(const Q8Rows& rows, int64_t k)
      : x(rows), K(k), G(k / kDotGroup<W>), span_blocks(rows.span / kQBlock),
        whole(std::is_same_v<W, Int4> && span_blocks > 1) {}
  // blocks [b0, b1) of output rows c0..c0 + C - 1
  void chunk(const W* w, int64_t c0, int64_t b0, int64_t b1) {
    if constexpr (kGrouped<W>) {
      const int64_t g0 = b0 * per, g1 = b1 * per;
      for (int c = 0; c < C; ++c) {
        if (!whole) expand_scales(w->s, c0 + c, g0, g1, so);
        if (span_blocks == 1) {
          scale_pairs<M, true>(so, x.dq + 2 * g0, 2 * G, 2 * (g1 - g0), ds[c], o[c]);
          continue;
        }
        if (!whole) scale_pairs<M, false>(so, x.dq + 2 * g0, 2 * G, 2 * (g1 - g0), ds[c], o[c]);
        const int64_t row = (c0 + c) * w->s.n_groups;
        int64_t g = g0;
#if MTPX_ISA == MTPX_ISA_AVX2 || MTPX_ISA == MTPX_ISA_AVX512
        // 8 groups a step: their (sc, m) bytes to sc, sc, widened to int16
        const __m128i pick = _mm_setr_epi8(0, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14, 14);
        for (; g + 8 <= g1; g += 8) {
          const __m128i pairs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w->s.groups + 2 * (row + g)));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(&subs[c][g - g0]),
                              _mm256_cvtepi8_epi16(_mm_shuffle_epi8(pairs, pick)));
        }
#endif
        for (; g < g1; ++g) {
          const uint16_t sc = static_cast<uint16_t>(w->s.groups[2 * (row + g)]);
          subs[c][g - g0] = static_cast<int32_t>(sc | static_cast<uint32_t>(sc) << 16);
        }
        for (int64_t b = b0; b < b1; b += span_blocks) {
          const uint16_t* dd = w->s.supers + 2 * ((row + b * per) >> w->s.shift);
          const float d = half_to_float(dd[0]);
          for (int m = 0; m < M; ++m) span_ds[c][b - b0][m] = d * x.dq[m * 2 * G + 2 * b * per];
          if constexpr (std::is_same_v<W, Int4>) {
            const float dmin = half_to_float(dd[1]);
            for (int m = 0; m < M; ++m) span_dm[c][b - b0][m] = dmin * x.dq[m * 2 * G + 2 * b * per];
            offset_sums(w->s.groups + 2 * (row + b), b, span_u[c][b - b0]);
          }
        }
      }
    }
  }
  // u[m] = the sum over the span's groups (from group g, `pairs` their (sc, m) bytes) of m times row m's code sum
  void offset_sums(const int8_t* pairs, int64_t g, int32_t* u) const {
    int m = 0;
#if MTPX_ISA == MTPX_ISA_AVX2 || MTPX_ISA == MTPX_ISA_AVX512
    if (span_blocks == 8) {  // 8 groups' m as int16, against each row's 8 sums by vpmaddwd
      const __m128i odd = _mm_setr_epi8(1, 3, 5, 7, 9, 11, 13, 15, -1, -1, -1, -1, -1, -1, -1, -1);
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(pairs));
      const __m128i ms = _mm_cvtepi8_epi16(_mm_shuffle_epi8(bytes, odd));
      const auto products = [&](int r) {
        return _mm_madd_epi16(ms, _mm_loadu_si128(reinterpret_cast<const __m128i*>(x.qsum + r * G + g)));
      };
      for (; m + 4 <= M; m += 4)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(u + m),
                         _mm_hadd_epi32(_mm_hadd_epi32(products(m), products(m + 1)),
                                        _mm_hadd_epi32(products(m + 2), products(m + 3))));
      for (; m < M; ++m) {
        const __m128i p = _mm_hadd_epi32(products(m), products(m));
        u[m] = _mm_cvtsi128_si32(_mm_hadd_epi32(p, p));
      }
    }
#endif
    for (; m < M; ++m) {
      int32_t sum = 0;
      for (int64_t i = 0; i < span_blocks; ++i) sum += pairs[2 * i + 1] * x.qsum[m * G + g + i];
      u[m] = sum;
    }
  }
  // a whole span's float part for the integer sum of its code products, onto acc
  float whole_span(int c, int m, int64_t b, int64_t b0, int32_t sum, float acc) const {
    acc = std::fma(static_cast<float>(sum), span_ds[c][b - b0][m], acc);
    return std::fma(static_cast<float>(span_u[c][b - b0][m]), span_dm[c][b - b0][m], acc);
  }
  // block b's scale (b0 its chunk's first) in spans of one block: int4 its group's; int8 blocks its first group's,
  // the second's two floats on; int8 rows x's d
  const float* scale(int c, int m, int64_t b, int64_t b0) const {
    if constexpr (kGrouped<W>) return &ds[c][m][2 * per * (b - b0)];
    else return x.dq + m * 2 * G + 2 * b;
  }
  // the ds of the span starting at block b
  float span_scale(int c, int m, int64_t b, int64_t b0) const {
    if constexpr (kGrouped<W>) return span_ds[c][b - b0][m];
    else return x.dq[m * 2 * G + 2 * b];
  }
  // block b's groups' sub-scales, each as two int16 (int8 blocks: its two groups')
  const int32_t* sub_scales(int c, int64_t b, int64_t b0) const { return &subs[c][per * (b - b0)]; }
  // the lanes' tree plus the offsets' (O0 + O2) + (O1 + O3) (whole spans: their accumulator, offsets in it)
  float total(int c, int m, float lanes) const {
    return kGrouped<W> && !whole ? lanes + ((o[c][m][1] + o[c][m][5]) + (o[c][m][3] + o[c][m][7])) : lanes;
  }
};

// The loops below take spans of several blocks (Spans) or of one (the sub-scales then in ds); Scaled: the integer
// sums take sub-scales; Whole: a span's lanes are summed exactly before the float part
template <bool Spans, typename W>
constexpr bool kScaled = Spans && kGrouped<W>;
template <bool Spans, typename W>
constexpr bool kWhole = Spans && std::is_same_v<W, Int4>;

#if MTPX_ISA == MTPX_ISA_AVX2 || MTPX_ISA == MTPX_ISA_AVX512
// the 8 lanes summed by a fixed tree (4 apart, then 2, 1). (AVX-512 runs these 8-lane loops too: 16 lanes would take
// two blocks a step and change the order.)
inline float reduce8(__m256 v) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}
// the 8 int32 lanes' exact sum
inline int32_t sum8(__m256i v) {
  const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  const __m128i s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
  return _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 1)));
}

// block b's 32 codes of output row n, as bytes in the block's element order
inline __m256i dot_codes(const Int4* w, int64_t K, int64_t n, int64_t b) {
  // the 16 bytes in both halves, the upper copy shifted to its high nibbles
  const __m256i raw = _mm256_broadcastsi128_si256(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(w->codes + n * (K / 2) + b * 16)));
  return _mm256_and_si256(_mm256_srlv_epi64(raw, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(0x0F));
}
inline __m256i dot_codes(const Int8Blocks* w, int64_t K, int64_t n, int64_t b) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w->codes + n * K + b * kQBlock));
}
inline __m256i dot_codes(const int8_t* w, int64_t K, int64_t n, int64_t b) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + n * K + b * kQBlock));
}

// a block's sub-scales as vpmaddwd's 16-bit pairs, lanes 0-3 the first group's and 4-7 the second's (int4: one)
template <typename W>
inline __m256i sub_scales8(const int32_t* sc) {
  if constexpr (std::is_same_v<W, Int8Blocks>)
    return _mm256_permutevar8x32_epi32(_mm256_castsi128_si256(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc))),
                                       _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
  else
    return _mm256_set1_epi32(*sc);
}

// lanes += the block's 8 int32 sums of 4 code products each, times the lanes' sub-scales where Scaled. Signed codes:
// vpmaddubsw multiplies unsigned by signed bytes, so the weights' magnitudes meet x's codes carrying the weights'
// signs (no pair sum exceeds int16). VNNI's vpdpbusd gives the same int32 sums (no saturation to lose). Each sum is
// made apart and then added: accumulating in vpdpbusd / vpdpwssd chains the blocks on their latency.
template <bool Signed, bool Scaled>
inline __m256i dot8(__m256i lanes, __m256i codes, __m256i q, __m256i sc) {
  const __m256i u = Signed ? _mm256_abs_epi8(codes) : codes, s = Signed ? _mm256_sign_epi8(q, codes) : q;
#if defined(MTPX_INT_DOT_VNNI) && MTPX_ISA == MTPX_ISA_AVX512
  if (!Scaled) return _mm256_add_epi32(lanes, _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s));
#elif defined(MTPX_INT_DOT_VNNI)
  if (!Scaled) return _mm256_add_epi32(lanes, _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s));
#endif
  return _mm256_add_epi32(lanes, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), Scaled ? sc : _mm256_set1_epi16(1)));
}

#if MTPX_ISA == MTPX_ISA_AVX512
// AVX-512, int4: two output columns a register, lanes 0-7 the first's and 8-15 the second's. Each lane runs the
// sequence of the 8-lane loop below (columns_dot), so the bits are its bits, for half the instructions.
// block b's codes of rows n and n + 1 side by side
inline __m512i dot_codes2(const Int4* w, int64_t K, int64_t n, int64_t b) {
  const uint8_t* p = w->codes + n * (K / 2) + b * 16;
  const __m512i raw = _mm512_castsi256_si512(_mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(p + K / 2),
                                                                 reinterpret_cast<const __m128i*>(p)));
  // [row n, row n, row n + 1, row n + 1], each second copy shifted to its high nibbles
  const __m512i both = _mm512_shuffle_i64x2(raw, raw, _MM_SHUFFLE(1, 1, 0, 0));
  return _mm512_and_si512(_mm512_srlv_epi64(both, _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4)), _mm512_set1_epi8(0x0F));
}
// dot8 of two columns of int4 codes (unsigned)
template <bool Scaled>
inline __m512i dot16(__m512i lanes, __m512i codes, __m512i q, __m512i sc) {
#ifdef MTPX_INT_DOT_VNNI
  if (!Scaled) return _mm512_add_epi32(lanes, _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, q));
#endif
  return _mm512_add_epi32(lanes, _mm512_madd_epi16(_mm512_maddubs_epi16(codes, q), Scaled ? sc : _mm512_set1_epi16(1)));
}

template <bool Spans, int M, int C>
void column_pairs_dot(const Q8Rows& x, const Int4* w, int64_t K, int64_t n, float* out, int64_t N) {
  constexpr int P = C / 2;
  constexpr bool Scaled = kScaled<Spans, Int4>, Whole = kWhole<Spans, Int4>;
  constexpr int64_t bytes = 16;  // codes of a block
  const int64_t blocks = K / kQBlock, span = Spans ? x.span / kQBlock : 1;
  float whole[C][M] = {};
  __m512 acc[P][M];
  for (int p = 0; p < P; ++p)
    for (int m = 0; m < M; ++m) acc[p][m] = _mm512_setzero_ps();
  DotScales<M, C, Int4> s(x, K);
  for (int64_t b0 = 0; b0 < blocks; b0 += kDotChunk) {
    const int64_t b1 = std::min(blocks, b0 + kDotChunk);
    s.chunk(w, n, b0, b1);
    for (int64_t b = b0; b < b1; b += span) {
      __m512i lanes[P][M];
      for (int p = 0; p < P; ++p)
        for (int m = 0; m < M; ++m) lanes[p][m] = _mm512_setzero_si512();
      for (int64_t e = b; e < b + span; ++e) {
        __m512i qv[M];
        for (int m = 0; m < M; ++m)
          qv[m] = _mm512_broadcast_i64x4(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + m * K + e * kQBlock)));
        for (int p = 0; p < P; ++p) {
          const int c = 2 * p;
          if ((e * bytes) % 64 == 0)
            for (int i = 0; i < 2; ++i) prefetch(static_cast<const char*>(dot_row(w, K, n + c + i)) + e * bytes, 4096);
          const __m512i codes = dot_codes2(w, K, n + c, e);
          __m512i sc = _mm512_setzero_si512();
          if constexpr (Scaled)
            sc = _mm512_inserti64x4(_mm512_set1_epi32(*s.sub_scales(c, e, b0)),
                                    _mm256_set1_epi32(*s.sub_scales(c + 1, e, b0)), 1);
          for (int m = 0; m < M; ++m) lanes[p][m] = dot16<Scaled>(lanes[p][m], codes, qv[m], sc);
        }
      }
      for (int p = 0; p < P; ++p)
        for (int m = 0; m < M; ++m) {
          if constexpr (Whole) {
            for (int i = 0; i < 2; ++i) {
              const __m256i half =
                  i == 0 ? _mm512_castsi512_si256(lanes[p][m]) : _mm512_extracti64x4_epi64(lanes[p][m], 1);
              whole[2 * p + i][m] = s.whole_span(2 * p + i, m, b, b0, sum8(half), whole[2 * p + i][m]);
            }
            continue;
          }
          const auto scale_of = [&](int c) { return Spans ? s.span_scale(c, m, b, b0) : *s.scale(c, m, b, b0); };
          const __m512 scale =
              _mm512_insertf32x8(_mm512_set1_ps(scale_of(2 * p)), _mm256_set1_ps(scale_of(2 * p + 1)), 1);
          acc[p][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lanes[p][m]), scale, acc[p][m]);
        }
    }
  }
  for (int p = 0; p < P; ++p)
    for (int m = 0; m < M; ++m)
      for (int i = 0; i < 2; ++i) {
        const __m256 half = i == 0 ? _mm512_castps512_ps256(acc[p][m]) : _mm512_extractf32x8_ps(acc[p][m], 1);
        out[m * N + n + 2 * p + i] = s.total(2 * p + i, m, Whole ? whole[2 * p + i][m] : reduce8(half));
      }
}
#endif

#if MTPX_ISA == MTPX_ISA_AVX2 || MTPX_ISA == MTPX_ISA_AVX512
// int4 in spans of 8 blocks, x's codes in span order (span_order), in AVX2 registers (the AVX-512 build too, where
// it beat the column pairs). Block by block, applying the sub-scales takes a vpmaddwd and an add per block and row;
// here each 32 bytes of codes hold 4 of every block's 32, so that 16-bit lane pair i always belongs to block
// kSpanOrder[i]: a span's products add up in 16 bits (8 * 2 * 15 * 127 < 2^15) and take one vpmaddwd a span and
// row. The span's 128 bytes of codes are regrouped by 8 in-lane unpacks.
template <int M, int C>
void columns_dot_span_order(const Q8Rows& x, const Int4* w, int64_t K, int64_t n, float* out, int64_t N) {
  const int64_t blocks = K / kQBlock;
  float whole[C][M] = {};
  DotScales<M, C, Int4> s(x, K);
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i order = _mm256_load_si256(reinterpret_cast<const __m256i*>(kSpanOrder));
  for (int64_t b0 = 0; b0 < blocks; b0 += kDotChunk) {
    const int64_t b1 = std::min(blocks, b0 + kDotChunk);
    s.chunk(w, n, b0, b1);
    for (int64_t b = b0; b < b1; b += 8) {
      __m256i lanes[C * M];  // per column and row: the span's sums, as 8 int32
      for (int c = 0; c < C; ++c) {
        // the span's 8 blocks of 16 bytes as 4 registers, register u holding bytes 4u..4u + 3 of every block
        const uint8_t* p = w->codes + (n + c) * (K / 2) + b * 16;
        prefetch(reinterpret_cast<const char*>(p), 4096);
        prefetch(reinterpret_cast<const char*>(p) + 64, 4096);
        __m256i a[4];
        for (int i = 0; i < 4; ++i) a[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * i));
        const __m256i lo01 = _mm256_unpacklo_epi32(a[0], a[1]), hi01 = _mm256_unpackhi_epi32(a[0], a[1]);
        const __m256i lo23 = _mm256_unpacklo_epi32(a[2], a[3]), hi23 = _mm256_unpackhi_epi32(a[2], a[3]);
        const __m256i r[4] = {_mm256_unpacklo_epi64(lo01, lo23), _mm256_unpackhi_epi64(lo01, lo23),
                              _mm256_unpacklo_epi64(hi01, hi23), _mm256_unpackhi_epi64(hi01, hi23)};
        // elements 4t..4t + 3 of each block: the low nibbles of bytes 4t.., then (t >= 4) the high ones
        __m256i codes[8];
        for (int t = 0; t < 4; ++t) {
          codes[t] = _mm256_and_si256(r[t], low);
          codes[t + 4] = _mm256_and_si256(_mm256_srli_epi16(r[t], 4), low);
        }
        const __m256i sc = _mm256_permutevar8x32_epi32(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.sub_scales(c, b, b0))), order);
        for (int m = 0; m < M; ++m) {
          const int8_t* q = x.q + m * K + b * kQBlock;
          const auto products = [&](int t) {
            return _mm256_maddubs_epi16(codes[t], _mm256_load_si256(reinterpret_cast<const __m256i*>(q + 32 * t)));
          };
          __m256i even = products(0), odd = products(1);
          for (int t = 2; t < 8; t += 2) {
            even = _mm256_add_epi16(even, products(t));
            odd = _mm256_add_epi16(odd, products(t + 1));
          }
          lanes[c * M + m] = _mm256_madd_epi16(_mm256_add_epi16(even, odd), sc);
        }
      }
      // the sums of 4 rows at a time by horizontal adds, and their float part (whole_span) as vectors
      for (int c = 0; c < C; ++c) {
        const int64_t i = b - b0;
        constexpr int fours = M / 4 * 4;
        for (int m = 0; m < fours; m += 4) {
          const __m256i* v = lanes + c * M + m;
          const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
          const __m128 sums = _mm_cvtepi32_ps(_mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
          const __m128 acc = _mm_fmadd_ps(sums, _mm_loadu_ps(&s.span_ds[c][i][m]), _mm_loadu_ps(&whole[c][m]));
          const __m128 u = _mm_cvtepi32_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(&s.span_u[c][i][m])));
          _mm_storeu_ps(&whole[c][m], _mm_fmadd_ps(u, _mm_loadu_ps(&s.span_dm[c][i][m]), acc));
        }
        for (int m = fours; m < M; ++m) whole[c][m] = s.whole_span(c, m, b, b0, sum8(lanes[c * M + m]), whole[c][m]);
      }
    }
  }
  for (int c = 0; c < C; ++c)
    for (int m = 0; m < M; ++m) out[m * N + n + c] = s.total(c, m, whole[c][m]);
}
#endif

template <bool Spans, int M, int C, typename W>
void columns_dot(const Q8Rows& x, const W* w, int64_t K, int64_t n, float* out, int64_t N) {
#if MTPX_ISA == MTPX_ISA_AVX2 || MTPX_ISA == MTPX_ISA_AVX512
  if constexpr (kWhole<Spans, W>)
    if (x.span_order) return columns_dot_span_order<M, C>(x, w, K, n, out, N);
#endif
#if MTPX_ISA == MTPX_ISA_AVX512
  if constexpr (std::is_same_v<W, Int4> && C % 2 == 0) return column_pairs_dot<Spans, M, C>(x, w, K, n, out, N);
#endif
  constexpr bool Signed = !std::is_same_v<W, Int4>, Scaled = kScaled<Spans, W>, Whole = kWhole<Spans, W>;
  constexpr int64_t bytes = std::is_same_v<W, Int4> ? 16 : 32;  // codes of a block
  const int64_t blocks = K / kQBlock, span = Spans ? x.span / kQBlock : 1;
  float whole[C][M] = {};
  __m256 acc[C][M];
  for (int c = 0; c < C; ++c)
    for (int m = 0; m < M; ++m) acc[c][m] = _mm256_setzero_ps();
  DotScales<M, C, W> s(x, K);
  for (int64_t b0 = 0; b0 < blocks; b0 += kDotChunk) {
    const int64_t b1 = std::min(blocks, b0 + kDotChunk);
    s.chunk(w, n, b0, b1);
    for (int64_t b = b0; b < b1; b += span) {
      __m256i lanes[C][M];
      for (int c = 0; c < C; ++c)
        for (int m = 0; m < M; ++m) lanes[c][m] = _mm256_setzero_si256();
      for (int64_t e = b; e < b + span; ++e) {
        __m256i qv[M];
        for (int m = 0; m < M; ++m)
          qv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + m * K + e * kQBlock));
        for (int c = 0; c < C; ++c) {
          if ((e * bytes) % 64 == 0) prefetch(static_cast<const char*>(dot_row(w, K, n + c)) + e * bytes, 4096);
          const __m256i codes = dot_codes(w, K, n + c, e);
          __m256i sc = _mm256_setzero_si256();
          if constexpr (Scaled) sc = sub_scales8<W>(s.sub_scales(c, e, b0));
          for (int m = 0; m < M; ++m) lanes[c][m] = dot8<Signed, Scaled>(lanes[c][m], codes, qv[m], sc);
        }
      }
      for (int c = 0; c < C; ++c)
        for (int m = 0; m < M; ++m) {
          if constexpr (Whole) {
            whole[c][m] = s.whole_span(c, m, b, b0, sum8(lanes[c][m]), whole[c][m]);
            continue;
          }
          __m256 scale;
          if constexpr (Spans)
            scale = _mm256_set1_ps(s.span_scale(c, m, b, b0));
          else if constexpr (std::is_same_v<W, Int8Blocks>)  // lanes 0-3 the block's first group, 4-7 its second
            scale = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(s.scale(c, m, b, b0))),
                                             _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2));
          else
            scale = _mm256_broadcast_ss(s.scale(c, m, b, b0));
          acc[c][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes[c][m]), scale, acc[c][m]);
        }
    }
  }
  for (int c = 0; c < C; ++c)
    for (int m = 0; m < M; ++m) out[m * N + n + c] = s.total(c, m, Whole ? whole[c][m] : reduce8(acc[c][m]));
}

#elif MTPX_ISA == MTPX_ISA_NEON
// 16 code products summed in fours: int32 lanes of bytes 4l..4l + 3, by widening multiplies and pairwise adds (no
// pair sum exceeds int16), or by one SDOT where the CPU has the dot-product extension (the same sums)
inline int32x4_t dot4(int8x16_t codes, int8x16_t q) {
#if defined(MTPX_INT_DOT_VNNI) || defined(__ARM_FEATURE_DOTPROD)
  return vdotq_s32(vdupq_n_s32(0), codes, q);
#else
  const int16x8_t lo = vmull_s8(vget_low_s8(codes), vget_low_s8(q)), hi = vmull_high_s8(codes, q);
  return vpaddlq_s16(vpaddq_s16(lo, hi));
#endif
}

template <bool Spans, int M, int C, typename W>
void columns_dot(const Q8Rows& x, const W* w, int64_t K, int64_t n, float* out, int64_t N) {
  constexpr bool Scaled = kScaled<Spans, W>, Whole = kWhole<Spans, W>;
  const int64_t blocks = K / kQBlock, span = Spans ? x.span / kQBlock : 1;
  float whole[C][M] = {};
  float32x4_t acc[C][M][2];
  for (int c = 0; c < C; ++c)
    for (int m = 0; m < M; ++m) acc[c][m][0] = acc[c][m][1] = vdupq_n_f32(0.f);
  DotScales<M, C, W> s(x, K);
  for (int64_t b0 = 0; b0 < blocks; b0 += kDotChunk) {
    const int64_t b1 = std::min(blocks, b0 + kDotChunk);
    s.chunk(w, n, b0, b1);
    for (int64_t b = b0; b < b1; b += span) {
      int32x4_t lanes[C][M][2];
      for (int c = 0; c < C; ++c)
        for (int m = 0; m < M; ++m) lanes[c][m][0] = lanes[c][m][1] = vdupq_n_s32(0);
      for (int64_t e = b; e < b + span; ++e)
        for (int c = 0; c < C; ++c) {
          int8x16_t c0, c1;
          if constexpr (std::is_same_v<W, Int4>) {
            const uint8x16_t raw = vld1q_u8(w->codes + (n + c) * (K / 2) + e * 16);
            c0 = vreinterpretq_s8_u8(vandq_u8(raw, vdupq_n_u8(0x0F)));
            c1 = vreinterpretq_s8_u8(vshrq_n_u8(raw, 4));
          } else {
            const int8_t* p = static_cast<const int8_t*>(dot_row(w, K, n + c)) + e * kQBlock;
            c0 = vld1q_s8(p), c1 = vld1q_s8(p + 16);
          }
          int32_t sc0 = 1, sc1 = 1;  // the halves' groups' sub-scales
          if constexpr (Scaled) {
            const int32_t* sc = s.sub_scales(c, e, b0);
            sc0 = static_cast<int16_t>(sc[0]), sc1 = static_cast<int16_t>(sc[std::is_same_v<W, Int8Blocks> ? 1 : 0]);
          }
          for (int m = 0; m < M; ++m) {
            const int8_t* q = x.q + m * K + e * kQBlock;
            lanes[c][m][0] = vmlaq_n_s32(lanes[c][m][0], dot4(c0, vld1q_s8(q)), sc0);
            lanes[c][m][1] = vmlaq_n_s32(lanes[c][m][1], dot4(c1, vld1q_s8(q + 16)), sc1);
          }
        }
      for (int c = 0; c < C; ++c)
        for (int m = 0; m < M; ++m) {
          if constexpr (Whole) {
            whole[c][m] = s.whole_span(c, m, b, b0, vaddvq_s32(vaddq_s32(lanes[c][m][0], lanes[c][m][1])), whole[c][m]);
            continue;
          }
          float s0, s1;
          if constexpr (Spans) {
            s0 = s1 = s.span_scale(c, m, b, b0);
          } else {
            const float* sc = s.scale(c, m, b, b0);  // int8 blocks: the second half's group two floats on
            s0 = sc[0], s1 = sc[std::is_same_v<W, Int8Blocks> ? 2 : 0];
          }
          acc[c][m][0] = vfmaq_f32(acc[c][m][0], vcvtq_f32_s32(lanes[c][m][0]), vdupq_n_f32(s0));
          acc[c][m][1] = vfmaq_f32(acc[c][m][1], vcvtq_f32_s32(lanes[c][m][1]), vdupq_n_f32(s1));
        }
    }
  }
  for (int c = 0; c < C; ++c)
    for (int m = 0; m < M; ++m) {
      const float32x4_t s4 = vaddq_f32(acc[c][m][0], acc[c][m][1]);
      const float lanes = (vgetq_lane_f32(s4, 0) + vgetq_lane_f32(s4, 2)) + (vgetq_lane_f32(s4, 1) + vgetq_lane_f32(s4, 3));
      out[m * N + n + c] = s.total(c, m, Whole ? whole[c][m] : lanes);
    }
}

#else  // scalar: the reference, lane by lane
template <bool Spans, int M, int C, typename W>
void columns_dot(const Q8Rows& x, const W* w, int64_t K, int64_t n, float* out, int64_t N) {
  constexpr bool Scaled = kScaled<Spans, W>, Whole = kWhole<Spans, W>;
  const int64_t blocks = K / kQBlock, span = Spans ? x.span / kQBlock : 1;
  float acc[C][M][8] = {};
  DotScales<M, C, W> s(x, K);
  for (int64_t b0 = 0; b0 < blocks; b0 += kDotChunk) {
    const int64_t b1 = std::min(blocks, b0 + kDotChunk);
    s.chunk(w, n, b0, b1);
    for (int64_t b = b0; b < b1; b += span) {
      int32_t lanes[C][M][8] = {};
      for (int64_t e = b; e < b + span; ++e)
        for (int c = 0; c < C; ++c) {
          int32_t codes[kQBlock];  // in the block's element order
          for (int64_t i = 0; i < kQBlock; ++i) {
            if constexpr (std::is_same_v<W, Int4>) {
              const uint8_t byte = w->codes[(n + c) * (K / 2) + e * 16 + i % 16];
              codes[i] = i < 16 ? byte & 15 : byte >> 4;
            } else {
              codes[i] = static_cast<const int8_t*>(dot_row(w, K, n + c))[e * kQBlock + i];
            }
          }
          for (int m = 0; m < M; ++m)
            for (int l = 0; l < 8; ++l) {
              int32_t sum = 0;
              for (int j = 0; j < 4; ++j) sum += codes[4 * l + j] * x.q[m * K + e * kQBlock + 4 * l + j];
              int32_t sc = 1;
              if constexpr (Scaled)
                sc = static_cast<int16_t>(s.sub_scales(c, e, b0)[std::is_same_v<W, Int8Blocks> ? l / 4 : 0]);
              lanes[c][m][l] += sum * sc;
            }
        }
      for (int c = 0; c < C; ++c)
        for (int m = 0; m < M; ++m) {
          if constexpr (Whole) {
            int32_t sum = 0;
            for (int l = 0; l < 8; ++l) sum += lanes[c][m][l];
            acc[c][m][0] = s.whole_span(c, m, b, b0, sum, acc[c][m][0]);
            continue;
          }
          for (int l = 0; l < 8; ++l) {
            const float scale = Spans ? s.span_scale(c, m, b, b0)
                                      : s.scale(c, m, b, b0)[std::is_same_v<W, Int8Blocks> ? 2 * (l / 4) : 0];
            acc[c][m][l] = std::fma(static_cast<float>(lanes[c][m][l]), scale, acc[c][m][l]);
          }
        }
    }
  }
  for (int c = 0; c < C; ++c)
    for (int m = 0; m < M; ++m) {
      if constexpr (Whole) {
        out[m * N + n + c] = s.total(c, m, acc[c][m][0]);
        continue;
      }
      float s4[4];
      for (int i = 0; i < 4; ++i) s4[i] = acc[c][m][i] + acc[c][m][i + 4];
      out[m * N + n + c] = s.total(c, m, (s4[0] + s4[2]) + (s4[1] + s4[3]));
    }
}
#endif

// Output columns the integer kernels compute together: int4 one pair (AVX-512; AVX2 in spans of several blocks up to
// 4 rows, where the pair's 8 row accumulators still fit the 16 registers, and in spans of one block at one row: from
// two rows on, the second column's float part per block costs more than the shared x loads save), as two streams a
// thread keep more of the bandwidth at one row (four were slower); the int8 formats one column in 8 lanes (their
// pairs take a sign mask and a masked subtract per row and block for vpsignb on AVX-512, and int8 blocks a
// cross-lane shuffle of the scales, which cost more than pairing saves)
template <int M, bool Spans, typename W>
constexpr int kColumnsDot =
    (MTPX_ISA == MTPX_ISA_AVX512 || (MTPX_ISA == MTPX_ISA_AVX2 && M <= (Spans ? 4 : 1))) && std::is_same_v<W, Int4>
        ? 2
        : kColumns<M>;

// x: fp32 rows, or their Q8 codes for the integer kernels (in spans of several blocks where Spans)
template <int M, int C, bool Spans, typename X, typename W>
void column_block(const X& x, const W* w, int64_t K, int64_t n, float* out, int64_t N) {
  if constexpr (std::is_same_v<X, Q8Rows>) {
    columns_dot<Spans, M, C>(x, w, K, n, out, N);
  } else if constexpr (std::is_same_v<W, Int8Blocks>) {
    columns_int8_blocks<M, C>(x, w, K, n, out, N);
  } else {
    if constexpr (std::is_same_v<W, Bf16>)
      if (pairs<W>(K)) return columns_bf16_pairs<M, C>(x, w, K, n, out, N);
    columns<M, C>(x, w, K, n, out, N);
  }
}

// parallel(blocks, grain, fn) runs fn(begin, end) over [0, blocks) (on any threads: a block's bits do not depend on
// which thread computes it)
template <int M, int C, bool Spans, typename X, typename W, typename Parallel>
void rows_in(const X& x, const W* w, int64_t K, int64_t N, float* out, const Parallel& parallel) {
  const int64_t blocks = N / C;
  parallel(blocks, 64 / C, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) column_block<M, C, Spans>(x, w, K, b * C, out, N);
  });
  for (int64_t n = blocks * C; n < N; ++n) column_block<M, 1, Spans>(x, w, K, n, out, N);
}

template <int M, typename X, typename W, typename Parallel>
void rows(const X& x, const W* w, int64_t K, int64_t N, float* out, const Parallel& parallel) {
  if constexpr (std::is_same_v<X, Q8Rows>) {
    if (x.span == kQBlock) return rows_in<M, kColumnsDot<M, false, W>, false>(x, w, K, N, out, parallel);
    return rows_in<M, kColumnsDot<M, true, W>, true>(x, w, K, N, out, parallel);
  } else {
    rows_in<M, kColumns<M>, false>(x, w, K, N, out, parallel);
  }
}

template <typename X, typename W, typename Parallel>
void rows_of(int64_t M, const X& x, const W* w, int64_t K, int64_t N, float* out, const Parallel& parallel) {
  switch (M) {
    case 1: return rows<1>(x, w, K, N, out, parallel);
    case 2: return rows<2>(x, w, K, N, out, parallel);
    case 3: return rows<3>(x, w, K, N, out, parallel);
    case 4: return rows<4>(x, w, K, N, out, parallel);
    case 5: return rows<5>(x, w, K, N, out, parallel);
    case 6: return rows<6>(x, w, K, N, out, parallel);
    case 7: return rows<7>(x, w, K, N, out, parallel);
    default: return rows<8>(x, w, K, N, out, parallel);
  }
}

// out[M, N] (fp32) = x[M, K] (fp32, deinterleaved where pairs<W>(K); rows at 64-byte boundaries, cache_aligned, for
// speed) @ w.T; quantized weights on the integer
// kernels where K is a multiple of kQBlock (x quantized here, once for all output columns)
template <typename W, typename Parallel>
void matmul_rows(int64_t M, const float* x, const W* w, int64_t K, int64_t N, float* out, const Parallel& parallel) {
  if constexpr (kIntDot<W>) {
    if (std::is_same_v<W, Int4> || K % kQBlock == 0) {  // int4: always (its groups are blocks)
      std::vector<int8_t> q_storage;
      int8_t* q = cache_aligned(q_storage, M * K);
      std::vector<float> dq(M * 2 * (K / kDotGroup<W>));
      std::vector<int16_t> qsum(M * (K / kDotGroup<W>));
      const int64_t span = dot_span(w, K);
      quantize_rows(x, M, K, kDotGroup<W>, span, q, dq.data(), qsum.data());
      const bool ordered = (MTPX_ISA == MTPX_ISA_AVX2 || MTPX_ISA == MTPX_ISA_AVX512) && std::is_same_v<W, Int4> &&
                           span == 8 * kQBlock;
      if (ordered) span_order(q, M * K);
      return rows_of(M, Q8Rows{q, dq.data(), qsum.data(), kDotGroup<W>, span, ordered}, w, K, N, out, parallel);
    }
  }
  if constexpr (!std::is_same_v<W, Int4>) rows_of(M, x, w, K, N, out, parallel);
}
