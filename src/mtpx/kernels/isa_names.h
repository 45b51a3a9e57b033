// The instruction sets a build of the kernels can be for (MTPX_ISA in isa_*.cpp and the test harnesses).
#pragma once
#define MTPX_ISA_SCALAR 0
#define MTPX_ISA_AVX2 1
#define MTPX_ISA_AVX512 2
#define MTPX_ISA_NEON 3
