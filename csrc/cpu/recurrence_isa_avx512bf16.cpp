// AVX-512 build of the recurrence with AVX512-BF16's VDPBF16PS for the bfloat16 products
// (amx_tiles.h): compiled with the AVX-512 flags plus -mavx512bf16, used when cpuid says the CPU
// has AVX512-BF16 and no usable AMX (AMD Zen 4 and later; recurrence_dispatch.cpp). Float and
// double layers run exactly as in the avx512 build.
#define FUSEDRNN_CPU_ISA avx512bf16
#define FUSEDRNN_CPU_VEC_BYTES 64
#define FUSEDRNN_CPU_ACC_REGS 24
#define FUSEDRNN_CPU_BF16DOT 1
#include "recurrence_impl.h"
#include "cell_step_impl.h"
