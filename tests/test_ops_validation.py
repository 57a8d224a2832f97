"""Bad arguments to the custom ops torch.ops.fusedrnn.layer_forward / layer_backward.

Anyone can call the ops, and the native kernels trust every size they are given (pointers, not
tensors): each mistake must raise, before any native call, an error that names the argument and
what was expected and received, never read or write out of bounds. Shapes, dtypes and devices
raise RuntimeError; the cell, the number of directions and lengths raise ValueError. The fake
kernels run the same checks, so torch.compile reports the mistake while tracing.
"""
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fusedrnn
from fusedrnn import functional

from _helpers import requires_native

SEQ_LEN, BATCH, HIDDEN = 3, 2, 4
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def forward_args(cell="lstm", directions=1, proj=0):
    """layer_forward's arguments (as a dict) for a valid random layer with states and lengths."""
    gates, state = GATES[cell] * HIDDEN, proj or HIDDEN

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64)

    return dict(
        cell=cell, xproj=rand(SEQ_LEN, BATCH, directions * gates),
        h0=rand(directions, BATCH, state),
        c0=rand(directions, BATCH, HIDDEN) if cell == "lstm" else None,
        w_hh=[rand(gates, state) for _ in range(directions)],
        b_hh=[rand(gates) for _ in range(directions)],
        w_hr=[rand(proj, HIDDEN) for _ in range(directions)] if proj else [], peephole=[],
        lengths=torch.tensor([SEQ_LEN, 2]), save=True)


def layer_forward(args):
    return torch.ops.fusedrnn.layer_forward(*args.values())


def backward_args(cell="lstm", directions=1, proj=0):
    """layer_backward's arguments (as a dict): a valid forward's saved outputs, random gradients."""
    args = forward_args(cell, directions, proj)
    out, hn, cn, gates, c_seq, _ = layer_forward(args)
    return dict(
        cell=cell, w_hh=args["w_hh"], b_hh=args["b_hh"], w_hr=args["w_hr"], peephole=[],
        h0=args["h0"],
        c0=args["c0"], out=out, gates=gates if gates.numel() else None,
        c_seq=c_seq if c_seq.numel() else None, d_out=torch.randn_like(out),
        d_hn=torch.randn_like(hn), d_cn=torch.randn_like(cn) if cell == "lstm" else None,
        lengths=args["lengths"])


def layer_backward(args):
    return torch.ops.fusedrnn.layer_backward(*args.values())


def _f64(*shape):
    return torch.randn(*shape, dtype=torch.float64)


