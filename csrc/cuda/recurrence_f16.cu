// Instantiates the persistent recurrence kernels and launchers of every cell for __half.
// One file per dtype so that the build compiles them in parallel.
#include "recurrence_launch.cuh"

namespace fusedrnn::cuda {
FUSEDRNN_INSTANTIATE_RECURRENCE(__half)
}  // namespace fusedrnn::cuda
