"""The input projection x W_ih^T (+ b_ih) of a layer, and which CPU GEMM runs it; also the
layer's weight-gradient GEMM and bias-gradient sum (weight_grad, row_sum), which the backward
of the recurrence (_layer_recurrence.py) shares.

Every layer starts with this GEMM over all T*B rows at once, and training adds two more of the
same size (d_x = d_xproj W_ih, dW_ih = d_xproj^T x): in large-batch training on the CPU they are
most of the call. torch.nn.functional.linear runs them on MKL. MKL picks its kernels by CPU
vendor, and on an AMD CPU with AVX-512 it runs well below oneDNN's GEMM (which torch.nn.LSTM
itself uses). Measured on a 2-core AMD EPYC (Zen 4) VM, torch 2.13, 2 threads, fp32, same
process:

    rows x K x N (x W^T)      MKL (F.linear)   oneDNN (mkldnn._linear_pointwise)
    3200 x 256 x 1024         10.4 ms          8.5 ms
    3200 x 512 x 2048         41-49 ms         33-37 ms   (~150 against ~200 GFLOP/s)
    3200 x 1024 x 4096        190 ms           153 ms
    100 x 64 x 256            27 us            32 us      (small GEMMs: oneDNN's call costs more)

while for dW = d^T x (a long reduction over the rows) MKL was as fast as oneDNN's d^T x; oneDNN
wins there only as (x^T d^T)^T and only for large products (kMinWeightGradMacs). On Intel CPUs
MKL ran these GEMMs at the machine's peak (~305 GFLOP/s on the 2-core Sapphire Rapids VM), so
there is nothing to win and they stay on MKL.

Without AVX-512 it is the other way round. On a 2-core AMD EPYC (Zen 3: AVX2 and FMA only) VM,
same settings, median of 9 calls, MKL against oneDNN, ms (oneDNN's dW copies its transposed x
operand first, ~4 ms at 3200 x 512):

    rows x I x G              x W^T          dW = d^T x     d_x = d W
    3200 x 512 x 2048         49-58 / 51-53  47-49 / 56-64  50-52 / 57-58
    3200 x 1024 x 4096        209-215 / 244+ 184-191 / 228-235  190-191 / 230-242
    6400 x 256 x 1024         26-27 / 25-26  25-27 / 33-34  26-28 / 27-29

and a whole LSTM B=64 T=50 training call (fusedrnn against torch.nn in the same run, two runs
each, --budget 6): H=512 1.05-1.07x with MKL against 0.94-0.95x with oneDNN, H=1024 0.99-1.10x
against 0.89-0.91x, H=256 1.26-1.28x against 1.12x.

Zen 5 (AMD family 26) runs AVX-512 on full 512-bit units, which oneDNN uses and MKL does not:
on a 2-core EPYC Zen 5 VM (same settings, median of 20-400 calls, ms) oneDNN ran every one of
these GEMMs about twice as fast, dW from ~5 M multiply-adds on:

    rows x G x I (dW = d^T x)  MKL     oneDNN       x W^T MKL / oneDNN   d_x MKL / oneDNN
    100 x 256 x 64             0.027   0.032
    400 x 256 x 64             0.086   0.074
    400 x 512 x 128            0.267   0.156        0.244 / 0.115        0.242 / 0.118
    3200 x 1024 x 256          8.5     5.6          7.5 / 3.6            7.6 / 3.3
    3200 x 4096 x 1024         250     123          275 / 139            252 / 125

So on a CPU whose vendor is not Intel and that has AVX-512, a float32 projection of at least
kMinMacs multiply-adds runs x W^T and d_x on oneDNN, and the weight gradients (weight_grad:
dW_ih here, dW_hh of the recurrence) run there from kMinWeightGradMacs on (from kMinMacs on
where the AVX-512 units are full width: weight_grad_min_macs). Everything else (other dtypes
and devices, small GEMMs, torch.compile, tracing, torch.func transforms, meta and fake tensors)
is torch's GEMM, unchanged: F.linear, or torch.mm/addmm with out= in project_into (the
inference plan's projection into its kept block). FUSEDRNN_CPU_GEMM=onednn or =torch overrides
the choice (tests force oneDNN on any machine; a user can rule it out).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backend

GEMM_VARIABLE = "FUSEDRNN_CPU_GEMM"
_CHOICES = ("auto", "onednn", "torch")

# Below about this many multiply-adds oneDNN's per-call cost ate its gain (table above: even at
# 100 x 128 x 512 = 6.5 M, 1.2x at 26 M).
kMinMacs = 1 << 23
# The weight gradient d^T x (a long reduction over the rows) on oneDNN, as (x^T d^T)^T, against
# MKL's d^T x, same VM (R x G x I): 1600 x 768 x 256 4.3 against 3.9 ms; 3200 x 1024 x 256
# 10.5 / 11.0; 3200 x 2048 x 512 35 / 40; 3200 x 4096 x 1024 133 / 171.
kMinWeightGradMacs = 1 << 29

# Tensor subclasses (other than parameters) keep F.linear, which dispatches through them.
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def project(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """x [T, B, I] (any strides) -> x W^T + b as [T, B, N] with unit stride in the last dim,
    differentiable like F.linear."""
    if not _onednn_applies(x, w, b):
        xproj = F.linear(x, w, b)
        return xproj if xproj.stride(2) == 1 else xproj.contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                    or (b is not None and b.requires_grad)):
        return _OneDnnProjection.apply(x, w, b)
    return _onednn_linear(x.reshape(-1, x.size(2)), w, b).view(x.size(0), x.size(1), w.size(0))


# project_into's chunk of oneDNN output rows, in bytes: small enough that malloc serves it from
# its heap without page faults once warm (glibc's mmap threshold adapts up to 32 MiB) and that
# the copy reads it from cache, large enough that each chunk's GEMM runs at oneDNN's full rate.
kProjectionChunkBytes = 2 << 20


def project_into(x_rows: Tensor, w: Tensor, b: Optional[Tensor], dest: Tensor) -> None:
    """x_rows [R, I] W^T (+ b) written into dest [R, N] (contiguous): the inference plan's kept
    block (_projection_buffer). Where project() would run the product on oneDNN, whose op has no
    out= form, it runs in chunks of rows, each copied into dest; elsewhere torch's mm/addmm
    write dest directly.

    MKL's mm into the block ran at half of oneDNN's rate on Zen 5 (module table): LSTM B=16
    T=1000 H=256 inference 69-92 ms a call, 46 of them in the projection, torch.nn 47-55."""
    if _onednn_applies(x_rows.unsqueeze(0), w, b):
        rows = x_rows.size(0)
        step = max(1, min(rows, kProjectionChunkBytes // (w.size(0) * x_rows.element_size())))
        for first in range(0, rows, step):
            # The last chunk ends at the last row, overlapping the one before: every chunk of
            # a weight shape has the same rows (one oneDNN primitive cached, not one for each
            # remainder), and none has a single row (oneDNN rounded those otherwise: 3e-6).
            # The overlap recomputes less than a chunk: at most 1/16 of the smallest kept
            # block's projection (32 MiB), less of larger ones.
            first = min(first, rows - step)
            dest[first:first + step].copy_(_onednn_linear(x_rows[first:first + step], w, b))
    elif b is None:
        torch.mm(x_rows, w.t(), out=dest)
    else:
        torch.addmm(b, x_rows, w.t(), out=dest)


def choice() -> str:
    """FUSEDRNN_CPU_GEMM as given (auto when unset); raises on anything else."""
    value = _backend.env_value(GEMM_VARIABLE) or "auto"
    if value not in _CHOICES:
        raise RuntimeError(f"fusedrnn: {GEMM_VARIABLE} must be one of {', '.join(_CHOICES)}, "
                           f"got {value!r}")
    return value


def onednn_available() -> bool:
    """Whether this torch has oneDNN and the linear op Inductor uses for it."""
    return _linear_op() is not None


def weight_grad(d2: Tensor, x2: Tensor) -> Tensor:
    """d2^T x2 ([R, G]^T [R, I] -> [G, I]): a weight gradient summed over all R = T*B rows
    (dW_ih, and the recurrence's dW_hh), contiguous. MKL's kernel is kept below
    weight_grad_min_macs(), where it was as fast or faster; above, oneDNN runs it, as
    (x2^T d2)^T from 2 I rows on (x2 [R, I]), else directly as d2^T x2.

    (x2^T d2)^T is copied out of its transposed view: a parameter's gradient of another layout
    is copied by autograd's AccumulateGrad anyway (layout contract), and once .grad exists,
    adding the view into it ran 11-70x slower than adding a contiguous one (Zen 5: 38 against
    3 us at 512 x 128, 8.9 against 0.13 ms at 4096 x 1024). The copy costs the same whatever
    the rows (92 us at 1024 x 256), which a short reduction does not win back; the rows where
    it does grew with I (Zen 5, median us, R x G x I: MKL / direct / transposed + copy):
        128 x 512 x 128      90 /   83 /   86
        256 x 512 x 128     172 /  139 /  130
        32 x 1024 x 256      95 /   83 /  229
        256 x 1024 x 256    676 /  456 /  504
        512 x 1024 x 256   1387 /  878 /  840
        3200 x 1024 x 256  8395 / 6856 / 4764
        512 x 2048 x 512   5021 / 2898 / 2997
        1024 x 2048 x 512  9929 / 6106 / 5832"""
    macs = d2.size(0) * d2.size(1) * x2.size(1)
    # Only dense operands (a direction's columns of a bidirectional d_pre are not: copying them
    # costs about what oneDNN gains).
    # (plain_eager first, as in _use_onednn: weight_grad_min_macs reads /proc/cpuinfo.)
    # (No rows: oneDNN has no primitive for an empty reduction.)
    if (d2.dim() == 2 and x2.dim() == 2 and d2.size(0) > 0 and _dense(d2) and _dense(x2)
            and _backend.plain_eager() and _use_onednn(macs, weight_grad_min_macs(), d2, x2)):
        if d2.size(0) < 2 * x2.size(1):
            return _onednn_linear(d2.t(), x2.t(), None)
        return _onednn_linear(x2.t(), d2.t(), None).t().contiguous()
    return d2.t().mm(x2)


def row_sum(d_pre: Tensor) -> Tensor:
    """d_pre [T, B, X] (dense, as the native backward allocates it) summed over T and B: [X].

    torch's sum, whose error stays flat as rows grow. It was a matrix-vector product with ones
    (then twice as fast), whose error grows with the rows: float32 bias gradients 17-50x
    torch.nn's at T=5000 B=8 (review, session 30). With torch 2.13 on the Zen 4 VM the sum
    is as fast (float32, median of 15: B=64 T=50 X=1024 0.30 against 0.32 ms; T=100 B=32
    X=2048 0.98 against 0.94 ms), with a relative error of 1.3e-7 against 1.1e-6."""
    return d_pre.reshape(d_pre.shape[0] * d_pre.shape[1], d_pre.shape[2]).sum(0)


def _dense(t: Tensor) -> bool:
    """A matrix stored without gaps, row- or column-major."""
    return t.is_contiguous() or t.t().is_contiguous()


def _onednn_applies(x: Tensor, w: Tensor, b: Optional[Tensor]) -> bool:
    if x.dim() != 3 or w.dim() != 2 or w.size(1) != x.size(2):
        return False  # F.linear raises its own error
    if b is not None and b.dim() != 1:
        return False  # (its dtype and device: _use_onednn)
    macs = x.size(0) * x.size(1) * x.size(2) * w.size(0)
    return _use_onednn(macs, kMinMacs, x, w, b)


def _use_onednn(macs: int, min_macs: int, *tensors: Optional[Tensor]) -> bool:
    """Whether a float32 CPU GEMM of `macs` multiply-adds over `tensors` runs on oneDNN."""
    # First: torch.compile, tracing and the func transforms keep F.linear, and Dynamo must not
    # trace what follows (the vendor check reads /proc/cpuinfo: open() breaks a fullgraph).
    if not _backend.plain_eager():
        return False
    first = tensors[0]
    if first.device.type != "cpu" or first.dtype != torch.float32:
        return False
    # Then the size: most calls of a small model stop here, before the checks that cost more.
    wanted = choice()
    if wanted == "torch" or (wanted == "auto" and macs < min_macs):
        return False
    if any(t is not None and (t.dtype != first.dtype or t.device != first.device)
           for t in tensors):
        return False
    if wanted == "auto" and not _vendor_prefers_onednn():
        return False
    plain = all(t is None or type(t) in _PLAIN_TENSOR_TYPES for t in tensors)
    # torch.backends.mkldnn.flags(enabled=False) turns oneDNN off for torch.nn; here too.
    return plain and torch.backends.mkldnn.enabled and onednn_available()


@functools.lru_cache(maxsize=None)
def _vendor_prefers_onednn() -> bool:
    """A CPU whose vendor is not Intel and that has AVX-512: there MKL runs code that does not
    use AVX-512 and oneDNN wins. Without AVX-512 both run AVX2 code and MKL won (Zen 3 table)."""
    vendor, flags, _ = _cpu_identity()
    return vendor not in ("GenuineIntel", "") and "avx512f" in flags


# AMD's first family whose AVX-512 units are 512 bits wide (Zen 5; Zen 4, family 25, runs each
# 512-bit operation as two 256-bit halves). Measured on a server part (model 2). Zen 5's mobile
# parts are reported to run AVX-512 on 256-bit units, like Zen 4; there the lower threshold is
# unmeasured (oneDNN's dW then likely gains less, as on Zen 4).
kFullWidthAvx512AmdFamily = 26


@functools.lru_cache(maxsize=None)
def weight_grad_min_macs() -> int:
    """The smallest weight gradient (in multiply-adds) weight_grad runs on oneDNN, where oneDNN
    is chosen at all: kMinWeightGradMacs, but kMinMacs on AMD CPUs with full-width AVX-512
    (module table: Zen 5's oneDNN dW ran 1.2-2x MKL's from ~5 M multiply-adds on; Zen 4's ran
    no faster below kMinWeightGradMacs)."""
    vendor, _, family = _cpu_identity()
    if vendor == "AuthenticAMD" and family >= kFullWidthAvx512AmdFamily:
        return kMinMacs
    return kMinWeightGradMacs


def _cpu_identity() -> tuple:
    """(vendor_id, the set of feature flags, cpu family) of the first CPU in /proc/cpuinfo;
    ("", empty, 0) for what cannot be read, which keeps torch's GEMM."""
    vendor, flags, family = "", frozenset(), 0
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    vendor = line.split(":", 1)[1].strip()
                elif line.startswith("cpu family"):
                    value = line.split(":", 1)[1].strip()
                    family = int(value) if value.isdigit() else 0
                elif line.startswith("flags"):
                    flags = frozenset(line.split(":", 1)[1].split())
                if vendor and flags and family:
                    break
    except OSError:
        pass
    return vendor, flags, family


@functools.lru_cache(maxsize=None)
def _linear_op():
    """torch.ops.mkldnn._linear_pointwise when it exists and agrees with F.linear on a small
    product (it is an internal op of torch's Inductor; a torch without it, or where it fails,
    keeps F.linear), else None."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(7, 5, generator=gen)
        w = torch.randn(3, 5, generator=gen)
        b = torch.randn(3, generator=gen)
        ok = torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        ok = ok and torch.allclose(op(x, w.t().contiguous().t(), None, "none", [], ""),
                                   F.linear(x, w), rtol=1e-5, atol=1e-5)
    except (AttributeError, RuntimeError):
        return None
    return op if ok else None


def _onednn_linear(x2: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """x2 [R, K] times w^T [K, N] (+ b) on oneDNN: [R, N], contiguous. Operands that are not
    dense are copied first: given a matrix with gaps between its rows, oneDNN ran a reference
    kernel ~1000x slower (dW of one direction of a bidirectional layer: 11.6 s against 12 ms)."""
    x2 = x2 if _dense(x2) else x2.contiguous()
    w = w if _dense(w) else w.contiguous()
    return _linear_op()(x2, w, b, "none", [], "")


class _OneDnnProjection(torch.autograd.Function):
    """x W^T + b with its gradients: d_x = d W on oneDNN, dW = d^T x by weight_grad, db = column
    sums of d on torch (MKL). With create_graph the backward runs as differentiable torch ops."""

    @staticmethod
    def forward(ctx, x, w, b):
        rows, width = x.size(0) * x.size(1), x.size(2)
        x2 = x.reshape(rows, width)  # a copy when x is a strided view (batch_first input)
        # A copy is kept for dW rather than made again (saved, so saved_tensors_hooks see it;
        # on ctx, save_on_cpu left it on the device); a view is made again from x.
        copied = x2.data_ptr() != x.data_ptr() and ctx.needs_input_grad[1]  # (only dW reads it)
        ctx.save_for_backward(x, w, x2 if copied else None)
        ctx.has_bias = b is not None
        return _onednn_linear(x2, w, b).view(x.size(0), x.size(1), w.size(0))

    @staticmethod
    def backward(ctx, d):
        x, w, x2_copy = ctx.saved_tensors
        rows, width = x.size(0) * x.size(1), x.size(2)
        d2 = d.reshape(rows, d.size(2))
        needs_x, needs_w, needs_b = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph: every formula stays differentiable
            x2 = x.reshape(rows, width)
            return (d2.mm(w).view_as(x) if needs_x else None,
                    d2.t().mm(x2) if needs_w else None,
                    d2.sum(0) if needs_b and ctx.has_bias else None)
        d_x = _onednn_linear(d2, w.t(), None).view(x.shape) if needs_x else None
        d_w = None
        if needs_w:
            x2 = x2_copy if x2_copy is not None else x.reshape(rows, width)
            d_w = weight_grad(d2, x2)
        d_b = row_sum(d) if needs_b and ctx.has_bias else None
        return d_x, d_w, d_b
