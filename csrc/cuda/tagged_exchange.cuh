// The tagged state exchange of the forward recurrence, an alternative to a grid barrier per step
// (opt-in through LaunchOptions::tagged_exchange until it is measured on a GPU).
//
// Each block writes its slice of h_s as 64-bit words that carry the values (two 16-bit values or
// one float in the low half) and the step's tag (the high half), and every block polls the words
// of h_{s-1} until they carry the tag it expects. A word is written and read whole
// (relaxed_word.cuh), so a reader that sees the tag sees the values: no fence and no barrier on
// the step's critical path, and a block waits only for the data it reads.
//
// Buffers: two per direction (steps alternate), B rows of ceil(P / values per word) words each.
// A block writes only the words of its own units, so the plan makes units per block a multiple of
// the values per word. Tags: h_s carries s + 1, never 0. The buffer that step s reads held h_{s-3}
// (tag s - 2) before h_{s-1} arrives; before the first step every block zeroes its own words and
// the grid meets once, so a tag left by an earlier launch on the same workspace is never taken for
// this one's. A buffer is rewritten without a barrier safely: a block writes h_{s+1} over h_{s-1}
// only after reading all of h_s, and every block wrote its part of h_s after reading all of h_{s-1}.
//
// Why not the backward as well (tried in session 21, not kept; the diff is not in the repository):
// its exchange is dpre_s, B x G*H values that every block reads whole at every step, four times
// the forward's h_s. As 64-bit words those bytes double (the bf16 anchor, LSTM B=16 H=768: 98 KB
// per block and step become 196 KB, about 0.9 us more of L2 bandwidth per SM, near what the grid
// barrier costs), and the 32 words a thread keeps in flight spilled the fp32 GRU and CIFG backward
// kernels (255 registers, ~100-200 bytes of spills at sm_90). Worth trying once the forward's
// numbers are in: a 16-bit tag with three 16-bit values per word (tags only need to differ from
// the one two steps back, and the clear at launch covers stale ones), or a flag per block and
// step with a fence, read before a cp.async of the plain values.
#pragma once

#include <cstdint>
#include <type_traits>

#include "block_product.cuh"
#include "relaxed_word.cuh"

namespace fusedrnn::cuda {

template <typename T>
inline constexpr int kValuesPerWord = sizeof(T) == 2 ? 2 : 1;

template <typename T>
__device__ __forceinline__ uint32_t value_bits(T v) {
  if constexpr (std::is_same_v<T, float>) return __float_as_uint(v);
  else if constexpr (std::is_same_v<T, __half>) return __half_as_ushort(v);
  else return __bfloat16_as_ushort(v);
}

template <typename T>
__device__ __forceinline__ T value_from_bits(uint32_t bits) {
  if constexpr (std::is_same_v<T, float>) {
    return __uint_as_float(bits);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __ushort_as_half(static_cast<unsigned short>(bits));
  } else {
    return __ushort_as_bfloat16(static_cast<unsigned short>(bits));
  }
}

// Before the first step: zeroes the words of units [u0, u0 + nu) in both buffers (2 x rows x
// row_words). A grid barrier must follow.
template <typename T>
__device__ __forceinline__ void clear_tagged_words(uint64_t* buffers, int64_t row_words, int rows,
                                                   int u0, int nu) {
  constexpr int W = kValuesPerWord<T>;
  const int first = u0 / W;
  const int words = static_cast<int>(ceil_div(nu, W));
  for (int i = threadIdx.x; i < 2 * rows * words; i += blockDim.x) {
    const int row = i / words;  // over both buffers
    store_word_relaxed(buffers + row * row_words + first + (i - row * words), 0);
  }
}

// Writes units [u0, u0 + nu) of rows [b0, b0 + nb) of h_s, staged in shared memory at
// h_stage[b * nu + u] (b, u relative to b0, u0), as words tagged `tag`.
template <typename T>
__device__ __forceinline__ void store_tagged_rows(uint64_t* dst, int64_t row_words, const T* h_stage,
                                                  int b0, int nb, int u0, int nu, uint32_t tag) {
  constexpr int W = kValuesPerWord<T>;
  const int first = u0 / W;
  const int words = static_cast<int>(ceil_div(nu, W));
  for (int i = threadIdx.x; i < nb * words; i += blockDim.x) {
    const int bl = i / words;
    const int c = i - bl * words;
    uint32_t payload = 0;
#pragma unroll
    for (int e = 0; e < W; ++e) {
      const int u = c * W + e;
      if (u < nu) payload |= value_bits(h_stage[bl * nu + u]) << (16 * e);
    }
    store_word_relaxed(dst + (b0 + bl) * row_words + first + c,
                       (static_cast<uint64_t>(tag) << 32) | payload);
  }
}

// The tagged twin of load_act_chunk: rows [0, batch) of K = k values from words at src (row
// stride row_words) into the shared chunk, once every word carries `tag`. A thread issues all of
// its loads (up to kWordsInFlight) before it checks any, so a step costs one L2 round trip when
// the data is there; a word that is not there yet is polled again until it is.
constexpr int kWordsInFlight = 32;

template <typename T>
__device__ __forceinline__ void load_tagged_chunk(T* dst, int64_t act_pitch, const uint64_t* src,
                                                  int64_t row_words, int batch, int k,
                                                  uint32_t tag) {
  constexpr int W = kValuesPerWord<T>;
  zero_k_padding(dst, act_pitch, batch, k);
  const int words = static_cast<int>(ceil_div(k, W));
  const int total = batch * words;
  const int stride = static_cast<int>(blockDim.x);
  for (int first = threadIdx.x; first < total; first += stride * kWordsInFlight) {
    uint64_t word[kWordsInFlight];
#pragma unroll
    for (int j = 0; j < kWordsInFlight; ++j) {
      const int i = first + j * stride;
      if (i < total) {
        const int b = i / words;
        word[j] = load_word_relaxed(src + b * row_words + (i - b * words));
      }
    }
#pragma unroll
    for (int j = 0; j < kWordsInFlight; ++j) {
      const int i = first + j * stride;
      if (i < total) {
        const int b = i / words;
        const int c = i - b * words;
        unsigned spins = 0;
        while (static_cast<uint32_t>(word[j] >> 32) != tag) {
          poll_pause(spins);
          word[j] = load_word_relaxed(src + b * row_words + c);
        }
        const uint32_t payload = static_cast<uint32_t>(word[j]);
#pragma unroll
        for (int e = 0; e < W; ++e) {
          const int col = c * W + e;
          const uint32_t bits = W == 1 ? payload : (payload >> (16 * e)) & 0xFFFFu;
          if (col < k) dst[b * act_pitch + col] = value_from_bits<T>(bits);
        }
      }
    }
  }
}

}  // namespace fusedrnn::cuda
