"""Kernel-level tests: the native recurrence (one layer, 1 or 2 directions per call) against
fusedrnn.reference.rnn_layer, forward and every gradient.

The kernels are driven through fusedrnn._backend.forward_layer / backward_layer exactly as the
modules drive them (via _helpers.run_forward_layer / run_backward_layer). The reference is fed the
input projection itself as its input (W_ih = I, no b_ih), so autograd on the reference gives
d_xproj directly; dW_hh, db_hh and dW_hr are formed from the kernel's d_hproj / d_h_seq exactly as
_layer_recurrence.py forms them (torch GEMMs), which checks those outputs too. Every output is
poisoned with NaN first, so unwritten elements show.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import pytest
import torch

import fusedrnn
from _helpers import (column_block, concurrent_mismatches, minimal_fwd_params,
                      run_backward_layer, run_forward_layer)
from fusedrnn import _backend, _layer_recurrence, reference

GATES = _backend.GATE_COUNT
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
NAN = float("nan")

# Which directions a configuration runs and which of them it checks. The layer API runs a reversed
# direction only as direction 1 of a two-direction layer, so "rev" runs both and checks the
# reversed one.
LAYOUTS = {"fwd": (1, (0,)), "rev": (2, (1,)), "bidir": (2, (0, 1))}


@dataclass(frozen=True)
class Config:
    cell: str
    proj: int             # proj_size, 0 = none (LSTM only)
    directions: str       # a key of LAYOUTS: "fwd", "rev" or "bidir"
    lengths: bool
    T: int
    B: int
    H: int
    dtype: torch.dtype
    batch_first: bool     # storage of the sequence tensors (strides), not a different math
    peephole: bool = False  # LSTM (plain or CIFG) with peephole connections

    @property
    def num_dirs(self) -> int:
        return LAYOUTS[self.directions][0]

    @property
    def checked(self) -> tuple:
        return LAYOUTS[self.directions][1]

    @property
    def id(self) -> str:
        parts = [self.cell]
        if self.peephole:
            parts.append("peep")
        if self.proj:
            parts.append("proj")
        parts.append(self.directions)
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
    for cell, proj_on, peephole in [
            ("lstm", False, False), ("lstm", True, False), ("lstm", False, True),
            ("lstm", True, True), ("lstm_cifg", False, False), ("lstm_cifg", True, True),
            ("gru", False, False), ("rnn_tanh", False, False), ("rnn_relu", False, False)]:
        for directions in LAYOUTS:
            for lengths in (False, True):
                for i, (T, B, H) in enumerate(SIZES):
                    if proj_on and H < 2:
                        continue
                    for dtype in (torch.float64, torch.float32):
                        out.append(Config(cell, H // 2 if proj_on else 0, directions, lengths,
                                          T, B, H, dtype, batch_first=i % 2 == 1,
                                          peephole=peephole))
    return out


GRID = _grid()


def _seq_storage(T, B, width, batch_first, dtype, device, fill=NAN):
    """A [T, B, width] tensor, stored batch-first if asked (non-trivial strides)."""
    if batch_first:
        return torch.full((B, T, width), fill, dtype=dtype, device=device).transpose(0, 1)
    return torch.full((T, B, width), fill, dtype=dtype, device=device)


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
    G, P, nd = GATES[cell], (cfg.proj or cfg.H), cfg.num_dirs
    X = G * H
    lstm, gru, projected = cell in _backend.LSTM_CELLS, cell == "gru", cfg.proj > 0
    coupled = cell == "lstm_cifg"  # reference.py's LSTM with coupled_input_forget
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

    x_master = rnd(T, B, nd * X, s=1.5)
    if cell == "rnn_relu":
        # ReLU's derivative jumps at 0: a pre-activation within float32 rounding of 0 would take
        # the other branch than in float64, an O(1) gradient error with no bug behind it. Keep
        # pre-activations away from 0: |x| >= 0.5 and a recurrent part of ~0.1.
        x_master = torch.sign(x_master) * (0.5 + x_master.abs())
        scale *= 0.1
    xproj = _seq_storage(T, B, nd * X, cfg.batch_first, dtype, device)
    xproj.copy_(x_master.to(dtype))
    d_out = _seq_storage(T, B, nd * P, cfg.batch_first, dtype, device)
    d_out.copy_(rnd(T, B, nd * P).to(dtype))
    masters = [dict(w_hh=rnd(X, P, s=scale), b_hh=rnd(X, s=scale),
                    w_hr=rnd(P, H, s=scale) if projected else None,
                    h0=rnd(B, P) if with_h0 else None,
                    c0=rnd(B, H) if (lstm and with_h0) else None,
                    peephole=rnd(2 if coupled else 3, H) if cfg.peephole else None)
               for _ in range(nd)]

    def layer(name):
        """The kernel's operand `name`: one tensor per direction (weights) or [D, ...] (states)."""
        per_dir = [as_kernel(m[name]) for m in masters]
        if name in ("h0", "c0"):
            return torch.stack(per_dir) if per_dir[0] is not None else None
        return per_dir

    run = run_forward_layer(cell, xproj, layer("w_hh"), layer("b_hh"), layer("w_hr"),
                            layer("h0"), layer("c0"), lengths_dev,
                            out=_seq_storage(T, B, nd * P, cfg.batch_first, dtype, device),
                            peephole=layer("peephole") if cfg.peephole else ())
    if with_grads:
        d_hn = rnd(nd, B, P).to(dtype)
        d_cn = rnd(nd, B, H).to(dtype) if lstm else None
        grads = run_backward_layer(
            run, d_out, d_hn.to(device), d_cn.to(device) if lstm else None,
            d_xproj=_seq_storage(T, B, nd * X, cfg.batch_first, dtype, device))

    tol = TOL[dtype]
    valid = _valid_mask(T, B, lengths)
    failures = []

    floor = 0.1 if dtype == torch.float32 else 0.0

    def check(name, actual, expected):
        err = _rel(actual, expected, floor)
        if not err <= tol:
            failures.append(f"{name}: rel err {err:.3g} > {tol:g}")

    for d in cfg.checked:
        reverse = d == 1  # the layer API's convention
        m = masters[d]
        out = column_block(run.out, d, nd)
        x_ref = column_block(xproj, d, nd).detach().cpu().double().requires_grad_()
        eye = torch.eye(X, dtype=torch.float64)
        refs = {k: as_ref(v) for k, v in m.items()}
        out_r, hn_r, cn_r = reference.rnn_layer(
            "lstm" if lstm else cell, x_ref, eye, refs["w_hh"], None, refs["b_hh"], refs["w_hr"],
            refs["h0"], refs["c0"], lengths, reverse, peephole=refs["peephole"],
            coupled_input_forget=coupled)
        check(f"dir{d} out", out, out_r)
        check(f"dir{d} h_n", run.hn[d], hn_r)
        if lstm:
            check(f"dir{d} c_n", run.cn[d], cn_r)
        padded_out = out.detach().cpu()[~valid]
        if padded_out.numel() and not (padded_out == 0).all():
            failures.append(f"dir{d}: padded output rows are not zero")
        if not with_grads:
            continue

        loss = ((out_r * column_block(d_out, d, nd).detach().cpu().double()).sum()
                + (hn_r * d_hn[d].double()).sum())
        if lstm:
            loss = loss + (cn_r * d_cn[d].double()).sum()
        leaves = [x_ref] + [v for v in refs.values() if v is not None]
        ref_grads = dict(zip(["x"] + [k for k, v in refs.items() if v is not None],
                             torch.autograd.grad(loss, leaves)))

        d_xproj = column_block(grads.d_xproj, d, nd)
        check(f"dir{d} d_xproj", d_xproj, ref_grads["x"])
        padded_grad = d_xproj.detach().cpu()[~valid]
        if padded_grad.numel() and not (padded_grad == 0).all():
            failures.append(f"dir{d}: padded d_xproj rows are not zero")
        if with_h0:
            check(f"dir{d} d_h0", grads.d_h0[d], ref_grads["h0"])
            if lstm:
                check(f"dir{d} d_c0", grads.d_c0[d], ref_grads["c0"])
        d_pre = column_block(grads.d_hproj if gru else grads.d_xproj, d, nd).detach().cpu().double()
        h0_used = m["h0"].to(dtype).double() if with_h0 else torch.zeros(B, P, dtype=torch.float64)
        hp = _h_prev(out.detach().cpu().double(), h0_used, lengths, reverse)
        check(f"dir{d} dW_hh", torch.einsum("tbx,tbp->xp", d_pre, hp), ref_grads["w_hh"])
        check(f"dir{d} db_hh", d_pre.sum((0, 1)), ref_grads["b_hh"])
        if projected:
            r_seq = torch.where(valid.unsqueeze(-1), run.r_seq[d].detach().cpu().double(),
                                torch.zeros(()))
            d_h_seq = grads.d_h_seq[d].detach().cpu().double()
            check(f"dir{d} dW_hr", torch.einsum("tbp,tbh->ph", d_h_seq, r_seq),
                  ref_grads["w_hr"])
        if cfg.peephole:  # formed from the kernel's d_xproj and c_seq as _layer_recurrence does,
            # which zeros c_seq's padded rows (here poisoned, to show they are left unwritten)
            c0_used = m["c0"].to(dtype).double() if with_h0 else None
            c_seq = run.c_seq[d].detach().cpu().double()
            padded_c = c_seq[~valid]
            if padded_c.numel() and not padded_c.isnan().all():
                failures.append(f"dir{d}: padded c_seq rows were written")
            c_seq = torch.where(valid.unsqueeze(-1), c_seq, torch.zeros(()))
            d_peephole = _layer_recurrence._peephole_grad(d_pre, c_seq, c0_used, lengths,
                                                          reverse, coupled)
            check(f"dir{d} d_peephole", d_peephole, ref_grads["peephole"])
    assert not failures, f"seed {seed}: " + "; ".join(failures)


