// AVX-512 build of the recurrence (compiled with -mavx512f/vl/dq/bw -mfma; 32 vector registers,
// hence twice the accumulators of AVX2; used only when cpuid says so).
#define FUSEDRNN_CPU_ISA avx512
#define FUSEDRNN_CPU_VEC_BYTES 64
#define FUSEDRNN_CPU_ACC_REGS 24
#include "recurrence_impl.h"
#include "cell_step_impl.h"
