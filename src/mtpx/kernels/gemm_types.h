// The weight formats of the few-row matmuls (gemm_core.h), declared once outside the instruction sets' namespaces:
// every build of the loops (each instruction set's, and the integer loops' VNNI builds nested in theirs) takes the
// same types, and a call with them finds only its own namespace's functions.
#pragma once
#include <cstdint>

namespace mtpx_gemm {

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

}  // namespace mtpx_gemm
