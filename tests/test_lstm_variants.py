"""The LSTM variants beyond torch.nn: peephole connections and the coupled input and forget gate
(CIFG), as fusedrnn.LSTM(peephole=..., coupled_input_forget=...).

The reference (fusedrnn.reference.lstm_cell) writes both from their papers' equations; it is
pinned here to torch.nn where a variant reduces to the plain LSTM. The modules are checked
against it in float64 and float32 on every backend (cpu, the emulated CUDA kernels, a GPU when
present), over the features they combine with; their gradients by gradcheck in
tests/test_gradcheck.py, the kernels' own outputs (NaN-poisoned) in test_recurrence_kernel.py.
"""
from __future__ import annotations

import io
import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fusedrnn
from fusedrnn import _inference, functional, reference

from _helpers import covering_design, ramp_loss, requires_native, rel_err

VARIANTS = {
    "peephole": dict(peephole=True),
    "cifg": dict(coupled_input_forget=True),
    "peephole-cifg": dict(peephole=True, coupled_input_forget=True),
}

FACTORS = dict(
    variant=tuple(VARIANTS),
    layers=(1, 2),
    bidirectional=(False, True),
    batch_first=(False, True),
    bias=(True, False),
    packing=("padded", "sorted", "unsorted"),
    hx=(False, True),
    proj=(0, 2),
)
CASES = covering_design(FACTORS, strength=2, seed=0)


def _case_id(case: dict) -> str:
    parts = [case["variant"], f"L{case['layers']}"]
    parts += [name for name in ("bidirectional", "batch_first", "hx") if case[name]]
    parts += [] if case["bias"] else ["nobias"]
    parts += [] if case["packing"] == "padded" else [case["packing"]]
    parts += [f"proj{case['proj']}"] if case["proj"] else []
    return "-".join(parts)


def _random_module(variant: str, dtype, device, seed: int, **kwargs) -> fusedrnn.LSTM:
    torch.manual_seed(seed)
    module = fusedrnn.LSTM(3, 5, dtype=dtype, device=device, **VARIANTS[variant], **kwargs)
    with torch.no_grad():  # wider than torch.nn's init, so that the peephole terms matter
        for p in module.parameters():
            p.uniform_(-0.7, 0.7)
    return module


def _reference_run(module: fusedrnn.LSTM, x, hx, lengths, batch_first: bool):
    """The reference on the module's own parameters, in float64."""
    weights = [tuple(w.double() if w is not None else None for w in layer)
               for layer in reference.weights_of(module)]
    return reference.rnn("lstm", x.double(), weights, hx, num_layers=module.num_layers,
                         bidirectional=module.bidirectional, batch_first=batch_first,
                         lengths=lengths, coupled_input_forget=module.coupled_input_forget)


@requires_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_variant_matches_reference(case, dtype, backend):
    """Outputs, final states and the gradients of the input, the states and every parameter."""
    seed = random.randrange(1 << 30)
    module = _random_module(case["variant"], dtype, backend.device, seed,
                            num_layers=case["layers"], bidirectional=case["bidirectional"],
                            batch_first=case["batch_first"], bias=case["bias"],
                            proj_size=case["proj"])
    T, B = (2, 3) if backend.tiny else (6, 4)
    shape = (B, T, 3) if case["batch_first"] else (T, B, 3)
    x = torch.randn(*shape, dtype=dtype, device=backend.device, requires_grad=True)
    lengths = None
    inp = x
    if case["packing"] != "padded":
        lengths = torch.randint(1, T + 1, (B,))
        lengths[0] = T
        if case["packing"] == "sorted":
            lengths = lengths.sort(descending=True).values
        inp = pack_padded_sequence(x, lengths, batch_first=case["batch_first"],
                                   enforce_sorted=case["packing"] == "sorted")
    hx = None
    if case["hx"]:
        states = case["layers"] * (2 if case["bidirectional"] else 1)
        hx = (torch.randn(states, B, case["proj"] or 5, dtype=dtype, device=backend.device,
                          requires_grad=True),
              torch.randn(states, B, 5, dtype=dtype, device=backend.device, requires_grad=True))

    output, (h_n, c_n) = module(inp, hx)
    if lengths is not None:
        output, _ = pad_packed_sequence(output, batch_first=case["batch_first"],
                                        total_length=T)
    ref_hx = tuple(s.double() for s in hx) if hx is not None else None
    expected = _reference_run(module, x, ref_hx, lengths, case["batch_first"])

    tol = 1e-10 if dtype == torch.float64 else 2e-5
    results, params = (output, h_n, c_n), list(module.parameters())
    for name, got, want in zip(("output", "h_n", "c_n"), results, expected):
        assert rel_err(got, want) <= tol, f"seed {seed}: {name}"
    leaves = [x, *(hx or ()), *params]
    grads = torch.autograd.grad(ramp_loss(results), leaves)
    want_grads = torch.autograd.grad(ramp_loss(expected), leaves)
    names = (["input"] + (["h_0", "c_0"] if hx is not None else [])
             + [n for n, _ in module.named_parameters()])
    for name, got, want in zip(names, grads, want_grads):
        assert rel_err(got, want) <= tol, f"seed {seed}: d {name}"


