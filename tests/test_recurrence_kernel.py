"""Kernel-level tests: the native recurrence (one layer, 1 or 2 directions per call) against
fusedrnn.reference.rnn_layer, forward and every gradient.

The kernels are driven through fusedrnn._backend.run_forward / run_backward exactly as the
modules drive them. The reference is fed the input projection itself as its input (W_ih = I,
no b_ih), so autograd on the reference gives d_xproj directly; dW_hh, db_hh and dW_hr are formed
from the kernel's d_hproj / d_h_seq exactly as functional.py forms them (torch GEMMs), which
checks those outputs too. Every output is poisoned with NaN first, so unwritten elements show.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from fusedrnn import _backend, reference

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
NAN = float("nan")


@dataclass(frozen=True)
class Config:
    cell: str
    proj: int             # proj_size, 0 = none (LSTM only)
    directions: tuple     # reverse flag per direction: (False,), (True,), (False, True)
    lengths: bool
    T: int
    B: int
    H: int
    dtype: torch.dtype
    batch_first: bool     # storage of the sequence tensors (strides), not a different math

    @property
    def id(self) -> str:
        parts = [self.cell]
        if self.proj:
            parts.append("proj")
        parts.append({(False,): "fwd", (True,): "rev", (False, True): "bidir"}[self.directions])
        if self.lengths:
            parts.append("len")
        if self.batch_first:
            parts.append("bf")
        parts += [f"B{self.B}", f"T{self.T}", f"H{self.H}"]
        parts.append("fp64" if self.dtype == torch.float64 else "fp32")
        return "-".join(parts)


SIZES = [(1, 1, 1), (2, 3, 5), (7, 5, 37), (7, 1, 5)]  # (T, B, H)


def _grid():
    out = []
    for cell, proj_on in [("lstm", False), ("lstm", True), ("gru", False), ("rnn_tanh", False),
                          ("rnn_relu", False)]:
        for directions in [(False,), (True,), (False, True)]:
            for lengths in (False, True):
                for i, (T, B, H) in enumerate(SIZES):
                    if proj_on and H < 2:
                        continue
                    for dtype in (torch.float64, torch.float32):
                        out.append(Config(cell, H // 2 if proj_on else 0, directions, lengths,
                                          T, B, H, dtype, batch_first=i % 2 == 1))
    return out


GRID = _grid()


def _seq_storage(T, B, width, batch_first, dtype, device, fill=NAN):
    """A [T, B, width] tensor, stored batch-first if asked (non-trivial strides)."""
    if batch_first:
        return torch.full((B, T, width), fill, dtype=dtype, device=device).transpose(0, 1)
    return torch.full((T, B, width), fill, dtype=dtype, device=device)


def _halves(t, n, width):
    return [t[..., d * width:(d + 1) * width] for d in range(n)]


def _rel(actual, expected, floor=0.0):
    """||actual - expected|| / max(||expected||, floor * sqrt(numel)); NaN never passes.

    `floor` (float32 only) keeps a tiny tensor whose values happen to cancel (a 1x1x1 output of
    x + W h + b close to zero) from turning float32 rounding of the inputs into a large
    relative error."""
    actual = actual.detach().cpu().double()
    expected = expected.detach().cpu().double()
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    if not torch.isfinite(actual).all():
        return float("inf")
    scale = max(expected.norm().item(), floor * expected.numel() ** 0.5)
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff


def _valid_mask(T, B, lengths):
    t = torch.arange(T).unsqueeze(1)
    if lengths is None:
        return torch.ones(T, B, dtype=torch.bool)
    return t < lengths.cpu().unsqueeze(0)


def _h_prev(out, h0, lengths, reverse):
    """h_{t-1} of each valid (t, b) in processing order: h0 at a sequence's first step."""
    T, B, P = out.shape
    hp = torch.zeros(T, B, P, dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b]) if lengths is not None else T
        for s in range(n):
            t = n - 1 - s if reverse else s
            hp[t, b] = h0[b] if s == 0 else out[t + 1 if reverse else t - 1, b]
    return hp


