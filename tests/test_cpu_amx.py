"""The bfloat16 recurrence on AMX tiles (csrc/cpu/amx_tiles.h, the `amx` build of the CPU
kernel), and on AVX512-BF16's VDPBF16PS (the `avx512bf16` build, same layouts and products). Its per-step product takes h_{t-1} (forward) or d_pre (backward) rounded to bfloat16, as
every bfloat16 GEMM does, so it is not the float kernel rounded (test_cpu_bfloat16.py checks that
bit for bit on the AVX-512 build). Checked here instead:
- one step, where every operand of the forward product is a bfloat16 value already: the outputs
  are the float64 result rounded, within one bfloat16 ulp; the backward's d_h0 is the product of
  the bfloat16 d_pre the kernel writes out, rounded once;
- whole sequences with every feature (lengths, both directions, initial states, odd sizes) within
  a bfloat16 error bar against float64, padded rows zero;
- a NaN in one row of h0 stays in that row;
- torch.nn's own bfloat16 kernels (oneDNN, also on AMX on this kind of CPU) still right after ours
  ran on the same threads: the kernel gives each thread its tile configuration back.
Each test also runs on the AVX-512 build (FUSEDRNN_CPU_ISA=avx512), which must meet the same bars.
"""
from __future__ import annotations

import pytest
import torch

from _helpers import minimal_fwd_params, rel_err, run_backward_layer, run_forward_layer
from fusedrnn import _backend, reference

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
BF16_ULP = 2.0 ** -7  # the spacing of bfloat16 values, relative to the value (at most)

pytestmark = pytest.mark.skipif(
    _backend.backend_name() != "cpu", reason="AMX runs in the _cpu kernels")


def _cpu_runs(isa: str) -> bool:
    """Whether this CPU (and build) runs `isa` when asked for it (a request above what the CPU
    has runs the best it has)."""
    from fusedrnn import _cpu
    import os
    saved = os.environ.get("FUSEDRNN_CPU_ISA")
    os.environ["FUSEDRNN_CPU_ISA"] = isa
    try:
        return _cpu.isa() == isa
    finally:
        if saved is None:
            del os.environ["FUSEDRNN_CPU_ISA"]
        else:
            os.environ["FUSEDRNN_CPU_ISA"] = saved


@pytest.fixture(params=["amx", "avx512bf16", "avx512"])
def isa(request, monkeypatch):
    if request.param == "amx" and not _cpu_runs("amx"):
        pytest.skip("needs a CPU with AMX-BF16 and an OS that grants the tile state")
    if request.param == "avx512bf16" and not _cpu_runs("avx512bf16"):
        pytest.skip("needs a CPU with AVX512-BF16")
    monkeypatch.setenv("FUSEDRNN_CPU_ISA", request.param)
    return request.param


def _bf16(g, *shape, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).bfloat16()


def _reference(cell, xproj, w_hh, b_hh, h0, c0, lengths=None, reverse=False, w_hr=None):
    """fusedrnn.reference's layer in float64 on xproj (an identity input weight)."""
    width = xproj.shape[-1]
    eye = torch.eye(width, dtype=torch.float64)
    cast = lambda t: None if t is None else t.double()  # noqa: E731
    return reference.rnn_layer(cell, cast(xproj), eye, cast(w_hh), None, cast(b_hh), cast(w_hr),
                               cast(h0), cast(c0), lengths, reverse)


def _within_ulp(got, want, name):
    """Every element within one bfloat16 ulp of the float64 value, plus a slack for the float
    sums' own rounding (relative to the largest value)."""
    got, want = got.double(), want.double()
    bound = BF16_ULP * want.abs() + 1e-4 * want.abs().max()
    worst = ((got - want).abs() - bound).max().item()
    assert torch.isfinite(got).all() and worst <= 0, f"{name}: {worst} past the bound"


STEP_CASES = [("lstm", 3, 16, 16), ("lstm", 17, 37, 37), ("lstm", 20, 70, 70),
              ("lstm", 17, 37, 21), ("gru", 3, 16, 16), ("gru", 17, 37, 37), ("gru", 33, 70, 70),
              ("rnn_tanh", 17, 37, 37), ("rnn_relu", 20, 70, 70)]


@pytest.mark.parametrize("cell, B, H, P", STEP_CASES,
                         ids=[f"{c}-B{b}-H{h}" + (f"-P{p}" if p != h else "")
                              for c, b, h, p in STEP_CASES])
