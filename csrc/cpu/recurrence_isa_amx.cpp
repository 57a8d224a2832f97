// AVX-512 build of the recurrence with Intel AMX for the bfloat16 products (amx_tiles.h):
// compiled with the AVX-512 flags plus -mamx-tile -mamx-bf16, used only when cpuid says the CPU
// has AMX-BF16 and the OS grants this process the tile state (recurrence_dispatch.cpp). Float and
// double layers run exactly as in the avx512 build.
#define FUSEDRNN_CPU_ISA amx
#define FUSEDRNN_CPU_VEC_BYTES 64
#define FUSEDRNN_CPU_ACC_REGS 24
#define FUSEDRNN_CPU_AMX 1
#include "recurrence_impl.h"
#include "cell_step_impl.h"