def run_and_check(cfg: Config, device: torch.device, *, with_h0=True, with_grads=True):
    seed = random.randrange(1 << 30)
    torch.manual_seed(seed)
    cell, T, B, H, dtype = cfg.cell, cfg.T, cfg.B, cfg.H, cfg.dtype
    G, P, nd = GATES[cell], (cfg.proj or cfg.H), len(cfg.directions)
    X = G * H
    lstm, gru, projected = cell == "lstm", cell == "gru", cfg.proj > 0
    lengths = torch.randint(1, T + 1, (B,), dtype=torch.int64) if cfg.lengths else None
    lengths_dev = lengths.to(device) if lengths is not None else None
    scale = H ** -0.5

    def rnd(*shape, s=1.0):
        return (torch.rand(*shape, dtype=torch.float64) * 2 - 1) * s

    # Master values in float64, rounded to the kernel dtype so both sides see the same numbers.
    def as_kernel(t):
        return t.to(dtype).to(device) if t is not None else None

    def as_ref(t):
        return t.to(dtype).double().requires_grad_() if t is not None else None

    xproj_all = _seq_storage(T, B, nd * X, cfg.batch_first, dtype, device)
    xproj_all.copy_(rnd(T, B, nd * X, s=1.5).to(dtype))
    out_all = _seq_storage(T, B, nd * P, cfg.batch_first, dtype, device)
    d_out_all = _seq_storage(T, B, nd * P, cfg.batch_first, dtype, device)
    d_out_all.copy_(rnd(T, B, nd * P).to(dtype))
    d_xproj_all = _seq_storage(T, B, nd * X, cfg.batch_first, dtype, device)
    xprojs, outs = _halves(xproj_all, nd, X), _halves(out_all, nd, P)
    d_outs, d_xprojs = _halves(d_out_all, nd, P), _halves(d_xproj_all, nd, X)

    def nan(*shape):
        return torch.full(shape, NAN, dtype=dtype, device=device)

    fwd_dirs, masters = [], []
    for d, reverse in enumerate(cfg.directions):
        m = dict(w_hh=rnd(X, P, s=scale), b_hh=rnd(X, s=scale),
                 w_hr=rnd(P, H, s=scale) if projected else None,
                 h0=rnd(B, P) if with_h0 else None,
                 c0=rnd(B, H) if (lstm and with_h0) else None)
        masters.append(m)
        fwd_dirs.append(_backend.DirectionForward(
            xproj=xprojs[d], w_hh=as_kernel(m["w_hh"]), b_hh=as_kernel(m["b_hh"]),
            w_hr=as_kernel(m["w_hr"]), h0=as_kernel(m["h0"]), c0=as_kernel(m["c0"]),
            out=outs[d], hn=nan(B, P), cn=nan(B, H) if lstm else None, reverse=reverse,
            gates=nan(T, B, 4 * H) if (lstm or gru) else None,
            c_seq=nan(T, B, H) if lstm else None,
            r_seq=nan(T, B, H) if projected else None))
    _backend.run_forward(cell, fwd_dirs, lengths_dev)

    tol = TOL[dtype]
    valid = _valid_mask(T, B, lengths)
    failures = []

    floor = 0.1 if dtype == torch.float32 else 0.0

    def check(name, actual, expected):
        err = _rel(actual, expected, floor)
        if not err <= tol:
            failures.append(f"{name}: rel err {err:.3g} > {tol:g}")

    for d, reverse in enumerate(cfg.directions):
        m, f = masters[d], fwd_dirs[d]
        x_ref = xprojs[d].detach().cpu().double().requires_grad_()
        eye = torch.eye(X, dtype=torch.float64)
        refs = {k: as_ref(v) for k, v in m.items()}
        out_r, hn_r, cn_r = reference.rnn_layer(
            cell, x_ref, eye, refs["w_hh"], None, refs["b_hh"], refs["w_hr"], refs["h0"],
            refs["c0"], lengths, reverse)
        check(f"dir{d} out", f.out, out_r)
        check(f"dir{d} h_n", f.hn, hn_r)
        if lstm:
            check(f"dir{d} c_n", f.cn, cn_r)
        padded_out = f.out.detach().cpu()[~valid]
        if padded_out.numel() and not (padded_out == 0).all():
            failures.append(f"dir{d}: padded output rows are not zero")
        if not with_grads:
            continue

        d_hn = rnd(B, P).to(dtype)
        d_cn = rnd(B, H).to(dtype) if lstm else None
        loss = (out_r * d_outs[d].detach().cpu().double()).sum() + (hn_r * d_hn.double()).sum()
        if lstm:
            loss = loss + (cn_r * d_cn.double()).sum()
        leaves = [x_ref] + [v for v in refs.values() if v is not None]
        grads = dict(zip(["x"] + [k for k, v in refs.items() if v is not None],
                         torch.autograd.grad(loss, leaves)))

        bwd = _backend.DirectionBackward(
            w_hh=f.w_hh, b_hh=f.b_hh, w_hr=f.w_hr, h0=f.h0, c0=f.c0, out=f.out, gates=f.gates,
            c_seq=f.c_seq, d_out=d_outs[d], d_hn=d_hn.to(device),
            d_cn=d_cn.to(device) if lstm else None, d_xproj=d_xprojs[d],
            d_hproj=nan(T, B, X) if gru else None,
            d_h_seq=nan(T, B, P) if projected else None,
            d_h0=nan(B, P), d_c0=nan(B, H) if lstm else None, reverse=reverse)
        _backend.run_backward(cell, [bwd], lengths_dev)

        check(f"dir{d} d_xproj", bwd.d_xproj, grads["x"])
        padded_grad = bwd.d_xproj.detach().cpu()[~valid]
        if padded_grad.numel() and not (padded_grad == 0).all():
            failures.append(f"dir{d}: padded d_xproj rows are not zero")
        if with_h0:
            check(f"dir{d} d_h0", bwd.d_h0, grads["h0"])
            if lstm:
                check(f"dir{d} d_c0", bwd.d_c0, grads["c0"])
        d_pre = (bwd.d_hproj if gru else bwd.d_xproj).detach().cpu().double()
        h0_used = m["h0"].to(dtype).double() if with_h0 else torch.zeros(B, P, dtype=torch.float64)
        hp = _h_prev(f.out.detach().cpu().double(), h0_used, lengths, reverse)
        check(f"dir{d} dW_hh", torch.einsum("tbx,tbp->xp", d_pre, hp), grads["w_hh"])
        check(f"dir{d} db_hh", d_pre.sum((0, 1)), grads["b_hh"])
        if projected:
            r_seq = torch.where(valid.unsqueeze(-1), f.r_seq.detach().cpu().double(),
                                torch.zeros(()))
            d_h_seq = bwd.d_h_seq.detach().cpu().double()
            check(f"dir{d} dW_hr", torch.einsum("tbp,tbh->ph", d_h_seq, r_seq), grads["w_hr"])
    assert not failures, f"seed {seed}: " + "; ".join(failures)


