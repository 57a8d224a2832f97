"""The implementations a benchmark compares, behind one small interface.

Every implementation turns (config, the torch.nn module that holds the weights) into a callable
with torch.nn's calling convention: ``module(x_or_packed, state) -> (output, state)``. fusedrnn,
torch and the reference share the torch module's weights, so their outputs can be compared;
third-party libraries (FlashRNN, haste) use their own weights and are timed only.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import flops
from .configs import BenchConfig
from .wrapped import CompiledImpl, GraphedImpl

TORCH_CLASSES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn_tanh": nn.RNN, "rnn_relu": nn.RNN}
# The reference runs one Python step per time step and layer; past this many it is too slow to
# be worth timing next to kernels.
REFERENCE_MAX_STEPS = 400
REFERENCE_MAX_FLOPS = 2e9   # per forward: past it the unfused per-step products dominate a cell's time


def build_torch_module(cfg: BenchConfig, device, dtype, seed: int = 0) -> nn.Module:
    """The torch.nn module whose weights every comparable implementation loads. For an LSTM
    variant, which torch.nn lacks, a fusedrnn.LSTM of that variant holds them (torch's own row
    then runs a plain torch.nn.LSTM of the shape, TorchImpl)."""
    torch.manual_seed(seed)
    if cfg.variant:
        module = fused_module_class(cfg.cell)(**cfg.module_kwargs(), **cfg.variant_kwargs())
    else:
        module = TORCH_CLASSES[cfg.cell](**cfg.module_kwargs())
    return _in_model(cfg, module).to(device=device, dtype=dtype)


class ModelAround(nn.Module):
    """BenchConfig.in_model: the RNN `src` between an input layer (Linear and tanh) and an output
    Linear, as in a small speech or time-series model. Its parameters keep their own names
    (execution reports `src.` ones unprefixed); the layers' are pre.* and post.*."""

    def __init__(self, rnn: nn.Module, in_size: int, out_size: int):
        super().__init__()
        self.src = rnn
        self.pre = nn.Linear(in_size, in_size)
        self.post = nn.Linear(out_size, out_size)

    def forward(self, x, state):
        out, state = self.src(torch.tanh(self.pre(x)), state)
        return self.post(out), state


def _in_model(cfg: BenchConfig, rnn: nn.Module) -> nn.Module:
    """The RNN as the configuration runs it: alone, or inside ModelAround."""
    if not cfg.in_model:
        return rnn
    return ModelAround(rnn, cfg.in_size, cfg.directions * cfg.state_size)


def fused_module_class(cell: str):
    """fusedrnn.LSTM / GRU / RNN (looked up at call time so tests can stand in for it)."""
    import fusedrnn
    name = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN"}[cell]
    return getattr(fusedrnn, name)


def native_backend_problem(device: torch.device):
    """Why fusedrnn's native module for `device` cannot load or run, or None (tests stand in for
    it too)."""
    try:
        from fusedrnn import _backend
        _backend.module_for(device)  # raises, saying what to build, when the native module is missing
    except Exception as exc:
        return f"no native backend for {device.type} ({exc})"
    try:
        _smoke_call(device)
    except Exception as exc:
        return f"a tiny fusedrnn.LSTM forward and backward fails: {type(exc).__name__}: {exc}"
    return None


def _smoke_call(device: torch.device) -> None:
    """One tiny LSTM forward and backward through the native kernels. The environment variables
    that steer them (FUSEDRNN_CPU_ISA, FUSEDRNN_CPU_GEMM, ...) are read there and only there, so a
    bad value shows here, before a run, instead of failing every fusedrnn row of it."""
    import fusedrnn
    with torch.random.fork_rng(devices=[]):  # leaves the caller's random stream as it was
        module = fusedrnn.LSTM(2, 3).to(device)
        x = torch.randn(2, 1, 2).to(device).requires_grad_()
    out, _ = module(x)
    out.sum().backward()


