// Element types of the recurrence kernels and their accumulation types.
//
// fp32, fp16 and bf16 accumulate (and keep the LSTM cell state) in fp32; fp64 in fp64. Loads
// convert to the accumulation type, stores round to nearest from it, so the half types see one
// rounding per stored value, as torch.nn does.
#pragma once

#include <type_traits>

#include "launch_compat.h"

namespace fusedrnn::cuda {

template <typename T>
struct AccumulatorOf {
  using type = float;
};
template <>
struct AccumulatorOf<double> {
  using type = double;
};
template <typename T>
using Acc = typename AccumulatorOf<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// A value read from memory of element type T, kept as stored (V = T: a load issued early, whose
// conversion would wait for it) or converted to the accumulation type (V = Acc<T>).
template <typename V, typename T>
__device__ __forceinline__ V stored_as(T value) {
  if constexpr (std::is_same_v<V, T>) {
    return value;
  } else {
    return to_acc(value);
  }
}

template <typename T>
__device__ __forceinline__ T from_acc(Acc<T> v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

}  // namespace fusedrnn::cuda