@pytest.mark.parametrize("name, kwargs", [
    ("LSTM", dict(num_layers=2, bidirectional=True)), ("LSTM", dict(num_layers=2, proj_size=2)),
    ("LSTMCell", {})], ids=["lstm-L2-bidir", "lstm-L2-proj", "cell"])
def test_peephole_initialisation_gives_the_plain_weights_torch_nn_draws(name, kwargs):
    """Under the same seed a peephole LSTM's other parameters equal torch.nn's: the peephole
    weights are drawn after all of them (drawn in registration order, each layer's shifted every
    later draw), and reset_parameters draws the same again."""
    torch.manual_seed(0)
    plain = getattr(nn, name)(3, 4, **kwargs)
    torch.manual_seed(0)
    ours = getattr(fusedrnn, name)(3, 4, peephole=True, **kwargs)
    state = ours.state_dict()
    for key, value in plain.state_dict().items():
        assert torch.equal(state[key], value), key
    torch.manual_seed(0)
    ours.reset_parameters()
    for key, value in state.items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_reference_peephole_with_zero_weights_is_torch_lstm():
    """Pins the reference: peephole weights of zero give torch.nn.LSTM exactly."""
    torch.manual_seed(0)
    plain = nn.LSTM(3, 5, num_layers=2, bidirectional=True, dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    weights = [(*layer, torch.zeros(3, 5, dtype=torch.float64))
               for layer in reference.weights_of(plain)]
    out, h_n, c_n = reference.rnn("lstm", x, weights, num_layers=2, bidirectional=True)
    want, (want_h, want_c) = plain(x)
    for got, expected in ((out, want), (h_n, want_h), (c_n, want_c)):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_reference_cifg_input_gate_is_one_minus_forget():
    """Pins the reference: a CIFG step is the plain LSTM step whose input gate is 1 - f, written
    out here from the torch.nn equations with the input gate replaced."""
    torch.manual_seed(0)
    H = 4
    x, h, c = (torch.randn(2, n, dtype=torch.float64) for n in (3, H, H))
    w_ih, w_hh = torch.randn(3 * H, 3, dtype=torch.float64), torch.randn(3 * H, H,
                                                                         dtype=torch.float64)
    b = torch.randn(3 * H, dtype=torch.float64)
    peephole = torch.randn(2, H, dtype=torch.float64)
    got_h, got_c = reference.lstm_cell(x, h, c, w_ih, w_hh, b, None, peephole=peephole,
                                       coupled_input_forget=True)
    a_f, a_g, a_o = (x @ w_ih.t() + h @ w_hh.t() + b).chunk(3, dim=1)
    f = torch.sigmoid(a_f + peephole[0] * c)
    c_next = f * c + (1 - f) * torch.tanh(a_g)
    h_next = torch.sigmoid(a_o + peephole[1] * c_next) * torch.tanh(c_next)
    torch.testing.assert_close(got_c, c_next, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(got_h, h_next, rtol=1e-14, atol=1e-14)


@requires_native
def test_variant_parameters_and_state_dict():
    module = fusedrnn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2, peephole=True,
                           coupled_input_forget=True)
    shapes = {name: tuple(p.shape) for name, p in module.named_parameters()}
    assert shapes["weight_ih_l0"] == (15, 3) and shapes["weight_hh_l0"] == (15, 2)
    assert shapes["bias_ih_l1_reverse"] == (15,)
    assert shapes["weight_peephole_l0"] == (2, 5) and shapes["weight_peephole_l1_reverse"] == (2, 5)
    assert list(shapes)[:6] == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0",
                                "weight_hr_l0", "weight_peephole_l0"]
    assert repr(module) == ("LSTM(3, 5, proj_size=2, num_layers=2, bidirectional=True, "
                            "peephole=True, coupled_input_forget=True)")
    assert fusedrnn.LSTM(3, 5, peephole=True).weight_peephole_l0.shape == (3, 5)

    twin = fusedrnn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2, peephole=True,
                         coupled_input_forget=True)
    twin.load_state_dict(module.state_dict())
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(twin(x)[0], module(x)[0], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="weight_peephole_l0"):
        nn.LSTM(3, 5).load_state_dict(fusedrnn.LSTM(3, 5, peephole=True).state_dict())


