"""The CPU cell step (python/fusedrnn/_cell_step.py, csrc/cpu/cell_step_impl.h): torch's GEMMs
around one native pointwise pass, which LSTMCell/GRUCell/RNNCell run on float32/float64 CPU
tensors.

Kernel level: the native forward and backward passes on NaN-poisoned outputs against the
reference cells (forward) and torch autograd through the reference (backward), with odd hidden
sizes (SIMD tails), with and without biases and states, on one thread and split over threads.
Path level: every output and gradient equal to the sequence-of-one path that CUDA and the
emulator take, and the fallbacks that keep other cases on that path.
"""
from __future__ import annotations

import zlib

import pytest
import torch

import fusedrnn
from fusedrnn import _backend, _cell_step, functional, reference
from fusedrnn._backend import CELL_CODES, DTYPE_CODES, GATE_COUNT, SAVED_GATE_COUNT

from _helpers import TOLERANCE, assert_close, assert_second_derivatives_match, requires_native

pytestmark = requires_native


def _seed(*case) -> int:
    """A seed fixed by the case, the same in every process (hash() of a string is not)."""
    return zlib.crc32(repr(case).encode())


CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")


@pytest.fixture(autouse=True)
def _cpu_backend(monkeypatch):
    """The cell step is the _cpu backend's: these tests pin it, so that they test it also when
    the whole suite runs with FUSEDRNN_BACKEND=emu (where modules take the emulated recurrence
    instead, which the rest of the suite covers). A test may still switch to emu itself."""
    monkeypatch.setenv(_backend.BACKEND_VARIABLE, "cpu")


def _nan(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def _ptr(t):
    return t.data_ptr() if t is not None else 0


def _operands(cell, B, I, H, dtype, bias, gen):
    G = GATE_COUNT[cell]

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    x, h, c = rand(B, I), rand(B, H), rand(B, H)
    w_ih, w_hh = rand(G * H, I) * 0.5, rand(G * H, H) * 0.5
    b_ih, b_hh = (rand(G * H), rand(G * H)) if bias else (None, None)
    return x, h, c, w_ih, w_hh, b_ih, b_hh


def _expected_cell(cell, x, h, c, w_ih, w_hh, b_ih, b_hh):
    args = [t.double() if t is not None else None for t in (x, h, c, w_ih, w_hh, b_ih, b_hh)]
    x, h, c, w_ih, w_hh, b_ih, b_hh = args
    if cell == "lstm":
        return reference.lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh)
    if cell == "gru":
        return reference.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh)
    return reference.rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh, cell[4:])


def _native_forward(cell, x, h, c, w_ih, w_hh, b_ih, b_hh, *, products, threads=1,
                    peephole=None):
    """The native pass on NaN-poisoned outputs; returns (h', c' or None, gates or None).
    products: "summed" (LSTM/RNN: x W_ih^T + h W_hh^T in xpre, as _cell_step passes them with
    torch's GEMMs), "split" (xpre and hpre), "native" (the pass forms them from x, W_ih, W_hh
    and h), "native-zero-state" (no h: no recurrent term)."""
    B, H = x.size(0), w_hh.size(1)
    dtype = x.dtype
    xpre, hpre = x @ w_ih.t(), h @ w_hh.t()
    if products == "summed":
        xpre, hpre = xpre + hpre, None
    native = products.startswith("native")
    if native:
        xpre = hpre = None
        if products == "native-zero-state":
            h = torch.zeros_like(h) if cell == "gru" else None
    lstm = cell in _backend.LSTM_CELLS
    h_next = _nan(B, H, dtype=dtype)
    c_next = _nan(B, H, dtype=dtype) if lstm else None
    gates = _nan(B, SAVED_GATE_COUNT[cell] * H, dtype=dtype) if SAVED_GATE_COUNT[cell] else None
    saved_state = _nan(B, H, dtype=dtype) if cell != "gru" else None
    _backend._cpu.cell_step_forward(
        CELL_CODES[cell], DTYPE_CODES[dtype], B, H, _ptr(xpre), _ptr(hpre), _ptr(b_ih),
        _ptr(b_hh), _ptr(h if cell == "gru" or native else None),
        _ptr(c if lstm else None), h_next.data_ptr(), _ptr(c_next), _ptr(gates),
        _ptr(saved_state), threads,
        *((x.data_ptr(), w_ih.data_ptr(), w_hh.data_ptr(), x.size(1), H) if native else (0,) * 5),
        _ptr(peephole))
    # The private copy the backward reads: c' (LSTM) or h' (RNN), bit for bit.
    if saved_state is not None:
        assert torch.equal(saved_state, c_next if lstm else h_next)
    return h_next, c_next, gates


