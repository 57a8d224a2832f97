// Baseline build of the recurrence: no flags beyond the compiler's default target (SSE2 on x86-64).
#define FUSEDRNN_CPU_ISA generic
#define FUSEDRNN_CPU_VEC_BYTES 16
#define FUSEDRNN_CPU_ACC_REGS 12
#include "recurrence_impl.h"
#include "cell_step_impl.h"
