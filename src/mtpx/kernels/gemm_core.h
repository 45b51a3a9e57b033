// The inner loops of the few-row matmul (rowgemm_isa.h) for one instruction set, without PyTorch: a test harness
// builds them for aarch64 too (tests/kernels/gemm_harness.cpp, run under qemu) and checks NEON against scalar.
// Longer than 400 lines because the scalar, AVX2, AVX-512 and NEON versions of each weight format sit side by side,
// where one can check that they compute the same thing.
//
// No include guard: included once per instruction set, inside that set's namespace, with MTPX_ISA set to one of
// the MTPX_ISA_* values below; the includer has included <algorithm>, <cmath>, <cstdint>, <cstring>,
// <type_traits> and <immintrin.h> (x86) or <arm_neon.h> (aarch64).
//
// One function, every instruction set: each output is a dot product over K in 16 lanes, lane l taking, per block of
// 16 (int8, int8 blocks, and bf16 where K is not a multiple of 32), element l, or, per block of 32 (bf16, int4),
// elements 2l then 2l + 1 (x comes deinterleaved to match, deinterleave_pairs), each by one fused multiply-add in
// order; the lanes are then summed by one fixed tree (pairs 8 apart, then 4, 2, 1). The scalar loop, AVX2's two 8-lane
// registers, AVX-512's one 16-lane register and NEON's four 4-lane registers hold the same 16 partial sums, so all
// give the same bits; and nothing depends on how many rows are computed together, so a verify pass over k + 1
// positions gives each position the bits a one-token step gives.

constexpr int kLanes = 16;
// Quantized weights in groups along K, each group with a scale and an offset in two levels, as llama.cpp's K-quants
// keep them: the group's int8 pair (sc, m) and its super-block's fp16 pair (d, dmin) give scale = d * sc and
// offset = dmin * m, both exact in fp32 (products of an 11-bit and an 8-bit integer significand), and each weight is
// code * scale + offset (one fused multiply-add). A super-block is 2^shift groups: 8 for mtpx's own int4 (4.625
// bits a weight), others where a GGUF file's blocks are kept as they are (Q4_0: 1, its groups each have an fp16
// scale).
struct GroupScales {
  const int8_t* groups;    // [N, n_groups, 2]: sc, m
  const uint16_t* supers;  // [N, n_groups >> shift, 2]: d, dmin as fp16 bits
  int64_t n_groups, shift;
};
// int4: two 4-bit codes a byte (the even element of each pair in the low nibble), groups of kGroup4 along K
constexpr int64_t kGroup4 = 32;
struct Int4 {
  const uint8_t* codes;  // [N, K / 2]
  GroupScales s;         // groups of kGroup4
};
// int8 codes in groups of kGroup8 (GGUF's Q8_0, Q5_*, Q6_K blocks kept exactly)
constexpr int64_t kGroup8 = 16;
struct Int8Blocks {
  const int8_t* codes;  // [N, K]
  GroupScales s;        // groups of kGroup8
};
using Bf16 = uint16_t;  // the bits of a bf16 weight

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
  const int64_t per = int64_t{1} << s.shift, supers = (g1 - g0) >> s.shift;
  for (int64_t b = 0; b < supers; ++b) {
    const float d = half_to_float(sup[2 * b]), dmin = half_to_float(sup[2 * b + 1]);
    int64_t i = 2 * b * per;
    const int64_t end = i + 2 * per;
#if MTPX_ISA == MTPX_ISA_AVX512
    const __m512 dd = _mm512_setr_ps(d, dmin, d, dmin, d, dmin, d, dmin, d, dmin, d, dmin, d, dmin, d, dmin);
    for (; i + 16 <= end; i += 16) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(sm + i));
      _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)), dd));
    }
#elif MTPX_ISA == MTPX_ISA_AVX2
    const __m256 dd = _mm256_setr_ps(d, dmin, d, dmin, d, dmin, d, dmin);
    for (; i + 8 <= end; i += 8) {
      const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sm + i));
      _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), dd));
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
// further ahead keep more of the memory bandwidth. AVX2 has 16 vector registers (two per accumulator): one column
// from 4 rows on (two spill). (Neither changes a result's bits: every column is its own dot product.)
// AVX2's 8-lane FMAs do half of AVX-512's work each: 4 rows take 16 of them per 64 bytes of bf16 weights, 8 cycles
// at two a cycle, so on one core a 4-row pass is bound by the FMAs, not by memory, and costs more than one row.
template <int M>
constexpr int kColumns = MTPX_ISA == MTPX_ISA_AVX2 || MTPX_ISA == MTPX_ISA_NEON ? (M == 1 ? 4 : M <= 3 ? 2 : 1)
                                                                                : (M == 1 ? 4 : 2);
// int4 on AVX-512 takes more columns at a time: its table lookups leave the registers for 4 columns up to 4 rows
// and 3 up to 6 (on one core of the AMX Xeon: 2-9 % faster than 2 columns at 2-6 rows)
template <int M>
constexpr int kColumnsInt4 = MTPX_ISA == MTPX_ISA_AVX512 ? (M <= 4 ? 4 : M <= 6 ? 3 : 2) : kColumns<M>;
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