SHAPES = [(1, 3, 5), (3, 4, 37), (2, 7, 16)]
# B * H = 16900: two threads of the native pass (each takes at least 8192 (row, unit) pairs).
WIDE = (130, 3, 130)


# The LSTM variants of the pass: (cell, with peephole weights).
VARIANTS = [("lstm", True), ("lstm_cifg", False), ("lstm_cifg", True)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape", [(1, 3, 5), (3, 4, 37), WIDE],
                         ids=lambda s: "B{}-I{}-H{}".format(*s))
@pytest.mark.parametrize("cell, peephole", VARIANTS, ids=["peephole", "cifg", "peephole-cifg"])
def test_native_variant_step_matches_reference(cell, peephole, shape, dtype):
    """The peephole and CIFG updates of the pass, NaN-poisoned: h', c' and the saved gates' use
    in every products mode against reference.lstm_cell, and the backward's d_pre and d_c_prev
    against autograd through it (on the pre-activations: W_ih = I, no recurrent term)."""
    tol = 1e-12 if dtype == torch.float64 else TOLERANCE[dtype]
    coupled = cell == "lstm_cifg"
    gen = torch.Generator().manual_seed(_seed(cell, peephole, shape))
    B, I, H = shape
    G = GATE_COUNT[cell]
    x, h, c, w_ih, w_hh, b_ih, b_hh = _operands(cell, B, I, H, dtype, True, gen)
    w_c = (torch.randn(2 if coupled else 3, H, generator=gen, dtype=torch.float64).to(dtype)
           if peephole else None)
    wide = [t.double() if t is not None else None for t in (x, h, c, w_ih, w_hh, b_ih, b_hh, w_c)]
    want = reference.lstm_cell(*wide[:7], None, wide[7], coupled)
    for products in ("summed", "split", "native"):
        h_next, c_next, gates = _native_forward(cell, x, h, c, w_ih, w_hh, b_ih, b_hh,
                                                products=products, threads=2, peephole=w_c)
        assert_close(h_next, want[0], tol, f"h' (products: {products})")
        assert_close(c_next, want[1], tol, f"c' (products: {products})")

    pre = (wide[0] @ wide[3].t() + wide[5] + wide[1] @ wide[4].t() + wide[6]).requires_grad_()
    c_leaf = wide[2].clone().requires_grad_()
    eye, no_h = torch.eye(G * H, dtype=torch.float64), torch.zeros(B, H, dtype=torch.float64)
    outs = reference.lstm_cell(pre, no_h, c_leaf, eye, torch.zeros(G * H, H, dtype=torch.float64),
                               None, None, None, wide[7], coupled)
    d_outs = [torch.randn(B, H, generator=gen, dtype=torch.float64).to(dtype) for _ in outs]
    grads = torch.autograd.grad(outs, [pre, c_leaf], [d.double() for d in d_outs])
    d_xpre, d_c_prev = _nan(B, G * H, dtype=dtype), _nan(B, H, dtype=dtype)
    _backend._cpu.cell_step_backward(
        CELL_CODES[cell], DTYPE_CODES[dtype], B, H, _ptr(gates), _ptr(c_next), _ptr(c), 0, 0,
        d_outs[0].data_ptr(), d_outs[1].data_ptr(), d_xpre.data_ptr(), 0, d_c_prev.data_ptr(),
        0, 2, _ptr(w_c))
    assert_close(d_xpre, grads[0], tol, "d_pre")
    assert_close(d_c_prev, grads[1], tol, "d_c_prev")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES + [WIDE], ids=lambda s: "B{}-I{}-H{}".format(*s))
