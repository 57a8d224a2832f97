// The entry points each per-ISA build of the CPU recurrence provides (recurrence_isa_*.cpp compile
// recurrence_impl.h with different instruction-set flags into namespaces generic / avx2 / avx512 /
// avx512bf16 / amx; recurrence_dispatch.cpp picks one at run time by cpuid).
//
// All work on ONE direction: the dispatcher gives each direction its own workspace slice and team.
#pragma once

#include <cstdint>

#include "fusedrnn/cell_step_params.h"
#include "fusedrnn/params.h"
#include "thread_team.h"

#define FUSEDRNN_DECLARE_CPU_ISA(isa)                                                  \
  namespace fusedrnn::cpu::isa {                                                        \
  int64_t forward_workspace_bytes(const RecurrenceFwdParams& p);                        \
  int64_t backward_workspace_bytes(const RecurrenceBwdParams& p);                       \
  /* Useful threads for this direction (more would only wait at the barriers). */       \
  int forward_max_threads(const RecurrenceFwdParams& p);                                \
  int backward_max_threads(const RecurrenceBwdParams& p);                               \
  /* Called by every member of `team`; p.workspace is this direction's slice. */       \
  void forward_direction(const RecurrenceFwdParams& p, const Team& team);               \
  void backward_direction(const RecurrenceBwdParams& p, const Team& team);              \
  /* The pointwise cell step (cell_step_impl.h) for rows [row_begin, row_end). */       \
  void cell_step_forward(const CellStepFwdParams& p, int64_t row_begin, int64_t row_end); \
  void cell_step_backward(const CellStepBwdParams& p, int64_t row_begin, int64_t row_end); \
  }

FUSEDRNN_DECLARE_CPU_ISA(generic)
#if defined(__x86_64__)
FUSEDRNN_DECLARE_CPU_ISA(avx2)
FUSEDRNN_DECLARE_CPU_ISA(avx512)
#if defined(FUSEDRNN_CPU_HAS_AVX512BF16_BUILD)
FUSEDRNN_DECLARE_CPU_ISA(avx512bf16)
#endif
#if defined(FUSEDRNN_CPU_HAS_AMX_BUILD)
FUSEDRNN_DECLARE_CPU_ISA(amx)
#endif
#endif
