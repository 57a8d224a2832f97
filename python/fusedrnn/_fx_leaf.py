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


def leaf_node(module, proxy: Proxy, args: tuple, kwargs: Optional[dict] = None):
    """The call_module node of `module` called with args and kwargs, one of which is `proxy`
    (the callers test their input and state with isinstance(..., Proxy) first: ~40 ns on every
    call, where a call of this function cost ~120). None for the traced root itself, which FX
    always traces through (so does torch.nn's: both then fail on the first check that branches
    on the input)."""
    tracer = proxy.tracer
    path = tracer.path_of_module(module)
    if not path:
        return None
    return tracer.create_proxy("call_module", path, args, kwargs or {})
