"""torch.fx symbolic tracing: fusedrnn's modules and cells as leaves, as torch.nn's are.

FX's default tracer records a module defined under torch.nn as one call_module node
(Tracer.is_leaf_module) and traces through every other module's forward. Traced through, a
fusedrnn module's input checks meet FX Proxies (control flow on a traced value: TraceError), so
a model that swapped torch.nn.LSTM for fusedrnn.LSTM no longer traced, and with it went FX
graph-mode quantization and torchvision's feature extraction (review, session 32). A module
called while FX traces therefore records itself as the node FX's leaf branch records, which
runs the module itself when the GraphModule runs.

Only where that node does exactly what the traced call did: FX has already entered the module
as a non-leaf, running its hooks on the Proxies and, for a subclass, the subclass's own forward
around ours; the node would run them all again (twice-applied hooks, a subclass's `[0]` taken
twice: wrong results, no error). There tracing fails with FX's TraceError, naming the cause.
"""
from __future__ import annotations

import sys
from typing import Optional

from torch.fx import Proxy, Tracer
from torch.fx import _symbolic_trace
from torch.fx.proxy import TraceError
from torch.nn.modules import module as _module_hooks

from . import _backend


class _NeverTracing:
    _is_fx_tracing_flag = False


# Read at every call of the modules (`STATE._is_fx_tracing_flag`, ~40 ns): FX's flag, set while
# symbolic_trace runs (is_fx_tracing() itself also runs a warning check, ~3x the cost).
STATE = _symbolic_trace if hasattr(_symbolic_trace, "_is_fx_tracing_flag") else _NeverTracing

_OWN_FORWARD_MODULES = ("fusedrnn.modules", "fusedrnn.cell_modules")
_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                 "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks",
                 "_global_backward_hooks", "_global_backward_pre_hooks")


def leaf_node(module, args: tuple, kwargs: Optional[dict] = None):
    """The call_module node of `module` called with args and kwargs while FX traces, as FX's
    leaf branch records it (whatever the arguments: Proxies, a state tuple of them, constants);
    None where no tracer is found or for the traced root itself, which FX always traces through
    (so does torch.nn's: both then fail on the first check that branches on the input). Raises
    FX's TraceError, naming the cause, where the node would not run what FX traced."""
    if _backend.make_fx_tracing():  # (its tracer is an FX Tracer too, which never takes leaves)
        return None
    kwargs = kwargs or {}
    tracer = _tracer_of(args, kwargs)
    if tracer is None:
        return None
    try:
        path = tracer.path_of_module(module)
    except NameError:  # not a submodule of the traced root (make_fx's tracer: no root at all)
        return None
    if not path:
        return None
    why = _why_not_a_leaf(module)
    if why:
        raise TraceError(
            f"fusedrnn: {type(module).__name__} '{path}' cannot be recorded as one call_module "
            f"node: {why}, which FX has already traced and the node would run again. Declare "
            f"it a leaf in a torch.fx.Tracer subclass (is_leaf_module) to trace it as torch.nn's")
    return tracer.create_proxy("call_module", path, args, kwargs)


def _tracer_of(args: tuple, kwargs: dict):
    """The tracer of the first Proxy among the arguments (a state may be a tuple of them), or,
    with none (a constant input, a buffer), of the Tracer.call_module frame that called the
    module: FX records a leaf whatever its arguments, and without the node the module ran
    eagerly at trace time, its result baked into the graph (review, session 32)."""
    values = [*args, *kwargs.values()]
    values += [v for value in values if isinstance(value, (tuple, list)) for v in value]
    proxy = next((v for v in values if isinstance(v, Proxy)), None)
    if proxy is not None:
        return proxy.tracer
    frame = sys._getframe(2)
    for _ in range(16):  # Tracer.call_module -> Module.__call__ -> forward -> ... -> here
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if frame.f_code.co_name == "call_module" and isinstance(candidate, Tracer):
            return candidate
        frame = frame.f_back
    return None


def _why_not_a_leaf(module) -> str:
    """Why running `module` again would do more than the forward FX is tracing ("" if it would
    not): hooks on it or global ones, or a class whose forward is not fusedrnn's own (a
    subclass's, or ours wrapped by a decorator)."""
    if any(getattr(module, name, None) for name in _MODULE_HOOKS) or any(
            getattr(_module_hooks, name, None) for name in _GLOBAL_HOOKS):
        return "it has forward or backward hooks (its own or global ones)"
    if not _keeps_own_forward(type(module)):
        return "its class overrides forward"
    return ""


def _keeps_own_forward(cls) -> bool:
    """Whether cls.forward is the forward of the nearest fusedrnn class in its MRO (identity:
    functools.wraps copies __module__ and __qualname__ onto a wrapper)."""
    for base in cls.__mro__:
        if base.__module__ in _OWN_FORWARD_MODULES and "forward" in base.__dict__:
            return cls.forward is base.__dict__["forward"]
    return False