@requires_native
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_inference_paths_match_training_path(variant):
    """No grad (the inference plan), inference mode, unbatched input and a single step (the
    recurrence for a peephole LSTM: the cell steps are the plain LSTM's) give the full path's
    results."""
    module = _random_module(variant, torch.float32, "cpu", 0, num_layers=2, bidirectional=True)
    x = torch.randn(7, 3, 3)
    want = module(x)[0]
    with torch.no_grad():
        torch.testing.assert_close(module(x)[0], want)
        assert module in _inference._plans  # a variant's plan points into its parameters
        if module.peephole:  # the plan reads the peephole weights where they are
            module.weight_peephole_l1_reverse.mul_(-2)
            want = module(x.requires_grad_())[0].detach()
            x.requires_grad_(False)
            torch.testing.assert_close(module(x)[0], want)
    with torch.inference_mode():
        torch.testing.assert_close(module(x)[0], want)
    torch.testing.assert_close(module(x[:, 0])[0], want[:, 0])
    step, (h, c) = module(x[:1])
    expected = _reference_run(module, x[:1], None, None, False)[0]
    assert rel_err(step, expected) <= 2e-5


def test_variant_arguments_are_checked():
    with pytest.raises(TypeError, match="peephole should be of type bool"):
        fusedrnn.LSTM(3, 5, peephole=1)
    with pytest.raises(TypeError, match="coupled_input_forget should be of type bool"):
        fusedrnn.LSTM(3, 5, coupled_input_forget="yes")
    with pytest.raises(TypeError, match="peephole"):
        fusedrnn.GRU(3, 5, peephole=True)


@requires_native
def test_variant_refuses_torchscript_clearly():
    """TorchScript runs the plain LSTM's ops: a variant is refused, never run as one."""
    module = fusedrnn.LSTM(3, 5, peephole=True)
    with pytest.raises(RuntimeError, match="torch.jit.script does not support the peephole"):
        torch.jit.script(module)


@requires_native
@pytest.mark.parametrize("variant", ["peephole", "peephole-cifg"])
@pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "state"])
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_peephole_layers_export_to_onnx(variant, with_state, dynamo):
    """Both exporters write a peephole layer as ONNX's LSTM node with its peephole input (a
    CIFG's weights tied as the plain LSTM's): onnxruntime runs it at other sequence lengths and
    batch sizes and gives the reference's numbers. (The dynamo exporter refused a peephole
    layer before: torch has no peephole RNN op to record.)"""
    onnxruntime = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    module = _random_module(variant, torch.float32, "cpu", 0, bidirectional=True, num_layers=2,
                            batch_first=True)
    states = (torch.randn(4, 2, 5), torch.randn(4, 2, 5)) if with_state else None
    args = (torch.randn(2, 4, 3),) + ((states,) if with_state else ())
    names = ["x", "h", "c"][:len(args) + with_state]
    axes = {"x": {0: "B", 1: "T"}, "h": {1: "B"}, "c": {1: "B"}}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            from torch.export import Dim
            batch, length = Dim("B", min=1, max=64), Dim("T", min=1, max=64)
            shapes = ({0: batch, 1: length},) + (({1: batch}, {1: batch}),) * with_state
            torch.onnx.export(module, args, dynamo=True, input_names=names,
                              dynamic_shapes=shapes).save(buffer)
        else:
            torch.onnx.export(module, args, buffer, dynamo=False, input_names=names,
                              dynamic_axes={n: axes[n] for n in names})
    model = onnx.load_from_string(buffer.getvalue())
    lstm_nodes = [n for n in model.graph.node if n.op_type == "LSTM"]
    assert len(lstm_nodes) == 2 and all(len(n.input) == 8 and n.input[7] for n in lstm_nodes)
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 6, 3)  # another batch size and length
    hx = (torch.randn(4, 3, 5), torch.randn(4, 3, 5)) if with_state else None
    feed = {"x": x.numpy()}
    if with_state:
        feed.update(h=hx[0].numpy(), c=hx[1].numpy())
    got = [torch.from_numpy(a) for a in session.run(None, feed)]
    want = _reference_run(module, x, tuple(s.double() for s in hx) if hx else None, None, True)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-5