@pytest.mark.parametrize("cell", CELLS)
def test_native_forward_matches_reference(cell, shape, bias, dtype):
    gen = torch.Generator().manual_seed(_seed(cell, shape, bias))
    B, I, H = shape
    ops = _operands(cell, B, I, H, dtype, bias, gen)
    expected = _expected_cell(cell, *ops)
    expected = expected if isinstance(expected, tuple) else (expected,)
    tol = TOLERANCE[dtype]
    for products in (["split", "native"] if cell == "gru" else ["summed", "split", "native"]):
        h_next, c_next, _ = _native_forward(cell, *ops, products=products, threads=2)
        assert_close(h_next, expected[0], tol, f"h' (products: {products})")
        if cell == "lstm":
            assert_close(c_next, expected[1], tol, f"c' (products: {products})")
    # Without a previous state the products mode has no recurrent term.
    x, h, c, w_ih, w_hh, b_ih, b_hh = ops
    h_next, c_next, _ = _native_forward(cell, *ops, products="native-zero-state", threads=2)
    zero = _expected_cell(cell, x, torch.zeros_like(h), c, w_ih, w_hh, b_ih, b_hh)
    zero = zero if isinstance(zero, tuple) else (zero,)
    assert_close(h_next, zero[0], tol, "h' (zero state)")


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512", "avx512bf16", "amx"], indirect=True)
def test_every_instruction_set(isa, monkeypatch):
    """FUSEDRNN_CPU_ISA lowers the run-time choice, so each compiled copy of the pass runs (SIMD
    widths 4/8/16 for float32: H=37 leaves a tail in each)."""
    for dtype in (torch.float64, torch.float32):
        for cell in CELLS:
            test_native_forward_matches_reference(cell, (3, 4, 37), True, dtype)
            test_native_backward_matches_autograd(cell, (3, 4, 37), dtype)
        for cell, peephole in VARIANTS:
            test_native_variant_step_matches_reference(cell, peephole, (3, 4, 37), dtype)


def test_native_forward_lstm_without_c_prev_is_zero_state():
    gen = torch.Generator().manual_seed(3)
    x, h, c, w_ih, w_hh, b_ih, b_hh = _operands("lstm", 3, 4, 21, torch.float64, True, gen)
    h_next, c_next, _ = _native_forward("lstm", x, h, None, w_ih, w_hh, b_ih, b_hh,
                                        products="summed")
    expected = reference.lstm_cell(x, h, torch.zeros_like(c), w_ih, w_hh, b_ih, b_hh)
    assert_close(h_next, expected[0], 1e-12, "h'")
    assert_close(c_next, expected[1], 1e-12, "c'")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape", [(1, 3, 5), (3, 4, 37), WIDE], ids=lambda s: "B{}-I{}-H{}".format(*s))
