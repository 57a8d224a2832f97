"""torch.jit.trace of the modules and cells: the traced graph holds the recurrence as the custom
op fusedrnn::layer_forward, so a traced module computes what the eager one does, on the traced
shapes and on others, with gradients, after torch.jit.save/load, and passes the tracer's own
check (which traces again under no_grad).

Before, a trace under no_grad recorded the input projection but not the native call of the
inference fast path: the traced module returned whatever its output buffers held, and the
tracer's check passed. A trace with gradients failed the check.
"""
import io
import warnings

import pytest
import torch

import fusedrnn

from _helpers import assert_close, ramp_loss, requires_native

pytestmark = requires_native

DTYPE = torch.float64
TOLERANCE = 1e-12  # the same kernels and GEMMs as the eager module

CASES = [
    # (id, class name, kwargs, with initial state)
    ("lstm-proj-bidir-L2", "LSTM", dict(num_layers=2, bidirectional=True, proj_size=2), True),
    ("gru-batch_first", "GRU", dict(batch_first=True), True),
    ("rnn-relu-nobias", "RNN", dict(nonlinearity="relu", bias=False), False),
]


def _flat(result):
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for part in result for t in _flat(part)]


def _module(name, kwargs):
    torch.manual_seed(0)
    return getattr(fusedrnn, name)(3, 4, dtype=DTYPE, **kwargs)


def _inputs(module, seq_len, batch, with_state):
    x = torch.randn(seq_len, batch, 3, dtype=DTYPE)
    if module.batch_first:
        x = x.transpose(0, 1).contiguous()
    if not with_state:
        return (x,)
    states = module.num_layers * (2 if module.bidirectional else 1)
    h0 = torch.randn(states, batch, module.proj_size or module.hidden_size, dtype=DTYPE)
    if isinstance(module, fusedrnn.LSTM):
        return (x, (h0, torch.randn(states, batch, module.hidden_size, dtype=DTYPE)))
    return (x, h0)


def _trace_quietly(module, example):
    """torch.jit.trace with its check, failing on any TracerWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        return torch.jit.trace(module, example)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("name, cls, kwargs, with_state", CASES, ids=[c[0] for c in CASES])
def test_traced_module_matches_eager(name, cls, kwargs, with_state, grad):
    module = _module(cls, kwargs)
    with torch.set_grad_enabled(grad):
        traced = _trace_quietly(module, _inputs(module, 4, 2, with_state))
    # Other lengths and batch sizes than the traced ones, one step included.
    for seq_len, batch in [(4, 2), (7, 3), (1, 1)]:
        args = _inputs(module, seq_len, batch, with_state)
        with torch.no_grad():
            for g, e in zip(_flat(traced(*args)), _flat(module(*args))):
                assert_close(g, e, TOLERANCE, f"traced output at T={seq_len} B={batch}")


@pytest.mark.parametrize("name, cls, kwargs, with_state", CASES, ids=[c[0] for c in CASES])
def test_traced_module_gradients_match_eager(name, cls, kwargs, with_state):
    module = _module(cls, kwargs)
    traced = _trace_quietly(module, _inputs(module, 4, 2, with_state))
    args = _inputs(module, 5, 3, with_state)
    grads = []
    for run in (traced, module):
        module.zero_grad()
        x = args[0].clone().requires_grad_()
        ramp_loss(_flat(run(x, *args[1:]))).backward()
        grads.append([x.grad] + [p.grad.clone() for p in module.parameters()])
    for g, e in zip(*grads):
        assert_close(g, e, TOLERANCE, "gradient through the traced module")


@pytest.mark.parametrize("cls", ["LSTMCell", "GRUCell", "RNNCell"])
def test_traced_cell_matches_eager(cls):
    torch.manual_seed(0)
    cell = getattr(fusedrnn, cls)(3, 4, dtype=DTYPE)
    with torch.no_grad():
        traced = _trace_quietly(cell, (torch.randn(2, 3, dtype=DTYPE),))
        for batch in (2, 5):
            x = torch.randn(batch, 3, dtype=DTYPE)
            for g, e in zip(_flat(traced(x)), _flat(cell(x))):
                assert_close(g, e, TOLERANCE, f"traced {cls} at B={batch}")


def test_saved_and_loaded_trace_matches_eager():
    module = _module("LSTM", dict(num_layers=2))
    with torch.no_grad():
        traced = _trace_quietly(module, _inputs(module, 4, 2, False))
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = torch.randn(6, 3, 3, dtype=DTYPE)
    with torch.no_grad():
        for g, e in zip(_flat(loaded(x)), _flat(module(x))):
            assert_close(g, e, TOLERANCE, "loaded trace")


@pytest.mark.parametrize("how", ["float16", "autocast", "frozen"])
def test_trace_of_a_casting_or_frozen_model_trains(how):
    """A forward that casts (float16 on the CPU computes in float32; autocast to bfloat16), or a
    frozen model with an input that requires grad: the trace passes the tracer's own check
    (a second trace under no_grad) and a trace taken under no_grad still trains, with the eager
    module's gradients."""
    torch.manual_seed(0)
    dtype = torch.float16 if how == "float16" else torch.float32
    module = fusedrnn.GRU(3, 5, num_layers=2, dtype=dtype)
    if how == "frozen":
        module.requires_grad_(False)
    x = torch.randn(4, 2, 3, dtype=dtype, requires_grad=how == "frozen")
    leaves = [x] if how == "frozen" else list(module.parameters())
    context = (torch.autocast("cpu", dtype=torch.bfloat16) if how == "autocast"
               else torch.autocast("cpu", enabled=False))
    with context:
        torch.jit.trace(module, (x,))  # raises if the two traces differ
        with torch.no_grad():
            traced = torch.jit.trace(module, (x,), check_trace=False)
        grads = [torch.autograd.grad(m(x)[0].float().sum(), leaves) for m in (traced, module)]
    for a, e in zip(*grads):
        assert_close(a.float(), e.float(), 1e-6, f"{how}: traced gradient")


@pytest.mark.parametrize("kind, sorted_", [("GRU", False), ("LSTM", True)])
def test_trace_of_a_model_that_packs_its_input_takes_other_shapes(kind, sorted_):
    """pack_padded_sequence -> the module -> pad_packed_sequence, traced at one batch size and
    length: the trace follows each call's batch_sizes (other B, longer and shorter T), as
    torch.nn's trace does."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    class PackModel(torch.nn.Module):
        def __init__(self, rnn):
            super().__init__()
            self.rnn = rnn

        def forward(self, x, lengths):
            out, state = self.rnn(pack_padded_sequence(x, lengths, enforce_sorted=sorted_))
            return pad_packed_sequence(out, total_length=x.size(0))[0], state

    torch.manual_seed(0)
    model = PackModel(getattr(fusedrnn, kind)(3, 5, bidirectional=True, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (torch.randn(5, 3, 3, dtype=torch.float64),
                                         torch.tensor([5, 3, 2])))
    for lengths in ([5, 4, 2, 1], [4, 4, 1, 1, 1], [7, 3], [2]):
        x = torch.randn(lengths[0] + 1, len(lengths), 3, dtype=torch.float64)
        expected, actual = model(x, torch.tensor(lengths)), traced(x, torch.tensor(lengths))
        for a, e in zip(torch.jit._flatten(actual)[0], torch.jit._flatten(expected)[0]):
            assert_close(a, e, 1e-12, f"traced {kind}, lengths {lengths}")
