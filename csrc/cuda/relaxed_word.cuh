// 64-bit words that other blocks of the same launch read while this block writes them: relaxed
// loads and stores at GPU scope (coherent at L2, never served from a stale L1 line), each one a
// single-copy-atomic 8-byte access, so a reader sees a whole word or none of it. The emulator
// substitutes std::atomic_ref (csrc/emu/emu_relaxed_word.h).
//
// store_word_relaxed(p, v) / load_word_relaxed(p): p 8-byte aligned, in global memory.
// poll_pause(spins): between two polls of a word that is not ready yet (spins counts this
// thread's polls of the word); it ends a launch that would hang (on the emulator: after the
// watchdog time, as a reported fault), and on the emulator it also yields the CPU.
#pragma once

#if defined(FUSEDRNN_EMULATED_CUDA)
#include "emu_relaxed_word.h"
#else

#include <cstdint>

namespace fusedrnn {

__device__ __forceinline__ void store_word_relaxed(uint64_t* p, uint64_t v) {
  asm volatile("st.relaxed.gpu.global.b64 [%0], %1;\n" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint64_t load_word_relaxed(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.relaxed.gpu.global.b64 %0, [%1];\n" : "=l"(v) : "l"(p) : "memory");
  return v;
}

// A word no writer will ever tag would hang the launch: after ~2^24 polls (seconds, far beyond
// any step, even under compute-sanitizer) the kernel traps instead, so the caller gets a launch
// failure, never a hang.
constexpr unsigned kMaxPolls = 1u << 24;

__device__ __forceinline__ void poll_pause(unsigned& spins) {
  if (++spins > kMaxPolls) __trap();
  __nanosleep(32);
}

}  // namespace fusedrnn

#endif