# (id, cell, directions, proj, changes to the valid arguments, exception, message pattern):
# the pattern names the argument and the expected and received shape, dtype or device.
FORWARD_CASES = [
    # The reviewer's repro: the kernel read 8 values from a 1-element h0.
    ("h0-1x1x1", "lstm", 1, 0, dict(h0=_f64(1, 1, 1)), RuntimeError,
     r"h0 must have shape \[D, B, P\] = \[1, 2, 4\], got \[1, 1, 1\]"),
    ("lengths-int32", "lstm", 1, 0, dict(lengths=torch.tensor([3, 2], dtype=torch.int32)),
     ValueError, r"lengths must be an int64 tensor of shape \[B\] = \[2\] on cpu.*got torch.int32"),
    ("lengths-float", "gru", 1, 0, dict(lengths=torch.tensor([3.0, 2.0])), ValueError,
     r"lengths must be an int64 .*got torch.float32"),
    ("lengths-shape", "gru", 1, 0, dict(lengths=torch.tensor([3, 2, 1])), ValueError,
     r"lengths must be .* shape \[B\] = \[2\].*got torch.int64 of shape \[3\]"),
    ("lengths-2d", "rnn_tanh", 1, 0, dict(lengths=torch.tensor([[3, 2]])), ValueError,
     r"lengths .* shape \[B\] = \[2\].* of shape \[1, 2\]"),
    ("lengths-device", "lstm", 1, 0, dict(lengths=torch.empty(2, dtype=torch.int64,
                                                               device="meta")),
     ValueError, r"lengths must be .* on cpu \(xproj's device\).* on meta"),
    ("cell", "lstm", 1, 0, dict(cell="lsmt"), ValueError, r"cell must be one of .*'lsmt'"),
    ("three-directions", "gru", 1, 0, dict(w_hh=[_f64(12, 4)] * 3), ValueError,
     r"w_hh must hold 1 or 2 tensors .* got 3"),
    ("no-directions", "gru", 1, 0, dict(w_hh=[]), ValueError, r"w_hh must hold 1 or 2 .* got 0"),
    ("xproj-2d", "lstm", 1, 0, dict(xproj=_f64(3, 16)), RuntimeError,
     r"xproj must be a 3-D \[T, B, D\*G\*H\] = \[T, B, 16\] tensor .* got shape \[3, 16\]"),
    ("xproj-width", "lstm", 2, 0, dict(xproj=_f64(3, 2, 16)), RuntimeError,
     r"xproj must be a 3-D .* = \[T, B, 32\] .* got shape \[3, 2, 16\]"),
    ("xproj-no-steps", "rnn_relu", 1, 0, dict(xproj=_f64(0, 2, 4)), RuntimeError,
     r"xproj must be .* T, B >= 1, got shape \[0, 2, 4\]"),
    ("xproj-int", "rnn_relu", 1, 0, dict(xproj=torch.ones(3, 2, 4, dtype=torch.int64)),
     RuntimeError, r"xproj must be float32, float64, float16 or bfloat16, got torch.int64"),
    ("w_hh-not-gates", "lstm", 1, 0, dict(w_hh=[_f64(15, 4)]), RuntimeError,
     r"w_hh\[0\] must be a 2-D \[G\*H, P\] tensor with G = 4 .* got shape \[15, 4\]"),
    ("w_hh-state", "gru", 1, 0, dict(w_hh=[_f64(12, 5)]), RuntimeError,
     r"w_hh\[0\] must be \[G\*H, H\] = \[12, 4\] without w_hr .* got \[12, 5\]"),
    ("w_hh-1d", "gru", 1, 0, dict(w_hh=[_f64(12)]), RuntimeError,
     r"w_hh\[0\] must be a 2-D .* got shape \[12\]"),
    ("w_hh-directions-differ", "gru", 2, 0, dict(w_hh=[_f64(12, 4), _f64(12, 3)]), RuntimeError,
     r"w_hh\[1\] must have shape \[G\*H, P\] = \[12, 4\], got \[12, 3\]"),
    ("w_hh-dtype", "gru", 1, 0, dict(w_hh=[torch.randn(12, 4)]), RuntimeError,
     r"w_hh\[0\] must be torch.float64 on cpu like xproj, got torch.float32 on cpu"),
    ("b_hh-shape", "lstm", 1, 0, dict(b_hh=[_f64(15)]), RuntimeError,
     r"b_hh\[0\] must have shape \[G\*H\] = \[16\], got \[15\]"),
    ("b_hh-count", "lstm", 2, 0, dict(b_hh=[_f64(16)]), ValueError,
     r"b_hh must be empty .* one tensor per direction \(2, like w_hh\), got 1"),
    ("w_hr-gru", "gru", 1, 0, dict(w_hr=[_f64(2, 4)]), ValueError,
     r"w_hr must be empty .* for \('lstm', 'lstm_cifg'\) only.* for gru"),
    ("w_hr-shape", "lstm", 1, 2, dict(w_hr=[_f64(2, 5)]), RuntimeError,
     r"w_hr\[0\] must have shape \[P, H\] = \[2, 4\], got \[2, 5\]"),
    ("w_hr-not-smaller", "lstm", 1, 0, dict(w_hr=[_f64(4, 4)]), RuntimeError,
     r"with w_hr .* P below H = 4, got \[16, 4\]"),
    ("h0-dtype", "gru", 1, 0, dict(h0=torch.randn(1, 2, 4)), RuntimeError,
     r"h0 must be torch.float64 on cpu like xproj, got torch.float32 on cpu"),
    ("h0-device", "gru", 1, 0, dict(h0=torch.empty(1, 2, 4, dtype=torch.float64,
                                                   device="meta")),
     RuntimeError, r"h0 must be torch.float64 on cpu like xproj, got torch.float64 on meta"),
    ("h0-projected", "lstm", 2, 2, dict(h0=_f64(2, 2, 4)), RuntimeError,
     r"h0 must have shape \[D, B, P\] = \[2, 2, 2\], got \[2, 2, 4\]"),
    ("c0-shape", "lstm", 1, 2, dict(c0=_f64(1, 2, 2)), RuntimeError,
     r"c0 must have shape \[D, B, H\] = \[1, 2, 4\], got \[1, 2, 2\]"),
    ("c0-gru", "gru", 1, 0, dict(c0=_f64(1, 2, 4)), RuntimeError,
     r"c0 must be None or empty for gru \(only an lstm or lstm_cifg has a cell state\), "
     r"got shape \[1, 2, 4\]"),
]


@pytest.mark.parametrize("name, cell, directions, proj, changes, error, pattern", FORWARD_CASES,
                         ids=[c[0] for c in FORWARD_CASES])