@pytest.mark.parametrize("cfg", GRID, ids=[c.id for c in GRID])
def test_recurrence_matches_reference(cfg, backend):
    if backend.tiny and (cfg.T > 2 or cfg.B > 3 or cfg.H > 5):
        pytest.skip("emulated backend: tiny shapes only")
    run_and_check(cfg, backend.device)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_no_initial_state(cell, backend):
    run_and_check(Config(cell, 0, "bidir", True, 2, 3, 5, torch.float64, False),
                  backend.device, with_h0=False)


# (cell, proj_size, peephole) of the CPU tests that force a code path
FORCED_CELLS = [("lstm", 0, False), ("lstm", 13, False), ("lstm", 13, True),
                ("lstm_cifg", 0, False), ("lstm_cifg", 13, True), ("gru", 0, False),
                ("rnn_relu", 0, False)]


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("cell,proj,peephole", FORCED_CELLS)
def test_thread_splits(cell, proj, peephole, threads, monkeypatch):
    """Teams of several threads (forced: these shapes are below the threading threshold), with
    panel counts that do not divide evenly; both directions run side by side."""
    pytest.importorskip("fusedrnn._cpu")
    monkeypatch.setenv("FUSEDRNN_CPU_TEST_THREADS", str(threads))
    for dtype in (torch.float64, torch.float32):
        run_and_check(Config(cell, proj, "bidir", True, 7, 5, 37, dtype, True, peephole),
                      torch.device("cpu"))


