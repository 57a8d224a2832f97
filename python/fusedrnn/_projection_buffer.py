"""The input projection's memory, kept by an inference plan from one call to the next on the CPU.

An inference call projects the whole sequence first: xproj is [T, B, D*G*H], read once by the
recurrence and dropped. glibc serves a block of 32 MiB or more (its largest mmap threshold) with
a fresh mmap and returns it to the kernel on free, so every such call faults all of it in again,
a page at a time. Measured on the 2-core VM (whole inference calls, torch.nn in the same run):
- LSTM B=64 T=100 H=512 (xproj 52 MB): 12801 page faults a call, 109-113 ms against torch.nn's
  94-103 ms;
- LSTM B=16 T=1000 H=256 (65 MB): 16000-23600 faults, 93-105 ms against 80-82 ms.
torch.nn's oneDNN path faults ~3350 and ~4030 pages there.

So a plan keeps that block for its next call, as cuDNN keeps its workspace: a module's memory
between calls is then what its largest call needed, which is also what the call itself took.
Smaller projections are left to the allocator, which keeps their blocks anyway. The block is
lent to one call at a time (calls from several threads are allowed); a call that finds it lent
allocates its own, as before. CUDA tensors never come here: torch's caching allocator already
reuses device memory.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Optional

import torch
from torch import Tensor

# glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: blocks at least this large are always mmapped.
REUSE_MIN_BYTES = 32 << 20


class ProjectionBuffer:
    """One block of memory lent to one inference call at a time."""

    def __init__(self):
        self._lock = threading.Lock()
        self._block: Optional[Tensor] = None

    @staticmethod
    def applies(like: Tensor, numel: int) -> bool:
        """Whether a projection of `numel` elements of like's dtype and device is kept: on the
        CPU from REUSE_MIN_BYTES on. (Asked first, so that the small calls, where each
        microsecond shows, skip lend's context manager: ~1.4 us.)"""
        return like.is_cpu and numel * like.element_size() >= REUSE_MIN_BYTES

    @contextmanager
    def lend(self, like: Tensor, numel: int):
        """Where applies(): yields a flat CPU tensor of `numel` elements of like's dtype, to be
        used only inside the with block: the kept block, or None when another call holds it
        (the caller then allocates as usual)."""
        if not self._lock.acquire(blocking=False):
            yield None
            return
        try:
            block = self._block
            if block is None or block.dtype != like.dtype or block.numel() < numel:
                self._block = None  # drop the old block before allocating the larger one
                # A normal tensor even under torch.inference_mode: an inference tensor could
                # not be written by a later call made outside it.
                with torch.inference_mode(False):
                    block = self._block = torch.empty(numel, dtype=like.dtype)
            yield block[:numel]
        finally:
            self._lock.release()