def test_one_step_is_the_float64_result_rounded(cell, B, H, P, isa):
    """T=1 from a bfloat16 h0: the forward product's operands are exact, so the outputs are the
    float64 ones rounded (B > 2 packs W_hh; B=17 and more leave a partial row tile, H=37 and 70
    partial panels and chunks of k).

    Then the backward's d_h0 = d_pre W_hh (+ a GRU's direct part z * d_h). The AMX product reads
    d_pre rounded to bfloat16, which is exactly what the kernel writes out as d_xproj (LSTM,
    RNN) or d_hproj (GRU), so d_h0 is that product of bfloat16 values, rounded once. The AVX-512
    build multiplies the float d_pre: it may differ by half an ulp of each term (2^-9 relative).
    P < H: a projected LSTM (its r W_hr^T on FMAs, in float: no rounding on that product)."""
    g = torch.Generator().manual_seed(B * 100 + H + P)
    G = GATES[cell]
    xproj = _bf16(g, 1, B, G * H)
    w_hh, b_hh = _bf16(g, G * H, P, scale=0.3), _bf16(g, G * H, scale=0.3)
    w_hr = _bf16(g, P, H, scale=0.3) if P != H else None
    h0 = _bf16(g, 1, B, P)
    c0 = _bf16(g, 1, B, H) if cell == "lstm" else None
    run = run_forward_layer(cell, xproj, [w_hh], [b_hh], [w_hr], h0, c0, training=True)

    out, hn, cn = _reference(cell, xproj, w_hh, b_hh, h0[0], c0[0] if cell == "lstm" else None,
                             w_hr=w_hr)
    _within_ulp(run.out, out, "out")
    _within_ulp(run.hn[0], hn, "h_n")
    if cell == "lstm":
        _within_ulp(run.cn[0], cn, "c_n")

    d_out = _bf16(g, 1, B, P)
    d_cn = _bf16(g, 1, B, H) if cell == "lstm" else None
    grads = run_backward_layer(run, d_out, None, d_cn)
    d_pre = (grads.d_hproj if cell == "gru" else grads.d_xproj)[0].double()
    w = w_hh.double()
    want = d_pre @ w
    if cell == "gru":  # the direct part, from the saved z the kernel reads
        want = want + run.gates[0, 0, :, H:2 * H].double() * d_out[0].double()
    bound = BF16_ULP * want.abs() + 1e-4 * want.abs().max()
    if isa == "avx512":  # the FMA kernel multiplies d_pre in float, not rounded
        bound = bound + 2.0 ** -9 * (d_pre.abs() @ w.abs())
    worst = ((grads.d_h0[0].double() - want).abs() - bound).max().item()
    assert torch.isfinite(grads.d_h0).all() and worst <= 0, f"d_h0: {worst} past the bound"


@pytest.mark.parametrize("vnni_isa", ["amx", "avx512bf16"])
def test_bfloat16_layers_take_the_tiles(vnni_isa):
    """Where the CPU has AMX (or AVX512-BF16), a bfloat16 layer at batch 17 takes the bfloat16
    VNNI product (its workspace has that layout, not the FMA one's) and a float32 layer does not:
    so the tests above that run with isa=amx (avx512bf16) test the tiles (VDPBF16PS), not a
    silent fallback."""
    if not _cpu_runs(vnni_isa):
        pytest.skip(f"needs a CPU that runs the {vnni_isa} build")
    from fusedrnn import _cpu
    import os

    def workspace(dtype, isa):
        os.environ["FUSEDRNN_CPU_ISA"] = isa
        params, _ = minimal_fwd_params(_cpu, "lstm", T=2, B=17, H=40, dtype=dtype)
        return _cpu.forward_workspace_bytes(params)

    saved = os.environ.get("FUSEDRNN_CPU_ISA")
    try:
        assert workspace(torch.bfloat16, vnni_isa) != workspace(torch.bfloat16, "avx512")
        assert workspace(torch.float32, vnni_isa) == workspace(torch.float32, "avx512")
    finally:
        if saved is None:
            os.environ.pop("FUSEDRNN_CPU_ISA", None)
        else:
            os.environ["FUSEDRNN_CPU_ISA"] = saved


SEQUENCE_CASES = [("lstm", 2, 37, 37), ("gru", 2, 37, 37), ("rnn_tanh", 1, 37, 37),
                  ("lstm", 1, 37, 37), ("lstm", 1, 100, 100), ("gru", 1, 100, 100),
                  ("lstm", 2, 37, 21), ("lstm", 1, 100, 70)]
# Thread teams forced (FUSEDRNN_CPU_TEST_THREADS, FUSEDRNN_CPU_TEST_SPLIT): None leaves the
# kernel's own choice; teams that split the units share the bfloat16 h / d_pre between threads
# at every step (H=100: 7 forward panels, 2 backward ones, uneven over 2 and 3 threads).
TEAMS = [None, ("2", "units"), ("3", "units"), ("2", "rows")]


@pytest.mark.parametrize("team", TEAMS, ids=["auto", "2-units", "3-units", "2-rows"])
@pytest.mark.parametrize("cell, D, H, P", SEQUENCE_CASES,
                         ids=[f"{c}-D{d}-H{h}" + (f"-P{p}" if p != h else "")
                              for c, d, h, p in SEQUENCE_CASES])