@pytest.mark.parametrize("value", ["1000000", "0", "-2", "3x", "many"])
def test_a_bad_forced_thread_count_is_refused(value, monkeypatch):
    """The test knob is checked: FUSEDRNN_CPU_TEST_THREADS=1000000 crashed the process
    (review, session 29); a value that was not a number was ignored."""
    pytest.importorskip("fusedrnn._cpu")
    monkeypatch.setenv("FUSEDRNN_BACKEND", "cpu")
    monkeypatch.setenv("FUSEDRNN_CPU_TEST_THREADS", value)
    with pytest.raises(ValueError, match="FUSEDRNN_CPU_TEST_THREADS must be a whole number from "
                                         f"1 to 64, got '{value}'"):
        with torch.no_grad():
            fusedrnn.LSTM(3, 16)(torch.randn(6, 40, 3))


@pytest.mark.parametrize("threads", [2, 3, 5])
@pytest.mark.parametrize("cell,proj,peephole", FORCED_CELLS)
def test_row_group_splits(cell, proj, peephole, threads, monkeypatch):
    """Threads that split the batch rows (csrc/cpu/row_groups.h) instead of the units, forced on
    shapes below the rule that picks them: uneven groups (5 rows over 2 or 3 threads), one row
    each, and groups with no row at all (2 rows over 3 and 5 threads); forward and backward,
    lengths, both directions side by side."""
    pytest.importorskip("fusedrnn._cpu")
    monkeypatch.setenv("FUSEDRNN_CPU_TEST_THREADS", str(threads))
    monkeypatch.setenv("FUSEDRNN_CPU_TEST_SPLIT", "rows")
    for dtype in (torch.float64, torch.float32):
        for T, B in ((7, 5), (4, 2)):
            run_and_check(Config(cell, proj, "bidir", True, T, B, 37, dtype, True, peephole),
                          torch.device("cpu"))
        run_and_check(Config(cell, proj, "fwd", False, 3, 40, 70, dtype, False, peephole),
                      torch.device("cpu"))


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512", "avx512bf16", "amx"], indirect=True)
@pytest.mark.parametrize("cell,proj,peephole", [("lstm", 0, False), ("lstm", 9, False),
                                                ("lstm", 0, True), ("lstm_cifg", 0, True),
                                                ("gru", 0, False), ("rnn_tanh", 0, False)])