// A group's 16 possible values are computed once (one FMA) and its 32 codes looked up in them (a permute per 16).
template <int M, int C>
void columns_int4(const float* x, const Int4* w, int64_t K, int64_t n, float* out, int64_t N) {
  __m512 acc[C][M];
  for (int c = 0; c < C; ++c)
    for (int m = 0; m < M; ++m) acc[c][m] = _mm512_setzero_ps();
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  float so[C][2 * kScaleChunk];
  for (int64_t k0 = 0; k0 < K; k0 += kScaleChunk * kGroup4) {
    const int64_t k1 = std::min(K, k0 + kScaleChunk * kGroup4);
    for (int c = 0; c < C; ++c) expand_scales(w->s, n + c, k0 / kGroup4, k1 / kGroup4, so[c]);
    for (int64_t k = k0; k < k1; k += kGroup4) {
      __m512 even[M], odd[M];
      for (int m = 0; m < M; ++m) {
        even[m] = _mm512_loadu_ps(x + m * K + k);
        odd[m] = _mm512_loadu_ps(x + m * K + k + kLanes);
      }
      for (int c = 0; c < C; ++c) {
        const float* sc = so[c] + 2 * ((k - k0) / kGroup4);
        const float scale = sc[0], offset = sc[1];
        const __m512 values = _mm512_fmadd_ps(iota, _mm512_set1_ps(scale), _mm512_set1_ps(offset));
        const uint8_t* row = w->codes + (n + c) * (K / 2) + k / 2;
        if (k % 128 == 0) prefetch(row, 4096);  // once per line
        // codes as permute indices: vpermps reads an index's low 4 bits only, so neither nibble needs a mask
        const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
        const __m512 lo = _mm512_permutexvar_ps(idx, values);
        const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), values);
        for (int m = 0; m < M; ++m) acc[c][m] = _mm512_fmadd_ps(lo, even[m], acc[c][m]);
        for (int m = 0; m < M; ++m) acc[c][m] = _mm512_fmadd_ps(hi, odd[m], acc[c][m]);
      }
    }
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

// each code widened and turned into its weight by one FMA (code * scale + offset: the same bits as AVX-512's table
// of the 16 values)
inline __m256 int4_values(__m128i codes, __m256 s, __m256 o) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes)), s, o);
}

template <int M, int C>
void columns_int4(const float* x, const Int4* w, int64_t K, int64_t n, float* out, int64_t N) {
  __m256 acc[C][M][2];
  for (int c = 0; c < C; ++c)
    for (int m = 0; m < M; ++m) acc[c][m][0] = acc[c][m][1] = _mm256_setzero_ps();
  const __m128i low4 = _mm_set1_epi8(0x0F);
  float so[C][2 * kScaleChunk];
  for (int64_t k0 = 0; k0 < K; k0 += kScaleChunk * kGroup4) {
    const int64_t k1 = std::min(K, k0 + kScaleChunk * kGroup4);
    for (int c = 0; c < C; ++c) expand_scales(w->s, n + c, k0 / kGroup4, k1 / kGroup4, so[c]);
    for (int64_t k = k0; k < k1; k += kGroup4) {
      for (int c = 0; c < C; ++c) {
        const float* sc = so[c] + 2 * ((k - k0) / kGroup4);
        const float scale = sc[0], offset = sc[1];
        const __m256 s = _mm256_set1_ps(scale), o = _mm256_set1_ps(offset);
        const uint8_t* row = w->codes + (n + c) * (K / 2) + k / 2;
        if (k % 128 == 0) prefetch(row, 4096);
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row));
        const __m128i lo = _mm_and_si128(raw, low4), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low4);
        const __m256 lo0 = int4_values(lo, s, o), lo1 = int4_values(_mm_srli_si128(lo, 8), s, o);
        const __m256 hi0 = int4_values(hi, s, o), hi1 = int4_values(_mm_srli_si128(hi, 8), s, o);
        for (int m = 0; m < M; ++m) {
          const float* xm = x + m * K + k;
          acc[c][m][0] = _mm256_fmadd_ps(lo0, _mm256_loadu_ps(xm), acc[c][m][0]);
          acc[c][m][1] = _mm256_fmadd_ps(lo1, _mm256_loadu_ps(xm + 8), acc[c][m][1]);
          acc[c][m][0] = _mm256_fmadd_ps(hi0, _mm256_loadu_ps(xm + 16), acc[c][m][0]);
          acc[c][m][1] = _mm256_fmadd_ps(hi1, _mm256_loadu_ps(xm + 24), acc[c][m][1]);
        }
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

// 16 codes -> their weights, code * scale + offset by one FMA each
inline void int4_values(uint8x16_t codes, float32x4_t s, float32x4_t o, float32x4_t* v) {
  const uint16x8_t lo = vmovl_u8(vget_low_u8(codes)), hi = vmovl_u8(vget_high_u8(codes));
  v[0] = vfmaq_f32(o, vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo))), s);
  v[1] = vfmaq_f32(o, vcvtq_f32_u32(vmovl_u16(vget_high_u16(lo))), s);
  v[2] = vfmaq_f32(o, vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi))), s);
  v[3] = vfmaq_f32(o, vcvtq_f32_u32(vmovl_u16(vget_high_u16(hi))), s);
}

