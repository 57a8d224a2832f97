// Instantiates the persistent recurrence kernels and launchers of every cell for __nv_bfloat16.
// One file per dtype so that the build compiles them in parallel.
#include "recurrence_launch.cuh"

namespace fusedrnn::cuda {
FUSEDRNN_INSTANTIATE_RECURRENCE(__nv_bfloat16)
}  // namespace fusedrnn::cuda
