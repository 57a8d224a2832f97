"""The CUDA recurrence kernels on the CPU emulator (fusedrnn._emu): what the backend-generic grid
of test_recurrence_kernel.py does not reach.

- Shapes that give several blocks per direction with uneven unit slices (the emulator's fake
  device has 4 SMs: H=37 runs 4 blocks of 10, 10, 10 and 7 units), and single-block grids.
- float16 and bfloat16 against the float64 reference, with the bar of DESIGN.md: the kernel's error
  is at most twice torch's own error in the same precision (plus one unit roundoff, because at
  these tiny sizes torch's error is itself a small random number).
- The streaming variant (weights read from global memory every step) and batch chunking.
- The launch plan and the errors of the binding.

Workspaces are poisoned (0xFF bytes: NaN) so that a read of an unwritten exchange buffer shows.
"""
from __future__ import annotations

import random

import pytest
import torch

from fusedrnn import _backend, reference

emu = pytest.importorskip("fusedrnn._emu", reason="fusedrnn._emu is not built (FUSEDRNN_EMU=ON)")

pytestmark = pytest.mark.emu

from test_recurrence_kernel import Config, run_and_check  # noqa: E402  (same harness)

CPU = torch.device("cpu")
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


@pytest.fixture(autouse=True)
def _emulated(monkeypatch):
    """Route CPU tensors through _emu, poison workspaces, reset the launch knobs afterwards."""
    monkeypatch.setenv("FUSEDRNN_BACKEND", "emu")
    original = _backend._workspace

    def poisoned(module, kind, params, device):
        ws = original(module, kind, params, device)
        ws.fill_(0xFF)
        return ws

    monkeypatch.setattr(_backend, "_workspace", poisoned)
    yield
    emu._set_launch_options()


# ------------------------------------------------------------------ multi-block float32 / float64
CELLS = [("lstm", 0), ("lstm", 1), ("gru", 0), ("rnn_tanh", 0), ("rnn_relu", 0)]
SHAPES = [(1, 1, 5), (2, 3, 5), (5, 3, 37), (5, 1, 37), (2, 4, 1)]  # (T, B, H)


