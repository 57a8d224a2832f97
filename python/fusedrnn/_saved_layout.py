"""Saved tensors that a saved_tensors_hooks unpack hook hands back, checked before a native
backward reads them.

The native backwards read the saved tensors as memory of the dtype and sizes the forward had.
An unpack hook that returns another dtype (a compression hook that forgets to cast back) or
shape made them read another number of bytes than the buffers hold: silently wrong gradients
(off by 0.2, or inf) or worse (found by review, session 29). torch.nn's ops raise there (a dtype
mismatch). Strides may differ: the backwards make the tensors dense. The layouts are recorded
only under a pack hook: without one, autograd hands back the very tensors saved.
"""
from __future__ import annotations

from typing import Optional

import torch


def under_pack_hook() -> bool:
    """Whether a saved_tensors_hooks pack hook sees what a forward saves now."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def save_for_backward(ctx, *tensors) -> None:
    """ctx.save_for_backward(*tensors), and under a pack hook their layouts, for saved_tensors."""
    ctx.save_for_backward(*tensors)
    ctx.saved_layouts = tuple(_layout(t) for t in tensors) if under_pack_hook() else None


def saved_tensors(ctx, what: str) -> tuple:
    """ctx.saved_tensors, each of the dtype, shape and device it was saved with. what: the
    operation, for the error."""
    tensors = ctx.saved_tensors
    layouts = getattr(ctx, "saved_layouts", None)
    if layouts is not None:
        for index, (t, saved) in enumerate(zip(tensors, layouts)):
            if _layout(t) != saved:
                raise RuntimeError(
                    f"fusedrnn: the backward of {what}: saved tensor {index} came back from a "
                    f"saved_tensors_hooks unpack hook as {_text(_layout(t))}, but was saved as "
                    f"{_text(saved)}; an unpack hook must return the dtype, shape and device it "
                    f"was given (other strides are fine)")
    return tensors


def _layout(t) -> Optional[tuple]:
    return None if t is None else (t.dtype, tuple(t.shape), t.device)


def _text(layout: Optional[tuple]) -> str:
    if layout is None:
        return "None"
    dtype, shape, device = layout
    return f"{dtype} {list(shape)} on {device}"
