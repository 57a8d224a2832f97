// Emulated twins of csrc/cuda/relaxed_word.cuh (same names and signatures), selected when
// FUSEDRNN_EMULATED_CUDA is defined: relaxed std::atomic_ref accesses (ThreadSanitizer sees no
// race, and no ordering beyond the word itself), and a pause that yields the CPU to the emulated
// threads that have the data to write, and reports a hang after the watchdog time instead of
// spinning forever.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <thread>

#include "emu_engine.h"

namespace fusedrnn {

inline void store_word_relaxed(uint64_t* p, uint64_t v) {
  std::atomic_ref<uint64_t>(*p).store(v, std::memory_order_relaxed);
}

inline uint64_t load_word_relaxed(const uint64_t* p) {
  return std::atomic_ref<uint64_t>(*const_cast<uint64_t*>(p)).load(std::memory_order_relaxed);
}

inline void poll_pause(unsigned& spins) {
  using clock = std::chrono::steady_clock;
  thread_local clock::time_point started;
  if (spins++ == 0) started = clock::now();
  std::this_thread::yield();
  if ((spins & 1023u) == 0) {
    if (emu::detail::tls_context.launch != nullptr &&
        emu::detail::tls_context.launch->faulted.load()) {
      throw emu::KernelFault{};
    }
    const double waited = std::chrono::duration<double>(clock::now() - started).count();
    if (waited > emu::device_config().watchdog_seconds) {
      emu::detail::fault("watchdog: polled a tagged word for " +
                         std::to_string(static_cast<int>(waited)) +
                         " s without seeing its tag (a hang: its writer never wrote this step)");
    }
  }
}

}  // namespace fusedrnn
