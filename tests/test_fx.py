"""torch.fx.symbolic_trace of models holding fusedrnn modules and cells (_fx_leaf.py): each is
one call_module node, as torch.nn's are, and the GraphModule gives the eager model's results.
Before, tracing such a model failed in the modules' input checks (review, session 32)."""
from __future__ import annotations

import functools

import pytest
import torch
from torch.utils._pytree import tree_leaves

import fusedrnn


class _Holder(torch.nn.Module):
    """A model around one recurrent module: forward(x, state) -> the module's results."""

    def __init__(self, inner):
        super().__init__()
        self.pre = torch.nn.Linear(5, 5)
        self.inner = inner

    def forward(self, x, state=None):
        return self.inner(self.pre(x), state)


def _call_modules(graph_module) -> list:
    return [n.target for n in graph_module.graph.nodes if n.op == "call_module"]


@pytest.mark.parametrize("name, kwargs, cell", [
    ("LSTM", dict(num_layers=2, bidirectional=True, batch_first=True), False),
    ("LSTM", dict(proj_size=3), False),
    ("GRU", {}, False),
    ("RNN", dict(nonlinearity="relu"), False),
    ("LSTMCell", {}, True),
    ("GRUCell", {}, True),
    ("RNNCell", {}, True),
])
@pytest.mark.parametrize("with_state", [False, True])
def test_traced_model_matches_eager_and_torch_nn(name, kwargs, cell, with_state):
    results = {}
    for namespace in (torch.nn, fusedrnn):
        torch.manual_seed(0)
        model = _Holder(getattr(namespace, name)(5, 4, **kwargs))
        traced = torch.fx.symbolic_trace(model)
        assert _call_modules(traced) == ["pre", "inner"]
        x = torch.randn(3, 5) if cell else torch.randn(2, 3, 5)
        state = None
        if with_state:  # the state the eager call returned, fed back
            out = model(x)
            state = out if cell else out[1]
        expected, got = tree_leaves(model(x, state)), tree_leaves(traced(x, state))
        assert len(expected) == len(got)
        for e, g in zip(expected, got):
            assert torch.equal(e, g)
        results[namespace.__name__] = got
    for a, b in zip(results["torch.nn"], results["fusedrnn"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_lengths_keyword_is_recorded():
    class WithLengths(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = fusedrnn.GRU(3, 4)

        def forward(self, x, lengths):
            return self.rnn(x, lengths=lengths)[0]

    torch.manual_seed(0)
    model = WithLengths()
    traced = torch.fx.symbolic_trace(model)
    x, lengths = torch.randn(5, 2, 3), torch.tensor([5, 3])
    assert torch.equal(traced(x, lengths), model(x, lengths))


@pytest.mark.parametrize("namespace", [torch.nn, fusedrnn], ids=["torch.nn", "fusedrnn"])
def test_the_module_itself_as_root_is_traced_through_and_fails(namespace):
    """FX traces the root's forward whatever it is: torch.nn's LSTM fails there, so does ours."""
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(namespace.LSTM(3, 4))


@pytest.mark.parametrize("pre_dispatch", [False, True])
@pytest.mark.parametrize("name, grad", [("LSTM", True), ("LSTM", False), ("GRU", True),
                                        ("GRUCell", True), ("LSTMCell", False)])
def test_make_fx_records_the_recurrence(name, grad, pre_dispatch):
    """make_fx (real tensors) records torch ops through its dispatch mode: the modules' direct
    native calls were missing from its graph, which then returned uninitialised memory (up to
    7e32 off; review, session 32). Under it they run as the custom ops, which it records."""
    from torch.fx.experimental.proxy_tensor import make_fx
    torch.manual_seed(0)
    module = getattr(fusedrnn, name)(3, 4).requires_grad_(grad)
    first = (lambda r: r[0]) if name != "GRUCell" else (lambda r: r)
    shape = (2, 3) if "Cell" in name else (5, 2, 3)
    graph = make_fx(lambda x: first(module(x)), pre_dispatch=pre_dispatch)(torch.randn(shape))
    other = torch.randn(shape)
    # (to rounding: an LSTMCell's eager no-grad step forms its products in the native step)
    torch.testing.assert_close(graph(other), first(module(other)), rtol=1e-5, atol=1e-6)


def test_state_tuple_and_lengths_proxies_alone():
    """A constant input with the state (a tuple of Proxies), or only lengths, traced."""
    class StateOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.x = torch.randn(4, 2, 3)
            self.rnn = fusedrnn.LSTM(3, 5)

        def forward(self, h, c, lengths):
            return self.rnn(self.x, (h, c), lengths=lengths)[0]

    torch.manual_seed(0)
    model = StateOnly()
    traced = torch.fx.symbolic_trace(model)
    assert _call_modules(traced) == ["rnn"]
    h, c, lengths = torch.randn(1, 2, 5), torch.randn(1, 2, 5), torch.tensor([4, 2])
    assert torch.equal(traced(h, c, lengths), model(h, c, lengths))


class _OutputOnly(fusedrnn.LSTM):
    def forward(self, x, hx=None):
        return super().forward(x, hx)[0]


def test_subclass_with_its_own_forward_is_traced_through_and_fails():
    """A leaf node would run the subclass's forward again around what FX traced of it (its
    `[0]` taken twice: the first step's output, no error). torch.nn's subclasses fail; so now."""
    model = _Holder(_OutputOnly(5, 4))
    with pytest.raises(torch.fx.proxy.TraceError, match="its class overrides forward"):
        torch.fx.symbolic_trace(model)


def _first_only(forward):
    @functools.wraps(forward)  # (copies __module__ and __qualname__: not ours all the same)
    def wrapper(*args, **kwargs):
        return forward(*args, **kwargs)[0]
    return wrapper


class _Decorated(fusedrnn.GRU):
    forward = _first_only(fusedrnn.GRU.forward)


class _Plain(fusedrnn.GRU):
    """A subclass that keeps fusedrnn's forward: a leaf."""


def test_decorated_forward_fails_and_an_inherited_one_is_a_leaf():
    with pytest.raises(torch.fx.proxy.TraceError, match="its class overrides forward"):
        torch.fx.symbolic_trace(_Holder(_Decorated(5, 4)))
    traced = torch.fx.symbolic_trace(_Holder(_Plain(5, 4)))
    assert _call_modules(traced) == ["pre", "inner"]


def test_constant_and_buffer_inputs_are_leaves_too():
    """With no Proxy among its arguments (a tensor made inside forward, a buffer) the module
    ran eagerly at trace time and its result was baked into the graph (stale after a weight
    change), or the trace failed; torch.nn records its leaf node whatever the arguments."""
    class Constants(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = fusedrnn.GRUCell(3, 4)
            self.rnn = fusedrnn.GRU(3, 4)
            self.register_buffer("sequence", torch.randn(5, 2, 3))

        def forward(self, x):
            return self.cell(torch.ones(2, 3)) + self.rnn(self.sequence)[0][-1] + x

    torch.manual_seed(0)
    model = Constants()
    traced = torch.fx.symbolic_trace(model)
    assert _call_modules(traced) == ["cell", "rnn"]
    x = torch.randn(2, 4)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2)
    assert torch.equal(traced(x), model(x))


@pytest.mark.parametrize("kind", ["forward", "pre", "global"])
def test_hooked_module_is_traced_through_and_fails(kind):
    """FX runs a non-leaf's hooks on the Proxies while it traces; a leaf node would run them
    again (a doubling hook doubled twice). Refused (TraceError naming the hooks) rather than a
    wrong graph."""
    model = _Holder(fusedrnn.GRU(5, 4))
    double = lambda module, args, out: (out[0] * 2, out[1])
    if kind == "forward":
        handle = model.inner.register_forward_hook(double)
    elif kind == "pre":
        handle = model.inner.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    else:
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda module, args, out: out)
    try:
        with pytest.raises(torch.fx.proxy.TraceError, match="hooks"):
            torch.fx.symbolic_trace(model)
    finally:
        handle.remove()
