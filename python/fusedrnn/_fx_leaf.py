"""torch.fx symbolic tracing: fusedrnn's modules and cells as leaves, as torch.nn's are.

FX's default tracer records a module defined under torch.nn as one call_module node
(Tracer.is_leaf_module) and traces through every other module's forward. Traced through, a
fusedrnn module's input checks meet FX Proxies (control flow on a traced value: TraceError), so
a model that swapped torch.nn.LSTM for fusedrnn.LSTM no longer traced, and with it went FX
graph-mode quantization and torchvision's feature extraction (review, session 32). A module
whose eager forward receives a Proxy therefore records itself as the node FX's leaf branch
records, which runs the module itself when the GraphModule runs.
"""
from __future__ import annotations

from typing import Optional

from torch.fx import Proxy


def traced_call(module, args: tuple, kwargs: Optional[dict] = None):
    """The call_module node of `module` called with args and kwargs when the first argument
    or the second (the input, the state) is an FX Proxy, else None (an ordinary call). None too
    for the traced root itself, which FX always traces through (so does torch.nn's: both then
    fail on the first check that branches on the input)."""
    first = args[0] if args else None
    second = args[1] if len(args) > 1 else None
    if not (isinstance(first, Proxy) or isinstance(second, Proxy)):
        return None
    tracer = (first if isinstance(first, Proxy) else second).tracer
    path = tracer.path_of_module(module)
    if not path:
        return None
    return tracer.create_proxy("call_module", path, args, kwargs or {})