def test_every_instruction_set(cell, proj, peephole, isa, monkeypatch):
    """FUSEDRNN_CPU_ISA lowers the run-time choice, so every compiled path runs here (a path the
    CPU lacks falls back to the best one it has). H=300 gives the backward a depth (G*H) of
    more than one kDepth slice (panel_gemm.h: 64 KB of panel, 1024 rows at the narrowest
    vectors), so the partial sums pass through scratch under every ISA."""
    cpu = pytest.importorskip("fusedrnn._cpu")
    for dtype in (torch.float64, torch.float32):
        for size in [(7, 5, 37), (3, 9, 70), (2, 3, 300)]:
            run_and_check(Config(cell, proj, "bidir", True, *size, dtype, False, peephole),
                          torch.device("cpu"))
    assert cpu.isa() in ("generic", "avx2", "avx512", "avx512bf16", "amx")


def test_larger_threaded_shapes(monkeypatch):
    """Shapes over the threading threshold, with the default thread count."""
    pytest.importorskip("fusedrnn._cpu")
    for cell, proj in [("lstm", 0), ("lstm", 40), ("gru", 0), ("rnn_tanh", 0)]:
        run_and_check(Config(cell, proj, "bidir", True, 3, 17, 96, torch.float32, True),
                      torch.device("cpu"))


def test_concurrent_calls_give_the_results_of_a_call_alone():
    """Python threads calling one module at once: a call that gets fewer threads than planned
    (nested parallelism, or the back-off after stalled barriers) runs the planned row groups one
    after the other, so its results equal a call's alone bit for bit. It used to run all rows as
    one team, whose tail blocks sum in another order: 5 to 44 of 240 calls differed in the last
    bits (batches of 33 and 64, which split into row groups on two threads)."""
    import fusedrnn
    pytest.importorskip("fusedrnn._cpu")
    torch.manual_seed(0)
    module = fusedrnn.RNN(32, 128, nonlinearity="relu")
    inputs = [torch.randn(20, batch, 32) for batch in (1, 16, 33, 64)]
    mismatches = concurrent_mismatches(module, inputs, calls_per_thread=60)
    assert not mismatches


# ------------------------------------------------------------------------------ deferred cell update
# From kDeferredMinStepBytes of input projection per step (B x G*H elements) and a thread share of
# at least kDeferredMinRowBytes of each gate row (256 fp32 or 128 fp64 units), the CPU forward parks
# the packed product's sums and runs the cell update row by row after the whole step's product
# (csrc/cpu/recurrence_forward.h). These shapes take that path; with two threads and H=520 (33 fp32
# panels: shares of 272 and 248 units) one thread defers and the other does not, in one team.
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cell,proj,B", [("lstm", 0, 16), ("lstm", 100, 16), ("gru", 0, 16),
                                         ("rnn_tanh", 0, 56)])
