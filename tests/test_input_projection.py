"""The input projection's GEMM choice (_input_projection.py): oneDNN for x W^T and d_x on CPUs
where MKL is slow (not Intel's, with AVX-512), torch's F.linear everywhere else. FUSEDRNN_CPU_GEMM=onednn forces the oneDNN
path on any machine (at any size), so these tests run it wherever torch has oneDNN."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedrnn
from fusedrnn import _input_projection

from _helpers import Case, compare_with_torch, requires_native

requires_onednn = pytest.mark.skipif(not _input_projection.onednn_available(),
                                     reason="this torch has no oneDNN linear op")


@pytest.fixture
def onednn(monkeypatch):
    monkeypatch.setenv(_input_projection.GEMM_VARIABLE, "onednn")


def _operands(batch_first: bool, bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 5, 9, generator=gen)  # [T, B, I]
    if batch_first:  # the time-major view of a batch-first input, as _rnn makes it
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    w = torch.randn(12, 9, generator=gen)
    b = torch.randn(12, generator=gen) if bias else None
    return x, w, b


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


def _took_onednn(out: torch.Tensor) -> bool:
    return type(out.grad_fn).__name__ == "_OneDnnProjectionBackward"


def _grads(fn, x, w, b, d_out):
    x, w, b = _leaves(x, w, b)
    out = fn(x, w, b)
    out.backward(d_out)
    return out.detach(), [t.grad for t in (x, w, b) if t is not None]


@requires_onednn
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_gradients_match_linear(onednn, batch_first, bias):
    x, w, b = _operands(batch_first, bias)
    d_out = torch.randn(6, 5, 12, generator=torch.Generator().manual_seed(3))
    expected, expected_grads = _grads(F.linear, x, w, b, d_out)
    actual, actual_grads = _grads(_input_projection.project, x, w, b, d_out)
    assert actual.stride(2) == 1
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    for a, e in zip(actual_grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@requires_onednn
def test_takes_onednn_when_forced_and_linear_otherwise(onednn, monkeypatch):
    x, w, b = _leaves(*_operands(False, True))
    assert _took_onednn(_input_projection.project(x, w, b))
    monkeypatch.setenv(_input_projection.GEMM_VARIABLE, "torch")
    assert not _took_onednn(_input_projection.project(x, w, b))
    # auto: never below the size where oneDNN's call costs more than it saves
    monkeypatch.setenv(_input_projection.GEMM_VARIABLE, "auto")
    assert not _took_onednn(_input_projection.project(x, w, b))
    # not for other dtypes
    monkeypatch.setenv(_input_projection.GEMM_VARIABLE, "onednn")
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double()
    assert not _took_onednn(_input_projection.project(x64, w64, None))
    # nor when oneDNN is turned off for torch
    with torch.backends.mkldnn.flags(enabled=False):
        assert not _took_onednn(_input_projection.project(x, w, b))


@requires_onednn
def test_without_grad_no_graph(onednn):
    x, w, b = _operands(True, True)
    with torch.no_grad():
        out = _input_projection.project(x, w, b)
    assert out.grad_fn is None
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@requires_onednn
def test_second_order_gradients_match_linear(onednn):
    x, w, b = _operands(True, True)

    def penalty(fn):
        xl, wl, bl = _leaves(x, w, b)
        out = fn(xl, wl, bl)
        gx, gw = torch.autograd.grad(out.pow(2).sum(), (xl, wl), create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum() + gw.pow(2).sum(), (xl, wl, bl))

    for a, e in zip(penalty(_input_projection.project), penalty(F.linear)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


@requires_onednn
def test_backward_twice_with_retain_graph(onednn):
    x, w, b = _leaves(*_operands(True, False))
    out = _input_projection.project(x, w, b)
    out.sum().backward(retain_graph=True)
    first = w.grad.clone()
    out.sum().backward()
    torch.testing.assert_close(w.grad, 2 * first)


@requires_onednn
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("rows", [10, 40], ids=["direct", "transposed"])  # (from 2 x 9 rows)
def test_weight_grad_matches_mm(onednn, monkeypatch, strided, rows):
    gen = torch.Generator().manual_seed(5)
    d2 = torch.randn(rows, 24, generator=gen)
    x2 = (torch.randn(rows, 2 * 9, generator=gen)[:, 9:] if strided
          else torch.randn(rows, 9, generator=gen))
    got = _input_projection.weight_grad(d2, x2)
    torch.testing.assert_close(got, d2.t().mm(x2), rtol=1e-5, atol=1e-5)
    assert got.is_contiguous()  # (a transposed view slowed every later add into .grad)
    got.addmm_(d2[:3].t(), x2[:3])  # functional adds the h0 term in place
    torch.testing.assert_close(got, d2.t().mm(x2) + d2[:3].t().mm(x2[:3]), rtol=1e-5, atol=1e-5)
    # A direction's columns of a bidirectional d_pre: rows with gaps, where oneDNN ran a
    # reference kernel ~1000x slower. Right, and on MKL (whose result is contiguous).
    d_pre = torch.randn(rows, 2 * 24, generator=gen)
    d_dir = d_pre[:, 24:]
    got = _input_projection.weight_grad(d_dir, x2)
    torch.testing.assert_close(got, d_dir.t().mm(x2), rtol=1e-5, atol=1e-5)
    assert got.is_contiguous()
    monkeypatch.setenv(_input_projection.GEMM_VARIABLE, "auto")  # small: MKL's mm, contiguous
    assert _input_projection.weight_grad(d2, x2).is_contiguous()


@requires_onednn
def test_operands_with_gaps_are_right(onednn):
    """x whose rows are a slice of wider rows: copied before oneDNN sees it."""
    gen = torch.Generator().manual_seed(6)
    wide = torch.randn(6, 5, 20, generator=gen, requires_grad=True)
    x = wide[:, :, 3:12]
    w = torch.randn(12, 9, generator=gen, requires_grad=True)
    out = _input_projection.project(x, w, None)
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    expected = torch.zeros_like(wide)
    expected[:, :, 3:12] = w.sum(0)
    torch.testing.assert_close(wide.grad, expected, rtol=1e-5, atol=1e-5)


def test_bad_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv(_input_projection.GEMM_VARIABLE, "mkl")
    x, w, b = _operands(False, True)
    with pytest.raises(RuntimeError, match="FUSEDRNN_CPU_GEMM must be one of auto, onednn, torch"):
        _input_projection.project(x, w, b)


def test_without_the_op_keeps_linear(onednn, monkeypatch):
    monkeypatch.setattr(_input_projection, "onednn_available", lambda: False)
    x, w, b = _leaves(*_operands(False, True))
    assert not _took_onednn(_input_projection.project(x, w, b))


@requires_native
@requires_onednn
@pytest.mark.parametrize("case", [
    Case(cell="lstm", layers=2, bidirectional=True, batch_first=True, hx=True, dtype=torch.float32),
    Case(cell="gru", layers=2, packing="packed_unsorted", dtype=torch.float32),
    Case(cell="rnn_relu", bidirectional=True, bias=False, dtype=torch.float32),
    Case(cell="lstm_proj", batch_first=True, hx=True, dtype=torch.float32),
], ids=lambda c: c.id)
def test_modules_match_torch_nn_on_onednn(onednn, case):
    compare_with_torch(case)


@requires_native
@requires_onednn
def test_inference_path_on_onednn(onednn):
    torch.manual_seed(0)
    ours = fusedrnn.GRU(9, 11, num_layers=2, bidirectional=True, batch_first=True)
    ref = torch.nn.GRU(9, 11, num_layers=2, bidirectional=True, batch_first=True)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(4, 7, 9)
    with torch.no_grad():
        out, h = ours(x)
        out_ref, h_ref = ref(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vendor, flags, expected", [
    ("AuthenticAMD", {"avx2", "fma", "avx512f"}, True),   # Zen 4: MKL runs no AVX-512 there
    ("AuthenticAMD", {"avx2", "fma"}, False),             # Zen 3: MKL's AVX2 code won
    ("GenuineIntel", {"avx2", "fma", "avx512f"}, False),  # MKL at the machine's peak
    ("HygonGenuine", {"avx2"}, False),
    ("", set(), False),                                    # unknown: torch's GEMM
], ids=["amd-avx512", "amd-avx2", "intel", "other-avx2", "unknown"])
def test_onednn_chosen_only_where_mkl_runs_below_the_cpu(monkeypatch, vendor, flags, expected):
    """The automatic choice (_input_projection's table): oneDNN on a CPU whose vendor is not
    Intel and that has AVX-512; MKL (F.linear) on every other."""
    monkeypatch.setattr(_input_projection, "_cpu_identity",
                        lambda: (vendor, frozenset(flags), 25))
    _input_projection._vendor_prefers_onednn.cache_clear()
    try:
        assert _input_projection._vendor_prefers_onednn() is expected
    finally:
        _input_projection._vendor_prefers_onednn.cache_clear()


@pytest.mark.parametrize("gemm", ["onednn", "torch"])
@pytest.mark.parametrize("bias", [False, True])
def test_project_into_writes_every_row(monkeypatch, gemm, bias):
    """The inference plan's projection into its kept block: on oneDNN in chunks of rows (here 4
    rows: 30 rows end with a chunk that overlaps the one before), on torch's GEMM in one mm;
    every row of the block is written (it starts as NaNs) with x W^T + b."""
    if gemm == "onednn" and not _input_projection.onednn_available():
        pytest.skip("this torch has no oneDNN linear op")
    monkeypatch.setenv(_input_projection.GEMM_VARIABLE, gemm)
    gen = torch.Generator().manual_seed(3)
    x_rows = torch.randn(30, 9, generator=gen)
    w = torch.randn(12, 9, generator=gen)
    b = torch.randn(12, generator=gen) if bias else None
    monkeypatch.setattr(_input_projection, "kProjectionChunkBytes", 4 * 12 * 4)
    dest = torch.full((30, 12), float("nan"))
    _input_projection.project_into(x_rows, w, b, dest)
    torch.testing.assert_close(dest, F.linear(x_rows, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vendor, family, expected", [
    ("AuthenticAMD", 26, _input_projection.kMinMacs),             # Zen 5: full-width AVX-512
    ("AuthenticAMD", 25, _input_projection.kMinWeightGradMacs),   # Zen 4: halves
    ("GenuineIntel", 6, _input_projection.kMinWeightGradMacs),
    ("", 0, _input_projection.kMinWeightGradMacs),
], ids=["zen5", "zen4", "intel", "unknown"])
def test_weight_grad_threshold_by_cpu(monkeypatch, vendor, family, expected):
    monkeypatch.setattr(_input_projection, "_cpu_identity",
                        lambda: (vendor, frozenset({"avx2", "fma", "avx512f"}), family))
    _input_projection.weight_grad_min_macs.cache_clear()
    try:
        assert _input_projection.weight_grad_min_macs() == expected
    finally:
        _input_projection.weight_grad_min_macs.cache_clear()


def test_cpu_identity_reads_this_machine():
    vendor, flags, family = _input_projection._cpu_identity()
    assert isinstance(vendor, str) and isinstance(flags, frozenset)
    assert isinstance(family, int) and family >= 0
