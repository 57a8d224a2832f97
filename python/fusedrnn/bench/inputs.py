"""Random input sets: made once in float64 on the CPU from a seed, then cast to each run's dtype and
device, so every implementation (and the float64 accuracy check) sees the very same numbers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from .configs import BenchConfig


@dataclass
class InputSet:
    """Canonical float64 CPU tensors of one input set."""
    x: torch.Tensor                      # [T, B, I], zero past each length (packed, lengths)
    h0: torch.Tensor                     # [L*D, B, P]
    c0: Optional[torch.Tensor]           # [L*D, B, H], LSTM
    lengths: Optional[torch.Tensor]      # [B] int64 on the CPU (as pack_padded_sequence wants)
    grad_out: torch.Tensor               # [T, B, D*P] (packed: [sum(lengths), D*P])
    grad_hn: torch.Tensor                # like h0
    grad_cn: Optional[torch.Tensor]      # like c0


def rounded(s: InputSet, dtype: torch.dtype) -> InputSet:
    """The same set after a round trip through `dtype`: what a run in that dtype really saw."""
    def rt(t):
        return None if t is None or not t.is_floating_point() else t.to(dtype).to(torch.float64)
    return InputSet(x=rt(s.x), h0=rt(s.h0), c0=rt(s.c0), lengths=s.lengths, grad_out=rt(s.grad_out),
                    grad_hn=rt(s.grad_hn), grad_cn=rt(s.grad_cn))


def make_input_set(cfg: BenchConfig, seed: int) -> InputSet:
    g = torch.Generator().manual_seed(seed)
    T, B, I, H, P = cfg.seq_len, cfg.batch, cfg.in_size, cfg.hidden, cfg.state_size
    LD = cfg.layers * cfg.directions

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    lengths = None
    x = randn(T, B, I)
    if cfg.packed or cfg.lengths:
        # Between T/4 and T, the longest exactly T, in random (unsorted) order.
        low = max(1, T // 4)
        lengths = torch.randint(low, T + 1, (B,), generator=g, dtype=torch.int64)
        lengths[torch.randint(0, B, (1,), generator=g)] = T
        steps = torch.arange(T).unsqueeze(1)
        x = x * (steps < lengths.unsqueeze(0)).unsqueeze(2)
    # One gradient row per output row: packed data has sum(lengths) of them.
    grad_out = randn(*((int(lengths.sum()),) if cfg.packed else (T, B)), cfg.directions * P)
    is_lstm = cfg.cell == "lstm"
    return InputSet(
        x=x, h0=randn(LD, B, P, scale=0.5), c0=randn(LD, B, H, scale=0.5) if is_lstm else None,
        lengths=lengths, grad_out=grad_out, grad_hn=randn(LD, B, P),
        grad_cn=randn(LD, B, H) if is_lstm else None)


@dataclass
class Materialized:
    """One input set on a device in a dtype, ready to call a torch.nn-style module with."""
    x: object                                 # Tensor, PackedSequence or PaddedWithLengths
    state: object                             # h0, or (h0, c0) for LSTM
    grads: List[torch.Tensor]                 # upstream gradients, one per output tensor
    leaves: List[torch.Tensor]                # tensors whose .grad training mode produces
    lengths: Optional[torch.Tensor]

    def clear_grads(self) -> None:
        for t in self.leaves:
            t.grad = None

    def input_grads(self) -> List[torch.Tensor]:
        return [t.grad for t in self.leaves]


class PaddedWithLengths(NamedTuple):
    """BenchConfig.lengths: a padded batch and its lengths, as one argument of the module call
    (impls.GivesLengths and impls.PacksAround unpack it)."""
    x: torch.Tensor          # [T, B, I], zero past each length
    lengths: torch.Tensor    # [B] int64 on x's device
    lengths_cpu: torch.Tensor  # the same on the CPU (what pack_padded_sequence takes)


def materialize(s: InputSet, device: torch.device, dtype: torch.dtype, training: bool,
                with_lengths: bool = False) -> Materialized:
    """with_lengths: a padded x and its lengths (BenchConfig.lengths); otherwise an input set
    with lengths is packed."""
    def cast(t):
        return None if t is None else t.to(device=device, dtype=dtype).requires_grad_(training)

    h0, c0 = cast(s.h0), cast(s.c0)
    state = (h0, c0) if c0 is not None else h0
    if with_lengths:
        x_leaf = cast(s.x)
        x = PaddedWithLengths(x_leaf, s.lengths.to(device), s.lengths)
    elif s.lengths is not None:
        packed = pack_padded_sequence(s.x, s.lengths, enforce_sorted=False)
        # Rebuilt around a leaf so backward can run once per timed call without a stale graph.
        data = packed.data.to(device=device, dtype=dtype).requires_grad_(training)
        idx = [None if t is None else t.to(device) for t in (packed.sorted_indices, packed.unsorted_indices)]
        x = PackedSequence(data, packed.batch_sizes, idx[0], idx[1])
        x_leaf = data
    else:
        x = x_leaf = cast(s.x)
    leaves = [x_leaf, h0] + ([c0] if c0 is not None else [])
    grads = [t.to(device=device, dtype=dtype) for t in (s.grad_out, s.grad_hn, s.grad_cn) if t is not None]
    return Materialized(x=x, state=state, grads=grads, leaves=leaves, lengths=s.lengths)