@requires_native
def test_peephole_onnx_export_refusals_say_why():
    """What ONNX's LSTM node (or torch's packed op) cannot express is refused by name."""
    pytest.importorskip("onnx")

    def export(module, x):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (x,), io.BytesIO(), dynamo=False)

    with pytest.raises(RuntimeError, match="peephole LSTM: proj_size is not supported"):
        export(fusedrnn.LSTM(3, 5, proj_size=2, peephole=True), torch.randn(4, 2, 3))

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = fusedrnn.LSTM(3, 5, peephole=True)

        def forward(self, x):
            return pad_packed_sequence(self.lstm(pack_padded_sequence(x, [4, 2]))[0])[0]

    with pytest.raises(RuntimeError, match="peephole LSTM: per-sequence lengths"):
        export(Packed(), torch.randn(4, 2, 3))

    # The dynamo exporter writes ONNX's LSTM node only in the dtypes onnxruntime runs it in.
    with pytest.raises(Exception, match="peephole LSTM: ONNX's LSTM node.*not torch.float64"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(fusedrnn.LSTM(3, 5, peephole=True).double(),
                              (torch.randn(4, 2, 3, dtype=torch.float64),), dynamo=True)


@requires_native
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_cells_export_to_onnx(variant):
    """A variant cell's step is torch ops, which both exporters write as ONNX ops."""
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    cell = fusedrnn.LSTMCell(3, 5, **VARIANTS[variant])
    x, h, c = torch.randn(2, 3), torch.randn(2, 5), torch.randn(2, 5)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(cell, (x, (h, c)), buffer, dynamo=False,
                          input_names=["x", "h", "c"])
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.numpy(), "h": h.numpy(), "c": c.numpy()})
    with torch.no_grad():
        want = cell(x, (h, c))
    for a, b in zip(got, want):
        torch.testing.assert_close(torch.from_numpy(a), b, rtol=1e-5, atol=1e-6)


@requires_native
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_cifg_exports_as_the_plain_lstm_that_computes_it(packed):
    """ONNX has no CIFG; its LSTM node with the tied weights computes one, in onnxruntime."""
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    module = _random_module("cifg", torch.float32, "cpu", 0, bidirectional=True, num_layers=2)
    x = torch.randn(5, 3, 3)
    lengths = torch.tensor([5, 3, 2])

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = module

        def forward(self, x):
            inp = pack_padded_sequence(x, lengths) if packed else x
            out = self.lstm(inp)[0]
            return pad_packed_sequence(out)[0] if packed else out

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapped(), (x,), buffer, dynamo=False, input_names=["x"])
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
    want = _reference_run(module, x, None, lengths if packed else None, False)[0]
    assert rel_err(got, want) <= 1e-5


@requires_native
def test_peephole_operand_checks():
    """The layer API refuses peephole weights of another cell, count or shape by name."""
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    w_ih, w_hh = torch.randn(12, 4, dtype=torch.float64), torch.randn(12, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"peephole\[0\].*\[3, H\]"):
        functional.rnn("lstm", x, [(w_ih, w_hh, None, None, None,
                                    torch.randn(2, 3, dtype=torch.float64))])
    gru_ih, gru_hh = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    with pytest.raises(ValueError,
                       match=r"peephole must be empty .* for \('lstm', 'lstm_cifg'\) only"):
        functional.rnn("gru", x, [(gru_ih, gru_hh, None, None, None,
                                   torch.randn(3, 3, dtype=torch.float64))])
    with pytest.raises(RuntimeError, match=r"peephole\[0\]"):
        functional.rnn("lstm", x, [(w_ih, w_hh, None, None, None,
                                    torch.randn(3, 3, dtype=torch.float32))])


