"""Modules and cells on tensors without data: meta tensors (a model built on the meta device)
and FakeTensors (shape propagation under FakeTensorMode). torch.nn gives the results' shapes
there; so does fusedrnn, through the custom ops' fake kernels, also for backward.

Before, a meta input failed inside torch.is_autocast_enabled ("unknown device type for
autocast"), and a FakeTensor reached the native kernels with null pointers, which refused it.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fusedrnn

from _helpers import requires_native

pytestmark = requires_native

CASES = [
    # (id, class name, kwargs)
    ("lstm-proj-bidir-L2", "LSTM", dict(num_layers=2, bidirectional=True, proj_size=2)),
    ("gru-batch_first", "GRU", dict(batch_first=True)),
    ("rnn", "RNN", {}),
    ("lstm-cell", "LSTMCell", {}),
    ("gru-cell", "GRUCell", {}),
    ("rnn-cell", "RNNCell", {}),
]


def _flat(result):
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for part in result for t in _flat(part)]


def _layouts(result):
    return [(t.shape, t.dtype, t.device.type) for t in _flat(result)]


def _pair(cls, kwargs):
    theirs = getattr(torch.nn, cls)(3, 4, **kwargs)
    ours = getattr(fusedrnn, cls)(3, 4, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


# Modules at T=4 and T=1 (which the CPU runs as cell steps), cells once.
SHAPED = [(case, seq_len) for case in CASES
          for seq_len in ([None] if case[1].endswith("Cell") else [4, 1])]


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("mode", ["meta", "fake"])
@pytest.mark.parametrize("case, seq_len", SHAPED,
                         ids=[f"{c[0]}-T{t}" if t else c[0] for c, t in SHAPED])
def test_results_have_torch_nn_shapes(case, seq_len, mode, grad):
    _, cls, kwargs = case
    theirs, ours = _pair(cls, kwargs)
    shape = (2, 3) if seq_len is None else (seq_len, 2, 3)
    def run():
        x = torch.randn(*shape, device="meta" if mode == "meta" else "cpu")
        expected, got = theirs(x), ours(x)
        if grad:
            _flat(got)[0].sum().backward()  # the backward op's fake kernel
        assert _layouts(got) == _layouts(expected)

    with torch.set_grad_enabled(grad):
        if mode == "meta":
            theirs, ours = theirs.to("meta"), ours.to("meta")
            run()
        else:
            with FakeTensorMode(allow_non_fake_inputs=True):
                run()
