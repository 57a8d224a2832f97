"""How one implementation is called in each mode, the same way for timing and for checking."""
from __future__ import annotations

from typing import Dict, List

import torch
from torch.nn.utils.rnn import PackedSequence

from .inputs import Materialized


def forward_tensors(module, mat: Materialized) -> List[torch.Tensor]:
    """Calls a torch.nn-style module; returns [output (packed data when packed), h_n, (c_n)]."""
    out, state = module(mat.x, mat.state)
    tensors = [out.data if isinstance(out, PackedSequence) else out]
    tensors += list(state) if isinstance(state, (tuple, list)) else [state]
    return tensors


def parameters_of(module):
    params = getattr(module, "parameters", None)
    return list(params()) if callable(params) else []


def clear_grads(module, mat: Materialized) -> None:
    """Outside the timed region: fresh .grad each call, so no call pays for accumulation."""
    mat.clear_grads()
    for p in parameters_of(module):
        p.grad = None


def inference_call(module, mat: Materialized) -> None:
    with torch.inference_mode():
        forward_tensors(module, mat)


def training_call(module, mat: Materialized) -> None:
    outs = forward_tensors(module, mat)
    grads = mat.grads
    if len(grads) != len(outs) or any(g.shape != o.shape for g, o in zip(grads, outs)):
        # Timing-only libraries may return other shapes (e.g. no final state): ones of their own.
        grads = [torch.ones_like(o) for o in outs]
    torch.autograd.backward(outs, grads)


OUTPUT_NAMES = ("output", "h_n", "c_n")
INPUT_GRAD_NAMES = ("grad_input", "grad_h0", "grad_c0")


def _named_parameters(module):
    named = getattr(module, "named_parameters", None)
    if not callable(named):
        return []
    # ReferenceStack, impls._Calls (StepCalls, GivesLengths, PacksAround) and CudaGraphed wrap a
    # module as `src` (CudaGraphed may wrap a StepCalls): report its own parameter names.
    return [(_unwrapped_name(n), p) for n, p in named()]


def _unwrapped_name(name: str) -> str:
    while name.startswith("src."):
        name = name[len("src."):]
    return name


def results_of(module, mat: Materialized, mode: str) -> Dict[str, torch.Tensor]:
    """Every tensor a user could see from one call: outputs, and in training every gradient."""
    if mode == "inference":
        with torch.inference_mode():
            outs = forward_tensors(module, mat)
        return {n: t.clone() for n, t in zip(OUTPUT_NAMES, outs)}
    clear_grads(module, mat)
    outs = forward_tensors(module, mat)
    torch.autograd.backward(outs, mat.grads)
    found = {n: t.detach().clone() for n, t in zip(OUTPUT_NAMES, outs)}
    for n, t in zip(INPUT_GRAD_NAMES, mat.input_grads()):
        found[n] = t
    for n, p in _named_parameters(module):
        found[f"grad_{n}"] = p.grad
    return found