@pytest.mark.parametrize("cell", CELLS)
def test_native_backward_matches_autograd(cell, shape, dtype):
    """d_pre (and GRU's d_hpre, d_h direct; LSTM's d_c_prev) against autograd in float64 through
    the reference cell's formulas on the same pre-activations, outputs NaN-poisoned."""
    tol = 1e-12 if dtype == torch.float64 else TOLERANCE[dtype]
    gen = torch.Generator().manual_seed(11)
    B, I, H = shape
    G = GATE_COUNT[cell]
    x, h, c, w_ih, w_hh, b_ih, b_hh = _operands(cell, B, I, H, dtype, True, gen)
    x64, h64, c64, w_ih64, w_hh64, b_ih64, b_hh64 = (t.double() for t in (x, h, c, w_ih, w_hh, b_ih, b_hh))
    xpre = (x64 @ w_ih64.t() + b_ih64).requires_grad_()
    hpre = (h64 @ w_hh64.t() + b_hh64).requires_grad_()
    h_leaf, c_leaf = h64.clone().requires_grad_(), c64.clone().requires_grad_()
    # The cell formulas of reference.py, written on the pre-activations.
    if cell == "lstm":
        i, f, g, o = (xpre + hpre).chunk(4, 1)
        c_next = torch.sigmoid(f) * c_leaf + torch.sigmoid(i) * torch.tanh(g)
        outs = (torch.sigmoid(o) * torch.tanh(c_next), c_next)
    elif cell == "gru":
        xr, xz, xn = xpre.chunk(3, 1)
        hr, hz, hn = hpre.chunk(3, 1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        outs = ((1 - z) * n + z * h_leaf,)
    else:
        act = torch.relu if cell == "rnn_relu" else torch.tanh
        outs = (act(xpre + hpre),)
    d_outs = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(dtype).double()
              for o in outs]
    wrt = [xpre, hpre] + ([c_leaf] if cell == "lstm" else []) + ([h_leaf] if cell == "gru" else [])
    grads = torch.autograd.grad(outs, wrt, d_outs)

    # Forward natively to get the saved gates, then the native backward on poisoned buffers.
    h_next, c_next, gates = _native_forward(cell, x, h, c, w_ih, w_hh, b_ih, b_hh,
                                            products="native")
    d_xpre = _nan(B, G * H, dtype=dtype)
    d_hpre = _nan(B, G * H, dtype=dtype) if cell == "gru" else None
    d_c_prev = _nan(B, H, dtype=dtype) if cell == "lstm" else None
    d_h_prev = _nan(B, H, dtype=dtype) if cell == "gru" else None
    d_native = [d.to(dtype) for d in d_outs]
    _backend._cpu.cell_step_backward(
        CELL_CODES[cell], DTYPE_CODES[dtype], B, H, _ptr(gates),
        _ptr(c_next), _ptr(c if cell == "lstm" else None), _ptr(h if cell == "gru" else None),
        _ptr(h_next if cell.startswith("rnn") else None), d_native[0].data_ptr(),
        _ptr(d_native[1] if cell == "lstm" else None), d_xpre.data_ptr(), _ptr(d_hpre),
        _ptr(d_c_prev), _ptr(d_h_prev), 2, 0)
    assert_close(d_xpre, grads[0], tol, "d_xpre")
    if cell == "gru":
        assert_close(d_hpre, grads[1], tol, "d_hpre")
        assert_close(d_h_prev, grads[2], tol, "d_h_prev (direct part)")
    else:
        assert_close(d_xpre, grads[1], tol, "d_xpre equals d_hpre")
    if cell == "lstm":
        assert_close(d_c_prev, grads[2], tol, "d_c_prev")


@pytest.mark.parametrize("missing, cell, message", [
    ("xpre", "rnn_tanh", "xpre"), ("hpre", "gru", "hpre"), ("h_prev", "gru", "h_prev"),
    ("c", "lstm", "c must not be null")])
def test_native_forward_rejects_missing_pointers(missing, cell, message):
    H, B = 4, 2
    G = GATE_COUNT[cell]
    buf = {name: torch.zeros(B, G * H) for name in ("xpre", "hpre")}
    buf.update({name: torch.zeros(B, H) for name in ("h_prev", "h", "c")})
    ptrs = {k: (0 if k == missing else v.data_ptr()) for k, v in buf.items()}
    with pytest.raises(ValueError, match=message):
        _backend._cpu.cell_step_forward(CELL_CODES[cell], DTYPE_CODES[torch.float32], B, H,
                                        ptrs["xpre"], ptrs["hpre"], 0, 0, ptrs["h_prev"], 0,
                                        ptrs["h"], ptrs["c"], 0, 0, 1, 0, 0, 0, 0, 0, 0)


def test_native_rejects_bad_shape_and_dtype():
    t = torch.zeros(8)
    with pytest.raises(ValueError, match="batch and hidden"):
        _backend._cpu.cell_step_forward(2, 0, 0, 4, t.data_ptr(), 0, 0, 0, 0, 0, t.data_ptr(), 0,
                                        0, 0, 1, 0, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="float32, float64 or bfloat16"):
        _backend._cpu.cell_step_forward(2, DTYPE_CODES[torch.float16], 1, 4, t.data_ptr(), 0, 0,
                                        0, 0, 0, t.data_ptr(), 0, 0, 0, 1, 0, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="cell code"):
        _backend._cpu.cell_step_forward(9, 0, 1, 4, t.data_ptr(), 0, 0, 0, 0, 0, t.data_ptr(), 0,
                                        0, 0, 1, 0, 0, 0, 0, 0, 0)


