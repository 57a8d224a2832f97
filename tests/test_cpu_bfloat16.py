"""bfloat16 tensors on the CPU recurrence and cell step (csrc/cpu/storage.h): the kernels widen
every bfloat16 they read to float, round every float they write to the nearest bfloat16, and
compute in float in between. So a bfloat16 call must give exactly the float32 kernel's results on
the widened tensors, rounded: that is checked bit for bit, forward (inference and training) and
backward, per cell, instruction set, layout and feature, with every output poisoned with NaN
first. Then the modules and cells: bfloat16 inference and training on the CPU run the native
kernels (no upcast copies) with torch.nn's error bar (DESIGN.md: at most twice torch.nn's error
in the same precision, against float64). The AMX build's products round h and d_pre to bfloat16,
so they are not the float kernel rounded: test_cpu_amx.py checks them; the bit-for-bit tests here
run on the builds up to AVX-512.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import fusedrnn
from _helpers import rel_err, run_backward_layer, run_forward_layer
from fusedrnn import _backend, _cell_step

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
NAN = float("nan")

pytestmark = pytest.mark.skipif(
    _backend.backend_name() != "cpu", reason="bfloat16 tensors in the CPU kernels are a _cpu feature")


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


def _forward(cell, xproj, w_hh, b_hh, w_hr, h0, c0, lens, dtype, training=False):
    """The native forward of the operands cast to `dtype` (_helpers.run_forward_layer: outputs
    NaN-poisoned first)."""
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return run_forward_layer(cell, cast(xproj), [cast(w) for w in w_hh], [cast(b) for b in b_hh],
                             [cast(w) for w in w_hr], cast(h0), cast(c0), lens, training=training)


def _widened(run):
    """The same layer run with every tensor widened to float32 (exact), for the float kernel."""
    wide = lambda t: None if t is None or not t.is_floating_point() else t.float()  # noqa: E731
    per_direction = ("w_hh", "b_hh", "w_hr", "peephole")  # lists of tensors
    return dataclasses.replace(
        run, **{f.name: (wide(getattr(run, f.name)) if f.name not in per_direction
                         else [wide(t) for t in getattr(run, f.name)])
                for f in dataclasses.fields(run) if f.name not in ("cell", "lengths")})


def _assert_rounded(name, got, want, ulps=0):
    """got (bfloat16) is want (float32) rounded, NaN (an element the kernel leaves, such as a
    padded step's saved gates) where want has NaN; within `ulps` bfloat16 units in the last place
    where the product's summation order differs from the float kernel's."""
    if want is None:
        assert got is None
        return
    assert got.dtype == torch.bfloat16, name
    assert torch.equal(got.isnan(), want.isnan()), f"{name}: NaN where the float kernel has none"
    keep = ~want.isnan()
    got, rounded = got[keep], want.to(torch.bfloat16)[keep]
    if ulps == 0:
        assert torch.equal(got, rounded), f"{name} differs"
    else:
        apart = (got.view(torch.int16).int() - rounded.view(torch.int16).int()).abs()
        assert int(apart.max()) <= ulps, f"{name}: {int(apart.max())} bfloat16 ulps apart"


CASES = [
    # cell, T, B, H, P, D, lengths, states
    ("lstm", 7, 1, 37, 37, 1, False, False),     # B=1, short: W_hh read in place
    ("lstm", 40, 1, 33, 33, 2, False, True),     # B=1, long: W_hh packed
    ("lstm", 12, 1, 256, 256, 1, False, True),   # B=1, W_hh of 1 MB in float: read in place
    ("gru", 6, 2, 70, 70, 1, True, True),        # B=2, short: in place, both rows
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


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"], indirect=True)
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_bfloat16_layer_is_the_float_kernel_rounded(case, isa, monkeypatch):
    """Inference and training forward, then the backward of the training run, each against the
    float kernel on the same values widened. At B <= 2 the forward may read bfloat16 W_hh in
    place, as pairs of k (InPlaceDots::dots), which sums in another order than the float kernel:
    there its outputs may be 1 bfloat16 ulp apart; everywhere else they are equal."""
    cell, T, B, H, P, D, lengths, states = case
    for batch_first in (False, True):
        operands = _layer(cell, T, B, H, P, D, lengths, states, torch.bfloat16, seed=T * B + H,
                          batch_first=batch_first)
        for training in (False, True):
            ours = _forward(cell, *operands, torch.bfloat16, training)
            wide = _forward(cell, *operands, torch.float32, training)
            for name in ("out", "hn", "cn", "gates", "c_seq", "r_seq"):
                _assert_rounded(name, getattr(ours, name), getattr(wide, name),
                                ulps=1 if B <= 2 else 0)
            if lengths:  # padded output rows are zeros, the rest written
                assert not ours.out.isnan().any()
        g = torch.Generator().manual_seed(H)
        d_out = torch.randn(ours.out.shape, generator=g).bfloat16()
        d_hn = torch.randn(ours.hn.shape, generator=g).bfloat16()
        d_cn = torch.randn(ours.cn.shape, generator=g).bfloat16() if cell == "lstm" else None
        grads = run_backward_layer(ours, d_out, d_hn, d_cn)
        wide_grads = run_backward_layer(_widened(ours), d_out.float(), d_hn.float(),
                                        d_cn.float() if d_cn is not None else None)
        for field in dataclasses.fields(grads):
            _assert_rounded(field.name, getattr(grads, field.name),
                            getattr(wide_grads, field.name))
            if getattr(grads, field.name) is not None:
                assert not getattr(grads, field.name).isnan().any(), field.name


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
        run = _forward(cell, xproj, w_hh, [b], [None], None, None, None, torch.bfloat16)
        out, hn = run.out, run.hn
        expected = fn(x.float() + b.float()).bfloat16()
        assert torch.equal(out.view(-1).isnan(), expected.isnan())
        keep = ~expected.isnan()
        assert torch.equal(out.view(-1)[keep], expected[keep]), cell
        assert torch.equal(hn.view(-1)[keep], expected[keep])


def test_cpu_forward_refuses_float16():
    operands = _layer("gru", 3, 2, 5, 5, 1, False, False, torch.float16, seed=1)
    with pytest.raises(ValueError, match=r"dtype must be 0 \(float32\), 1 \(float64\), "
                                         r"3 \(bfloat16\) here, got 2"):
        _forward("gru", *operands, torch.float16)


# --- modules ------------------------------------------------------------------------------------

def _module_trio(name, kwargs):
    """(float64 torch.nn, bfloat16 torch.nn, bfloat16 fusedrnn) modules with the same weights:
    random bfloat16 values, held exactly by the float64 one."""
    torch.manual_seed(0)
    exact = getattr(torch.nn, name)(6, 12, **kwargs).double()
    theirs = getattr(torch.nn, name)(6, 12, **kwargs).bfloat16()
    ours = getattr(fusedrnn, name)(6, 12, **kwargs).bfloat16()
    theirs.load_state_dict(exact.state_dict())
    ours.load_state_dict(exact.state_dict())
    exact.load_state_dict(ours.state_dict())
    return exact, theirs, ours


def _record_dtypes(monkeypatch, *entries, module=_backend):
    """Wraps these entries of `module` so that each call records the dtype of the tensors it
    hands the kernel: its second argument (xproj, or W_hh for the backward, the first of a list;
    x for the cell step's _forward)."""
    seen = []
    for entry in entries:
        def recording(first, second, *rest, native=getattr(module, entry), **kwargs):
            seen.append((second[0] if isinstance(second, list) else second).dtype)
            return native(first, second, *rest, **kwargs)
        monkeypatch.setattr(module, entry, recording)
    return seen

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
    exact, theirs, ours = _module_trio(name, kwargs)
    batch_first = kwargs.get("batch_first", False)
    if B == "packed":  # through functional.rnn, whose layers call forward_layer
        lengths = torch.tensor([9, 4, 7, 1])
        x = torch.nn.utils.rnn.pack_padded_sequence(torch.randn(T, 4, 6).bfloat16(), lengths,
                                                    enforce_sorted=False)
        entry = "forward_layer"
    else:
        x = torch.randn((B, T, 6) if batch_first else (T, B, 6)).bfloat16()
        entry = "forward_prepared"  # the modules' inference plan
    # A call of one step runs as a cell step (_cell_step.layer), whose _forward gets x.
    calls = (_record_dtypes(monkeypatch, "_forward", module=_cell_step) if T == 1
             else _record_dtypes(monkeypatch, entry))
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


TRAINING_CASES = [
    ("LSTM", dict(num_layers=2, bidirectional=True), 9, 3),
    ("LSTM", dict(proj_size=5), 9, 3),
    ("LSTM", dict(), 9, 40),
    ("GRU", dict(bidirectional=True), 9, 3),
    ("RNN", dict(num_layers=2), 9, 3),
]


@pytest.mark.parametrize("name, kwargs, T, B", TRAINING_CASES,
                         ids=["lstm-L2-bidir", "lstm-proj", "lstm-B40", "gru-bidir", "rnn-L2"])
def test_bfloat16_training_runs_native_within_torch_error(name, kwargs, T, B, monkeypatch):
    """Forward and backward in bfloat16 on the native kernels: the output and every gradient
    (input, states, each parameter) within twice torch.nn's bfloat16 error against float64."""
    exact, theirs, ours = _module_trio(name, kwargs)
    x = torch.randn(T, B, 6).bfloat16()
    num_states = (2 if kwargs.get("bidirectional") else 1) * kwargs.get("num_layers", 1)
    h0 = torch.randn(num_states, B, kwargs.get("proj_size") or 12).bfloat16()
    c0 = torch.randn(num_states, B, 12).bfloat16()
    seen = _record_dtypes(monkeypatch, "forward_layer", "backward_layer")
    runs = []
    for module in (exact, ours, theirs):
        dtype = torch.float64 if module is exact else torch.bfloat16
        leaves = [t.to(dtype).clone().requires_grad_()  # each module its own leaves
                  for t in ((x, h0, c0) if name == "LSTM" else (x, h0))]
        hx = tuple(leaves[1:]) if name == "LSTM" else leaves[1]
        out, state = module(leaves[0], hx)
        weight = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)
        (out.double() * weight).sum().backward()
        runs.append([out.detach()] + [t.grad for t in leaves] +
                    [p.grad for p in module.parameters()])
    assert set(seen) == {torch.bfloat16} and len(seen) >= 2, "native bfloat16 forward and backward"
    reference, got, torch_got = runs
    for index, (want, mine, theirs_) in enumerate(zip(reference, got, torch_got)):
        assert mine.dtype == torch.bfloat16
        assert rel_err(mine, want) <= max(2 * rel_err(theirs_, want), 1e-2), index


# --- one cell step (csrc/cpu/cell_step_impl.h) ----------------------------------------------------

CELL_CASES = [("LSTMCell", {}, 1), ("LSTMCell", {}, 9), ("GRUCell", {}, 2), ("GRUCell", {}, 9),
              ("RNNCell", dict(nonlinearity="relu"), 1), ("RNNCell", dict(bias=False), 9)]


@pytest.mark.parametrize("name, kwargs, B", CELL_CASES,
                         ids=["lstm-B1", "lstm-B9", "gru-B2", "gru-B9", "rnn-relu-B1",
                              "rnn-nobias-B9"])
def test_bfloat16_cells_run_native_within_torch_error(name, kwargs, B, monkeypatch):
    """bfloat16 cells on the CPU take the cell step on bfloat16 tensors (B <= 2: the pass forms
    the products from bfloat16 weights in place; else after torch's bfloat16 GEMMs), inference
    and training: the output and every gradient within twice torch.nn's bfloat16 error."""
    exact, theirs, ours = _module_trio(name, kwargs)
    x, h0, c0 = (torch.randn(B, size).bfloat16() for size in (6, 12, 12))
    seen = _record_dtypes(monkeypatch, "_forward", module=_cell_step)
    with torch.no_grad():
        results = [m(x.to(dt), (h0.to(dt), c0.to(dt)) if name == "LSTMCell" else h0.to(dt))
                   for m, dt in ((exact, torch.float64), (ours, torch.bfloat16),
                                 (theirs, torch.bfloat16))]
    reference, got, torch_got = ([r] if torch.is_tensor(r) else list(r) for r in results)
    for want, mine, theirs_ in zip(reference, got, torch_got):
        assert mine.dtype == torch.bfloat16
        assert rel_err(mine, want) <= max(2 * rel_err(theirs_, want), 1e-3)
    runs = []
    for module in (exact, ours, theirs):
        dtype = torch.float64 if module is exact else torch.bfloat16
        leaves = [t.to(dtype).clone().requires_grad_() for t in (x, h0, c0)]
        out = module(leaves[0], tuple(leaves[1:]) if name == "LSTMCell" else leaves[1])
        outs = list(out) if isinstance(out, tuple) else [out]
        loss = sum((o.double() * torch.linspace(-1, 1, o.numel(), dtype=torch.float64)
                    .view_as(o)).sum() for o in outs)
        loss.backward()
        runs.append([t.grad for t in leaves[:2 if name != "LSTMCell" else 3]] +
                    [p.grad for p in module.parameters()])
    assert set(seen) == {torch.bfloat16} and len(seen) == 2, "the native pass, twice"
    reference, got, torch_got = runs
    for index, (want, mine, theirs_) in enumerate(zip(reference, got, torch_got)):
        assert mine.dtype == torch.bfloat16
        assert rel_err(mine, want) <= max(2 * rel_err(theirs_, want), 1e-2), index


def _cell_step_native_forward(cell, o, dtype, products):
    """The native pass of one cell step's forward on operands `o` cast to dtype, outputs
    NaN-poisoned first: {h, c, gates, saved}, None where the cell has none. products: the pass
    forms x W_ih^T and h W_hh^T itself (weights read in place); else it gets them formed (xpre,
    and hpre for a GRU), as after torch's GEMMs."""
    from fusedrnn._backend import CELL_CODES, DTYPE_CODES, SAVED_GATE_COUNT, _cpu
    o = {k: v.to(dtype) for k, v in o.items()}
    B, H = o["h_prev"].shape
    lstm, gru = cell == "lstm", cell == "gru"
    fwd = dict(h=_poisoned(dtype, B, H), c=_poisoned(dtype, B, H) if lstm else None,
               gates=_poisoned(dtype, B, SAVED_GATE_COUNT[cell] * H) if lstm or gru else None,
               saved=_poisoned(dtype, B, H) if not gru else None)
    _cpu.cell_step_forward(
        CELL_CODES[cell], DTYPE_CODES[dtype], B, H, _ptr(None if products else o["xpre"]),
        _ptr(o["hpre"] if gru and not products else None), _ptr(o["b_ih"]), _ptr(o["b_hh"]),
        _ptr(o["h_prev"]), _ptr(o["c_prev"] if lstm else None), _ptr(fwd["h"]), _ptr(fwd["c"]),
        _ptr(fwd["gates"]), _ptr(fwd["saved"]), 2,
        *((_ptr(o["x"]), _ptr(o["w_ih"]), _ptr(o["w_hh"]), o["x"].size(1), H) if products
          else (0, 0, 0, 0, 0)), 0)
    return fwd


def _cell_step_native_backward(cell, o, fwd, dtype):
    """The native pass of one cell step's backward from the forward's saved values `fwd` and
    the operands `o` (h_prev, c_prev, d_h, d_c), all cast to dtype: {d_xpre, d_hpre, d_c_prev,
    d_h_prev}, NaN-poisoned first, None where the cell has none."""
    from fusedrnn._backend import CELL_CODES, DTYPE_CODES, GATE_COUNT, _cpu
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    o, fwd = ({k: cast(v) for k, v in d.items()} for d in (o, fwd))
    B, H = o["h_prev"].shape
    lstm, gru = cell == "lstm", cell == "gru"
    bwd = dict(d_xpre=_poisoned(dtype, B, GATE_COUNT[cell] * H),
               d_hpre=_poisoned(dtype, B, GATE_COUNT[cell] * H) if gru else None,
               d_c_prev=_poisoned(dtype, B, H) if lstm else None,
               d_h_prev=_poisoned(dtype, B, H) if gru else None)
    _cpu.cell_step_backward(
        CELL_CODES[cell], DTYPE_CODES[dtype], B, H, _ptr(fwd["gates"]),
        _ptr(fwd["saved"] if lstm else None), _ptr(o["c_prev"] if lstm else None),
        _ptr(o["h_prev"]), _ptr(fwd["saved"] if not (lstm or gru) else None), _ptr(o["d_h"]),
        _ptr(o["d_c"] if lstm else None), _ptr(bwd["d_xpre"]), _ptr(bwd["d_hpre"]),
        _ptr(bwd["d_c_prev"]), _ptr(bwd["d_h_prev"]), 2, 0)
    return bwd


def _poisoned(dtype, *shape):
    return torch.full(shape, NAN, dtype=dtype)


def _ptr(t):
    return 0 if t is None else t.data_ptr()


@pytest.mark.parametrize("isa", ["amx", "avx512bf16", "avx512", "avx2", "generic"], indirect=True)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("products", [True, False], ids=["products", "formed"])
def test_bfloat16_cell_step_is_the_float_pass_rounded(cell, products, isa, monkeypatch):
    """The cell step's native pass on bfloat16 tensors against the float32 pass on the same
    values widened: forward outputs and saved values, then the backward from the bfloat16
    forward's saved values. Equal after rounding, except where the pass forms the products
    itself: it reads bfloat16 weights as pairs of k (InPlaceDots::dots), another summation order,
    so there the forward may be 1 bfloat16 ulp apart. H=37 leaves a partial vector in each row."""
    B, H, I, G = (2 if products else 5), 37, 19, GATES[cell]
    g = torch.Generator().manual_seed(G * 100 + B)
    rand = lambda *shape, s=1.0: (torch.randn(*shape, generator=g) * s).bfloat16()  # noqa: E731
    operands = dict(x=rand(B, I), w_ih=rand(G * H, I, s=0.3), w_hh=rand(G * H, H, s=0.2),
                    b_ih=rand(G * H, s=0.3), b_hh=rand(G * H, s=0.3), h_prev=rand(B, H),
                    c_prev=rand(B, H), xpre=rand(B, G * H), hpre=rand(B, G * H),
                    d_h=rand(B, H), d_c=rand(B, H))
    fwd = _cell_step_native_forward(cell, operands, torch.bfloat16, products)
    wide_fwd = _cell_step_native_forward(cell, operands, torch.float32, products)
    for name in fwd:
        _assert_rounded(name, fwd[name], wide_fwd[name], ulps=1 if products else 0)
        if fwd[name] is not None:
            assert not fwd[name].isnan().any(), name
    bwd = _cell_step_native_backward(cell, operands, fwd, torch.bfloat16)
    wide_bwd = _cell_step_native_backward(cell, operands, fwd, torch.float32)
    for name in bwd:
        _assert_rounded(name, bwd[name], wide_bwd[name])
        if bwd[name] is not None:
            assert not bwd[name].isnan().any(), name
