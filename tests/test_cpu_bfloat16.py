"""bfloat16 tensors on the CPU forward (csrc/cpu/storage.h): the kernel widens every bfloat16 it
reads to float and rounds every float it writes to the nearest bfloat16, and computes in float in
between. So a bfloat16 call must give exactly the float32 kernel's results on the widened tensors,
rounded: that is checked bit for bit, per cell, instruction set, layout and feature, with every
output poisoned with NaN first. Then the modules: a bfloat16 inference call on the CPU runs the
native forward (no upcast copies) with torch.nn's error bar (DESIGN.md: at most twice torch.nn's
error in the same precision, against float64); a call that may need gradients still runs in
float32 (the CPU backward takes float tensors only).
"""
from __future__ import annotations

import pytest
import torch

import fusedrnn
from _helpers import rel_err
from fusedrnn import _backend

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
NAN = float("nan")

pytestmark = pytest.mark.skipif(
    _backend.backend_name() != "cpu", reason="the bfloat16 forward is a _cpu feature")


def _layer(cell, T, B, H, P, D, lengths, states, dtype, seed, batch_first=False):
    """Random operands of one layer in `dtype`; outputs poisoned with NaN."""
    g = torch.Generator().manual_seed(seed)
    G = GATES[cell]

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    if batch_first:  # [B, T, X] storage, handed over as a time-major view
        xproj = rand(B, T, D * G * H).transpose(0, 1)
    else:
        xproj = rand(T, B, D * G * H)
    w_hh = [rand(G * H, P, scale=0.4) for _ in range(D)]
    b_hh = [rand(G * H, scale=0.4) for _ in range(D)]
    w_hr = [rand(P, H, scale=0.4) for _ in range(D)] if P != H else [None] * D
    h0 = rand(D, B, P) if states else None
    c0 = rand(D, B, H) if states and cell == "lstm" else None
    lens = None
    if lengths:
        lens = torch.randint(1, T + 1, (B,), generator=g)
        lens[0] = T
    return xproj, w_hh, b_hh, w_hr, h0, c0, lens


def _forward(cell, xproj, w_hh, b_hh, w_hr, h0, c0, lens, dtype):
    """The native forward of the operands cast to `dtype`, outputs NaN-poisoned first."""
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    T, B = xproj.shape[0], xproj.shape[1]
    D, P, H = len(w_hh), w_hh[0].shape[1], w_hh[0].shape[0] // GATES[cell]
    out = torch.full((T, B, D * P), NAN, dtype=dtype)
    hn = torch.full((D, B, P), NAN, dtype=dtype)
    cn = torch.full((D, B, H), NAN, dtype=dtype) if cell == "lstm" else None
    _backend.forward_layer(cell, cast(xproj), [cast(w) for w in w_hh], [cast(b) for b in b_hh],
                           [cast(w) for w in w_hr], cast(h0), cast(c0), out, hn, cn,
                           None, None, None, lens)
    return out, hn, cn


CASES = [
    # cell, T, B, H, P, D, lengths, states
    ("lstm", 7, 1, 37, 37, 1, False, False),     # B=1, short: W_hh read in place
    ("lstm", 40, 1, 33, 33, 2, False, True),     # B=1, long: W_hh packed
    ("lstm", 5, 3, 20, 20, 2, True, True),
    ("lstm", 6, 2, 40, 17, 1, False, True),      # projection, read in place
    ("lstm", 6, 20, 40, 17, 2, True, False),     # projection, packed
    ("lstm", 4, 70, 33, 33, 1, False, True),     # enough rows for row groups on two threads
    ("lstm", 1, 5, 9, 9, 1, False, True),
    ("gru", 7, 1, 37, 37, 1, False, True),
    ("gru", 5, 3, 20, 20, 2, True, False),
    ("gru", 4, 70, 33, 33, 1, False, True),
    ("rnn_tanh", 7, 1, 37, 37, 2, False, True),
    ("rnn_relu", 5, 30, 21, 21, 1, True, True),
]