template <int M, int C>
void columns_int4(const float* x, const Int4* w, int64_t K, int64_t n, float* out, int64_t N) {
  float32x4_t acc[C][M][4];
  for (int c = 0; c < C; ++c)
    for (int m = 0; m < M; ++m)
      for (int i = 0; i < 4; ++i) acc[c][m][i] = vdupq_n_f32(0.f);
  float so[C][2 * kScaleChunk];
  for (int64_t k0 = 0; k0 < K; k0 += kScaleChunk * kGroup4) {
    const int64_t k1 = std::min(K, k0 + kScaleChunk * kGroup4);
    for (int c = 0; c < C; ++c) expand_scales(w->s, n + c, k0 / kGroup4, k1 / kGroup4, so[c]);
    for (int64_t k = k0; k < k1; k += kGroup4) {
      for (int c = 0; c < C; ++c) {
        const float* sc = so[c] + 2 * ((k - k0) / kGroup4);
        const float scale = sc[0], offset = sc[1];
        const uint8_t* row = w->codes + (n + c) * (K / 2) + k / 2;
        if (k % 128 == 0) prefetch(row, 4096);
        const uint8x16_t raw = vld1q_u8(row);
        float32x4_t lo[4], hi[4];
        int4_values(vandq_u8(raw, vdupq_n_u8(0x0F)), vdupq_n_f32(scale), vdupq_n_f32(offset), lo);
        int4_values(vshrq_n_u8(raw, 4), vdupq_n_f32(scale), vdupq_n_f32(offset), hi);
        for (int m = 0; m < M; ++m) {
          const float* xm = x + m * K + k;
          for (int i = 0; i < 4; ++i) acc[c][m][i] = vfmaq_f32(acc[c][m][i], lo[i], vld1q_f32(xm + 4 * i));
          for (int i = 0; i < 4; ++i) acc[c][m][i] = vfmaq_f32(acc[c][m][i], hi[i], vld1q_f32(xm + kLanes + 4 * i));
        }
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
void columns_int4(const float* x, const Int4* w, int64_t K, int64_t n, float* out, int64_t N) {
  for (int c = 0; c < C; ++c) {
    float acc[M][kLanes] = {};
    float so[2 * kScaleChunk];
    for (int64_t k0 = 0; k0 < K; k0 += kScaleChunk * kGroup4) {
      const int64_t k1 = std::min(K, k0 + kScaleChunk * kGroup4);
      expand_scales(w->s, n + c, k0 / kGroup4, k1 / kGroup4, so);
      for (int64_t k = k0; k < k1; k += kGroup4) {
        const float scale = so[2 * ((k - k0) / kGroup4)], offset = so[2 * ((k - k0) / kGroup4) + 1];
        const uint8_t* row = w->codes + (n + c) * (K / 2) + k / 2;
        for (int l = 0; l < kLanes; ++l) {
          const float even = std::fma(static_cast<float>(row[l] & 15), scale, offset);
          const float odd = std::fma(static_cast<float>(row[l] >> 4), scale, offset);
          for (int m = 0; m < M; ++m) {
            acc[m][l] = std::fma(even, x[m * K + k + l], acc[m][l]);
            acc[m][l] = std::fma(odd, x[m * K + k + kLanes + l], acc[m][l]);
          }
        }
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

template <int M, int C, typename W>
void column_block(const float* x, const W* w, int64_t K, int64_t n, float* out, int64_t N) {
  if constexpr (std::is_same_v<W, Int4>) {
    columns_int4<M, C>(x, w, K, n, out, N);
  } else if constexpr (std::is_same_v<W, Int8Blocks>) {
    columns_int8_blocks<M, C>(x, w, K, n, out, N);
  } else {
    if constexpr (std::is_same_v<W, Bf16>)
      if (pairs<W>(K)) return columns_bf16_pairs<M, C>(x, w, K, n, out, N);
    columns<M, C>(x, w, K, n, out, N);
  }
}

// out[M, N] (fp32) = x[M, K] (fp32, deinterleaved where pairs<W>(K)) @ w.T. parallel(blocks, grain, fn) runs
// fn(begin, end) over [0, blocks) (on any threads: a block's bits do not depend on which thread computes it).
template <int M, typename W, typename Parallel>
void rows(const float* x, const W* w, int64_t K, int64_t N, float* out, const Parallel& parallel) {
  constexpr int C = std::is_same_v<W, Int4> ? kColumnsInt4<M> : kColumns<M>;
  const int64_t blocks = N / C;
  parallel(blocks, 64 / C, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) column_block<M, C>(x, w, K, b * C, out, N);
  });
  for (int64_t n = blocks * C; n < N; ++n) column_block<M, 1>(x, w, K, n, out, N);
}

template <typename W, typename Parallel>
void matmul_rows(int64_t M, const float* x, const W* w, int64_t K, int64_t N, float* out, const Parallel& parallel) {
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