@requires_native
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_compiles_fullgraph(variant):
    """torch.compile traces the variants' custom ops (peephole weights included), forward and
    backward, with no graph break."""
    module = _random_module(variant, torch.float32, "cpu", 0, bidirectional=True)
    x = torch.randn(5, 2, 3, requires_grad=True)
    want = module(x)
    want_grads = torch.autograd.grad(ramp_loss([want[0], *want[1]]), [x, *module.parameters()])
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    grads = torch.autograd.grad(ramp_loss([got[0], *got[1]]), [x, *module.parameters()])
    for a, b in zip([got[0], *got[1], *grads], [want[0], *want[1], *want_grads]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@requires_native
@pytest.mark.parametrize("variant", ["cifg", "peephole-cifg"])
def test_cifg_runs_three_gate_kernels(variant, monkeypatch):
    """A CIFG reaches the kernels as the cell "lstm_cifg" with its own [3H, .] weights, in
    training (forward and backward) and through the inference plan: never as a four-gate LSTM,
    whose recurrence does a third more work."""
    from fusedrnn import _backend
    seen = []

    def recording(name):
        original = getattr(_backend, name)

        def record(cell, *args, **kwargs):
            seen.append((name, cell, args[0][0].shape[0] if name == "prepare_forward" else None))
            return original(cell, *args, **kwargs)
        monkeypatch.setattr(_backend, name, record)

    for name in ("forward_layer", "backward_layer", "prepare_forward"):
        recording(name)
    module = _random_module(variant, torch.float32, "cpu", 0, bidirectional=True)
    x = torch.randn(4, 2, 3, requires_grad=True)
    module(x)[0].sum().backward()
    with torch.no_grad():
        module(x)
    assert [s[:2] for s in seen] == [("forward_layer", "lstm_cifg"),
                                     ("backward_layer", "lstm_cifg"),
                                     ("prepare_forward", "lstm_cifg")]
    assert seen[2][2] == 3 * 5  # the plan's w_hh: [3H, H]


@requires_native
def test_functional_rnn_takes_the_cifg_cell():
    """functional.rnn("lstm_cifg") is reference.rnn's LSTM with coupled_input_forget, peephole
    weights [2, H] included, forward and gradients."""
    module = _random_module("peephole-cifg", torch.float64, "cpu", 0, num_layers=2)
    weights = module._layer_weights()
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    out, h_n, c_n = functional.rnn("lstm_cifg", x, weights, num_layers=2)
    ref = reference.rnn("lstm", x, weights, num_layers=2, coupled_input_forget=True)
    for got, want in zip((out, h_n, c_n), ref):
        assert rel_err(got, want) <= 1e-12
    params = [x, *module.parameters()]
    grads = torch.autograd.grad((out.sum() + c_n.sum()), params)
    ref_grads = torch.autograd.grad((ref[0].sum() + ref[2].sum()), params)
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) <= 1e-10


@requires_native
def test_cifg_inference_weights_follow_the_parameters():
    """A CIFG's inference follows its parameters from one call to the next: in-place updates,
    torch.func.functional_call, and a later call whose input requires grad."""
    from torch.func import functional_call
    module = _random_module("peephole-cifg", torch.float64, "cpu", 0)
    x = torch.randn(4, 2, 3, dtype=torch.float64)

    def expected():
        return _reference_run(module, x, None, None, False)[0]

    with torch.inference_mode():
        assert rel_err(module(x)[0], expected()) <= 1e-12
    with torch.no_grad():
        module.weight_ih_l0.add_(0.25)
        module.weight_peephole_l0.mul_(-1)
        assert rel_err(module(x)[0], expected()) <= 1e-12
        doubled = {name: p * 2 for name, p in module.named_parameters()}
        swapped = functional_call(module, doubled, (x,))[0]
    twin = _random_module("peephole-cifg", torch.float64, "cpu", 0)
    twin.load_state_dict(doubled)
    assert rel_err(swapped, _reference_run(twin, x, None, None, False)[0]) <= 1e-12
    module.requires_grad_(False)
    leaf = x.clone().requires_grad_()
    module(leaf)[0].sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0


@requires_native
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_cells_match_the_reference_step(variant, backend):
    """LSTMCell(peephole=..., coupled_input_forget=...): a step, its gradients, unbatched input
    and no state, against reference.lstm_cell on the cell's own parameters."""
    torch.manual_seed(random.randrange(1 << 30))
    cell = fusedrnn.LSTMCell(3, 5, dtype=torch.float64, device=backend.device,
                             **VARIANTS[variant])
    with torch.no_grad():
        for p in cell.parameters():
            p.uniform_(-0.7, 0.7)
    x = torch.randn(4, 3, dtype=torch.float64, device=backend.device, requires_grad=True)
    h, c = (torch.randn(4, 5, dtype=torch.float64, device=backend.device) for _ in range(2))
    got = cell(x, (h, c))
    want = reference.lstm_cell(x, h, c, cell.weight_ih, cell.weight_hh, cell.bias_ih,
                               cell.bias_hh, None, getattr(cell, "weight_peephole", None),
                               cell.coupled_input_forget)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-12
    params = [x, *cell.parameters()]
    for a, b in zip(torch.autograd.grad(ramp_loss(got), params),
                    torch.autograd.grad(ramp_loss(want), params)):
        assert rel_err(a, b) <= 1e-12
    zero = torch.zeros(1, 5, dtype=torch.float64, device=backend.device)
    single = cell(x[0])
    expected = reference.lstm_cell(x[:1], zero, zero, cell.weight_ih, cell.weight_hh,
                                   cell.bias_ih, cell.bias_hh, None,
                                   getattr(cell, "weight_peephole", None),
                                   cell.coupled_input_forget)
    for a, b in zip(single, expected):
        assert a.shape == (5,) and rel_err(a, b[0]) <= 1e-12
    # Without a state: a step's peephole gradient has no c_{t-1} term at all.
    params = list(cell.parameters())
    for a, b in zip(torch.autograd.grad(ramp_loss(single), params),
                    torch.autograd.grad(ramp_loss(tuple(e[0] for e in expected)), params)):
        assert rel_err(a, b) <= 1e-12