def _case_id(case):
    cell, T, B, H, P, D, lengths, states = case
    parts = [cell, f"T{T}", f"B{B}", f"H{H}"] + ([f"P{P}"] if P != H else [])
    parts += (["bidir"] if D == 2 else []) + (["len"] if lengths else []) + (["hx"] if states else [])
    return "-".join(parts)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_bfloat16_forward_is_the_float_kernel_rounded(case, isa, monkeypatch):
    monkeypatch.setenv("FUSEDRNN_CPU_ISA", isa)  # lowered to what the machine has
    cell, T, B, H, P, D, lengths, states = case
    for batch_first in (False, True):
        operands = _layer(cell, T, B, H, P, D, lengths, states, torch.bfloat16, seed=T * B + H,
                          batch_first=batch_first)
        ours = _forward(cell, *operands, torch.bfloat16)
        wide = _forward(cell, *operands, torch.float32)  # the same values, widened exactly
        for name, got, want in zip(("out", "hn", "cn"), ours, wide):
            if want is None:
                continue
            assert got.dtype == torch.bfloat16
            assert not torch.isnan(got).any(), f"{name}: unwritten elements"
            assert torch.equal(got, want.to(torch.bfloat16)), f"{name} differs"


def test_bfloat16_stores_round_like_torch():
    """Ties to even, overflow to infinity, NaN kept: an Elman tanh layer with W_hh = 0 writes
    tanh(xproj + b_hh) rounded, and a ReLU layer writes xproj + b_hh rounded (exact sums in
    float of two bfloat16 values, so every rounding case is reachable)."""
    big = 3.3e38
    x = torch.tensor([1.0, 1.0, 1.0, -1.0, big, -big, 2.0 ** -130, 0.0, 5.0, 7.0, NAN, 1.5])
    b = torch.tensor([2.0 ** -8, 3 * 2.0 ** -8, 2.0 ** -9, -2.0 ** -8, big, -big, 0.0, -0.0,
                      2.0 ** -6, 2.0 ** -5, 0.0, 2.0 ** -8]).bfloat16()
    x = x.bfloat16()
    H = x.numel()
    for cell, fn in (("rnn_relu", torch.relu), ("rnn_tanh", torch.tanh)):
        xproj = x.view(1, 1, H)
        w_hh = [torch.zeros(H, H, dtype=torch.bfloat16)]
        out, hn, _ = _forward(cell, xproj, w_hh, [b], [None], None, None, None, torch.bfloat16)
        expected = fn(x.float() + b.float()).bfloat16()
        assert torch.equal(out.view(-1).isnan(), expected.isnan())
        keep = ~expected.isnan()
        assert torch.equal(out.view(-1)[keep], expected[keep]), cell
        assert torch.equal(hn.view(-1)[keep], expected[keep])


def test_cpu_backward_refuses_bfloat16():
    w = torch.randn(2, 2).bfloat16()
    out = torch.randn(3, 2, 2).bfloat16()
    with pytest.raises(ValueError, match=r"dtype must be 0 \(float32\), 1 \(float64\) here, got 3"):
        _backend.backward_layer("rnn_tanh", [w], [None], [None], None, None, out, None, None,
                                out, None, None, torch.empty(3, 2, 2).bfloat16(), None, None,
                                torch.empty(1, 2, 2).bfloat16(), None, None)


def test_cpu_forward_refuses_float16():
    operands = _layer("gru", 3, 2, 5, 5, 1, False, False, torch.float16, seed=1)
    with pytest.raises(ValueError, match=r"dtype must be 0 \(float32\), 1 \(float64\), "
                                         r"3 \(bfloat16\) here, got 2"):
        _forward("gru", *operands, torch.float16)


# --- modules ------------------------------------------------------------------------------------