def test_layer_forward_rejects(name, cell, directions, proj, changes, error, pattern):
    args = {**forward_args(cell, directions, proj), **changes}
    with pytest.raises(error, match=r"fusedrnn::layer_forward: " + pattern):
        layer_forward(args)


@pytest.mark.parametrize("name, cell, directions, proj, changes, error, pattern", FORWARD_CASES,
                         ids=[c[0] for c in FORWARD_CASES])
def test_layer_forward_fake_kernel_rejects(name, cell, directions, proj, changes, error, pattern):
    """What torch.compile traces: the fake kernel raises the same error on fake tensors."""
    args = {**forward_args(cell, directions, proj), **changes}
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = {key: _to_fake(mode, value) for key, value in args.items()}
        with pytest.raises(error, match=r"fusedrnn::layer_forward: " + pattern):
            layer_forward(fake)


def _to_fake(mode, value):
    if isinstance(value, torch.Tensor):
        return mode.from_tensor(value)
    if isinstance(value, list):
        return [_to_fake(mode, v) for v in value]
    return value


@requires_native
@pytest.mark.parametrize("bad", [0, SEQ_LEN + 1], ids=["zero", "above-T"])
def test_layer_forward_rejects_lengths_out_of_range(bad, monkeypatch):
    """The CPU module checks the values itself; the CUDA kernels and their emulation rely on
    Python's check (the next test)."""
    monkeypatch.setenv("FUSEDRNN_BACKEND", "cpu")
    args = forward_args("lstm")
    args["lengths"] = torch.tensor([SEQ_LEN, bad])
    with pytest.raises(ValueError, match=rf"lengths\[1\] must be in \[1, {SEQ_LEN}\], got {bad}"):
        layer_forward(args)


@pytest.mark.parametrize("bad", [0, SEQ_LEN + 1], ids=["zero", "above-T"])
def test_lengths_values_checked_in_python_where_the_kernels_do_not(bad, monkeypatch):
    monkeypatch.setenv("FUSEDRNN_BACKEND", "emu")  # the emulated CUDA kernels trust lengths
    args = forward_args("gru")
    args["lengths"] = torch.tensor([bad, SEQ_LEN])
    low, high = min(bad, SEQ_LEN), max(bad, SEQ_LEN)
    pattern = rf"layer_forward: lengths must lie in \[1, {SEQ_LEN}\] .* from {low} to {high}"
    with pytest.raises(ValueError, match=pattern):
        layer_forward(args)


BACKWARD_CASES = [
    # (id, cell, directions, proj, changes, exception, message pattern)
    ("out-shape", "lstm", 1, 0, dict(out=_f64(3, 2, 5)), RuntimeError,
     r"out must be a 3-D \[T, B, D\*P\] = \[T, B, 4\] tensor .* got shape \[3, 2, 5\]"),
    ("out-int", "gru", 1, 0, dict(out=torch.ones(3, 2, 4, dtype=torch.int64)), RuntimeError,
     r"out must be float32, float64, float16 or bfloat16, got torch.int64"),
    ("gates-missing", "lstm", 1, 0, dict(gates=None), RuntimeError,
     r"gates is required for lstm: the \[D, T, B, S\*H\] = \[1, 3, 2, 16\] gates"),
    ("gates-empty", "gru", 1, 0, dict(gates=_f64(0)), RuntimeError,
     r"gates must have shape \[D, T, B, S\*H\] = \[1, 3, 2, 16\], got \[0\]"),
    ("gates-shape", "gru", 2, 0, dict(gates=_f64(2, 3, 2, 12)), RuntimeError,
     r"gates must have shape \[D, T, B, S\*H\] = \[2, 3, 2, 16\], got \[2, 3, 2, 12\]"),
    ("gates-rnn", "rnn_tanh", 1, 0, dict(gates=_f64(1, 3, 2, 4)), RuntimeError,
     r"gates must be None or empty for rnn_tanh \(it saves no gates\), got shape \[1, 3, 2, 4\]"),
    ("c_seq-missing", "lstm", 1, 2, dict(c_seq=None), RuntimeError,
     r"c_seq is required for lstm: the \[D, T, B, H\] = \[1, 3, 2, 4\] cell states"),
    ("c_seq-shape", "lstm", 1, 2, dict(c_seq=_f64(1, 3, 2, 2)), RuntimeError,
     r"c_seq must have shape \[D, T, B, H\] = \[1, 3, 2, 4\], got \[1, 3, 2, 2\]"),
    ("d_out-shape", "gru", 1, 0, dict(d_out=_f64(3, 1, 4)), RuntimeError,
     r"d_out must have shape \[T, B, D\*P\] = \[3, 2, 4\], got \[3, 1, 4\]"),
    ("d_hn-shape", "lstm", 2, 2, dict(d_hn=_f64(2, 2, 4)), RuntimeError,
     r"d_hn must have shape \[D, B, P\] = \[2, 2, 2\], got \[2, 2, 4\]"),
    ("d_cn-gru", "gru", 1, 0, dict(d_cn=_f64(1, 2, 4)), RuntimeError,
     r"d_cn must be None or empty for gru"),
    ("d_cn-dtype", "lstm", 1, 0, dict(d_cn=torch.randn(1, 2, 4)), RuntimeError,
     r"d_cn must be torch.float64 on cpu like out, got torch.float32 on cpu"),
    ("h0-1x1x1", "lstm", 1, 0, dict(h0=_f64(1, 1, 1)), RuntimeError,
     r"h0 must have shape \[D, B, P\] = \[1, 2, 4\], got \[1, 1, 1\]"),
    ("w_hh-state", "rnn_relu", 1, 0, dict(w_hh=[_f64(4, 3)]), RuntimeError,
     r"w_hh\[0\] must be \[G\*H, H\] = \[4, 4\] without w_hr .* got \[4, 3\]"),
    ("lengths-int32", "gru", 2, 0, dict(lengths=torch.tensor([3, 2], dtype=torch.int32)),
     ValueError, r"lengths must be an int64 tensor of shape \[B\] = \[2\] on cpu \(out's "
     r"device\), got torch.int32"),
    ("cell", "gru", 1, 0, dict(cell="GRU"), ValueError, r"cell must be one of .*'GRU'"),
]


