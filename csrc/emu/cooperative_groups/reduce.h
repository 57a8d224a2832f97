// cooperative_groups::reduce for warp tiles on the CPU emulator (butterfly reduction: every rank
// receives the result, as on the GPU).
#pragma once

#include "../cooperative_groups.h"

namespace cooperative_groups {

template <class T> struct plus { T operator()(T a, T b) const { return a + b; } };
template <class T> struct less { T operator()(T a, T b) const { return b < a ? b : a; } };
template <class T> struct greater { T operator()(T a, T b) const { return a < b ? b : a; } };
template <class T> struct bit_and { T operator()(T a, T b) const { return a & b; } };
template <class T> struct bit_or { T operator()(T a, T b) const { return a | b; } };
template <class T> struct bit_xor { T operator()(T a, T b) const { return a ^ b; } };

template <unsigned N, class T, class Op>
inline T reduce(const thread_block_tile<N>& tile, T value, Op op,
                const std::source_location loc = std::source_location::current()) {
  for (unsigned offset = N / 2; offset > 0; offset /= 2) {
    value = op(value, tile.shfl_xor(value, offset, loc));
  }
  return value;
}

}  // namespace cooperative_groups