def test_variant_cell_surface():
    cell = fusedrnn.LSTMCell(3, 5, peephole=True, coupled_input_forget=True)
    assert [n for n, _ in cell.named_parameters()] == [
        "weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_peephole"]
    assert cell.weight_ih.shape == (15, 3) and cell.weight_peephole.shape == (2, 5)
    assert repr(cell) == "LSTMCell(3, 5, peephole=True, coupled_input_forget=True)"
    with pytest.raises(RuntimeError, match="LSTMCell: torch.jit.script does not support"):
        torch.jit.script(cell)
    with pytest.raises(TypeError, match="peephole should be of type bool"):
        fusedrnn.LSTMCell(3, 5, peephole=None)


@requires_native
@pytest.mark.parametrize("variant", ["peephole", "peephole-cifg"])
def test_variant_bfloat16_within_twice_the_reference_error(variant, backend):
    """bfloat16 (the CPU kernels widen it, the CUDA kernels run it on tensor cores): the error
    against float64 is at most twice that of the reference loop run in bfloat16 itself (torch.nn
    plays that part for the plain cells)."""
    module = _random_module(variant, torch.bfloat16, backend.device, 0, bidirectional=True)
    T, B = (3, 2) if backend.tiny else (20, 4)
    x = torch.randn(T, B, 3, device=backend.device).to(torch.bfloat16)
    with torch.no_grad():
        got = module(x)[0]
        truth = _reference_run(module, x, None, None, False)[0]
        weights = reference.weights_of(module)
        low = reference.rnn("lstm", x, weights, bidirectional=True,
                            coupled_input_forget=module.coupled_input_forget)[0]
    assert rel_err(got, truth) <= 2 * rel_err(low, truth)


@requires_native
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_follow_writes_that_keep_the_version_counter(variant):
    """A fused optimizer's step (which leaves _version alone) and writes through .data are seen
    by the next no_grad call: the inference plan keeps nothing derived from a variant's weights
    (a CIFG's used to be derived as the plain LSTM's, and this caught a cache of them)."""
    module = _random_module(variant, torch.float64, "cpu", 0, num_layers=2)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.1, fused=True)
    with torch.no_grad():
        module(x)
    module(x)[0].pow(2).sum().backward()
    optimizer.step()
    module.weight_hh_l1.data.mul_(2)
    with torch.no_grad():
        assert rel_err(module(x)[0], _reference_run(module, x, None, None, False)[0]) <= 1e-12
    with torch.inference_mode():
        module.bias_ih_l0.data.add_(0.5)
        assert rel_err(module(x)[0], _reference_run(module, x, None, None, False)[0]) <= 1e-12


@requires_native
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_trace_and_copy(variant):
    """torch.jit.trace (whose check traces again under no_grad) and deepcopy after an inference
    call, for the module and the cell."""
    import copy
    for module, x in ((_random_module(variant, torch.float32, "cpu", 0), torch.randn(4, 2, 3)),
                      (fusedrnn.LSTMCell(3, 5, **VARIANTS[variant]), torch.randn(2, 3))):
        with torch.no_grad():
            module(x)
        twin = copy.deepcopy(module)
        traced = torch.jit.trace(module, (x,))
        torch.testing.assert_close(traced(x)[0], twin(x)[0])


