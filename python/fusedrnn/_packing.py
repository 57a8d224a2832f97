"""PackedSequence <-> the padded time-major layout the native recurrence reads.

A PackedSequence stores, step after step, the rows of the sequences still running at that step
(batch_sizes[t] of them, longest sequences first). The kernels instead take a padded [T, B, X]
tensor plus per-sequence lengths. `PackedLayout` maps one to the other with one gather/scatter
of rows, differentiable both ways. Everything stays in the packed (sorted) batch order; the
modules apply sorted_indices/unsorted_indices to the states, exactly like torch.nn.
"""
from __future__ import annotations

import torch
from torch import Tensor


class PackedLayout:
    """Where each packed row lives in the padded [T, B] grid, and each sequence's length.

    Built from batch_sizes with tensor ops only, never a Python int read from its values: a
    torch.jit.trace of a model that packs its input then records a layout that follows each
    call's batch_sizes (other batch sizes and lengths), as torch.nn's trace does."""

    def __init__(self, batch_sizes: Tensor, device: torch.device):
        batch_sizes = batch_sizes.to("cpu", torch.int64)
        first = batch_sizes[:1].sum()  # B (the first step runs every sequence); 0 when empty
        self.valid = torch.arange(first).unsqueeze(0) < batch_sizes.unsqueeze(1)  # [T, B]
        # Row-major order of the [T, B] grid is the packed order: step by step, in batch order.
        self.rows = self.valid.flatten().nonzero().squeeze(1).to(device)
        # [B], packed (sorted) order; on the CPU: functional.rnn checks it there, then moves it
        self.lengths = self.valid.sum(0)
        self.batch_sizes = batch_sizes

    def pad(self, data: Tensor) -> Tensor:
        """Packed data [N, X] -> padded [T, B, X], zeros past each sequence's end."""
        steps, batch = self.valid.size(0), self.valid.size(1)
        padded = data.new_zeros(steps * batch, data.size(1))
        return padded.index_copy(0, self.rows, data).view(steps, batch, data.size(1))

    def pack(self, padded: Tensor) -> Tensor:
        """Padded [T, B, X] -> packed data [N, X]."""
        return padded.reshape(-1, padded.size(2)).index_select(0, self.rows)

    def dropout(self, p: float):
        """torch.nn applies dropout between layers to the packed data; this draws the same mask
        (same shape, same RNG stream) and returns it padded again."""
        def apply(padded: Tensor) -> Tensor:
            return self.pad(torch.nn.functional.dropout(self.pack(padded), p, training=True))
        return apply