@pytest.mark.parametrize("cfg", GRID, ids=[c.id for c in GRID])
def test_recurrence_matches_reference(cfg, backend):
    if backend.tiny and (cfg.T > 2 or cfg.B > 3 or cfg.H > 5):
        pytest.skip("emulated backend: tiny shapes only")
    run_and_check(cfg, backend.device)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_no_initial_state(cell, backend):
    run_and_check(Config(cell, 0, (False, True), True, 2, 3, 5, torch.float64, False),
                  backend.device, with_h0=False)


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("cell,proj", [("lstm", 0), ("lstm", 13), ("gru", 0), ("rnn_relu", 0)])
def test_thread_splits(cell, proj, threads, monkeypatch):
    """Teams of several threads (forced: these shapes are below the threading threshold), with
    panel counts that do not divide evenly; both directions run side by side."""
    pytest.importorskip("fusedrnn._cpu")
    monkeypatch.setenv("FUSEDRNN_CPU_TEST_THREADS", str(threads))
    for dtype in (torch.float64, torch.float32):
        run_and_check(Config(cell, proj, (False, True), True, 7, 5, 37, dtype, True),
                      torch.device("cpu"))


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
@pytest.mark.parametrize("cell,proj", [("lstm", 0), ("lstm", 9), ("gru", 0), ("rnn_tanh", 0)])
def test_every_instruction_set(cell, proj, isa, monkeypatch):
    """FUSEDRNN_CPU_ISA lowers the run-time choice, so every compiled path runs here (a path the
    CPU lacks falls back to the best one it has)."""
    cpu = pytest.importorskip("fusedrnn._cpu")
    monkeypatch.setenv("FUSEDRNN_CPU_ISA", isa)
    for dtype in (torch.float64, torch.float32):
        for size in [(7, 5, 37), (3, 9, 70)]:
            run_and_check(Config(cell, proj, (False, True), True, *size, dtype, False),
                          torch.device("cpu"))
    assert cpu.isa() in ("generic", "avx2", "avx512")