MODULE_CASES = [
    ("LSTM", dict(num_layers=2, bidirectional=True), 9, 3),
    ("LSTM", dict(proj_size=5, batch_first=True), 9, 3),
    ("LSTM", dict(), 60, 1),
    ("GRU", dict(num_layers=2), 9, 40),
    ("RNN", dict(nonlinearity="relu", bidirectional=True), 9, 3),
    ("GRU", dict(), 1, 2),
    ("LSTM", dict(num_layers=2, bidirectional=True), 9, "packed"),
]
MODULE_IDS = ["lstm-L2-bidir", "lstm-proj-bf", "lstm-B1-T60", "gru-L2-B40", "rnn-relu-bidir",
              "gru-T1", "lstm-L2-bidir-packed"]


@pytest.mark.parametrize("name, kwargs, T, B", MODULE_CASES, ids=MODULE_IDS)
def test_bfloat16_inference_runs_native_within_torch_error(name, kwargs, T, B, monkeypatch):
    torch.manual_seed(0)
    exact = getattr(torch.nn, name)(6, 12, **kwargs).double()
    theirs = getattr(torch.nn, name)(6, 12, **kwargs).bfloat16()
    ours = getattr(fusedrnn, name)(6, 12, **kwargs).bfloat16()
    theirs.load_state_dict(exact.state_dict())
    ours.load_state_dict(exact.state_dict())
    exact.load_state_dict(ours.state_dict())  # the bfloat16 weights, exactly, in float64
    batch_first = kwargs.get("batch_first", False)
    calls = []
    if B == "packed":  # through functional.rnn, whose layers call forward_layer
        lengths = torch.tensor([9, 4, 7, 1])
        x = torch.nn.utils.rnn.pack_padded_sequence(torch.randn(T, 4, 6).bfloat16(), lengths,
                                                    enforce_sorted=False)
        entry = "forward_layer"
    else:
        x = torch.randn((B, T, 6) if batch_first else (T, B, 6)).bfloat16()
        entry = "forward_prepared"  # the modules' inference plan
    native = getattr(_backend, entry)
    monkeypatch.setattr(_backend, entry, lambda prep, xproj, *a: (
        calls.append((xproj[0] if isinstance(xproj, list) else xproj).dtype),
        native(prep, xproj, *a))[1])
    with torch.no_grad():
        out, state = ours(x)
        ref, ref_state = exact(_to(x, torch.float64))
        torch_out, torch_state = theirs(x)
    assert calls and set(calls) == {torch.bfloat16}, "the native forward ran on bfloat16 tensors"
    if B == "packed":
        out, ref, torch_out = (torch.nn.utils.rnn.pad_packed_sequence(o)[0]
                               for o in (out, ref, torch_out))
    assert out.dtype == torch.bfloat16
    states = state if isinstance(state, tuple) else (state,)
    ref_states = ref_state if isinstance(ref_state, tuple) else (ref_state,)
    torch_states = torch_state if isinstance(torch_state, tuple) else (torch_state,)
    for got, want, theirs_ in zip((out, *states), (ref, *ref_states), (torch_out, *torch_states)):
        assert got.dtype == torch.bfloat16
        assert rel_err(got, want) <= max(2 * rel_err(theirs_, want), 1e-3)


def _to(x, dtype):
    if isinstance(x, torch.nn.utils.rnn.PackedSequence):
        return x._replace(data=x.data.to(dtype))
    return x.to(dtype)


def test_bfloat16_with_gradients_still_upcasts(monkeypatch):
    """A call that may need gradients runs in float32: the CPU backward takes no bfloat16."""
    torch.manual_seed(0)
    ours = fusedrnn.GRU(4, 6).bfloat16()
    seen = []
    forward = _backend.forward_layer
    monkeypatch.setattr(_backend, "forward_layer",
                        lambda cell, xproj, *a: (seen.append(xproj.dtype),
                                                 forward(cell, xproj, *a))[1])
    out, _ = ours(torch.randn(5, 2, 4).bfloat16())
    out.float().sum().backward()
    assert seen == [torch.float32] and out.dtype == torch.bfloat16
    assert ours.weight_hh_l0.grad.dtype == torch.bfloat16
