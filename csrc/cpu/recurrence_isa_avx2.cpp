// AVX2 + FMA build of the recurrence (compiled with -mavx2 -mfma; used only when cpuid says so).
#define FUSEDRNN_CPU_ISA avx2
#define FUSEDRNN_CPU_VEC_BYTES 32
#define FUSEDRNN_CPU_ACC_REGS 12
#include "recurrence_impl.h"
#include "cell_step_impl.h"