class Impl:
    """One implementation. Subclasses override what differs."""
    name = "?"
    shares_weights = True      # rows carry max_rel_err against float64 torch.nn
    silent_when_missing = False

    def computes(self, cfg: BenchConfig) -> bool:
        """Whether this implementation's results are the configuration's function (checked
        against the float64 yardstick), not just timed."""
        return self.shares_weights

    def unavailable(self, device: torch.device) -> Optional[str]:
        """Why this implementation cannot run on `device` at all, or None."""
        return None

    def skip_reason(self, cfg: BenchConfig, mode: str, device: torch.device) -> Optional[str]:
        """Why this configuration is left out for this implementation, or None."""
        return None

    def before_config(self) -> None:
        """Runs before the implementations of each configuration are built."""

    def build(self, cfg: BenchConfig, reference_module: nn.Module) -> Callable:
        raise NotImplementedError


class _Calls(nn.Module):
    """A torch.nn-style RNN called another way. `src` holds the module, so the harness reports
    its parameter names unprefixed (execution._named_parameters)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.src = module


class StepCalls(_Calls):
    """A torch.nn-style RNN called once per time step (BenchConfig.step_calls), the state carried
    from call to call; the outputs are concatenated into the whole sequence's."""
    calls_src_per_step = True  # what torch.compile compiles is src, once per call (wrapped.py)

    def forward(self, x, state):
        outs = []
        for t in range(x.size(0)):
            out, state = self.src(x[t:t + 1], state)
            outs.append(out)
        return torch.cat(outs), state


class GivesLengths(_Calls):
    """BenchConfig.lengths, fusedrnn: the padded batch and its lengths straight to the module
    (`lengths=`)."""

    def forward(self, batch, state):
        return self.src(batch.x, state, lengths=batch.lengths)


class PacksAround(_Calls):
    """BenchConfig.lengths, torch.nn (and the float64 yardstick, and the reference): what a model
    built on torch.nn does with a padded batch and its lengths, inside the timed call: pack
    (sorting by length), run, pad again to the batch's length."""

    def forward(self, batch, state):
        packed = pack_padded_sequence(batch.x, batch.lengths_cpu, enforce_sorted=False)
        out, state = self.src(packed, state)
        out, _ = pad_packed_sequence(out, total_length=batch.x.size(0))
        return out, state


def _per_call(cfg: BenchConfig, module, takes_lengths: bool = False):
    """The module as the configuration calls it: one step per call, given lengths (fusedrnn's
    modules take them, takes_lengths), packed around, or as it is."""
    if cfg.step_calls:
        return StepCalls(module)
    if cfg.lengths:
        return GivesLengths(module) if takes_lengths else PacksAround(module)
    return module


class TorchImpl(Impl):
    name = "torch"

    def computes(self, cfg):
        return not cfg.variant  # a variant's row times torch.nn's plain LSTM of the shape

    def build(self, cfg, reference_module):
        if cfg.variant:
            p = next(reference_module.parameters())
            return _per_call(cfg, build_torch_module(cfg.replace(variant=""), p.device, p.dtype))
        return _per_call(cfg, reference_module)


class FusedImpl(Impl):
    name = "fusedrnn"

    def unavailable(self, device):
        try:
            fused_module_class("lstm")
        except Exception as exc:
            return f"fusedrnn modules not importable ({type(exc).__name__}: {exc})"
        return native_backend_problem(device)

    def build(self, cfg, reference_module):
        p = next(reference_module.parameters())
        module = fused_module_class(cfg.cell)(**cfg.module_kwargs(), **cfg.variant_kwargs())
        module = _in_model(cfg, module).to(device=p.device, dtype=p.dtype)
        module.load_state_dict(reference_module.state_dict())
        return _per_call(cfg, module, takes_lengths=True)