def test_sequences_with_every_feature_within_bfloat16_error(cell, D, H, P, team, isa, monkeypatch):
    """T=7, B=19 (a partial second row tile) with unsorted lengths, initial states, one or two
    directions, projected LSTMs (P < H), on several thread teams: outputs, final states and the
    backward's gradients against float64 within a bfloat16 bar (errors of 3-6e-3 are typical, a
    layout slip or a race gives O(1)), padded rows zero."""
    if team is not None:
        monkeypatch.setenv("FUSEDRNN_CPU_TEST_THREADS", team[0])
        monkeypatch.setenv("FUSEDRNN_CPU_TEST_SPLIT", team[1])
    T, B = 7, 19
    g = torch.Generator().manual_seed(D * 10 + GATES[cell])
    G = GATES[cell]
    xproj = _bf16(g, T, B, D * G * H)
    w_hh = [_bf16(g, G * H, P, scale=0.3) for _ in range(D)]
    b_hh = [_bf16(g, G * H, scale=0.3) for _ in range(D)]
    # W_hr at torch.nn's init scale (1/sqrt(H)): larger, h grows with H and the recurrence
    # amplifies the bfloat16 rounding of h (both builds' errors grew 2-3x at 0.3, H=100).
    w_hr = [_bf16(g, P, H, scale=H ** -0.5) if P != H else None for _ in range(D)]
    h0 = _bf16(g, D, B, P)
    c0 = _bf16(g, D, B, H) if cell == "lstm" else None
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[3] = T
    run = run_forward_layer(cell, xproj, w_hh, b_hh, w_hr, h0, c0, lengths, training=True)

    leaves = [t.double().requires_grad_() for t in (xproj, h0, c0) if t is not None]
    outs, finals, cells = [], [], []
    for d in range(D):
        out, hn, cn = _reference(cell, leaves[0][..., d * G * H:(d + 1) * G * H], w_hh[d], b_hh[d],
                                 leaves[1][d], leaves[2][d] if cell == "lstm" else None,
                                 lengths, reverse=d == 1, w_hr=w_hr[d])
        outs.append(out)
        finals.append(hn)
        cells.append(cn)
    out = torch.cat(outs, dim=-1)
    assert rel_err(run.out, out) <= 2e-2
    assert rel_err(run.hn, torch.stack(finals)) <= 2e-2
    if cell == "lstm":
        assert rel_err(run.cn, torch.stack(cells)) <= 2e-2
    padded = torch.arange(T)[:, None] >= lengths[None, :]
    assert (run.out[padded] == 0).all()

    d_out = _bf16(g, T, B, D * P)
    (out * d_out.double()).sum().backward()
    grads = run_backward_layer(run, d_out, None, None)
    assert rel_err(grads.d_xproj, leaves[0].grad) <= 2e-2
    assert rel_err(grads.d_h0, leaves[1].grad) <= 2e-2
    if cell == "lstm":
        assert rel_err(grads.d_c0, leaves[2].grad) <= 2e-2


def test_torch_bfloat16_kernels_still_right_after_ours(isa):
    """oneDNN (torch.nn's bfloat16 LSTM and matmul) may run on AMX tiles on the same threads as
    our kernel: after each of our calls, torch's results are unchanged. (oneDNN may well load
    its own tile configuration before each kernel, in which case this cannot see a kernel that
    forgets to give a thread its configuration back; AmxTileScope does so regardless.)"""
    torch.manual_seed(0)
    a, b = torch.randn(64, 96).bfloat16(), torch.randn(96, 80).bfloat16()
    theirs = torch.nn.LSTM(32, 48).bfloat16()
    x = torch.randn(9, 24, 32).bfloat16()
    with torch.no_grad():
        mm_before, lstm_before = a @ b, theirs(x)[0]
    g = torch.Generator().manual_seed(1)
    for cell in ("lstm", "gru"):
        G = GATES[cell]
        run_forward_layer(cell, _bf16(g, 5, 24, G * 48), [_bf16(g, G * 48, 48, scale=0.3)],
                          [_bf16(g, G * 48)], [None], training=False)
        with torch.no_grad():
            assert torch.equal(a @ b, mm_before)
            assert torch.equal(theirs(x)[0], lstm_before)


def test_nan_stays_in_its_row(isa):
    """A NaN in one row of h0 makes that row's outputs NaN and leaves the others as they were:
    a tile row's sums read only its own row of A (B=20: the NaN row and others share a tile)."""
    g = torch.Generator().manual_seed(7)
    T, B, H = 3, 20, 37
    xproj = _bf16(g, T, B, 4 * H)
    w_hh, b_hh = _bf16(g, 4 * H, H, scale=0.3), _bf16(g, 4 * H)
    h0 = _bf16(g, 1, B, H)
    c0 = _bf16(g, 1, B, H)
    clean = run_forward_layer("lstm", xproj, [w_hh], [b_hh], [None], h0, c0, training=False)
    h0[0, 5, 11] = float("nan")
    poisoned = run_forward_layer("lstm", xproj, [w_hh], [b_hh], [None], h0, c0, training=False)
    assert poisoned.out[:, 5].isnan().all()
    others = [b for b in range(B) if b != 5]
    assert torch.equal(poisoned.out[:, others], clean.out[:, others])
