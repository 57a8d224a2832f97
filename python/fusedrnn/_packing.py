"""PackedSequence <-> the padded time-major layout the native recurrence reads.

A PackedSequence stores, step after step, the rows of the sequences still running at that step
(batch_sizes[t] of them, longest sequences first). The kernels instead take a padded [T, B, X]
tensor plus per-sequence lengths. `PackedLayout` maps one to the other with one gather/scatter
of rows, differentiable both ways. Everything stays in the packed (sorted) batch order; the
modules apply sorted_indices/unsorted_indices to the states, exactly like torch.nn.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
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
            return self.pad(F.dropout(self.pack(padded), p, training=True))
        return apply


# The two functions below are TorchScript too: _script.py calls them.

def dropout_as_packed(x: Tensor, lengths: Tensor, p: float,
                      batch_order: Optional[Tensor] = None) -> Tensor:
    """Dropout between layers of a padded x [T, B, X] with per-sequence lengths (`lengths=`),
    drawn where torch.nn draws it for pack_padded_sequence(x, lengths, enforce_sorted=False) ->
    RNN -> pad_packed_sequence: on the packed rows (same mask shape, same RNG stream), so the same
    seed gives torch.nn's numbers. A mask drawn over the padded [T, B, X] would be as random, but
    a different draw. lengths: [B] integers, the caller's, in the caller's batch order; batch_order:
    x's row j holds the caller's sequence batch_order[j] (None: the caller's order). Returns x's
    shape and batch order, zeros past each sequence's end."""
    if x.size(1) == 0:  # (no rows to pack: pack_padded_sequence refuses an empty batch)
        return F.dropout(x, p, True)
    # pack_padded_sequence's own sort, on the CPU as it makes it: ties fall the same way.
    sorted_lengths, sorted_indices = torch.sort(lengths.to(device="cpu", dtype=torch.int64),
                                                descending=True)
    rows = sorted_indices.to(x.device)
    if batch_order is not None:
        rows = torch.argsort(batch_order)[rows]
    return packed_dropout(x.index_select(1, rows), sorted_lengths, p).index_select(
        1, torch.argsort(rows))


def packed_dropout(x: Tensor, sorted_lengths: Tensor, p: float) -> Tensor:
    """Dropout on the packed rows of a padded x [T, B, X] whose lengths (on the CPU) are sorted
    longest first, as torch.nn draws it between the layers of a packed input. Returns x's
    shape."""
    data, batch_sizes = torch._pack_padded_sequence(x, sorted_lengths, False)
    padded, _ = torch._pad_packed_sequence(F.dropout(data, p, True), batch_sizes, False, 0.0,
                                           x.size(0))
    return padded
