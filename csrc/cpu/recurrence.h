// The CPU recurrence as the _cpu module calls it: a list of 1 or 2 directions of one layer,
// already validated by fusedrnn::validate_forward/backward (csrc/bindings/params_binding.h).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "fusedrnn/cell_step_params.h"
#include "fusedrnn/params.h"

namespace fusedrnn::cpu {

int64_t forward_workspace_bytes(const std::vector<RecurrenceFwdParams>& dirs);
int64_t backward_workspace_bytes(const std::vector<RecurrenceBwdParams>& dirs);

// Throw std::invalid_argument for what only the CPU can check (lengths in [1, T], workspace
// size); then run all directions, concurrently when there are threads for both.
void forward(const std::vector<RecurrenceFwdParams>& dirs);
void backward(const std::vector<RecurrenceBwdParams>& dirs);

// One pointwise cell step (fusedrnn/cell_step_params.h), rows split over up to num_threads
// threads; throws std::invalid_argument for a null required pointer or a bad shape/dtype/cell.
void cell_step_forward(const CellStepFwdParams& p);
void cell_step_backward(const CellStepBwdParams& p);

// The instruction set picked at run time: "amx", "avx512bf16", "avx512", "avx2" or "generic".
// FUSEDRNN_CPU_ISA in the environment (same names) lowers the choice, for tests of every path on
// one machine.
std::string active_isa();

}  // namespace fusedrnn::cpu