# ------------------------------------------------------------------------------ the path
def _sequence_of_one(cell, x, hx, w_ih, w_hh, b_ih, b_hh):
    """What CUDA and the emulator run for a cell: the native recurrence over T=1 (forced: on the
    CPU functional.rnn would send T=1 to the cell step itself)."""
    if hx is not None:
        hx = tuple(s.unsqueeze(0) for s in hx) if cell == "lstm" else hx.unsqueeze(0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(functional, "_one_step_applies", lambda *args: False)
        _, h_n, c_n = functional.rnn(cell, x.unsqueeze(0), [(w_ih, w_hh, b_ih, b_hh, None)], hx)
    return (h_n[0], c_n[0]) if cell == "lstm" else h_n[0]


@pytest.mark.parametrize("with_state", [True, False], ids=["hx", "no-hx"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("cell", CELLS)
def test_cell_step_equals_sequence_of_one(cell, bias, with_state):
    """Outputs and every gradient (input, states, weights, biases) equal the recurrence path's."""
    gen = torch.Generator().manual_seed(5)
    x, h, c, w_ih, w_hh, b_ih, b_hh = _operands(cell, 3, 4, 19, torch.float64, bias, gen)
    leaves = [t.requires_grad_() for t in (x, h, c, w_ih, w_hh, b_ih, b_hh) if t is not None]
    hx = ((h, c) if cell == "lstm" else h) if with_state else None
    assert _cell_step.applies(x)
    assert _cell_step.operand_problem(cell, x.dtype, 3, 4, h, c if cell == "lstm" else None,
                                      w_ih, w_hh, b_ih, b_hh) is None
    runs = []
    for run in (lambda: functional.cell_step(cell, x, w_ih, w_hh, b_ih, b_hh, hx),
                lambda: _sequence_of_one(cell, x, hx, w_ih, w_hh, b_ih, b_hh)):
        out = run()
        out = out if isinstance(out, tuple) else (out,)
        loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum()
                   for o in out)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        runs.append((out, grads))
    (out_a, grads_a), (out_b, grads_b) = runs
    for a, b in zip(out_a, out_b):
        assert_close(a, b, 1e-12, "output")
    for leaf_index, (a, b) in enumerate(zip(grads_a, grads_b)):
        if b is None:
            assert a is None or not a.any(), f"gradient {leaf_index}: expected none"
            continue
        assert_close(a, b, 1e-12, f"gradient {leaf_index}")


def test_cell_step_inference_saves_nothing_and_matches():
    cell = fusedrnn.GRUCell(5, 9, dtype=torch.float64)
    x, h = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
    with torch.no_grad():
        got = cell(x, h)
    assert got.grad_fn is None
    expected = reference.gru_cell(x, h, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    assert_close(got, expected, 1e-12, "h'")


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cell_step_double_backward_matches_torch(name):
    torch.manual_seed(0)
    theirs = getattr(torch.nn, name)(3, 4, dtype=torch.float64)
    ours = getattr(fusedrnn, name)(3, 4, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, dtype=torch.float64)

    def run(cell, x):
        out = cell(x)
        return out[0] + out[1] if name == "LSTMCell" else out

    assert_second_derivatives_match(run, theirs, ours, x)


def test_cell_step_fallbacks(monkeypatch):
    """float16, 1-D inputs, empty batches and a non-CPU backend keep the other path; operands
    of another dtype are a problem (the checked path then reports it)."""
    x = torch.randn(2, 3)
    w_ih, w_hh = torch.randn(4, 3), torch.randn(4, 4)
    assert _cell_step.applies(x) and _cell_step.applies(x.bfloat16())
    assert not _cell_step.applies(x.half())
    assert not _cell_step.applies(x[0])
    assert not _cell_step.applies(x[:0])
    ok = _cell_step.operand_problem("rnn_tanh", x.dtype, 2, 3, None, None, w_ih, w_hh, None, None)
    assert ok is None
    problem = _cell_step.operand_problem("rnn_tanh", x.dtype, 2, 3, None, None, w_ih,
                                         w_hh.double(), None, None)
    assert "float64" in problem
    monkeypatch.setenv(_backend.BACKEND_VARIABLE, "emu")
    assert not _cell_step.applies(x)


@pytest.mark.parametrize("kind, kwargs", [("LSTM", dict(proj_size=2, bidirectional=True)),
                                          ("GRU", dict(num_layers=2, bidirectional=True))],
                         ids=["lstm-proj-bidir", "gru-2l-bidir"])
def test_gradcheck_one_step_layers(kind, kwargs):
    """A module called with T=1 runs each layer as cell steps (_cell_step.layer): gradcheck
    through inputs, states and every parameter."""
    from torch.func import functional_call
    torch.manual_seed(0)
    module = getattr(fusedrnn, kind)(3, 4, dtype=torch.float64, **kwargs)
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    num_states = module.num_layers * 2
    state = module.proj_size or module.hidden_size
    x = torch.randn(1, 2, 3, dtype=torch.float64, requires_grad=True)
    states = [torch.randn(num_states, 2, state, dtype=torch.float64, requires_grad=True)]
    if kind == "LSTM":
        states.append(torch.randn(num_states, 2, 4, dtype=torch.float64, requires_grad=True))

    def run(x, *tensors):
        hx = tuple(tensors[:2]) if kind == "LSTM" else tensors[0]
        params = tensors[len(states):]
        out, final = functional_call(module, dict(zip(names, params)), (x, hx))
        return (out, *final) if kind == "LSTM" else (out, final)

    assert torch.autograd.gradcheck(run, (x, *states, *params), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_non_contiguous_states_and_biases(cell):
    """States, biases and upstream gradients that are strided views: the pass reads contiguous
    copies, which must stay alive through the native call (a freed temporary would be read)."""
    gen = torch.Generator().manual_seed(8)
    x, h, c, w_ih, w_hh, b_ih, b_hh = _operands(cell, 3, 4, 23, torch.float64, True, gen)
    h_view = torch.randn(23, 3, dtype=torch.float64, generator=gen).t()
    c_view = torch.randn(23, 3, dtype=torch.float64, generator=gen).t()
    b_ih_view = torch.randn(2 * b_ih.numel(), dtype=torch.float64, generator=gen)[::2]
    b_hh_view = torch.randn(2 * b_hh.numel(), dtype=torch.float64, generator=gen)[::2]
    tensors = [t.requires_grad_() for t in (x, h_view, c_view, w_ih, w_hh, b_ih_view, b_hh_view)]
    hx = (tensors[1], tensors[2]) if cell == "lstm" else tensors[1]
    args = (x, w_ih, w_hh, tensors[5], tensors[6], hx)
    got = functional.cell_step(cell, *args)
    expected = _sequence_of_one(cell, x, hx, w_ih, w_hh, tensors[5], tensors[6])
    got = got if isinstance(got, tuple) else (got,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    leaves = [t for i, t in enumerate(tensors) if i != 2 or cell == "lstm"]
    upstream = [torch.randn(o.shape, dtype=o.dtype, generator=gen) for o in got]
    # The same values stored column-major: a strided upstream gradient.
    upstream = [u.t().contiguous().t() for u in upstream]
    for a, b in zip(got, expected):
        assert_close(a, b, 1e-12, "output")
    grads_got = torch.autograd.grad(got, leaves, upstream)
    grads_expected = torch.autograd.grad(expected, leaves, upstream)
    for i, (a, b) in enumerate(zip(grads_got, grads_expected)):
        assert_close(a, b, 1e-12, f"gradient {i}")


@pytest.mark.parametrize("batch", [1, 5], ids=["B1-native-products", "B5-torch-gemms"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cells_match_torch_at_odd_width(name, dtype, batch):
    """H=37, I=19: full SIMD vectors and a tail in every ISA; outputs and every gradient of a
    three-step loop against torch.nn's cell (float32 within the fp32 tolerance), with the
    products formed natively (B=1) and by torch's GEMMs (B=5)."""
    torch.manual_seed(2)
    theirs = getattr(torch.nn, name)(19, 37, dtype=dtype)
    ours = getattr(fusedrnn, name)(19, 37, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, batch, 19, dtype=dtype)
    runs = []
    for module in (theirs, ours):
        xs = x.clone().requires_grad_()
        state, outs = None, []
        for t in range(3):
            state = module(xs[t], state)
            outs.append(state[0] if name == "LSTMCell" else state)
        loss = sum((o * (k + 1)).sum() for k, o in enumerate(outs))
        loss.backward()
        runs.append([*outs, xs.grad, *(p.grad for p in module.parameters())])
    for i, (a, b) in enumerate(zip(*runs)):
        assert_close(b, a, TOLERANCE[dtype] * 5, f"result {i}")


@pytest.mark.parametrize("with_state", [True, False], ids=["hx", "no-hx"])
@pytest.mark.parametrize("kind, kwargs", [
    ("LSTM", {}), ("LSTM", dict(proj_size=2, num_layers=2, bidirectional=True)),
    ("GRU", dict(batch_first=True)), ("RNN", dict(nonlinearity="relu", num_layers=2))],
    ids=["lstm", "lstm-proj-2l-bidir", "gru-bf", "relu-2l"])
def test_one_step_training_matches_torch(kind, kwargs, with_state):
    """With a gradient, a call of one step goes straight to the cell steps (the modules' fast
    path): outputs and every gradient (input, states, parameters) as torch.nn's, in float64."""
    torch.manual_seed(0)
    theirs = getattr(torch.nn, kind)(3, 4, dtype=torch.float64, **kwargs)
    ours = getattr(fusedrnn, kind)(3, 4, dtype=torch.float64, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    num_states = ours.num_layers * (2 if ours.bidirectional else 1)
    x = torch.randn(*((2, 1) if ours.batch_first else (1, 2)), 3, dtype=torch.float64)
    states = []
    if with_state:
        states.append(torch.randn(num_states, 2, ours.proj_size or 4, dtype=torch.float64))
        if kind == "LSTM":
            states.append(torch.randn(num_states, 2, 4, dtype=torch.float64))
    results = []
    for module in (theirs, ours):
        inputs = [t.clone().requires_grad_() for t in (x, *states)]
        hx = (tuple(inputs[1:]) if kind == "LSTM" else inputs[1]) if with_state else None
        if module is ours:
            assert module._fast_forward(inputs[0], hx) is not None  # the path under test
        out, final = module(inputs[0], hx)
        outputs = [out, *(final if kind == "LSTM" else (final,))]
        sum(o.pow(2).sum() * (i + 1) for i, o in enumerate(outputs)).backward()
        results.append(outputs + [t.grad for t in inputs] + [p.grad for p in module.parameters()])
    for expected, actual in zip(*results):
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)


def test_one_step_output_and_h_n_do_not_share_memory():
    """torch.nn's output and h_n are separate tensors: a stream may change one in place."""
    for module in (fusedrnn.LSTM(3, 4), fusedrnn.GRU(3, 4), fusedrnn.RNN(3, 4)):
        x = torch.randn(1, 2, 3)
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                out, state = module(x)
            h_n = state[0] if isinstance(state, tuple) else state
            assert out.data_ptr() != h_n.data_ptr()
            before = h_n.clone()
            out.detach().mul_(2)
            assert torch.equal(h_n, before)


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "LSTM", "GRU", "RNN"])
def test_returned_tensors_may_change_in_place_before_backward(name):
    """Nothing returned is a saved tensor: an in-place reset of the state (c[done] = 0), or of a
    layer's output, before backward works as with torch.nn."""
    torch.manual_seed(3)
    ours = getattr(fusedrnn, name)(3, 4, dtype=torch.float64)
    theirs = getattr(torch.nn, name)(3, 4, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    is_cell = name.endswith("Cell")
    x = torch.randn(2, 3, dtype=torch.float64) if is_cell else torch.randn(1, 2, 3, dtype=torch.float64)
    grads = []
    for module in (theirs, ours):
        out = module(x)
        tensors = list(out) if isinstance(out, tuple) else [out]
        if not is_cell:  # (output, h_n) or (output, (h_n, c_n))
            tensors = [tensors[0], *(tensors[1] if isinstance(tensors[1], tuple) else [tensors[1]])]
        for t in tensors:
            t.mul_(0.5)
        sum(t.sum() for t in tensors).backward()
        grads.append([p.grad for p in module.parameters()])
    for a, b in zip(*grads):
        assert_close(b, a, 1e-12, "parameter gradient")


@pytest.mark.parametrize("args", [dict(b_hh=torch.randn(19)), dict(w_ih=torch.randn(16, 5)),
                                  dict(w_hh=torch.randn(24, 5))], ids=["b_hh", "w_ih", "w_hh"])
def test_one_step_bad_shapes_get_the_checked_errors(args):
    """functional.rnn at T=1 reports a bad weight shape exactly as at T=2 (it falls back to the
    checked recurrence path instead of handing the shape to the native pass); so does
    functional.cell_step, and a bad state shape too."""
    H, I, B = 8, 5, 2
    weights = dict(w_ih=torch.randn(3 * H, I), w_hh=torch.randn(3 * H, H), b_ih=torch.randn(3 * H),
                   b_hh=torch.randn(3 * H))
    weights.update(args)
    layer = [(weights["w_ih"], weights["w_hh"], weights["b_ih"], weights["b_hh"], None)]
    errors = []
    for seq_len in (2, 1):
        with pytest.raises(RuntimeError) as error:
            functional.rnn("gru", torch.randn(seq_len, B, I), layer)
        errors.append(str(error.value).replace("[4, ", "[2, "))  # (T*B rows in one message)
    assert errors[0] == errors[1]
    with pytest.raises(RuntimeError):
        functional.cell_step("gru", torch.randn(B, I), *layer[0][:4], torch.randn(B, H))


def test_cell_step_bad_state_shape_is_an_error():
    with pytest.raises(RuntimeError, match="c0|hidden"):
        functional.cell_step("lstm", torch.randn(2, 5), torch.randn(32, 5), torch.randn(32, 8),
                             None, None, (torch.randn(2, 8), torch.randn(2, 3)))


def test_cell_with_a_recurrent_weight_of_another_width_is_refused():
    """LSTMCell's W_hh must be [4H, H]: a [4H, P] one is an error, as in torch.nn (a projected
    layer's step accepts it only through _cell_step.layer, whose caller checks W_hr)."""
    for lib in (torch.nn, fusedrnn):
        cell = lib.LSTMCell(8, 16)
        cell.weight_hh = torch.nn.Parameter(torch.randn(64, 5))
        with pytest.raises(RuntimeError,
                           match="weight_hh must have shape" if lib is fusedrnn else None):
            cell(torch.randn(1, 8))


@pytest.mark.parametrize("case, message", [
    ("mixed-modes", "must be null when xpre is given"),
    ("h-prev-without-w-hh", "w_hh must not be null"),
    ("gru-state", "state must equal hidden"),
    ("input-size", "input_size"),
    ("gru-peephole", "peephole must be null"),
])
def test_native_rejects_inconsistent_product_arguments(case, message):
    """The products mode's arguments: never both modes at once (a product counted twice), a
    previous state needs its weights, a GRU's state is H wide, sizes >= 1, peepholes are an
    LSTM's."""
    H, B, I = 4, 1, 3
    buf = torch.zeros(64)
    p = buf.data_ptr()
    cell = CELL_CODES["gru" if case in ("gru-state", "gru-peephole") else "lstm"]
    # Positional: cell, dtype, B, H, xpre, hpre, b_ih, b_hh, h_prev, c_prev, h, c, gates,
    # saved_state, threads, x, w_ih, w_hh, input_size, state, peephole.
    args = {
        "mixed-modes": (p, 0, 0, 0, 0, 0, p, p, 0, 0, 1, p, p, 0, I, H, 0),
        "h-prev-without-w-hh": (0, 0, 0, 0, p, 0, p, p, 0, 0, 1, p, p, 0, I, H, 0),
        "gru-state": (0, 0, 0, 0, p, 0, p, p, 0, 0, 1, p, p, p, I, H + 1, 0),
        "input-size": (0, 0, 0, 0, 0, 0, p, p, 0, 0, 1, p, p, 0, 0, H, 0),
        "gru-peephole": (p, p, 0, 0, p, 0, p, 0, 0, 0, 1, 0, 0, 0, 0, 0, p),
    }[case]
    with pytest.raises(ValueError, match=message):
        _backend._cpu.cell_step_forward(cell, DTYPE_CODES[torch.float32], B, H, *args)


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell", "LSTM"])
@pytest.mark.parametrize("name", ["bias_ih", "bias_hh", "weight_hh"])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_a_parameter_whose_storage_was_freed_is_refused(kind, name, grad):
    """A parameter whose storage was freed (resized to 0, as FSDP does to a sharded one) has
    address 0, which the native step read as an absent bias: the cell ran without it, where
    torch.nn's cells raise (review, session 29). The sequence module's one-step call takes the
    same step."""
    module = getattr(fusedrnn, kind)(4, 5)
    name = name if kind.endswith("Cell") else f"{name}_l0"
    with torch.no_grad():
        getattr(module, name).untyped_storage().resize_(0)
    x = torch.randn(*((2, 4) if kind.endswith("Cell") else (1, 2, 4)))
    with torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match="has no memory"):
        module(x)
