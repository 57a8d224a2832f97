"""torch.fx symbolic tracing: fusedrnn's modules and cells as leaves, as torch.nn's are.

FX's default tracer records a module defined under torch.nn as one call_module node
(Tracer.is_leaf_module) and traces through every other module's forward. Traced through, a
fusedrnn module's input checks meet FX Proxies (control flow on a traced value: TraceError), so
a model that swapped torch.nn.LSTM for fusedrnn.LSTM no longer traced, and with it went FX
graph-mode quantization and torchvision's feature extraction (review, session 32). A module
whose eager forward receives a Proxy therefore records itself as the node FX's leaf branch
records, which runs the module itself when the GraphModule runs.

Only where that node does exactly what the traced call did: FX has already entered the module
as a non-leaf, running its hooks on the Proxies and, for a subclass, the subclass's own forward
around ours; the node would run them all again (twice-applied hooks, a subclass's `[0]` taken
twice: wrong results, no error). There the module is traced through and fails as torch.nn's
subclasses do.
"""
from __future__ import annotations

from typing import Optional

from torch.fx import Proxy
from torch.fx import _symbolic_trace
from torch.nn.modules import module as _module_hooks


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
    """The call_module node of `module` called with args and kwargs while FX traces, where one
    of them holds a Proxy (a state may be a tuple of them) and the node runs what the traced call
    ran; else None, and the call goes on as usual. None too for the traced root itself, which FX
    always traces through (so does torch.nn's: both then fail on the first check that branches
    on the input)."""
    kwargs = kwargs or {}
    values = [*args, *kwargs.values()]
    values += [v for value in values if isinstance(value, (tuple, list)) for v in value]
    proxy = next((v for v in values if isinstance(v, Proxy)), None)
    if proxy is None or not _runs_as_traced(module):
        return None
    tracer = proxy.tracer
    path = tracer.path_of_module(module)
    if not path:
        return None
    return tracer.create_proxy("call_module", path, args, kwargs)


def _runs_as_traced(module) -> bool:
    """Whether running `module` again does no more than the forward FX is tracing: its class
    keeps fusedrnn's forward, and no forward or backward hook is registered on it or globally."""
    if getattr(type(module).forward, "__module__", None) not in _OWN_FORWARD_MODULES:
        return False
    if any(getattr(module, name, None) for name in _MODULE_HOOKS):
        return False
    return not any(getattr(_module_hooks, name, None) for name in _GLOBAL_HOOKS)
