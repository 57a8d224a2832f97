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


@pytest.mark.parametrize("isa", ["amx", "avx512bf16", "avx512", "avx2", "generic"], indirect=True)
def test_tanh_within_its_ulp_bound_over_the_float_range(isa, monkeypatch):
    """Each instruction set's build (the dispatch reads FUSEDRNN_CPU_ISA at every call and runs
    the best one the CPU supports at or below it)."""
    x = _float_sweep()
    y = _native_tanh(x)
    ulps = _ulps(y, torch.tanh(x.double()))
    worst = int(ulps.argmax())
    assert ulps[worst] <= MAX_ULP, f"tanh({x[worst].item()!r}): {ulps[worst].item():.2f} ulp"
    beyond = int(y.abs().argmax())
    assert y[beyond].abs() <= 1, f"tanh({x[beyond].item()!r}) = {y[beyond].item()!r}"


@pytest.mark.parametrize("isa", ["amx", "avx512bf16", "avx512", "avx2", "generic"], indirect=True)
def test_tanh_special_values(isa, monkeypatch):
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


def _native_sigmoid(values: torch.Tensor) -> torch.Tensor:
    """sigmoid of each float32 value: the update gate z a GRU layer saves for backward, with its
    z pre-activations set to the values (and W_hh = 0)."""
    count = values.numel()
    steps = -(-count // HIDDEN)
    z = torch.zeros(steps * HIDDEN, dtype=torch.float32)
    z[:count] = values
    xproj = torch.zeros(steps, 1, 3 * HIDDEN)
    xproj[:, 0, HIDDEN:2 * HIDDEN] = z.view(steps, HIDDEN)
    w_hh = torch.zeros(3 * HIDDEN, HIDDEN)
    gates = _layer_recurrence._run_forward("gru", xproj, None, None, [w_hh], [None], [None],
                                           None, save=True)[3]  # [T, B, r z n h_n]
    return gates.reshape(steps, 4 * HIDDEN)[:, HIDDEN:2 * HIDDEN].reshape(-1)[:count]


@pytest.mark.parametrize("isa", ["amx", "avx512bf16", "avx512", "avx2", "generic"], indirect=True)
def test_sigmoid_saturates_exactly_as_torch(isa, monkeypatch):
    """Exactly 1 where torch.sigmoid's 1 / (1 + e^-x) is 1, exactly 0 where e^-x overflows: a
    saturated gate's derivative s(1 - s) is then 0, as torch's. Before, AVX2 gave 1 - 2^-24 up to
    +inf and the AVX-512 and generic builds 6e-39 down to -inf."""
    # (16.635532 and -88.722839 are the first floats past 24 ln 2 and -ln FLT_MAX.)
    x = torch.tensor([16.635532379150390625, 16.7, 17.0, 20.0, 1e4, 1e30, float("inf"),
                      -88.72283935546875, -88.73, -90.0, -1e4, -1e30, float("-inf")])
    y = _native_sigmoid(torch.cat([x, torch.tensor([float("nan")])]))
    assert torch.equal(y[:-1], torch.sigmoid(x)), y.tolist()
    assert torch.isnan(y[-1])


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"], indirect=True)
def test_saturated_gates_as_accurate_as_torch(isa, monkeypatch):
    """What a saturated gate's leftover derivative did (found by fuzzing against torch.nn):
    - a GRU whose h0 holds +-1e30 (an update gate of 0 times operands of 1e30): dW_hh ~7.7e21
      where torch.nn's is ~1.1;
    - an LSTM whose forget gate is stuck at 1 (forget bias 20) over T=20000 steps: on AVX2 c_n
      decayed by (1 - 2^-24) a step, 9e-4 off the float64 truth where torch.nn float32 is 1e-5
      off."""
    torch.manual_seed(0)
    theirs = torch.nn.GRU(3, 5)
    ours = fusedrnn.GRU(3, 5)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 2, 3)
    h0 = torch.randn(1, 2, 5).sign() * 1e30
    grads = [torch.autograd.grad(m(x, h0)[0].sum(), m.weight_hh_l0)[0] for m in (theirs, ours)]
    assert (grads[1] - grads[0]).abs().max() <= 1e-5 * grads[0].abs().max()

    truth_model = torch.nn.LSTM(2, 4).double()
    with torch.no_grad():
        truth_model.weight_hh_l0.mul_(0.1)
        truth_model.weight_ih_l0.mul_(0.1)
        truth_model.bias_ih_l0[4:8] = 20.0  # the forget gate's rows
    x = torch.randn(20000, 1, 2, dtype=torch.float64) * 0.01
    state = (torch.zeros(1, 1, 4, dtype=torch.float64), torch.ones(1, 1, 4, dtype=torch.float64))
    with torch.no_grad():
        truth = truth_model(x, state)[1][1]
        theirs = copy.deepcopy(truth_model).float()
        ours = fusedrnn.LSTM(2, 4)
        ours.load_state_dict(theirs.state_dict())
        state32 = tuple(s.float() for s in state)
        errors = [(m(x.float(), state32)[1][1].double() - truth).abs().max().item()
                  for m in (theirs, ours)]
    assert errors[1] <= 2 * errors[0] + 1e-6, errors


@pytest.mark.parametrize("isa", ["amx", "avx512bf16", "avx512", "avx2", "generic"], indirect=True)
def test_sigmoid_within_two_ulp_and_exactly_one_half_at_zero(isa, monkeypatch):
    """The reciprocal in 1 / (1 + e^-x) refines the hardware estimate by Newton steps in
    residual form (simd_vec.h, newton_recip_step). In the form est (2 - x est) AVX2's steps
    stopped at 0.49999997 for 1/2, so sigmoid(0) was not 0.5 (a gate biased by it leaked over
    long sequences: review, session 30), and AVX-512's sigmoid was 2.5 ulp off (now 1.9;
    torch.sigmoid's 1.8 against float64)."""
    x = torch.from_numpy(np.linspace(-16, 16, 200001, dtype=np.float32))
    y = _native_sigmoid(torch.cat([x, torch.tensor([0.0, -0.0])]))
    assert y[-2].item() == 0.5 and y[-1].item() == 0.5
    assert _ulps(y[:-2], torch.sigmoid(x.double())).max() <= 2.0