@requires_native  # the valid arguments come from a native forward
@pytest.mark.parametrize("name, cell, directions, proj, changes, error, pattern", BACKWARD_CASES,
                         ids=[c[0] for c in BACKWARD_CASES])
def test_layer_backward_rejects(name, cell, directions, proj, changes, error, pattern):
    args = {**backward_args(cell, directions, proj), **changes}
    with pytest.raises(error, match=r"fusedrnn::layer_backward: " + pattern):
        layer_backward(args)


@requires_native
def test_layer_backward_fake_kernel_rejects():
    args = {**backward_args("lstm"), "h0": _f64(1, 1, 1)}
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = {key: _to_fake(mode, value) for key, value in args.items()}
        with pytest.raises(RuntimeError, match=re.escape("h0 must have shape [D, B, P]")):
            layer_backward(fake)


@requires_native
@pytest.mark.parametrize("cell", ["gru", "rnn_tanh"])
def test_empty_placeholders_are_accepted(cell):
    """What layer_forward returns in place of what a cell has no use for (an empty cn, gates,
    c_seq) may be passed back: it means None."""
    args = forward_args(cell)
    empty = _f64(0)
    reference = layer_forward(args)
    for actual, expected in zip(layer_forward({**args, "c0": empty}), reference):
        assert torch.equal(actual, expected)
    bwd = backward_args(cell)
    reference = layer_backward(bwd)
    changes = dict(c0=empty, c_seq=empty, d_cn=empty)
    if cell != "gru":
        changes["gates"] = empty
    for actual, expected in zip(layer_backward({**bwd, **changes}), reference):
        assert torch.equal(actual, expected)


def test_functional_rnn_checks_state_shapes():
    """fusedrnn.functional.rnn is public: a state of the wrong shape is an error naming it, not
    an out-of-bounds read (the modules check before they call it; direct callers did not)."""
    lstm = fusedrnn.LSTM(4, 3, dtype=torch.float64)
    weights = lstm._layer_weights()
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    bad = (torch.randn(1, 1, 1, dtype=torch.float64), torch.randn(1, 1, 1, dtype=torch.float64))
    for grad in (False, True):
        with torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match="h0"):
            functional.rnn("lstm", x, weights, bad)


@requires_native
def test_float16_on_the_cpu_kernels_is_named_by_its_dtype(monkeypatch):
    """The CPU kernels take float32, float64 and bfloat16 (the modules run float16 CPU tensors
    in float32): a direct call of the op with float16 was refused by the native ABI code
    ("dtype must be 0 (float32), 1 (float64), 3 (bfloat16) here, got 2")."""
    monkeypatch.delenv("FUSEDRNN_BACKEND", raising=False)

    def half(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.half()
        return [half(v) for v in value] if isinstance(value, list) else value

    args = {key: half(value) for key, value in forward_args().items()}
    with pytest.raises(RuntimeError, match=r"fusedrnn::layer_forward: xproj is float16, which "
                                           r"the CPU kernels do not take"):
        layer_forward(args)