class ReferenceImpl(Impl):
    name = "reference"

    def unavailable(self, device):
        try:
            importlib.import_module("fusedrnn.reference")
        except Exception as exc:
            return f"fusedrnn.reference not importable ({type(exc).__name__}: {exc})"
        return None

    def skip_reason(self, cfg, mode, device):
        if cfg.step_calls:
            return "times whole sequences only (step_calls compares per-call costs)"
        if cfg.in_model:
            return "times the RNN alone (in_model compares compiled models)"
        steps = cfg.seq_len * cfg.layers * cfg.directions
        if steps > REFERENCE_MAX_STEPS:
            return f"step loop too slow to time: T*layers*directions = {steps} > {REFERENCE_MAX_STEPS}"
        work = flops.count_flops(cfg, "inference")
        if work > REFERENCE_MAX_FLOPS:
            return f"step loop too slow to time: {work / 1e9:.1f} GFLOP per forward > {REFERENCE_MAX_FLOPS / 1e9:g}"
        return None

    def build(self, cfg, reference_module):
        stack = ReferenceStack(cfg, reference_module)
        return PacksAround(stack) if cfg.lengths else stack


class ReferenceStack(nn.Module):
    """A torch.nn-style module over fusedrnn.reference.rnn (the plain-torch step loop), reading
    the weights of the torch module it wraps."""

    def __init__(self, cfg: BenchConfig, weights_from: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.src = weights_from
        self.reference = importlib.import_module("fusedrnn.reference")

    def forward(self, x, state):
        cfg = self.cfg
        packed = isinstance(x, PackedSequence)
        lengths = None
        if packed:
            x, lengths = pad_packed_sequence(x)   # lengths on the CPU, in the original batch order
        # (The peephole weights come with weights_of; a CIFG is named.)
        coupled = cfg.variant_kwargs().get("coupled_input_forget", False)
        out, h_n, c_n = self.reference.rnn(
            cfg.cell, x, self.reference.weights_of(self.src), state, num_layers=cfg.layers,
            bidirectional=cfg.bidirectional, lengths=lengths, coupled_input_forget=coupled)
        if packed:
            out = pack_padded_sequence(out, lengths, enforce_sorted=False)
        return out, ((h_n, c_n) if c_n is not None else h_n)


def _single_layer_dense(cfg: BenchConfig) -> Optional[str]:
    if cfg.variant:
        return f"no {cfg.variant} LSTM"
    if (cfg.layers != 1 or cfg.bidirectional or cfg.packed or cfg.lengths or cfg.proj_size
            or cfg.step_calls or cfg.in_model):
        return ("supports one layer, one direction, whole sequences, no packing, no projection, "
                "the RNN alone")
    return None


class FlashRnnImpl(Impl):
    """FlashRNN's fused CUDA kernel (timing only; its own weights). One head of size H; the input
    projection runs in torch inside the timed call, so the work matches the other rows."""
    name = "flashrnn"
    shares_weights = False
    silent_when_missing = True
    # cell -> (FlashRNN function, gates with weights, states, bias gates). Its GRU takes a fourth
    # bias (b_hn inside r * (...)) and always runs on its non-fused "cuda" backend (FlashRNN
    # switches it there: its fused kernel needs gate counts that divide 8).
    FUNCTIONS = {"lstm": ("lstm", 4, 2, 4), "gru": ("gru", 3, 1, 4), "rnn_tanh": ("elman", 1, 1, 1)}

    def unavailable(self, device):
        if device.type != "cuda":
            return "CUDA only"
        try:
            _flashrnn_function()
        except ModuleNotFoundError:
            return "not installed"
        except Exception as exc:
            return f"not importable ({type(exc).__name__}: {exc})"
        return None

    def skip_reason(self, cfg, mode, device):
        if cfg.cell not in self.FUNCTIONS:
            return f"no {cfg.cell} in FlashRNN"
        return _single_layer_dense(cfg)

    def build(self, cfg, reference_module):
        flashrnn = _flashrnn_function()
        function, gates, states, bias_gates = self.FUNCTIONS[cfg.cell]
        p = next(reference_module.parameters())
        H = cfg.hidden
        kernel_dtype = str(p.dtype).replace("torch.", "")
        w_ih = nn.Parameter(reference_module.weight_ih_l0.detach().clone())
        R = nn.Parameter(torch.randn(gates, 1, H, H, device=p.device, dtype=p.dtype) / H ** 0.5)
        b = nn.Parameter(torch.zeros(bias_gates, 1, H, device=p.device, dtype=p.dtype))

        def run(x, state):
            T, B, _ = x.shape
            wx = torch.nn.functional.linear(x, w_ih).view(T, B, gates, 1, H).transpose(0, 1)
            h0 = state[0] if isinstance(state, tuple) else state
            s0 = h0.view(1, B, 1, 1, H).expand(states, B, 1, 1, H).contiguous()
            seq, last = flashrnn(wx, R, b, states=s0, function=function, backend="cuda_fused",
                                 dtype=kernel_dtype)
            # [S, B, T(+1 with the initial state), 1, H] -> the last T steps of h, time-major.
            out = seq[0][:, -T:].reshape(B, T, H).transpose(0, 1)
            h_n = last[0].reshape(1, B, H)
            return out, ((h_n, last[1].reshape(1, B, H)) if states == 2 else h_n)

        run.parameters = lambda: iter([w_ih, R, b])
        return run


def _flashrnn_function():
    """FlashRNN's entry point. Its README imports `from flashrnn import flashrnn` with its inner
    package on the path; installed from its repository, the same package sits one level down
    (flashrnn.flashrnn, whose `flashrnn` is the function)."""
    top = importlib.import_module("flashrnn")
    function = getattr(top, "flashrnn", None)
    if callable(function):
        return function
    return importlib.import_module("flashrnn.flashrnn").flashrnn


class HasteImpl(Impl):
    """haste_pytorch's fused CUDA LSTM/GRU (timing only; its own weights)."""
    name = "haste"
    shares_weights = False
    silent_when_missing = True

    def unavailable(self, device):
        if device.type != "cuda":
            return "CUDA only"
        try:
            importlib.import_module("haste_pytorch")
        except ModuleNotFoundError:
            return "not installed"
        except Exception as exc:  # installed, but broken (say, built for another torch)
            return f"not importable ({type(exc).__name__}: {exc})"
        return None

    def skip_reason(self, cfg, mode, device):
        if cfg.cell not in ("lstm", "gru"):
            return f"no {cfg.cell} in haste"
        return _single_layer_dense(cfg)

    def build(self, cfg, reference_module):
        haste = importlib.import_module("haste_pytorch")
        p = next(reference_module.parameters())
        cls = haste.LSTM if cfg.cell == "lstm" else haste.GRU
        module = cls(cfg.in_size, cfg.hidden).to(device=p.device, dtype=p.dtype)

        def run(x, state):
            return module(x)

        run.parameters = module.parameters
        return run


_FUSED, _TORCH = FusedImpl(), TorchImpl()
REGISTRY: Dict[str, Impl] = {impl.name: impl for impl in (
    _FUSED, _TORCH, ReferenceImpl(), FlashRnnImpl(), HasteImpl(),
    # The same two under torch.compile and from CUDA graphs (wrapped.py): fusedrnn's with
    # fullgraph=True, torch.nn's as Dynamo leaves it (a graph break around the RNN).
    CompiledImpl(_FUSED, fullgraph=True), CompiledImpl(_TORCH, fullgraph=False),
    GraphedImpl(_FUSED), GraphedImpl(_TORCH))}
DEFAULT_ORDER: List[str] = ["fusedrnn", "torch", "reference", "flashrnn", "haste"]
# Run only when named (--impls) or by a preset that lists them (configs.PRESET_IMPLS).
OPT_IN: List[str] = ["fusedrnn+compile", "torch+compile", "fusedrnn+cudagraph", "torch+cudagraph"]


def parse_impls(spec: Optional[str], default: Optional[List[str]] = None) -> List[str]:
    """The implementations --impls names (torch added), or `default` (a preset's), or
    DEFAULT_ORDER."""
    if not spec:
        return list(default or DEFAULT_ORDER)
    names = list(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))  # (once each)
    for n in names:
        if n not in REGISTRY:
            raise ValueError(f"--impls: unknown implementation {n!r}; expected some of "
                             f"{DEFAULT_ORDER + OPT_IN}")
    if "torch" not in names:
        names.append("torch")  # every speed-up and error is measured against torch.nn
    return names
