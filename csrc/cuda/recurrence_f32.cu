// Instantiates the persistent recurrence kernels and launchers of every cell for float.
// One file per dtype so that the build compiles them in parallel.
#include "recurrence_launch.cuh"

namespace fusedrnn::cuda {
FUSEDRNN_INSTANTIATE_RECURRENCE(float)
}  // namespace fusedrnn::cuda