def test_larger_threaded_shapes(monkeypatch):
    """Shapes over the threading threshold, with the default thread count."""
    pytest.importorskip("fusedrnn._cpu")
    for cell, proj in [("lstm", 0), ("lstm", 40), ("gru", 0), ("rnn_tanh", 0)]:
        run_and_check(Config(cell, proj, (False, True), True, 3, 17, 96, torch.float32, True),
                      torch.device("cpu"))


# ------------------------------------------------------------------------------ bad parameters
def _valid_fwd(cpu, cell="lstm", T=2, B=2, H=3, P=None):
    """A FwdParams pointing at real buffers (kept alive in the returned dict)."""
    P = P or H
    G = GATES[cell]
    keep = dict(xproj=torch.randn(T, B, G * H), w_hh=torch.randn(G * H, P),
                out=torch.empty(T, B, P), hn=torch.empty(B, P), cn=torch.empty(B, H),
                w_hr=torch.randn(P, H))
    p = cpu.FwdParams()
    p.cell, p.dtype = _backend.CELL_CODES[cell], 0
    p.seq_len, p.batch, p.hidden, p.state = T, B, H, P
    p.xproj = (keep["xproj"].data_ptr(), G * H * B, G * H)
    p.w_hh = keep["w_hh"].data_ptr()
    p.out = (keep["out"].data_ptr(), B * P, P)
    p.hn = keep["hn"].data_ptr()
    if cell == "lstm":
        p.cn = keep["cn"].data_ptr()
    if P != H:
        p.w_hr = keep["w_hr"].data_ptr()
    p.num_threads = 1
    return p, keep


def _valid_bwd(cpu, cell="gru", T=2, B=2, H=3):
    G = GATES[cell]
    keep = dict(w_hh=torch.randn(G * H, H), out=torch.randn(T, B, H),
                gates=torch.rand(T, B, 4 * H), c_seq=torch.randn(T, B, H),
                d_xproj=torch.empty(T, B, G * H), d_hproj=torch.empty(T, B, G * H),
                d_h0=torch.empty(B, H), d_c0=torch.empty(B, H))
    p = cpu.BwdParams()
    p.cell, p.dtype = _backend.CELL_CODES[cell], 0
    p.seq_len, p.batch, p.hidden, p.state = T, B, H, H
    p.w_hh = keep["w_hh"].data_ptr()
    p.out = (keep["out"].data_ptr(), B * H, H)
    p.gates = (keep["gates"].data_ptr(), B * 4 * H, 4 * H)
    p.c_seq = (keep["c_seq"].data_ptr(), B * H, H)
    p.d_xproj = (keep["d_xproj"].data_ptr(), B * G * H, G * H)
    p.d_hproj = (keep["d_hproj"].data_ptr(), B * G * H, G * H)
    p.d_h0 = keep["d_h0"].data_ptr()
    p.d_c0 = keep["d_c0"].data_ptr()
    p.num_threads = 1
    return p, keep


def _expect(fn, *words):
    with pytest.raises(ValueError) as err:
        fn()
    for w in words:
        assert w in str(err.value), f"{w!r} not in {str(err.value)!r}"


def test_valid_params_run():
    cpu = pytest.importorskip("fusedrnn._cpu")
    for p, keep in [_valid_fwd(cpu), _valid_fwd(cpu, "gru"), _valid_fwd(cpu, "lstm", P=2)]:
        ws = torch.empty(cpu.forward_workspace_bytes([p]), dtype=torch.uint8)
        p.workspace, p.workspace_bytes = ws.data_ptr(), ws.numel()
        cpu.forward([p])
        assert torch.isfinite(keep["out"]).all()