def test_deferred_cell_update(cell, proj, B, threads, monkeypatch):
    pytest.importorskip("fusedrnn._cpu")
    monkeypatch.setenv("FUSEDRNN_CPU_TEST_THREADS", str(threads))
    H = 300 if threads == 1 else 520
    for dtype in (torch.float32, torch.float64):
        run_and_check(Config(cell, proj, "bidir", True, 3, B, H, dtype, threads == 2),
                      torch.device("cpu"))


# ------------------------------------------------------------------------------ small batch
# At B <= 2 and short sequences the CPU forward reads W_hh and b_hh in place instead of packing
# them (csrc/cpu/in_place_dots.h, forward_in_place: while T * B * 2 * W <= P * log2(W), W the
# SIMD width in elements, and at B=1 whenever W_hh is 512 KB or more). The shapes below take
# that path under every instruction set and dtype (the strictest case, W=16, needs T * B * 8 <=
# P), B=3 the packed one; both must match the reference. H=37 and P=20 leave tails in the units
# (rows of a panel past H) and in the depth (masked loads past P).
def _small_batch_grid():
    out = []
    for cell, proj in [("lstm", 0), ("lstm", 20), ("gru", 0), ("rnn_tanh", 0), ("rnn_relu", 0)]:
        for B in (1, 2, 3):
            T = {1: 4, 2: 2, 3: 2}[B] if not proj else {1: 2, 2: 1, 3: 2}[B]
            for directions in ("fwd", "rev"):
                for lengths in (False, True):
                    for dtype in (torch.float64, torch.float32):
                        out.append(Config(cell, proj, directions, lengths, T, B, 37, dtype,
                                          batch_first=B == 2))
    return out


SMALL_BATCH_GRID = _small_batch_grid()


@pytest.mark.parametrize("cfg", SMALL_BATCH_GRID, ids=[c.id for c in SMALL_BATCH_GRID])
def test_small_batch_matches_reference(cfg):
    pytest.importorskip("fusedrnn._cpu")
    run_and_check(cfg, torch.device("cpu"))


def _w_hh_bytes(cell, H, P, dtype):
    return GATES[cell] * H * P * torch.empty((), dtype=dtype).element_size()


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512", "avx512bf16", "amx"], indirect=True)
@pytest.mark.parametrize("cell,proj", [("lstm", 0), ("lstm", 20), ("gru", 0), ("rnn_tanh", 0)])
def test_small_batch_packs_nothing(cell, proj, isa, monkeypatch):
    """The in-place forward carves no packed W_hh (nor W_hr) from the workspace (so the tests
    above do run it): its workspace is smaller than the packed B=3 one by at least W_hh and W_hr
    (the rest, row buffers, differs by far less)."""
    cpu = pytest.importorskip("fusedrnn._cpu")

    def workspace(T, B, H, P, dtype, c=cell):
        (p,), _ = minimal_fwd_params(cpu, c, T=T, B=B, H=H, P=P, dtype=dtype)
        return cpu.forward_workspace_bytes([p])

    H, P = 37, proj or 37
    for dtype in (torch.float64, torch.float32):
        w_bytes = _w_hh_bytes(cell, H, P, dtype) + (_w_hh_bytes("rnn_tanh", P, H, dtype)
                                                     if proj else 0)
        for T, B in [(2 if proj else 4, 1), (1 if proj else 2, 2)]:
            packed = workspace(T, 3, H, P, dtype)
            assert workspace(T, B, H, P, dtype) + w_bytes <= packed, (T, B, dtype)
    # A W_hh of 512 KB or more is read in place at B=1 whatever the length.
    w_bytes = _w_hh_bytes("lstm", 182, 182, torch.float32)
    assert (workspace(500, 1, 182, 182, torch.float32, "lstm") + w_bytes
            <= workspace(500, 3, 182, 182, torch.float32, "lstm"))


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512", "avx512bf16", "amx"], indirect=True)
@pytest.mark.parametrize("cell,proj", [("lstm", 0), ("lstm", 20), ("gru", 0), ("rnn_relu", 0)])
def test_small_batch_every_instruction_set(cell, proj, isa, monkeypatch):
    pytest.importorskip("fusedrnn._cpu")
    for dtype in (torch.float64, torch.float32):
        for T, B in [(2 if proj else 4, 1), (1 if proj else 2, 2)]:
            run_and_check(Config(cell, proj, "bidir", True, T, B, 37, dtype, False),
                          torch.device("cpu"))