def test_variant_errors_name_what_the_user_gave():
    module = fusedrnn.LSTM(3, 5, coupled_input_forget=True, peephole=True)
    module.weight_peephole_l0 = nn.Parameter(torch.zeros(3, 5))
    with pytest.raises(RuntimeError, match=r"weight_peephole_l0 must have shape \[2, 5\]"):
        module(torch.randn(4, 2, 3))
    module = fusedrnn.LSTM(3, 5, coupled_input_forget=True)
    module.weight_hh_l0 = nn.Parameter(torch.zeros(20, 5))
    with pytest.raises(RuntimeError, match=r"weight_hh_l0 must have shape \[15, 5\]"):
        module(torch.randn(4, 2, 3))
    cell = fusedrnn.LSTMCell(3, 5, coupled_input_forget=True)
    cell.weight_ih = nn.Parameter(torch.zeros(20, 3))
    with pytest.raises(RuntimeError, match=r"LSTMCell: weight_ih must have shape \[15, 3\]"):
        cell(torch.randn(2, 3))
    for one_step in (False, True):
        module = fusedrnn.LSTM(3, 5, peephole=True, bidirectional=True)
        module.weight_peephole_l0_reverse = nn.Parameter(torch.zeros(2, 5))
        with pytest.raises(RuntimeError,
                           match=r"weight_peephole_l0_reverse must have shape \[3, 5\]"):
            module(torch.randn(1 if one_step else 4, 2, 3))
    cell = fusedrnn.LSTMCell(3, 5, peephole=True)
    cell.weight_peephole = nn.Parameter(torch.zeros(2, 5))
    with pytest.raises(RuntimeError, match=r"LSTMCell: weight_peephole must have shape \[3, 5\]"):
        cell(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"peephole must be \[3, H\]"):
        reference.lstm_cell(torch.zeros(1, 3), torch.zeros(1, 5), torch.zeros(1, 5),
                            torch.zeros(20, 3), torch.zeros(20, 5), None, None,
                            peephole=torch.zeros(2, 5))
    assert fusedrnn.LSTM(3, 5, peephole=np.bool_(True)).peephole is True
    with pytest.raises(TypeError, match="should be of type bool, got: numpy.float64"):
        fusedrnn.LSTM(3, 5, peephole=np.float64(1))


@requires_native
@pytest.mark.parametrize("variant", ["peephole", "peephole-cifg"])
def test_non_contiguous_peephole_weights(variant):
    """Peephole weights that are a non-contiguous view (a parametrization's result) give the
    reference's values and gradients on every path: the cell, a one-step layer, a sequence."""
    from torch.nn.utils import parametrize

    class Strided(nn.Module):
        def forward(self, w):  # the same values, column-major
            return w.t().contiguous().t()

    torch.manual_seed(0)
    kwargs = VARIANTS[variant]
    for module, x in ((fusedrnn.LSTMCell(3, 4, dtype=torch.float64, **kwargs), (2, 3)),
                      (fusedrnn.LSTM(3, 4, dtype=torch.float64, **kwargs), (1, 2, 3)),
                      (fusedrnn.LSTM(3, 4, dtype=torch.float64, **kwargs), (5, 2, 3))):
        name = "weight_peephole" if isinstance(module, fusedrnn.LSTMCell) else "weight_peephole_l0"
        with torch.no_grad():
            getattr(module, name).uniform_(-2, 2)
        parametrize.register_parametrization(module, name, Strided())
        assert not getattr(module, name).is_contiguous()
        x = torch.randn(*x, dtype=torch.float64, requires_grad=True)
        c0 = torch.randn(*x.shape[:-1][-1:], 4, dtype=torch.float64, requires_grad=True)
        h0 = torch.zeros_like(c0)
        peephole = getattr(module, name)
        if isinstance(module, fusedrnn.LSTMCell):
            got = module(x, (h0, c0))
            want = reference.lstm_cell(x, h0, c0, module.weight_ih, module.weight_hh,
                                       module.bias_ih, module.bias_hh, None, peephole,
                                       module.coupled_input_forget)
        else:
            out, (h_n, c_n) = module(x, (h0[None], c0[None]))
            got = (out, c_n)
            ref = _reference_run(module, x, (h0[None], c0[None]), None, False)
            want = (ref[0], ref[2])
        params = [x, c0, *module.parameters()]
        for a, b in zip(torch.autograd.grad(ramp_loss(got), params),
                        torch.autograd.grad(ramp_loss(want), params)):
            assert rel_err(a, b) <= 1e-12


@requires_native
def test_a_weight_peephole_set_on_a_plain_cell_is_not_a_weight():
    """Only a cell made with peephole=True has peepholes: a weight_peephole a user sets on
    another cell is ignored alike on the fast (batched CPU) and the checked path."""
    cell = fusedrnn.LSTMCell(3, 5)
    x = torch.randn(2, 3)
    want = cell(x)[0]
    cell.weight_peephole = nn.Parameter(torch.randn(3, 5) * 5)
    torch.testing.assert_close(cell(x)[0], want)
    torch.testing.assert_close(cell(x[0])[0], want[0])