@pytest.mark.parametrize("field,value,words", [
    ("seq_len", 0, ["seq_len", ">= 1", "got 0"]),
    ("batch", -1, ["batch", ">= 1"]),
    ("hidden", 0, ["hidden", ">= 1"]),
    ("cell", 7, ["cell", "got 7"]),
    ("dtype", 2, ["dtype", "float32", "got 2"]),
    ("xproj", (0, 6, 3), ["xproj", "null"]),
    ("w_hh", 0, ["w_hh", "null"]),
    ("out", (0, 6, 3), ["out", "null"]),
    ("hn", 0, ["hn", "null"]),
    ("cn", 0, ["cn", "null", "lstm"]),
    ("w_hr", 12345, ["w_hr", "null"]),
    ("num_threads", 0, ["num_threads", ">= 1"]),
    ("workspace_bytes", 64, ["workspace", "null"]),
])
def test_bad_forward_params(field, value, words):
    cpu = pytest.importorskip("fusedrnn._cpu")
    p, _keep = _valid_fwd(cpu)
    setattr(p, field, value)
    _expect(lambda: cpu.forward([p]), "direction 0", *words)


def test_bad_forward_structure():
    cpu = pytest.importorskip("fusedrnn._cpu")
    p, _k = _valid_fwd(cpu)
    _expect(lambda: cpu.forward([]), "1 or 2 directions", "got 0")
    _expect(lambda: cpu.forward([p, p, p]), "1 or 2 directions", "got 3")
    q, _k2 = _valid_fwd(cpu, H=4)
    _expect(lambda: cpu.forward([p, q]), "direction 1", "hidden")
    g, _k3 = _valid_fwd(cpu, "gru")
    g.state = 2
    _expect(lambda: cpu.forward([g]), "state", "hidden")
    proj, _k4 = _valid_fwd(cpu, "lstm", P=2)
    proj.w_hr = 0
    _expect(lambda: cpu.forward([proj]), "w_hr", "null")
    s, _k5 = _valid_fwd(cpu)
    s.xproj = (s.xproj[0], -1, 3)
    _expect(lambda: cpu.forward([s]), "xproj", "stride")
    t, _k6 = _valid_fwd(cpu)
    t.gates = (_k6["out"].data_ptr(), 0, 0)
    _expect(lambda: cpu.forward([t]), "c_seq")


def test_bad_lengths_and_workspace():
    cpu = pytest.importorskip("fusedrnn._cpu")
    p, keep = _valid_fwd(cpu)
    need = cpu.forward_workspace_bytes([p])
    ws = torch.empty(need, dtype=torch.uint8)
    p.workspace, p.workspace_bytes = ws.data_ptr(), need - 1
    _expect(lambda: cpu.forward([p]), "workspace_bytes", "need")
    p.workspace_bytes = need
    for bad in (0, 3):
        lengths = torch.tensor([1, bad], dtype=torch.int64)
        p.lengths = lengths.data_ptr()
        _expect(lambda: cpu.forward([p]), "lengths[1]", "[1, 2]", f"got {bad}")


@pytest.mark.parametrize("cell,field,words", [
    ("gru", "d_hproj", ["d_hproj", "gru"]),
    ("gru", "gates", ["gates"]),
    ("lstm", "c_seq", ["c_seq"]),
    ("gru", "d_xproj", ["d_xproj"]),
    ("gru", "d_h0", ["d_h0"]),
    ("gru", "out", ["out"]),
])
def test_bad_backward_params(cell, field, words):
    cpu = pytest.importorskip("fusedrnn._cpu")
    p, _keep = _valid_bwd(cpu, cell)
    setattr(p, field, (0, 0, 0) if isinstance(getattr(p, field), tuple) else 0)
    _expect(lambda: cpu.backward([p]), "direction 0", *words, "null")


def test_params_round_trip():
    cpu = pytest.importorskip("fusedrnn._cpu")
    p = cpu.FwdParams()
    p.xproj = (1234, 5, 6)
    p.cell, p.dtype, p.reverse, p.lengths = 3, 1, True, 99
    assert (p.xproj, p.cell, p.dtype, p.reverse, p.lengths) == ((1234, 5, 6), 3, 1, True, 99)
    b = cpu.BwdParams()
    b.d_h_seq, b.d_c0 = (8, 1, 2), 77
    assert (b.d_h_seq, b.d_c0, b.w_hh) == ((8, 1, 2), 77, 0)
