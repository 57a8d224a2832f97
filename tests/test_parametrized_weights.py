"""Weights computed by torch.nn.utils.parametrize, with side effects: a random weight dropout
(DropConnect, AWD-LSTM's WeightDrop) draws from the global generator, spectral_norm advances its
power iteration in training mode. With one seed, fusedrnn must draw the same masks and reach the
same power-iteration state as torch.nn, so it evaluates every parametrization as many times as
torch.nn does, in the same order (modules._read_as_torch_nn_does)."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

import fusedrnn


class _WeightDrop(nn.Module):
    """A random parametrization that also counts its evaluations (class-wide: the two modules
    compared run one after the other)."""

    calls = 0

    def forward(self, weight):
        _WeightDrop.calls += 1
        return nn.functional.dropout(weight, 0.3, self.training)


MODULES = [("LSTM", dict(num_layers=2, bidirectional=True, proj_size=2)), ("GRU", {}),
           ("RNN", dict(nonlinearity="relu", num_layers=2))]


def _parametrize(module, names, kind):
    for name in names:
        if kind == "drop":
            parametrize.register_parametrization(module, name, _WeightDrop())
        else:
            spectral_norm(module, name)


def _run_twice(make, names, kind, call):
    """(results, evaluations) of torch.nn's module and fusedrnn's, each built, parametrized
    and called from the same seed; call(module, generator) returns the tensors to compare."""
    runs = []
    for cls in make:
        torch.manual_seed(0)
        module = cls().double()
        _parametrize(module, names, kind)
        _WeightDrop.calls = 0
        results = []
        for step in range(3):  # state carried over from call to call (spectral_norm's u, v)
            results += call(module, torch.Generator().manual_seed(step))
        runs.append((results, _WeightDrop.calls))
    return runs


def _compare(runs):
    (expected, torch_calls), (actual, our_calls) = runs
    assert our_calls == torch_calls
    for i, (a, e) in enumerate(zip(actual, expected)):
        if e is None:
            assert a is None, i
        else:
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=f"result {i}")


@pytest.mark.parametrize("kind", ["drop", "spectral"])
@pytest.mark.parametrize("seq_len", [1, 4])
@pytest.mark.parametrize("grad", [True, False], ids=["training", "no_grad"])
@pytest.mark.parametrize("name, kwargs", MODULES, ids=[m[0] for m in MODULES])
def test_modules_evaluate_parametrizations_as_torch_does(name, kwargs, grad, seq_len, kind):
    make = [lambda: getattr(nn, name)(3, 4, **kwargs), lambda: getattr(fusedrnn, name)(3, 4, **kwargs)]
    # The first layer's W_hh (not the first weight: torch.nn reads plain ones before it) and a
    # later layer's bias or W_ih.
    names = ["weight_hh_l0", "bias_ih_l1" if kwargs.get("num_layers") else "bias_hh_l0"]

    def call(module, generator):
        x = torch.randn(seq_len, 2, 3, dtype=torch.float64, generator=generator)
        with torch.set_grad_enabled(grad):
            out, _ = module(x)
        if not grad:
            return [out]
        module.zero_grad()
        out.square().sum().backward()
        return [out.detach(), *(p.grad for p in module.parameters())]

    _compare(_run_twice(make, names, kind, call))


CELLS = [("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", dict(nonlinearity="relu"))]


@pytest.mark.parametrize("kind", ["drop", "spectral"])
@pytest.mark.parametrize("name, kwargs", CELLS, ids=[c[0] for c in CELLS])
def test_cells_evaluate_parametrizations_as_torch_does(name, kwargs, kind):
    make = [lambda: getattr(nn, name)(3, 4, **kwargs), lambda: getattr(fusedrnn, name)(3, 4, **kwargs)]

    def call(module, generator):
        x = torch.randn(2, 3, dtype=torch.float64, generator=generator)
        out = module(x)
        h = out[0] if isinstance(out, tuple) else out
        module.zero_grad()
        h.square().sum().backward()
        return [h.detach(), *(p.grad for p in module.parameters())]

    _compare(_run_twice(make, ["weight_ih", "weight_hh", "bias_hh"], kind, call))


def test_parametrized_module_reads_each_weight_as_torch_does():
    """The counts themselves, for a parametrization torch.nn reads before and after the first
    changed weight: two reads in its check, two when it reads them all again."""
    counts = []
    for cls in (nn.LSTM, fusedrnn.LSTM):
        module = cls(3, 4, num_layers=2)
        parametrize.register_parametrization(module, "weight_hh_l0", _WeightDrop())
        parametrize.register_parametrization(module, "weight_ih_l1", _WeightDrop())
        _WeightDrop.calls = 0
        module(torch.randn(4, 2, 3))
        counts.append(_WeightDrop.calls)
    assert counts[1] == counts[0] == 6