@requires_native
@pytest.mark.parametrize("name", ["LSTMCell", "LSTM"])
@pytest.mark.parametrize("coupled", [False, True], ids=["peephole", "peephole+cifg"])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_peephole_weights_set_to_none_are_refused_naming_them(name, coupled, grad):
    """A peephole cell whose weight_peephole is set to None ran as the plain LSTM cell, without
    an error (review, session 31); the module already refused its weight_peephole_l0."""
    module = getattr(fusedrnn, name)(3, 5, peephole=True, coupled_input_forget=coupled)
    weight = "weight_peephole" if name == "LSTMCell" else "weight_peephole_l0"
    setattr(module, weight, None)
    x = torch.randn(2, 3) if name == "LSTMCell" else torch.randn(4, 2, 3)
    with torch.set_grad_enabled(grad), pytest.raises(TypeError, match=f"{weight} is None"):
        module(x)


@requires_native
def test_layer_weights_with_peepholes_for_some_directions_are_refused():
    x = torch.randn(3, 2, 4, dtype=torch.float64)

    def direction(with_peephole):
        entry = (torch.randn(12, 4, dtype=torch.float64), torch.randn(12, 3, dtype=torch.float64),
                 None, None, None)
        return entry + (torch.randn(3, 3, dtype=torch.float64),) if with_peephole else entry

    for first, second in ((False, True), (True, False)):
        with pytest.raises(ValueError, match="must all have peephole weights .* or none"):
            functional.rnn("lstm", x, [direction(first), direction(second)], bidirectional=True)
    with pytest.raises(ValueError, match="got 7 entries"):
        functional.rnn("lstm", x, [direction(True) + (None,)])


def test_modules_pickled_before_the_variants_still_run():
    """A whole module pickled by a fusedrnn without the variants lacks their flags."""
    import pickle
    for module, x in ((fusedrnn.LSTM(3, 4), torch.randn(5, 2, 3)),
                      (fusedrnn.GRU(3, 4), torch.randn(5, 2, 3)),
                      (fusedrnn.LSTMCell(3, 4), torch.randn(2, 3))):
        with torch.no_grad():
            expected = module(x)[0]  # (before its flags go: after, it is the module under test)
        for name in ("_is_variant", "_has_peephole", "_coupled", "peephole",
                     "coupled_input_forget"):
            module.__dict__.pop(name, None)
        restored = pickle.loads(pickle.dumps(module))
        with torch.no_grad():
            torch.testing.assert_close(restored(x)[0], expected)


def test_peephole_cell_pickled_before_its_native_step_still_runs():
    """A peephole LSTMCell pickled whole when its steps ran as torch ops lacks _has_peephole:
    loaded, its steps must keep their peepholes (on the native pass and on the checked path)."""
    import pickle
    for kwargs in (dict(peephole=True), dict(peephole=True, coupled_input_forget=True)):
        cell = fusedrnn.LSTMCell(3, 4, **kwargs)
        with torch.no_grad():
            cell.weight_peephole.uniform_(-2, 2)
        x, h, c = torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 4)
        expected = cell(x, (h, c))
        del cell.__dict__["_has_peephole"]
        restored = pickle.loads(pickle.dumps(cell))
        for got, want in zip(restored(x, (h, c)), expected):
            torch.testing.assert_close(got, want)
        for got, want in zip(restored(x[0], (h[0], c[0])), expected):  # unbatched: checked path
            torch.testing.assert_close(got, want[0])


def test_cifg_pickled_before_its_three_gate_kernels_still_runs():
    """A CIFG pickled whole when it ran as the plain LSTM that computes it has its flags but not
    _coupled (it had _derived_weights): loaded, it must run its three-gate weights as a CIFG."""
    import pickle
    for module, x in ((fusedrnn.LSTM(3, 4, coupled_input_forget=True, peephole=True),
                       torch.randn(5, 2, 3)),
                      (fusedrnn.LSTM(3, 4, coupled_input_forget=True), torch.randn(5, 2, 3))):
        expected = module(x)[0]
        state = module.__dict__
        state["_derived_weights"] = state.pop("_coupled")
        restored = pickle.loads(pickle.dumps(module))
        torch.testing.assert_close(restored(x)[0], expected)
