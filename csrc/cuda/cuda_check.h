// Checks every CUDA runtime call and launch of the native CUDA module.
//
// A failure throws std::runtime_error naming the kernel (or the operation) and the CUDA error;
// pybind11 maps it to RuntimeError. Nothing here synchronizes: a launch error is the one the
// runtime reports at launch time (bad configuration, too many blocks for a cooperative launch,
// too much shared memory); an error during execution surfaces at the caller's next synchronizing
// call, as everywhere in CUDA.
#pragma once

#include <stdexcept>
#include <string>

#include "launch_compat.h"

namespace fusedrnn::cuda {

[[noreturn]] inline void throw_cuda_error(cudaError_t status, const char* what, const char* expr) {
  throw std::runtime_error(std::string("fusedrnn CUDA error in ") + what + ": " +
                           cudaGetErrorName(status) + " (" + cudaGetErrorString(status) +
                           ") from " + expr);
}

}  // namespace fusedrnn::cuda

// FUSEDRNN_CUDA_CHECK(call, "what"): throws if `call` does not return cudaSuccess. The runtime's
// last-error slot is cleared first so that a launch error does not resurface in an unrelated call.
#define FUSEDRNN_CUDA_CHECK(call, what)                                          \
  do {                                                                           \
    const cudaError_t fusedrnn_status_ = (call);                                 \
    if (fusedrnn_status_ != cudaSuccess) {                                       \
      (void)cudaGetLastError();                                                  \
      ::fusedrnn::cuda::throw_cuda_error(fusedrnn_status_, (what), #call);       \
    }                                                                            \
  } while (0)