@pytest.mark.parametrize("threads", [2, 3, 5])
@pytest.mark.parametrize("cell,proj", [("lstm", 0), ("lstm", 20), ("gru", 0), ("rnn_tanh", 0)])
def test_small_batch_thread_splits(cell, proj, threads, monkeypatch):
    """In-place products on teams of several threads (some with no panel at all)."""
    pytest.importorskip("fusedrnn._cpu")
    monkeypatch.setenv("FUSEDRNN_CPU_TEST_THREADS", str(threads))
    for dtype in (torch.float64, torch.float32):
        run_and_check(Config(cell, proj, "bidir", True, 2, 1, 37, dtype, True),
                      torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_small_batch_large_w_hh(dtype):
    """LSTM H=182 (a W_hh over 512 KB: in place at any length at B=1; 182 = 11 * 16 + 6 leaves
    tails in the units and the depth), both directions, with the default thread count."""
    pytest.importorskip("fusedrnn._cpu")
    run_and_check(Config("lstm", 0, "bidir", False, 3, 1, 182, dtype, False),
                  torch.device("cpu"))


# ------------------------------------------------------------------------------ bad parameters
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
    for (p,), keep in [minimal_fwd_params(cpu), minimal_fwd_params(cpu, "gru"),
                        minimal_fwd_params(cpu, "lstm", P=2)]:
        ws = torch.empty(cpu.forward_workspace_bytes([p]), dtype=torch.uint8)
        p.workspace, p.workspace_bytes = ws.data_ptr(), ws.numel()
        cpu.forward([p])
        assert torch.isfinite(keep["out"]).all() and torch.isfinite(keep["hn"]).all()


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
    (p,), _keep = minimal_fwd_params(cpu)
    setattr(p, field, value)
    _expect(lambda: cpu.forward([p]), "direction 0", *words)


def test_bad_forward_structure():
    cpu = pytest.importorskip("fusedrnn._cpu")
    (p,), _k = minimal_fwd_params(cpu)
    _expect(lambda: cpu.forward([]), "1 or 2 directions", "got 0")
    _expect(lambda: cpu.forward([p, p, p]), "1 or 2 directions", "got 3")
    (q,), _k2 = minimal_fwd_params(cpu, H=4)
    _expect(lambda: cpu.forward([p, q]), "direction 1", "hidden")
    (g,), _k3 = minimal_fwd_params(cpu, "gru")
    g.state = 2
    _expect(lambda: cpu.forward([g]), "state", "hidden")
    (proj,), _k4 = minimal_fwd_params(cpu, "lstm", P=2)
    proj.w_hr = 0
    _expect(lambda: cpu.forward([proj]), "w_hr", "null")
    (s,), _k5 = minimal_fwd_params(cpu)
    s.xproj = (s.xproj[0], -1, 3)
    _expect(lambda: cpu.forward([s]), "xproj", "stride")
    (t,), _k6 = minimal_fwd_params(cpu)
    t.gates = (_k6["out"].data_ptr(), 0, 0)
    _expect(lambda: cpu.forward([t]), "c_seq")


def test_bad_lengths_and_workspace():
    cpu = pytest.importorskip("fusedrnn._cpu")
    (p,), keep = minimal_fwd_params(cpu)
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


def test_workspace_sized_for_one_thread_runs_on_two(monkeypatch):
    """Row groups each need a workspace: a workspace sized for one thread (a stale size after
    torch.set_num_threads or a change of CPU affinity) still runs, the threads then splitting
    the units, and gives the same results."""
    pytest.importorskip("fusedrnn._cpu")
    sized = {}
    original = _backend._workspace

    def sized_for_one_thread(module, kind, params, device):
        threads = [p.num_threads for p in params]
        for p in params:
            p.num_threads = 1
        ws = original(module, kind, params, device)
        for p, n in zip(params, threads):
            p.num_threads = n
        sized[kind] = ws.numel()
        return ws

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs for two threads")
    monkeypatch.setattr(_backend, "_workspace", sized_for_one_thread)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_and_check(Config("lstm", 0, "fwd", True, 3, 40, 70, torch.float64, False),
                      torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert sized, "the layer ran through _backend._workspace"
