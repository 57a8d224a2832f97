// Emulated twins of csrc/cuda/async_copy.cuh (same names and signatures), selected when
// FUSEDRNN_EMULATED_CUDA is defined. They keep the GPU's contract rather than doing the copy at
// once, so that kernel code which only works because an emulated copy is instant fails here:
// - both addresses must be 16-byte aligned (a GPU faults on a misaligned cp.async), the
//   destination in this block's shared memory and the source outside it;
// - the destination is undefined from the issue until this thread's wait_async_copies(): it is
//   poisoned at once (0xFF bytes: NaN in every float type), so a read before the wait, or a
//   thread still reading the old contents (a missing barrier before the overwrite), sees NaN;
// - the source is read at the wait, the latest moment the GPU may read it;
// - a thread that exits with copies never waited for faults.
#pragma once

#include <cstdint>
#include <cstring>
#include <source_location>

#include "emu_engine.h"

namespace fusedrnn {

inline void copy_16_async(void* dst, const void* src,
                          const std::source_location loc = std::source_location::current()) {
  emu::detail::ThreadContext& t = emu::detail::context_or_fault("copy_16_async()");
  auto misuse = [&](const char* why) {
    emu::detail::fault(emu::detail::describe_site("copy_16_async()", loc.file_name(), loc.line()) +
                       why);
  };
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0) {
    misuse(": cp.async of 16 bytes needs both addresses 16-byte aligned");
  }
  if (!emu::detail::in_dynamic_smem(*t.block, dst, 16)) {
    misuse(": the destination is not in this block's dynamic shared memory");
  }
  if (emu::detail::in_dynamic_smem(*t.block, src, 1)) {
    misuse(": the source is in shared memory; cp.async reads global memory");
  }
  std::memset(dst, 0xFF, 16);
  t.pending_copies.push_back(emu::detail::PendingAsyncCopy{dst, src, loc.file_name(), loc.line()});
}

inline void wait_async_copies() {
  emu::detail::ThreadContext& t = emu::detail::context_or_fault("wait_async_copies()");
  for (const emu::detail::PendingAsyncCopy& c : t.pending_copies) std::memcpy(c.dst, c.src, 16);
  t.pending_copies.clear();
}

}  // namespace fusedrnn
