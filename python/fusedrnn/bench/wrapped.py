"""An implementation as users deploy it beyond eager mode: under torch.compile, or replayed from
CUDA graphs. Each wraps another implementation of the registry (fusedrnn, torch) and keeps its
weights, so its rows are checked against float64 torch.nn like the eager ones.

- `<impl>+compile`: the module's `compile()` (torch.compile, static shapes). fusedrnn's with
  fullgraph=True, so a graph break is a failed row: the README promises none. torch.nn's RNNs
  graph-break on purpose (Dynamo leaves them to eager), so its row is what a user gets: compiled
  code around an eager cuDNN/oneDNN call.
- `<impl>+cudagraph` (CUDA only): the first call of each mode captures one CUDA graph, the
  inference forward with plain stream capture, training's forward and backward with
  torch.cuda.make_graphed_callables; every later call copies its inputs into the graph's and
  replays. That removes the CPU's per-kernel launch cost, which for small shapes is most of a
  call.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from .configs import BenchConfig

# Calls before a capture, on a side stream: lazy initialisation (cuBLAS handles, fusedrnn's
# inference plans, cuDNN's workspace) must not happen inside it.
CAPTURE_WARMUP = 3


def _target(module: nn.Module) -> nn.Module:
    """What is compiled: the module, or for a StepCalls loop the RNN it calls once per step (the
    user compiles the step, not the loop)."""
    return module.src if getattr(module, "calls_src_per_step", False) else module


def compile_problem(device: torch.device) -> Optional[str]:
    """Why torch.compile cannot run on `device` here, or None."""
    try:
        import torch._dynamo as dynamo
        if not dynamo.is_dynamo_supported():
            return "torch.compile is not supported on this Python"
        if device.type == "cuda":
            from torch.utils._triton import has_triton
            if not has_triton():
                return "torch.compile on CUDA needs triton"
        else:
            from torch._inductor.cpp_builder import get_cpp_compiler
            get_cpp_compiler()  # raises when there is no C++ compiler for Inductor's CPU code
    except Exception as exc:
        return f"torch.compile unavailable ({type(exc).__name__}: {exc})"
    return None


class CompiledImpl:
    """`base` under torch.compile (see the module docstring)."""
    shares_weights = True
    silent_when_missing = False

    def __init__(self, base, fullgraph: bool):
        self.base = base
        self.name = f"{base.name}+compile"
        self.fullgraph = fullgraph

    def computes(self, cfg: BenchConfig) -> bool:
        return self.base.computes(cfg)

    def unavailable(self, device: torch.device) -> Optional[str]:
        return self.base.unavailable(device) or compile_problem(device)

    def skip_reason(self, cfg: BenchConfig, mode: str, device: torch.device) -> Optional[str]:
        if cfg.packed:
            return "a PackedSequence breaks the graph"
        return self.base.skip_reason(cfg, mode, device)

    def before_config(self) -> None:
        # Every configuration compiles anew: code compiled for the last one would count towards
        # Dynamo's recompile limit, past which it silently runs eagerly.
        torch._dynamo.reset()

    def build(self, cfg: BenchConfig, reference_module: nn.Module) -> Callable:
        # A copy: compile() works in place, and torch.nn's eager row runs the very module
        # TorchImpl returns (the one that holds the weights).
        module = copy.deepcopy(self.base.build(cfg, reference_module))
        _target(module).compile(fullgraph=self.fullgraph, dynamic=False)
        return module


class GraphedImpl:
    """`base` replayed from CUDA graphs (see the module docstring)."""
    shares_weights = True
    silent_when_missing = True   # a preset's default on a CPU-only machine: left out quietly

    def __init__(self, base):
        self.base = base
        self.name = f"{base.name}+cudagraph"

    def computes(self, cfg: BenchConfig) -> bool:
        return self.base.computes(cfg)

    def unavailable(self, device: torch.device) -> Optional[str]:
        if device.type != "cuda":
            return "CUDA only"
        return self.base.unavailable(device)

    def skip_reason(self, cfg: BenchConfig, mode: str, device: torch.device) -> Optional[str]:
        if cfg.packed:
            return "a PackedSequence is not a tensor a graph can take"
        if cfg.lengths:
            return "the graph is captured around (x, h0, c0) alone, not the lengths"
        return self.base.skip_reason(cfg, mode, device)

    def before_config(self) -> None:
        pass

    def build(self, cfg: BenchConfig, reference_module: nn.Module) -> Callable:
        return CudaGraphed(self.base.build(cfg, reference_module))


class _FlatCall:
    """A torch.nn-style RNN as a function of tensors only, returning tensors only, as graph
    capture needs: (x, h0[, c0]) -> (output, h_n[, c_n])."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, x, *states):
        out, state = self.module(x, states if len(states) > 1 else states[0])
        return (out, *state) if isinstance(state, tuple) else (out, state)


class CudaGraphed(nn.Module):
    """A torch.nn-style RNN whose calls replay CUDA graphs: one per mode (inference, or training
    with autograd on) and input shapes, captured on the first such call. Outputs of an inference
    replay are the graph's own tensors, overwritten by the next replay (clone to keep them)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.src = module
        self._replays: Dict[Tuple, Callable] = {}

    def forward(self, x, state):
        states = state if isinstance(state, tuple) else (state,)
        inputs = (x, *states)
        # Inference mode apart from no_grad: an inference-mode graph's static inputs are
        # inference tensors, which cannot be written outside inference mode.
        inference_mode = torch.is_inference_mode_enabled()
        training = torch.is_grad_enabled() and not inference_mode
        key = (training, inference_mode, tuple((t.shape, t.dtype, t.requires_grad) for t in inputs))
        replay = self._replays.get(key)
        if replay is None:
            capture = _capture_training if training else _capture_inference
            replay = self._replays[key] = capture(_FlatCall(self.src), inputs)
        out, h_n, *rest = replay(*inputs)
        return out, ((h_n, rest[0]) if rest else h_n)


def _capture_inference(call: _FlatCall, inputs: tuple) -> Callable:
    static = [t.detach().clone() for t in inputs]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(CAPTURE_WARMUP):
            call(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = call(*static)

    def replay(*new_inputs):
        for held, given in zip(static, new_inputs):
            held.copy_(given)
        graph.replay()
        return outputs

    return replay


def _capture_training(call: _FlatCall, inputs: tuple) -> Callable:
    # make_graphed_callables wants an nn.Module to find the parameters whose gradients the
    # backward graph produces.
    holder = _FlatModule(call)
    samples = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in inputs)
    return torch.cuda.make_graphed_callables(holder, samples, num_warmup_iters=CAPTURE_WARMUP)


class _FlatModule(nn.Module):
    """_FlatCall as a module that owns the RNN's parameters (for make_graphed_callables)."""

    def __init__(self, call: _FlatCall):
        super().__init__()
        self.src = call.module
        self._call = call

    def forward(self, x, *states):
        return self._call(x, *states)
