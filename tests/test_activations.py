"""The float32 activations of the CPU kernels (csrc/cpu/simd_vec.h) against float64 math, over a
sweep of the whole float range and the special values.

They are reached through the native forward of one Elman RNN layer with W_hh = 0 and no bias:
then h_t = tanh(xproj_t), element by element, so every lane of every SIMD width the kernel uses
(and its scalar tail, H = 37 is not a multiple of any) is checked, for each instruction set.
"""
import copy

import numpy as np
import pytest
import torch

import fusedrnn
from fusedrnn import _layer_recurrence

from _helpers import requires_native

pytestmark = requires_native

HIDDEN = 37
MAX_ULP = 6.5  # the rational tanh's bound (simd_vec.h)


def _native_tanh(values: torch.Tensor) -> torch.Tensor:
    """tanh of each float32 value, by the native rnn_tanh forward with W_hh = 0."""
    count = values.numel()
    steps = -(-count // HIDDEN)
    xproj = torch.zeros(steps * HIDDEN, dtype=torch.float32)
    xproj[:count] = values
    xproj = xproj.view(steps, 1, HIDDEN)
    w_hh = torch.zeros(HIDDEN, HIDDEN)
    out = _layer_recurrence._run_forward("rnn_tanh", xproj, None, None, [w_hh], [None], [None],
                                         None, save=False)[0]
    return out.reshape(-1)[:count]


def _float_sweep() -> torch.Tensor:
    """Every 97th float32 bit pattern from 2^-40 to 12 and every float32 from 7 to 9.5, where
    the rational form is closest to overflowing 1 (both signs), and [0, 1] densely."""
    def floats(lo, hi, step):
        return np.arange(np.float32(lo).view(np.int32), np.float32(hi).view(np.int32), step,
                         dtype=np.int32).view(np.float32)
    positive = np.concatenate([floats(2.0 ** -40, 12.0, 97), floats(7.0, 9.5, 1),
                               np.linspace(0, 1, 20001, dtype=np.float32)])
    return torch.from_numpy(np.concatenate([positive, -positive]))


def _ulps(actual: torch.Tensor, expected64: torch.Tensor) -> torch.Tensor:
    """|actual - expected| in units of the float32 spacing at the expected value."""
    spacing = torch.from_numpy(np.spacing(np.abs(expected64.float().numpy())))
    return (actual.double() - expected64).abs() / spacing.double()


@pytest.mark.parametrize("isa", ["amx", "avx512bf16", "avx512", "avx2", "generic"])
def test_tanh_within_its_ulp_bound_over_the_float_range(isa, monkeypatch):
    """Each instruction set's build (the dispatch reads FUSEDRNN_CPU_ISA at every call and runs
    the best one the CPU supports at or below it)."""
    monkeypatch.setenv("FUSEDRNN_CPU_ISA", isa)
    x = _float_sweep()
    y = _native_tanh(x)
    ulps = _ulps(y, torch.tanh(x.double()))
    worst = int(ulps.argmax())
    assert ulps[worst] <= MAX_ULP, f"tanh({x[worst].item()!r}): {ulps[worst].item():.2f} ulp"
    beyond = int(y.abs().argmax())
    assert y[beyond].abs() <= 1, f"tanh({x[beyond].item()!r}) = {y[beyond].item()!r}"


@pytest.mark.parametrize("isa", ["amx", "avx512bf16", "avx512", "avx2", "generic"])
def test_tanh_special_values(isa, monkeypatch):
    monkeypatch.setenv("FUSEDRNN_CPU_ISA", isa)
    x = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-45, 20.0, -20.0, 3e38, float("inf"),
                      float("-inf"), float("nan")])
    y = _native_tanh(x)
    # (The kernel adds the recurrent product, +0 here, so -0 arrives as +0, as in torch.nn.)
    tiny = x[:5].double()
    assert ((y[:5].double() - tiny).abs() <= torch.from_numpy(np.spacing(
        np.abs(x[:5].numpy()))).double()).all(), "tanh is x (within an ulp) for tiny x"
    # Saturated: exactly +-1, as torch.tanh (the rational form once gave 1 - 2^-24 there).
    assert torch.equal(y[5:10], torch.tanh(x[5:10])), y[5:10].tolist()
    assert torch.isnan(y[10])


@pytest.mark.parametrize("scale", [0.1, 1.0, 4.0])
@pytest.mark.parametrize("name", ["LSTM", "GRU"])
def test_float32_layers_as_accurate_as_torch(name, scale):
    """End to end, with pre-activations that span the activations' whole range: fusedrnn's
    float32 result is as close to the float64 truth as torch.nn's float32 result."""
    torch.manual_seed(0)
    reference = getattr(torch.nn, name)(16, 40)
    with torch.no_grad():
        for p in reference.parameters():
            p.mul_(scale * 4)
    ours = getattr(fusedrnn, name)(16, 40)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(30, 3, 16) * scale
    with torch.no_grad():
        truth = copy.deepcopy(reference).double()(x.double())[0]
        torch_error = (reference(x)[0].double() - truth).abs().max()
        our_error = (ours(x)[0].double() - truth).abs().max()
    assert our_error <= max(2 * torch_error, 1e-6), (our_error.item(), torch_error.item())