def _cfg(cell, proj, directions, lengths, T, B, H, dtype, batch_first=False):
    return Config(cell, (H // 2 if proj else 0), directions, lengths, T, B, H, dtype, batch_first)


MULTI = [
    _cfg(cell, proj, dirs, lengths, T, B, H, dtype, batch_first=i % 2 == 1)
    for cell, proj in CELLS
    for i, (T, B, H) in enumerate(SHAPES)
    if not (proj and H < 2)
    for dirs, lengths in [((False, True), True), ((True,), False)]
    for dtype in (torch.float64, torch.float32)
]


@pytest.mark.parametrize("cfg", MULTI, ids=[c.id for c in MULTI])
def test_multi_block(cfg):
    run_and_check(cfg, CPU)


@pytest.mark.parametrize("cell,proj", CELLS)
def test_streaming_weights(cell, proj):
    emu._set_launch_options(force_streaming=True)
    for T, B, H in [(2, 3, 5), (5, 3, 37)]:
        run_and_check(_cfg(cell, proj, (False, True), True, T, B, H, torch.float64), CPU)
    run_and_check(_cfg(cell, proj, (True,), False, 2, 2, 6, torch.float32, True), CPU)


@pytest.mark.parametrize("streaming", [False, True], ids=["smem", "streaming"])
@pytest.mark.parametrize("cell,proj", CELLS)
def test_batch_chunks(cell, proj, streaming):
    """Batch rows processed in passes of 1 and 2 (B=5: uneven last pass)."""
    for chunk in (1, 2):
        emu._set_launch_options(force_streaming=streaming, max_batch_chunk=chunk)
        run_and_check(_cfg(cell, proj, (False, True), True, 3, 5, 6, torch.float64), CPU)


@pytest.mark.parametrize("blocks", [1, 2, 64])
@pytest.mark.parametrize("cell,proj", CELLS)
def test_block_counts(cell, proj, blocks):
    """One block per direction (no exchange between blocks), two, and as many as the device
    allows (one unit per block for H=7)."""
    emu._set_launch_options(max_blocks_per_direction=blocks)
    run_and_check(_cfg(cell, proj, (False, True), True, 3, 2, 7, torch.float64), CPU)


def test_no_initial_state_multi_block():
    for cell in GATES:
        run_and_check(Config(cell, 0, (False, True), True, 4, 3, 37, torch.float32, False), CPU,
                      with_h0=False)


# ------------------------------------------------------------------ float16 / bfloat16
def _rel(actual, expected):
    actual, expected = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(actual).all():
        return float("inf")
    scale = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff


def _half_case(cell, proj, dtype, T, B, H, reverse, lengths_on, streaming):
    """Returns {name: (kernel error, torch error)} for forward and backward outputs, each measured
    against the float64 reference on the same (dtype-rounded) inputs."""
    seed = random.randrange(1 << 30)
    torch.manual_seed(seed)
    G, P = GATES[cell], (H // 2 if proj else H)
    X = G * H
    lstm, gru, projected = cell == "lstm", cell == "gru", P != H
    lengths = torch.randint(1, T + 1, (B,), dtype=torch.int64) if lengths_on else None

    def rnd(*shape, s=1.0):
        return ((torch.rand(*shape, dtype=torch.float64) * 2 - 1) * s).to(dtype)

    xproj, w_hh, b_hh = rnd(T, B, X, s=1.5), rnd(X, P, s=H ** -0.5), rnd(X, s=H ** -0.5)
    w_hr = rnd(P, H, s=H ** -0.5) if projected else None
    h0, c0 = rnd(B, P), (rnd(B, H) if lstm else None)
    d_out, d_hn = rnd(T, B, P), rnd(B, P)
    d_cn = rnd(B, H) if lstm else None

    def nan(*shape):
        return torch.full(shape, float("nan"), dtype=dtype)

    emu._set_launch_options(force_streaming=streaming)
    f = _backend.DirectionForward(
        xproj=xproj, w_hh=w_hh, b_hh=b_hh, w_hr=w_hr, h0=h0, c0=c0, out=nan(T, B, P),
        hn=nan(B, P), cn=nan(B, H) if lstm else None, reverse=reverse,
        gates=nan(T, B, 4 * H) if (lstm or gru) else None, c_seq=nan(T, B, H) if lstm else None,
        r_seq=nan(T, B, H) if projected else None)
    _backend.run_forward(cell, [f], lengths)
    bwd = _backend.DirectionBackward(
        w_hh=w_hh, b_hh=b_hh, w_hr=w_hr, h0=h0, c0=c0, out=f.out, gates=f.gates, c_seq=f.c_seq,
        d_out=d_out, d_hn=d_hn, d_cn=d_cn, d_xproj=nan(T, B, X),
        d_hproj=nan(T, B, X) if gru else None, d_h_seq=nan(T, B, P) if projected else None,
        d_h0=nan(B, P), d_c0=nan(B, H) if lstm else None, reverse=reverse)
    _backend.run_backward(cell, [bwd], lengths)

    def oracle(prec):
        """The reference in `prec`: float64 is the truth, `dtype` is what torch does in it."""
        leaves = {k: (v.to(prec).requires_grad_() if v is not None else None)
                  for k, v in dict(x=xproj, w_hh=w_hh, b_hh=b_hh, w_hr=w_hr, h0=h0, c0=c0).items()}
        out, hn, cn = reference.rnn_layer(
            cell, leaves["x"], torch.eye(X, dtype=prec), leaves["w_hh"], None, leaves["b_hh"],
            leaves["w_hr"], leaves["h0"], leaves["c0"], lengths, reverse)
        loss = (out.double() * d_out.double()).sum() + (hn.double() * d_hn.double()).sum()
        if lstm:
            loss = loss + (cn.double() * d_cn.double()).sum()
        names = ["x", "h0"] + (["c0"] if lstm else [])
        grads = torch.autograd.grad(loss, [leaves[n] for n in names])
        res = dict(out=out, hn=hn, d_xproj=grads[0], d_h0=grads[1])
        if lstm:
            res.update(cn=cn, d_c0=grads[2])
        return res

    truth, torch_half = oracle(torch.float64), oracle(dtype)
    mine = dict(out=f.out, hn=f.hn, d_xproj=bwd.d_xproj, d_h0=bwd.d_h0)
    if lstm:
        mine.update(cn=f.cn, d_c0=bwd.d_c0)
    return seed, {k: (_rel(mine[k], truth[k]), _rel(torch_half[k], truth[k])) for k in mine}


HALF = [(cell, proj, dtype, streaming)
        for cell, proj in CELLS
        for dtype in (torch.float16, torch.bfloat16)
        for streaming in (False, True)]


@pytest.mark.parametrize(
    "cell,proj,dtype,streaming", HALF,
    ids=[f"{c}{'-proj' if p else ''}-{str(d).split('.')[1]}-{'streaming' if s else 'smem'}"
         for c, p, d, s in HALF])
def test_half_precision(cell, proj, dtype, streaming):
    u = UNIT_ROUNDOFF[dtype]
    for T, B, H, reverse, lengths_on in [(5, 3, 37, False, True), (3, 2, 5, True, True),
                                          (2, 1, 6, False, False)]:
        seed, errors = _half_case(cell, proj, dtype, T, B, H, reverse, lengths_on, streaming)
        bad = {k: (mine, theirs) for k, (mine, theirs) in errors.items()
               if not mine <= 2 * theirs + 2 * u}
        assert not bad, (f"seed {seed} T{T} B{B} H{H}: (kernel error, torch {dtype} error) "
                         f"beyond 2x torch + 2u (u={u:g}): {bad}")


# ------------------------------------------------------------------ plan and errors
def _fwd_params(cell="lstm", T=2, B=3, H=5, P=None, dirs=1, dtype=torch.float32):
    P = P or H
    G = GATES[cell]
    keep = dict(xproj=torch.randn(T, B, G * H).to(dtype), w_hh=torch.randn(G * H, P).to(dtype),
                out=torch.empty(T, B, P, dtype=dtype), hn=torch.empty(B, P, dtype=dtype),
                cn=torch.empty(B, H, dtype=dtype), w_hr=torch.randn(P, H).to(dtype))
    params = []
    for d in range(dirs):
        p = emu.FwdParams()
        p.cell, p.dtype = _backend.CELL_CODES[cell], _backend.DTYPE_CODES[dtype]
        p.seq_len, p.batch, p.hidden, p.state = T, B, H, P
        p.reverse = d == 1
        p.xproj = (keep["xproj"].data_ptr(), B * G * H, G * H)
        p.w_hh = keep["w_hh"].data_ptr()
        p.out = (keep["out"].data_ptr(), B * P, P)
        p.hn = keep["hn"].data_ptr()
        if cell == "lstm":
            p.cn = keep["cn"].data_ptr()
        if P != H:
            p.w_hr = keep["w_hr"].data_ptr()
        params.append(p)
    return params, keep


def test_launch_plan():
    params, _keep = _fwd_params(H=5)
    plan = emu._launch_plan(params)
    # The fake device has 4 SMs: H=5 -> 2 units per block, 3 blocks, weights on chip.
    assert plan["weights_in_smem"] and plan["blocks_per_dir"] == 3 and plan["units_per_block"] == 2
    assert plan["batch_chunk"] == 3 and plan["num_dirs"] == 1
    bidir, _keep2 = _fwd_params(H=37, dirs=2)
    plan = emu._launch_plan(bidir)
    assert plan["blocks_per_dir"] == 2 and plan["units_per_block"] == 19 and plan["num_dirs"] == 2
    emu._set_launch_options(force_streaming=True, max_batch_chunk=2)
    plan = emu._launch_plan(params)
    assert not plan["weights_in_smem"] and plan["batch_chunk"] == 2
    assert emu._launch_options() == dict(force_streaming=True, max_blocks_per_direction=0,
                                         max_batch_chunk=2)


def test_large_hidden_streams_weights():
    """A slice too big for the fake device's 99 KiB of shared memory per block streams instead."""
    params, _keep = _fwd_params(T=1, B=1, H=200, dtype=torch.float64)
    plan = emu._launch_plan(params)
    assert not plan["weights_in_smem"]
    assert plan["blocks_per_dir"] * plan["units_per_block"] >= 200


def test_half_types_are_accepted():
    for dtype in (torch.float16, torch.bfloat16):
        params, _keep = _fwd_params(dtype=dtype)
        assert emu.forward_workspace_bytes(params) > 0


def test_workspace_too_small():
    params, keep = _fwd_params()
    need = emu.forward_workspace_bytes(params)
    ws = torch.empty(need, dtype=torch.uint8)
    params[0].workspace, params[0].workspace_bytes = ws.data_ptr(), need - 1
    with pytest.raises(ValueError, match="workspace"):
        emu.forward(params)


def test_bad_launch_option():
    with pytest.raises(ValueError, match=">= 0"):
        emu._set_launch_options(max_batch_chunk=-1)


# ------------------------------------------------------------------ optional tensors
def _random_layer(cell, proj, T, B, H, dtype=torch.float64):
    G, P = GATES[cell], (H // 2 if proj else H)
    lstm = cell == "lstm"
    return dict(xproj=torch.randn(T, B, G * H, dtype=dtype), w_hh=torch.randn(G * H, P, dtype=dtype) / H,
                b_hh=torch.randn(G * H, dtype=dtype), w_hr=torch.randn(P, H, dtype=dtype) / H if proj else None,
                h0=torch.randn(B, P, dtype=dtype), c0=torch.randn(B, H, dtype=dtype) if lstm else None)


def _forward(cell, layer, T, B, H, P, training, lengths=None, reverse=False):
    lstm, gru = cell == "lstm", cell == "gru"
    dtype = layer["xproj"].dtype

    def nan(*shape):
        return torch.full(shape, float("nan"), dtype=dtype)

    f = _backend.DirectionForward(
        xproj=layer["xproj"], w_hh=layer["w_hh"], b_hh=layer["b_hh"], w_hr=layer["w_hr"],
        h0=layer["h0"], c0=layer["c0"], out=nan(T, B, P), hn=nan(B, P),
        cn=nan(B, H) if lstm else None, reverse=reverse,
        gates=nan(T, B, 4 * H) if training and (lstm or gru) else None,
        c_seq=nan(T, B, H) if training and lstm else None,
        r_seq=nan(T, B, H) if training and P != H else None)
    _backend.run_forward(cell, [f], lengths)
    return f


@pytest.mark.parametrize("cell,proj", CELLS)
def test_inference_forward_matches_training(cell, proj):
    """Without the saved tensors (inference) forward writes the same out / h_n / c_n."""
    T, B, H = 4, 3, 7
    P = H // 2 if proj else H
    layer = _random_layer(cell, proj, T, B, H)
    lengths = torch.tensor([4, 1, 3])
    a = _forward(cell, layer, T, B, H, P, training=True, lengths=lengths)
    b = _forward(cell, layer, T, B, H, P, training=False, lengths=lengths)
    assert torch.equal(a.out, b.out) and torch.equal(a.hn, b.hn)
    if cell == "lstm":
        assert torch.equal(a.cn, b.cn)


@pytest.mark.parametrize("missing", ["d_out", "d_hn", "d_cn", "all"])
@pytest.mark.parametrize("cell,proj", CELLS)
def test_null_incoming_gradients_are_zeros(cell, proj, missing):
    T, B, H = 3, 2, 6
    G, P = GATES[cell], (H // 2 if proj else H)
    lstm, gru = cell == "lstm", cell == "gru"
    if missing == "d_cn" and not lstm:
        pytest.skip("d_cn is an LSTM gradient")
    layer = _random_layer(cell, proj, T, B, H)
    lengths = torch.tensor([3, 2])
    f = _forward(cell, layer, T, B, H, P, training=True, lengths=lengths, reverse=True)
    grads = dict(d_out=torch.randn(T, B, P, dtype=torch.float64),
                 d_hn=torch.randn(B, P, dtype=torch.float64),
                 d_cn=torch.randn(B, H, dtype=torch.float64) if lstm else None)
    results = []
    for drop in (True, False):
        given = dict(grads)
        for name in (["d_out", "d_hn", "d_cn"] if missing == "all" else [missing]):
            if given[name] is not None:
                given[name] = None if drop else torch.zeros_like(given[name])
        bwd = _backend.DirectionBackward(
            w_hh=f.w_hh, b_hh=f.b_hh, w_hr=f.w_hr, h0=f.h0, c0=f.c0, out=f.out, gates=f.gates,
            c_seq=f.c_seq, d_out=given["d_out"], d_hn=given["d_hn"], d_cn=given["d_cn"],
            d_xproj=torch.full((T, B, G * H), float("nan"), dtype=torch.float64),
            d_hproj=torch.full((T, B, G * H), float("nan"), dtype=torch.float64) if gru else None,
            d_h_seq=torch.full((T, B, P), float("nan"), dtype=torch.float64) if proj else None,
            d_h0=torch.full((B, P), float("nan"), dtype=torch.float64),
            d_c0=torch.full((B, H), float("nan"), dtype=torch.float64) if lstm else None,
            reverse=True)
        _backend.run_backward(cell, [bwd], lengths)
        results.append(bwd)
    none, zeros = results
    for name in ("d_xproj", "d_hproj", "d_h_seq", "d_h0", "d_c0"):
        a, b = getattr(none, name), getattr(zeros, name)
        if a is not None:
            assert torch.isfinite(a).all() and torch.equal(a, b), name
