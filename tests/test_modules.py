"""fusedrnn.LSTM/GRU/RNN against torch.nn: outputs, final states and every parameter, input and
state gradient, over a covering design of the features (every 3 feature values appear together
in some case), in float64 (1e-9 relative) and float32 (2e-5 relative); plus a hypothesis search,
dropout masks, PackedSequence details, unbatched input, non-contiguous tensors, inference mode,
low precision and the module surface (names, state_dict, repr)."""
import functools
import itertools
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import fusedrnn

from _helpers import (CELL_VARIANTS, PACKING, TOLERANCE, UNIT_ROUNDOFF, Case, assert_close,
                      assert_runs_close, assert_second_derivatives_match, compare_with_torch,
                      covering_design, flat_results, make_inputs, make_modules, ramp_loss,
                      requires_native, run_module, use_backend)

FACTORS = dict(
    cell=CELL_VARIANTS,
    layers=(1, 2, 3),
    bidirectional=(False, True),
    batch_first=(False, True),
    bias=(True, False),
    packing=PACKING,
    hx=(False, True),
    seq_len=(1, 2, 7),
    batch=(1, 3, 9),   # 9: more rows than the 2 cores' threads
    hidden=(5, 13),    # odd, not a multiple of any SIMD width
)


@functools.lru_cache(maxsize=None)
def grid() -> list:
    cases = [Case(**row, dtype=dtype) for dtype in (torch.float64, torch.float32)
             for row in covering_design(FACTORS, strength=3, seed=0)]
    return cases


@requires_native
@pytest.mark.parametrize("case", grid(), ids=[c.id for c in grid()])
def test_matches_torch(case):
    compare_with_torch(case)


@requires_native
# derandomize: CI sees the same examples every run; database=None: no .hypothesis/ directory.
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=True, database=None)
@given(cell=st.sampled_from(CELL_VARIANTS), layers=st.integers(1, 3),
       bidirectional=st.booleans(), batch_first=st.booleans(), bias=st.booleans(),
       packing=st.sampled_from(PACKING), hx=st.booleans(), seq_len=st.integers(1, 9),
       batch=st.integers(1, 11), hidden=st.integers(1, 19), input_size=st.integers(1, 9),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_random_configurations(**kwargs):
    case = Case(**kwargs)
    if case.cell == "lstm_proj" and case.hidden < 2:
        case = Case(**{**kwargs, "hidden": 2})
    compare_with_torch(case)


# --- dropout --------------------------------------------------------------------------------------

@requires_native
@pytest.mark.parametrize("packing", PACKING)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_dropout_masks_match_torch(cell, packing):
    """Training-mode dropout between layers: same RNG state, same masks, same results."""
    case = Case(cell=cell, layers=3, bidirectional=True, packing=packing, batch=4, seq_len=6)
    theirs, ours = make_modules(case)
    for m in (theirs, ours):
        m.dropout = 0.3
        m.train()
    inputs = make_inputs(case)
    torch.manual_seed(5)
    expected, expected_grads, _ = run_module(theirs, inputs)
    torch.manual_seed(5)
    actual, actual_grads, _ = run_module(ours, inputs)
    for a, e in zip(actual, expected):
        assert_close(a, e, 1e-9, "result with dropout")
    for name, e in expected_grads.items():
        assert_close(actual_grads[name], e, 1e-9, f"grad {name} with dropout")
    # The RNG advanced identically: the next draw agrees too.
    torch.manual_seed(5)
    theirs(inputs.input)
    after_theirs = torch.rand(3)
    torch.manual_seed(5)
    ours(inputs.input)
    assert torch.equal(torch.rand(3), after_theirs)


@requires_native
def test_eval_mode_has_no_dropout():
    case = Case(cell="gru", layers=2)
    theirs, ours = make_modules(case)
    for m in (theirs, ours):
        m.dropout = 0.9
        m.eval()
    x = make_inputs(case).input.detach()
    assert_close(ours(x)[0], theirs(x)[0], 1e-9, "eval output")


# --- forward contract details ---------------------------------------------------------------------

@requires_native
@pytest.mark.parametrize("cell", ["lstm_proj", "gru", "rnn_relu"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tm", "bf"])
def test_unbatched_input(cell, batch_first):
    case = Case(cell=cell, layers=2, bidirectional=True, batch_first=batch_first)
    theirs, ours = make_modules(case)
    x = torch.randn(5, 4, dtype=torch.float64)
    num, state = 4, case.proj_size or case.hidden
    h = torch.randn(num, state, dtype=torch.float64)
    hx = (h, torch.randn(num, case.hidden, dtype=torch.float64)) if cell.startswith("lstm") else h
    for args in ((x,), (x, hx)):
        (out_e, state_e), (out_a, state_a) = theirs(*args), ours(*args)
        assert out_a.shape == out_e.shape
        assert_close(out_a, out_e, 1e-9, "output")
        for a, e in zip(state_a if isinstance(state_a, tuple) else (state_a,),
                        state_e if isinstance(state_e, tuple) else (state_e,)):
            assert a.shape == e.shape
            assert_close(a, e, 1e-9, "state")


@requires_native
def test_result_layouts_match_torch():
    """Shapes, and batch_first outputs with torch.nn's (transposed) strides."""
    for cell, batch_first in itertools.product(("lstm", "gru"), (False, True)):
        case = Case(cell=cell, layers=2, bidirectional=True, batch_first=batch_first)
        theirs, ours = make_modules(case)
        x = make_inputs(case).input.detach()
        (oe, state_e), (oa, state_a) = theirs(x), ours(x)
        assert oa.shape == oe.shape and oa.stride() == oe.stride()
        for a, e in zip(*(s if isinstance(s, tuple) else (s,) for s in (state_a, state_e))):
            assert a.shape == e.shape and a.is_contiguous()


@requires_native
def test_packed_output_keeps_indices():
    case = Case(cell="gru", packing="packed_unsorted", batch=5, hx=True)
    theirs, ours = make_modules(case)
    inputs = make_inputs(case)
    out, h = ours(inputs.input, inputs.hx)
    assert isinstance(out, PackedSequence)
    assert out.sorted_indices is inputs.input.sorted_indices
    assert out.unsorted_indices is inputs.input.unsorted_indices
    assert torch.equal(out.batch_sizes, inputs.input.batch_sizes)
    expected, eh = theirs(inputs.input, inputs.hx)
    assert_close(h, eh, 1e-9, "h_n in the caller's batch order")


@requires_native
@pytest.mark.parametrize("cell", ["lstm_proj", "gru"])
def test_non_contiguous_input_and_state(cell):
    """Inputs and states that are views with odd strides give the same results and gradients."""
    case = Case(cell=cell, layers=2, bidirectional=True, hx=True, batch=4, seq_len=5)
    theirs, ours = make_modules(case)
    results = []
    for module in (theirs, ours):
        torch.manual_seed(3)
        base = torch.randn(4, 5, 2 * case.input_size, dtype=torch.float64, requires_grad=True)
        x = base[:, :, ::2].transpose(0, 1)             # [T, B, I], strides everywhere
        assert not x.is_contiguous()
        state = case.proj_size or case.hidden
        h_base = torch.randn(4, 4, 3 * state, dtype=torch.float64, requires_grad=True)
        h = h_base[:, :, 1::3].transpose(0, 1).transpose(0, 1)[..., :state]
        hx = h
        leaves = [base, h_base, *module.parameters()]
        if cell.startswith("lstm"):
            c_base = torch.randn(case.batch, 4, case.hidden, dtype=torch.float64,
                                 requires_grad=True)
            hx = (h, c_base.transpose(0, 1))
            leaves.append(c_base)
        out, st_ = module(x, hx)
        flat = [out] + list(st_ if isinstance(st_, tuple) else (st_,))
        results.append((flat, torch.autograd.grad(ramp_loss(flat), leaves)))
    assert_runs_close(*results, 1e-9)


@requires_native
def test_inference_saves_nothing_and_matches():
    """no_grad and requires_grad=False inputs take the inference path (no autograd node)."""
    case = Case(cell="lstm", layers=2, bidirectional=True)
    theirs, ours = make_modules(case)
    x = make_inputs(case).input.detach()
    with torch.no_grad():
        out, (h, c) = ours(x)
    assert out.grad_fn is None
    assert_close(out, theirs(x)[0], 1e-9, "no_grad output")
    with torch.inference_mode():
        out2, _ = ours(x)
    assert_close(out2, theirs(x)[0], 1e-9, "inference_mode output")


@functools.lru_cache(maxsize=None)
def inference_grid() -> list:
    return [Case(**row, dtype=dtype) for dtype in (torch.float64, torch.float32)
            for row in covering_design(FACTORS, strength=2, seed=1)]


@requires_native
@pytest.mark.parametrize("case", inference_grid(), ids=[c.id for c in inference_grid()])
def test_inference_path_matches_torch(case):
    """The no-grad fast path (modules.RNNBase.forward -> the module's _inference plan) over every
    pair of feature values: outputs and final states as torch.nn's."""
    theirs, ours = make_modules(case)
    inputs = make_inputs(case)
    with torch.no_grad():
        expected = flat_results(*theirs(inputs.input, inputs.hx))
        actual = flat_results(*ours(inputs.input, inputs.hx))
    for name, a, e in zip(["output", "h_n", "c_n"], actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert_close(a, e, TOLERANCE[case.dtype], name)


@requires_native
def test_only_input_requires_grad():
    case = Case(cell="gru", layers=2, hx=True)
    theirs, ours = make_modules(case)
    for m in (theirs, ours):
        m.requires_grad_(False)
    grads = []
    for m in (theirs, ours):
        x = torch.randn(5, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0),
                        requires_grad=True)
        out, h = m(x)
        grads.append(torch.autograd.grad(out.sum() + h.sum(), x)[0])
    assert_close(grads[1], grads[0], 1e-9, "input gradient")


DOUBLE_BACKWARD_CASES = [Case(cell="lstm_proj", layers=2, bidirectional=True),
                         Case(cell="gru", layers=2), Case(cell="rnn_relu")]


@requires_native
@pytest.mark.parametrize("backend", ["cpu", "emu"])
@pytest.mark.parametrize("case", [
    Case(cell="lstm", layers=2, bidirectional=True, batch_first=True),
    Case(cell="gru"), Case(cell="rnn_relu", seq_len=1), Case(cell="lstm", hx=True),
    Case(cell="gru", batch=1, batch_first=True)],
    ids=["lstm-L2-bi-bf", "gru", "rnn-T1", "lstm-hx", "gru-B1-bf"])
def test_output_changed_in_place_before_backward(case, backend, monkeypatch):
    """torch.nn's CPU RNNs return an output of their own: `out += residual`, ReLU(inplace=True)
    or masked_fill_ on it before backward work and give the gradients of what was computed.
    fusedrnn's last layer saves its output for backward, so the module hands out a copy."""
    if backend == "emu":
        pytest.importorskip("fusedrnn._emu")
        monkeypatch.setenv("FUSEDRNN_BACKEND", "emu")
    theirs, ours = make_modules(case)
    results = []
    for module in (theirs, ours):
        inputs = make_inputs(case, seed=3)
        out, _ = module(inputs.input, inputs.hx)
        out.mul_(2)
        out += 1
        out.relu_()  # last: it saves its result
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        results.append([out.detach(), inputs.leaf.grad, *(s.grad for s in inputs.hx_leaves),
                        *(p.grad for p in module.parameters())])
    for i, (e, a) in enumerate(zip(*results)):
        assert_close(a, e, TOLERANCE[case.dtype], f"result {i}")


@requires_native
@pytest.mark.parametrize("lengths", [None, [1, 3, 2]], ids=["padded", "unsorted-lengths"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_batch_first_output_in_training_is_a_tensor_of_its_own(name, batch, lengths):
    """In training, a batch_first output is a tensor of its own, not a transposed view, as
    torch.nn's GRU and RNN return it: FSDP2 warns of a view output, on which an in-place op would
    skip its pre-backward hook (it warned for fusedrnn's batch_first GRU and RNN)."""
    module = getattr(fusedrnn, name)(4, 5, num_layers=2, batch_first=True)
    x = torch.randn(batch, 3, 4, requires_grad=True)
    lengths = None if lengths is None else torch.tensor(lengths[:batch])
    out, _ = module(x, lengths=lengths)
    assert out._base is None and out.shape == (batch, 3, 5)


@requires_native
@pytest.mark.parametrize("case", DOUBLE_BACKWARD_CASES, ids=["lstm-L2-bidir-proj", "gru-L2", "rnn"])
def test_double_backward_matches_torch(case):
    """A gradient penalty through the layers (create_graph recomputes them as reference ops), and
    the first-order gradients taken with create_graph=True equal the native ones."""
    theirs, ours = make_modules(case)
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    assert_second_derivatives_match(lambda m, x: m(x)[0], theirs, ours, x)
    (gx,) = torch.autograd.grad(ours(x)[0].sum(), x, create_graph=True)
    (gx2,) = torch.autograd.grad(ours(x)[0].sum(), x)
    assert_close(gx.detach(), gx2, 1e-12, "first-order gradient under create_graph")


@requires_native
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_double_backward_with_lengths_and_states(cell):
    """Packed input and initial states that require grad: the penalty on the states' gradient,
    differentiated again, as torch.nn's."""
    results = []
    for lib in (nn, fusedrnn):
        torch.manual_seed(0)
        m = getattr(lib, cell.upper())(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
        torch.manual_seed(1)
        x = torch.randn(5, 3, 3, dtype=torch.float64)
        h0 = torch.randn(4, 3, 4, dtype=torch.float64, requires_grad=True)
        hx = (h0, torch.randn(4, 3, 4, dtype=torch.float64)) if cell == "lstm" else h0
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, [5, 2, 4], enforce_sorted=False)
        out = m(packed, hx)[0].data
        (gh,) = torch.autograd.grad(out.pow(2).sum(), h0, create_graph=True)
        results.append(torch.autograd.grad(gh.pow(2).sum(), [h0, *m.parameters()]))
    for a, e in zip(results[1], results[0]):
        assert_close(a, e, 1e-10, "second derivative")


WEIGHT_REACHES_INPUTS_KINDS = [("RNN", {}, 1), ("RNN", {}, 3), ("GRU", {}, 1), ("GRU", {}, 3),
                               ("LSTM", {}, 1), ("LSTM", {"proj_size": 2}, 3),
                               ("LSTM", {"bidirectional": True}, 3), ("RNNCell", {}, None),
                               ("GRUCell", {}, None), ("LSTMCell", {}, None)]


@requires_native
@pytest.mark.parametrize("backend", ["cpu", pytest.param("emu", marks=pytest.mark.emu)])
@pytest.mark.parametrize("kind, kwargs, seq_len", WEIGHT_REACHES_INPUTS_KINDS,
                         ids=[f"{k}-{'-'.join(kw) or 'plain'}-T{t}"
                              for k, kw, t in WEIGHT_REACHES_INPUTS_KINDS])
def test_create_graph_when_the_weights_also_reach_input_and_state(backend, kind, kwargs, seq_len,
                                                                  monkeypatch):
    """x computed from W_ih and the initial state from W_hh, gradients taken with
    create_graph=True: the first-order gradients and their own gradients are torch.nn's. The
    recomputation once differentiated with respect to the weights themselves, so the roads
    through x and h0 were counted twice (an RNN's dW_hh at T=1: -0.083 where torch.nn gives
    -0.207)."""
    use_backend(backend, monkeypatch)
    cell = seq_len is None
    suffix = "" if cell else "_l0"
    torch.manual_seed(0)
    x_base = torch.randn(*((2, 3) if cell else (seq_len, 2, 3)), dtype=torch.float64)
    states = 1 if cell else (2 if kwargs.get("bidirectional") else 1)
    h_base = torch.randn(*((2, kwargs.get("proj_size", 4)) if cell
                           else (states, 2, kwargs.get("proj_size", 4))), dtype=torch.float64)
    c_base = torch.randn(*((2, 4) if cell else (states, 2, 4)), dtype=torch.float64)
    results = []
    for lib in (nn, fusedrnn):
        torch.manual_seed(1)
        m = getattr(lib, kind)(3, 4, dtype=torch.float64, **kwargs)
        w_ih, w_hh = getattr(m, "weight_ih" + suffix), getattr(m, "weight_hh" + suffix)
        x = x_base * torch.tanh(w_ih.sum())
        h0 = h_base * torch.tanh(w_hh.sum())
        out = m(x, (h0, c_base * w_hh.mean()) if "LSTM" in kind else h0)
        out = out if cell and "LSTM" not in kind else out[0]
        params = list(m.parameters())
        first = torch.autograd.grad(out.pow(2).sum(), params, create_graph=True)
        second = torch.autograd.grad(sum(g.pow(2).sum() for g in first), params)
        results.append([g.detach() for g in first] + list(second))
    for i, (a, e) in enumerate(zip(results[1], results[0])):
        assert_close(a, e, 1e-10, f"{'first' if i < len(results[0]) // 2 else 'second'}-order "
                                  f"gradient {i % (len(results[0]) // 2)}")


@requires_native
@pytest.mark.parametrize("kind, seq_len", [("GRU", 5), ("LSTM", 5), ("LSTM", 1), ("RNN", 1),
                                           ("GRUCell", None), ("LSTMCell", None)])
def test_bias_written_in_place_before_backward(kind, seq_len):
    """The backward reads no bias value: a bias written in place between forward and backward
    gives torch.nn's gradients (its float64 paths allow it), and with only the biases trainable
    a bias gradient taken with create_graph differentiates again as torch.nn's."""
    name = "bias_hh" if seq_len is None else "bias_hh_l0"
    shape = (2, 3) if seq_len is None else (seq_len, 2, 3)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    grads = []
    for lib in (nn, fusedrnn):
        torch.manual_seed(0)
        m = getattr(lib, kind)(3, 4, dtype=torch.float64)
        out = m(x)
        out = out[0] if isinstance(out, tuple) else out
        with torch.no_grad():
            getattr(m, name).mul_(0.5)
        grads.append(torch.autograd.grad(out.pow(2).sum(), [x, *m.parameters()]))
    for a, e in zip(grads[1], grads[0]):
        assert_close(a, e, 1e-12, "gradient after an in-place bias write")
    second = []
    for lib in (nn, fusedrnn):
        torch.manual_seed(0)
        m = getattr(lib, kind)(3, 4, dtype=torch.float64).requires_grad_(False)
        bias = getattr(m, name).requires_grad_(True)
        out = m(x.detach())
        (d_bias,) = torch.autograd.grad((out[0] if isinstance(out, tuple) else out).pow(2).sum(),
                                        bias, create_graph=True)
        second.append(torch.autograd.grad(d_bias.pow(2).sum(), bias))
    assert_close(second[1][0], second[0][0], 1e-10, "second derivative wrt the bias alone")


@requires_native
@pytest.mark.parametrize("kind, seq_len", [("GRUCell", None), ("LSTMCell", None),
                                           ("RNNCell", None), ("GRU", 1), ("RNN", 1)])
@pytest.mark.parametrize("weight", ["weight_ih", "weight_hh"])
@pytest.mark.parametrize("state_needs_grad", [False, True], ids=["state", "state-grad"])
def test_weight_written_in_place_before_backward_like_torch(kind, seq_len, weight,
                                                            state_needs_grad):
    """A cell step saves x, W_ih and W_hh only where a first-order gradient reads them, as
    torch.nn's products save their operands: W_ih written in place next to an input that needs
    no gradient (or W_hh next to a state that needs none) gives torch.nn's gradients, and a
    write that torch.nn refuses is refused. (Every cell step used to save all three.)"""
    name = weight if seq_len is None else f"{weight}_l0"
    x = torch.randn(*((2, 3) if seq_len is None else (seq_len, 2, 3)), dtype=torch.float64)
    h = torch.randn(*((2, 4) if seq_len is None else (1, 2, 4)), dtype=torch.float64,
                    requires_grad=state_needs_grad)
    state = (h, torch.zeros_like(h)) if "LSTM" in kind else h
    results = []
    for lib in (nn, fusedrnn):
        torch.manual_seed(0)
        m = getattr(lib, kind)(3, 4, dtype=torch.float64)
        out = m(x, state)
        out = out[0] if isinstance(out, tuple) else out
        with torch.no_grad():
            getattr(m, name).mul_(0.5)
        results.append(_grads_unless_refused(
            lambda: torch.autograd.grad(out.pow(2).sum(), list(m.parameters()))))
    _assert_same_answer_to_a_write(results, name)


def _grads_unless_refused(compute):
    """compute()'s gradients, or None where autograd refused them because a tensor the backward
    reads was written in place after the forward."""
    try:
        return compute()
    except RuntimeError as error:
        assert "modified by an inplace operation" in str(error)
        return None


def _assert_same_answer_to_a_write(results, written: str) -> None:
    """results: torch.nn's and fusedrnn's _grads_unless_refused after the same in-place write.
    Both refused, or both gave the same gradients (None in the same places)."""
    theirs, ours = results
    assert (theirs is None) == (ours is None), (
        f"torch.nn {'refused' if theirs is None else 'accepted'} the write, fusedrnn did not")
    for a, e in zip(ours or (), theirs or ()):
        assert (a is None) == (e is None)
        if e is not None:
            assert_close(a, e, 1e-12, f"gradient after an in-place write of {written}")


@requires_native
def test_create_graph_after_an_in_place_write_of_an_unsaved_weight_raises():
    """create_graph's recomputation reads W_ih, which the cell did not save (x needs no
    gradient): written after the forward, it must raise, not differentiate a forward that
    never ran."""
    m = fusedrnn.GRUCell(3, 4, dtype=torch.float64)
    out = m(torch.randn(2, 3, dtype=torch.float64))
    with torch.no_grad():
        m.weight_ih.add_(0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out.pow(2).sum(), m.weight_hh, create_graph=True)


@requires_native
@pytest.mark.parametrize("kind, seq_len", [("GRU", 5), ("RNN", 1), ("GRUCell", None)])
def test_create_graph_after_an_in_place_bias_write_raises(kind, seq_len):
    """create_graph recomputes the layer from its biases, which the forward keeps for that alone
    (a first-order backward reads none): one written after the forward must raise, as a saved
    tensor does, not give the gradient of a forward that never ran."""
    name = "bias_hh" if seq_len is None else "bias_hh_l0"
    x = torch.randn(*((2, 3) if seq_len is None else (seq_len, 2, 3)), dtype=torch.float64)
    m = getattr(fusedrnn, kind)(3, 4, dtype=torch.float64)
    out = m(x)
    out = out[0] if isinstance(out, tuple) else out
    with torch.no_grad():
        getattr(m, name).add_(0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out.pow(2).sum(), m.weight_hh if seq_len is None else m.weight_hh_l0,
                            create_graph=True)


@requires_native
@pytest.mark.parametrize("backend", ["cpu", pytest.param("emu", marks=pytest.mark.emu)])
@pytest.mark.parametrize("kind, seq_len, packed, written, trainable", [
    (kind, seq_len, packed, written, trainable)
    for kind, seq_len, packed in [("LSTM", 3, False), ("GRU", 3, False), ("RNN", 3, False),
                                  ("LSTM", 1, False), ("GRU", 1, True), ("LSTMCell", None, False),
                                  ("GRUCell", None, False), ("RNNCell", None, False)]
    for written in ["h0", "c0", "weight_hh"] for trainable in ["x", "x+weight_hh", "c0", "h0"]
    if "LSTM" in kind or "c0" not in (written, trainable)], ids=str)
def test_state_or_weight_written_in_place_before_backward_like_torch(
        backend, kind, seq_len, packed, written, trainable, monkeypatch):
    """An initial state (or W_hh) written in place between forward and backward: fusedrnn's
    backward runs where torch.nn's does, with its gradients, and refuses where torch.nn's does.
    The layer and the cell step saved h0, c0 and W_hh whenever anything needed a gradient, so a
    frozen LSTM whose state buffer was updated after the forward could not give d x (found by
    fuzzing: 17 of these 168 cases failed)."""
    use_backend(backend, monkeypatch)
    lstm = "LSTM" in kind
    cell = seq_len is None
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*((2, 3) if cell else (seq_len, 2, 3)), dtype=torch.float64, generator=gen)
    h0, c0 = (torch.randn(*((2, 4) if cell else (1, 2, 4)), dtype=torch.float64, generator=gen)
              for _ in range(2))
    for name in trainable.split("+"):
        if name != "weight_hh":
            {"x": x, "h0": h0, "c0": c0}[name].requires_grad_()
    results = []
    for lib in (nn, fusedrnn):
        torch.manual_seed(0)
        m = getattr(lib, kind)(3, 4, dtype=torch.float64).requires_grad_(False)
        suffix = "" if cell else "_l0"
        if "weight_hh" in trainable:
            getattr(m, "weight_hh" + suffix).requires_grad_()
        states = [h0.clone() if h0.requires_grad else h0.detach().clone(),
                  c0.clone() if c0.requires_grad else c0.detach().clone()]
        inp = nn.utils.rnn.pack_padded_sequence(x, [seq_len] * 2) if packed else x
        out = m(inp, tuple(states) if lstm else states[0])
        out = out[0] if isinstance(out, tuple) else out
        out = out.data if packed else out
        with torch.no_grad():
            {"h0": states[0], "c0": states[1],
             "weight_hh": getattr(m, "weight_hh" + suffix)}[written].add_(0.5)
        wrt = [t for t in (x, h0, c0, *m.parameters()) if t.requires_grad]
        results.append(_grads_unless_refused(
            lambda: torch.autograd.grad(out.pow(2).sum(), wrt, allow_unused=True)))
    _assert_same_answer_to_a_write(results, written)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("emu", marks=pytest.mark.emu)])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_one_step_c_n_requires_no_grad_when_only_w_hr_does(backend, packed, monkeypatch):
    """After one step c_n does not depend on W_hr: with only W_hr trainable, torch.nn's c_n
    requires no grad (and a backward from it raises); fusedrnn's layer once made it require
    grad (a packed batch on the CPU, any one-step batch on the emulated layer)."""
    use_backend(backend, monkeypatch)
    x = torch.randn(1, 2, 3, dtype=torch.float64)
    if packed:
        x = nn.utils.rnn.pack_padded_sequence(x, [1, 1])
    for lib in (nn, fusedrnn):
        m = getattr(lib, "LSTM")(3, 4, proj_size=2, dtype=torch.float64).requires_grad_(False)
        m.weight_hr_l0.requires_grad_()
        out, (h_n, c_n) = m(x)
        assert h_n.requires_grad and not c_n.requires_grad, lib.__name__


@pytest.mark.parametrize("backend", ["cpu", pytest.param("emu", marks=pytest.mark.emu)])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("seq_len", [1, 3])
@pytest.mark.parametrize("batch, packed, create_graph", [(2, False, False), (2, True, True),
                                                         (2, False, True), (0, False, False)],
                         ids=["padded", "packed-create-graph", "create-graph", "batch-0"])
def test_projection_grad_none_where_torch_leaves_it(backend, bidirectional, seq_len, batch, packed,
                                                    create_graph, monkeypatch):
    """A loss on c_n alone never reaches W_hr after one step: torch.nn leaves weight_hr's grad
    None there, and fills it from the second step. The emulated and CUDA layer once gave zeros,
    and so did create_graph's recomputation of a packed batch and the empty batch's layer."""
    use_backend(backend, monkeypatch)
    theirs = nn.LSTM(3, 4, proj_size=2, bidirectional=bidirectional).double()
    ours = fusedrnn.LSTM(3, 4, proj_size=2, bidirectional=bidirectional).double()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(seq_len, batch, 3, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    if packed:
        x = nn.utils.rnn.pack_padded_sequence(x, [seq_len, 1], enforce_sorted=False)
    for module in (theirs, ours):
        _, (_, c_n) = module(x)
        grads = torch.autograd.grad(c_n.sum(), list(module.parameters()), allow_unused=True,
                                    create_graph=create_graph)
        for p, g in zip(module.parameters(), grads):
            p.grad = g
    for (name, e), a in zip(theirs.named_parameters(), ours.parameters()):
        assert (a.grad is None) == (e.grad is None), name
        if e.grad is not None:
            assert_close(a.grad.detach(), e.grad.detach(), 1e-10, name)


@requires_native
@pytest.mark.parametrize("backend", ["cpu", pytest.param("emu", marks=pytest.mark.emu)])
@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_nan_input_reaches_the_recurrent_weight_like_torch(backend, kind, packed, bidirectional,
                                                           monkeypatch):
    """A NaN in x with no initial state, one step long: torch.nn multiplies its zero h0 by the
    step's gate gradients, so W_hh's gradient rows are NaN; fusedrnn skipped that product and
    gave zeros (a packed batch whose longest sequence is 1 on the CPU, any such batch on the
    emulated layer). The NaN pattern of every gradient is torch.nn's."""
    use_backend(backend, monkeypatch)
    x = torch.randn(1, 2, 3, dtype=torch.float64)
    x[0, 1, 0] = float("nan")
    patterns = []
    for lib in (nn, fusedrnn):
        torch.manual_seed(0)
        m = getattr(lib, kind)(3, 4, bidirectional=bidirectional, dtype=torch.float64)
        out = m(nn.utils.rnn.pack_padded_sequence(x, [1, 1]) if packed else x)[0]
        (out.data if packed else out).sum().backward()
        patterns.append([p.grad.isnan() for p in m.parameters()])
    for (name, _), a, e in zip(m.named_parameters(), *reversed(patterns)):
        assert torch.equal(a, e), f"{name}: NaN at {a.nonzero().tolist()}, torch.nn's at " \
                                  f"{e.nonzero().tolist()}"


@requires_native
def test_zero_batch_like_torch():
    """B = 0: results of torch.nn's shapes, and gradients of the input and the states (empty
    tensors, not None) and of the weights (zeros)."""
    case = Case(cell="lstm", layers=2, bidirectional=True)
    theirs, ours = make_modules(case)
    results = []
    for m in (theirs, ours):
        x = torch.randn(5, 0, 4, dtype=torch.float64, requires_grad=True)
        h0, c0 = (torch.zeros(4, 0, case.hidden, dtype=torch.float64, requires_grad=True)
                  for _ in range(2))
        out, (hn, cn) = m(x, (h0, c0))
        (out.sum() + hn.sum() + cn.sum()).backward()
        results.append([out, hn, cn, x.grad, h0.grad, c0.grad,
                        *(p.grad for p in m.parameters())])
    for a, e in zip(*reversed(results)):
        assert a is not None and a.shape == e.shape and torch.equal(a, e)


# --- low precision on the CPU ---------------------------------------------------------------------

@requires_native
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_low_precision_computes_in_float32(cell, dtype):
    """fp16/bf16 modules on the CPU compute in float32 and return the input dtype; their error
    against float64, outputs and every parameter's gradient, is at most twice torch.nn's in the
    same precision plus two unit roundoffs (a floor of 1e-2 let a 30x worse result pass, and the
    gradients were only checked finite; review, session 31)."""
    case = Case(cell=cell, layers=2, bidirectional=True, hx=True, dtype=torch.float64)
    exact, ours = make_modules(case)
    theirs = make_modules(case)[0].to(dtype)
    ours = ours.to(dtype)
    x = torch.randn(5, 3, 4, dtype=dtype, generator=torch.Generator().manual_seed(0))
    state = case.hidden
    h = torch.randn(4, 3, state, dtype=dtype)
    hx = (h, torch.randn(4, 3, state, dtype=dtype)) if cell == "lstm" else h
    hx64 = tuple(s.double() for s in hx) if cell == "lstm" else hx.double()
    reference, _ = exact(x.double(), hx64)
    out, st_ = ours(x, hx)
    assert out.dtype == dtype
    for s in (st_ if isinstance(st_, tuple) else (st_,)):
        assert s.dtype == dtype
    torch_out, _ = theirs(x, hx)
    _assert_within_twice_torch_error(dtype, (exact, reference), (theirs, torch_out), (ours, out))
    for p in ours.parameters():
        assert p.grad.dtype == dtype


def _assert_within_twice_torch_error(dtype, exact_run, torch_run, our_run):
    """Each run (module, output), the exact one in float64: our output and, after a backward of
    each output's sum, every parameter's gradient, against float64, within twice torch.nn's
    error in `dtype` plus two unit roundoffs."""
    from _helpers import rel_err
    u = UNIT_ROUNDOFF[dtype]
    (exact, reference), (theirs, torch_out), (ours, out) = exact_run, torch_run, our_run
    assert rel_err(out, reference) <= 2 * rel_err(torch_out, reference) + 2 * u
    for result in (reference, torch_out, out):
        result.float().sum().backward()
    for (name, p), e, t in zip(ours.named_parameters(), exact.parameters(), theirs.parameters()):
        assert rel_err(p.grad, e.grad) <= 2 * rel_err(t.grad, e.grad) + 2 * u, name


@pytest.mark.parametrize("backend", ["cpu", pytest.param("emu", marks=pytest.mark.emu)])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_relu_rnn_keeps_nan_like_torch(backend, grad, monkeypatch):
    """A NaN reaching a ReLU RNN's pre-activation stays NaN, as torch.relu keeps it (the kernels'
    relu once returned 0 there: a silently finite answer), and the gradient passes where the
    output is NaN, as torch's relu backward lets it."""
    use_backend(backend, monkeypatch)
    torch.manual_seed(0)
    theirs = nn.RNN(3, 4, nonlinearity="relu", num_layers=2).double()
    ours = fusedrnn.RNN(3, 4, nonlinearity="relu", num_layers=2).double()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    x[1, 0, 0] = float("nan")
    runs = []
    for module in (theirs, ours):
        module.zero_grad()
        xi = x.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            out, h_n = module(xi)
        grads = []
        if grad:
            out.backward(torch.randn(out.shape, dtype=out.dtype,
                                     generator=torch.Generator().manual_seed(1)))
            grads = [xi.grad] + [p.grad for p in module.parameters()]
        runs.append([out.detach(), h_n.detach(), *grads])
    assert runs[0][0].isnan().any() and not runs[0][0].isnan().all()
    for want, got in zip(*runs):
        assert torch.equal(got.isnan(), want.isnan())
        keep = ~want.isnan()
        assert torch.allclose(got[keep], want[keep], rtol=1e-9, atol=1e-12)


# --- module surface -------------------------------------------------------------------------------

SURFACE_CASES = [
    (nn.LSTM, fusedrnn.LSTM, dict(num_layers=2, bidirectional=True, proj_size=3)),
    (nn.LSTM, fusedrnn.LSTM, dict(bias=False, batch_first=True, dropout=0.0)),
    (nn.GRU, fusedrnn.GRU, dict(num_layers=3, bidirectional=True, bias=False)),
    (nn.RNN, fusedrnn.RNN, dict(num_layers=2, nonlinearity="relu", dropout=0.2)),
]


@pytest.mark.parametrize("torch_cls, our_cls, kwargs", SURFACE_CASES,
                         ids=["lstm-proj-bidir", "lstm-nobias", "gru-bidir", "rnn-relu"])
def test_parameters_state_dict_and_repr(torch_cls, our_cls, kwargs):
    torch.manual_seed(0)
    theirs = torch_cls(5, 7, **kwargs)
    torch.manual_seed(0)
    ours = our_cls(5, 7, **kwargs)
    # names, order, shapes, and the initialisation (same RNG draws in the same order)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == \
           [(n, p.shape) for n, p in theirs.named_parameters()]
    for (name, a), (_, e) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert torch.equal(a, e), name
    # state_dict both ways
    other = torch_cls(5, 7, **kwargs)
    other.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    # attributes, repr, all_weights
    for attr in ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first",
                 "dropout", "bidirectional", "proj_size"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert type(ours.dropout) is float
    assert repr(ours) == repr(theirs)
    assert [[w.shape for w in ws] for ws in ours.all_weights] == \
           [[w.shape for w in ws] for ws in theirs.all_weights]
    assert ours._flat_weights_names == theirs._flat_weights_names
    ours.flatten_parameters()


def _outcome(call):
    """A call's result, or its exception's type and message: what a caller can observe."""
    try:
        return (None, call())
    except Exception as exc:
        return (type(exc), str(exc))


def _same_outcome(ours, theirs) -> bool:
    """The same result, or an exception that torch.nn's except clauses catch with the same
    message (fusedrnn's error types subclass torch's)."""
    if ours[0] is None or theirs[0] is None:
        return ours == theirs
    return issubclass(ours[0], theirs[0]) and ours[1] == theirs[1]


@pytest.mark.parametrize("torch_cls, our_cls, kwargs", SURFACE_CASES,
                         ids=["lstm-proj-bidir", "lstm-nobias", "gru-bidir", "rnn-relu"])
def test_checking_helpers_like_torch(torch_cls, our_cls, kwargs):
    """torch.nn.RNNBase's public helpers (check_input, get_expected_hidden_size,
    check_hidden_size, check_forward_args, permute_hidden, LSTM's get_expected_cell_size), which
    a subclass that overrides forward calls: the same results and the same errors."""
    theirs, ours = torch_cls(5, 7, **kwargs), our_cls(5, 7, **kwargs)
    lstm = torch_cls is nn.LSTM
    states = theirs.num_layers * (2 if theirs.bidirectional else 1)
    state_size = theirs.proj_size or theirs.hidden_size
    x = torch.randn(4, 3, 5)
    batch = 4 if theirs.batch_first else 3
    packed = torch.randn(6, 5)
    batch_sizes = torch.tensor([3, 2, 1])

    def hidden(batch, size=state_size):
        h = torch.randn(states, batch, size)
        return (h, torch.randn(states, batch, theirs.hidden_size)) if lstm else h

    calls = [
        lambda m: m.check_input(x, None),
        lambda m: m.check_input(packed, batch_sizes),
        lambda m: m.check_input(packed, None),
        lambda m: m.check_input(x.double(), None),
        lambda m: m.check_input(torch.randn(4, 3, 6), None),
        lambda m: m.get_expected_hidden_size(x, None),
        lambda m: m.get_expected_hidden_size(packed, batch_sizes),
        lambda m: m.check_hidden_size(torch.randn(states, batch, state_size),
                                      (states, batch, state_size)),
        lambda m: m.check_hidden_size(torch.randn(1, 2, 3), (states, batch, state_size)),
        lambda m: m.check_hidden_size(torch.randn(1, 2, 3), (1, 2, 4), "want {} got {}"),
        lambda m: m.check_forward_args(x, hidden(batch), None),
        lambda m: m.check_forward_args(packed, hidden(3), batch_sizes),
        lambda m: m.check_forward_args(x, hidden(batch + 1), None),
    ]
    if lstm:
        bad_cell = (hidden(batch)[0], torch.randn(states, batch, theirs.hidden_size + 1))
        calls += [lambda m: m.get_expected_cell_size(x, None),
                  lambda m: m.check_forward_args(x, bad_cell, None)]
    for i, call in enumerate(calls):
        got, want = _outcome(lambda: call(ours)), _outcome(lambda: call(theirs))
        assert _same_outcome(got, want), f"call {i}: {got} against torch.nn's {want}"
    permutation = torch.tensor([2, 0, 1])
    hx = hidden(3)
    assert ours.permute_hidden(hx, None) is hx
    got, want = ours.permute_hidden(hx, permutation), theirs.permute_hidden(hx, permutation)
    for a, e in zip(*(v if lstm else (v,) for v in (got, want))):
        assert torch.equal(a, e)


@pytest.mark.parametrize("name, kwargs", [("LSTMCell", {}), ("GRUCell", dict(bias=False)),
                                          ("RNNCell", dict(nonlinearity="relu"))])
def test_cell_surface(name, kwargs):
    torch.manual_seed(0)
    theirs = getattr(nn, name)(5, 7, **kwargs)
    torch.manual_seed(0)
    ours = getattr(fusedrnn, name)(5, 7, **kwargs)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == \
           [(n, p.shape) for n, p in theirs.named_parameters()]
    for (n, a), (_, e) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert torch.equal(a, e), n
    assert repr(ours) == repr(theirs)
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())
    assert ours.bias_ih is None if not ours.bias else ours.bias_ih is not None


def test_positional_arguments_like_torch():
    """RNN takes nonlinearity as its 4th positional argument, like torch.nn.RNN."""
    ours, theirs = fusedrnn.RNN(3, 4, 2, "relu", False), nn.RNN(3, 4, 2, "relu", False)
    assert (ours.nonlinearity, ours.bias, ours.num_layers) == \
           (theirs.nonlinearity, theirs.bias, theirs.num_layers)
    ours, theirs = fusedrnn.LSTM(3, 4, 2, False, True, 0.0, True, 2), \
        nn.LSTM(3, 4, 2, False, True, 0.0, True, 2)
    assert repr(ours) == repr(theirs)
    # GRU and RNN keep RNNBase's proj_size slot before device and dtype, as torch.nn's do.
    for ours, theirs in [
            (fusedrnn.GRU(3, 4, 1, True, False, 0.0, True, 0, "cpu", torch.float64),
             nn.GRU(3, 4, 1, True, False, 0.0, True, 0, "cpu", torch.float64)),
            (fusedrnn.RNN(3, 4, 2, "relu", True, True, 0.1, True, 0, "cpu", torch.float64),
             nn.RNN(3, 4, 2, "relu", True, True, 0.1, True, 0, "cpu", torch.float64))]:
        assert repr(ours) == repr(theirs)
        assert ours.weight_hh_l0.dtype == theirs.weight_hh_l0.dtype == torch.float64
    # torch.nn builds a GRU that cannot run from a nonzero slot; fusedrnn says why at once.
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM"):
        fusedrnn.GRU(3, 4, 1, True, False, 0.0, False, 2)
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM"):
        fusedrnn.RNN(3, 4, proj_size=0)


@requires_native
def test_module_to_dtype_and_functional_call():
    """Weights are read at every call, so .double() and torch.func.functional_call work."""
    case = Case(cell="gru", dtype=torch.float32)
    theirs, ours = make_modules(case)
    theirs.double()
    ours.double()
    x = torch.randn(4, 3, 4, dtype=torch.float64)
    assert_close(ours(x)[0], theirs(x)[0], 1e-9, "after .double()")
    params = {n: p * 2 for n, p in ours.named_parameters()}
    expected = torch.func.functional_call(theirs, params, (x,))[0]
    actual = torch.func.functional_call(ours, params, (x,))[0]
    assert_close(actual, expected, 1e-9, "functional_call")


@requires_native
@pytest.mark.parametrize("seq_len", [1, 4])
def test_conversion_swaps_parameters_after_cached_calls(seq_len):
    """Under torch.__future__.set_swap_module_params_on_conversion(True), .double() swaps each
    parameter with torch.utils.swap_tensors, which refuses a tensor that has weak references;
    the inference caches hold some, so _apply drops them first (torch.nn drops its own)."""
    torch.manual_seed(0)
    ours, theirs = fusedrnn.LSTM(3, 4, 2), nn.LSTM(3, 4, 2)
    theirs.load_state_dict(ours.state_dict())  # (torch.nn's own load refuses to swap: first)
    swapping = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        x = torch.randn(seq_len, 2, 3)
        with torch.no_grad():
            ours(x)
        ours(x)  # one step with autograd takes a cached path too
        ours.double()
        theirs.double()
        with torch.no_grad():
            assert_close(ours(x.double())[0], theirs(x.double())[0], 1e-12, "after .double()")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swapping)


# --- cells ----------------------------------------------------------------------------------------

@requires_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("with_hx", [True, False], ids=["hx", "nohx"])
@pytest.mark.parametrize("name, kwargs", [("LSTMCell", {}), ("GRUCell", {}),
                                          ("RNNCell", {}), ("RNNCell", dict(nonlinearity="relu")),
                                          ("GRUCell", dict(bias=False))],
                         ids=["lstm", "gru", "rnn-tanh", "rnn-relu", "gru-nobias"])
def test_cells_match_torch(name, kwargs, with_hx, batched, dtype):
    torch.manual_seed(0)
    ours = getattr(fusedrnn, name)(5, 9, dtype=dtype, **kwargs)
    theirs = getattr(nn, name)(5, 9, dtype=dtype, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(1)
    shape = (3,) if batched else ()
    x = torch.randn(*shape, 5, dtype=dtype, generator=g, requires_grad=True)
    hx, leaves = None, []
    if with_hx:
        h = torch.randn(*shape, 9, dtype=dtype, generator=g, requires_grad=True)
        c = torch.randn(*shape, 9, dtype=dtype, generator=g, requires_grad=True)
        hx, leaves = ((h, c), [h, c]) if name == "LSTMCell" else (h, [h])
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    results = []
    for module in (theirs, ours):
        out = module(x, hx)
        flat = list(out) if isinstance(out, tuple) else [out]
        results.append((flat, torch.autograd.grad(ramp_loss(flat),
                                                  [x, *leaves, *module.parameters()])))
    assert_runs_close(*results, tol, "cell ")  # rel_err also checks the shapes


# --- partial and oddly-strided incoming gradients -------------------------------------------------

PARTIAL_LOSSES = {
    "output-sum": lambda out, state: out.sum(),                 # expanded, all strides 0
    "output-sum-over-time": lambda out, state: out.sum(0).pow(2).sum(),  # T stride 0
    "h_n-only": lambda out, state: state[0].sum(),              # no output gradient at all
    "last-state-only": lambda out, state: state[-1].pow(2).sum(),
    "first-step-only": lambda out, state: out[:1].sum(),
}


@requires_native
@pytest.mark.parametrize("loss", PARTIAL_LOSSES, ids=list(PARTIAL_LOSSES))
@pytest.mark.parametrize("cell", ["lstm_proj", "gru", "rnn_tanh"])
def test_partial_gradients(cell, loss):
    case = Case(cell=cell, layers=2, bidirectional=True, batch_first=True)
    theirs, ours = make_modules(case)
    grads = []
    for module in (theirs, ours):
        x = make_inputs(case).leaf
        out, state = module(x)
        state = state if isinstance(state, tuple) else (state,)
        value = PARTIAL_LOSSES[loss](out, state)
        grads.append(torch.autograd.grad(value, [x, *module.parameters()], allow_unused=True))
    for e, a in zip(*grads):
        if e is None:  # unused by torch's graph: ours may give None or zeros
            assert a is None or not a.any()
        else:
            assert_close(a, e, 1e-9, "gradient")


# --- the CUDA kernels' sources through the CPU emulator -------------------------------------------

@pytest.mark.emu
@pytest.mark.parametrize("cell", ["lstm_proj", "gru", "rnn_relu"])
def test_modules_through_emulator(cell, monkeypatch):
    """The same module code routed to _emu (the CUDA kernels run on CPU threads): strided
    bidirectional halves, packed lengths and gradients, on tiny shapes."""
    from fusedrnn import _backend
    if not _backend.HAS_EMU:
        pytest.skip("fusedrnn._emu is not built (configure with -DFUSEDRNN_EMU=ON)")
    monkeypatch.setenv("FUSEDRNN_BACKEND", "emu")
    for packing in ("padded", "packed_unsorted"):
        compare_with_torch(Case(cell=cell, layers=2, bidirectional=True, packing=packing,
                                hx=True, seq_len=3, batch=2, hidden=5, input_size=3,
                                dtype=torch.float32))


@pytest.mark.emu
def test_double_backward_through_emulator(monkeypatch):
    """create_graph on the emulated backend: the first backward's recomputation as reference ops
    gives torch.nn's second derivatives there too."""
    from fusedrnn import _backend
    if not _backend.HAS_EMU:
        pytest.skip("fusedrnn._emu is not built (configure with -DFUSEDRNN_EMU=ON)")
    monkeypatch.setenv("FUSEDRNN_BACKEND", "emu")
    theirs, ours = make_modules(Case(cell="lstm", layers=2, bidirectional=True, seq_len=3,
                                     batch=2, hidden=5, input_size=3, dtype=torch.float64))
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    assert_second_derivatives_match(lambda m, x: m(x)[0], theirs, ours, x)


# --- CUDA (runs where a GPU and fusedrnn._cuda are present) ---------------------------------------

CUDA_CASES = [
    Case(cell="lstm", layers=2, bidirectional=True, hx=True, seq_len=7, batch=9, hidden=13,
         dtype=torch.float32, device="cuda"),
    Case(cell="lstm_proj", layers=2, bidirectional=True, packing="packed_unsorted", hx=True,
         seq_len=7, batch=9, hidden=13, dtype=torch.float32, device="cuda"),
    Case(cell="gru", layers=3, batch_first=True, packing="packed_sorted", seq_len=7, batch=5,
         hidden=13, dtype=torch.float64, device="cuda"),
    Case(cell="rnn_relu", layers=1, bidirectional=True, bias=False, seq_len=1, batch=1,
         hidden=5, dtype=torch.float32, device="cuda"),
]


@pytest.mark.cuda
@pytest.mark.parametrize("case", CUDA_CASES, ids=[c.id for c in CUDA_CASES])
def test_matches_torch_on_cuda(case):
    from fusedrnn import _backend
    if not _backend.HAS_CUDA:
        pytest.skip("needs a CUDA GPU and fusedrnn._cuda")
    compare_with_torch(case)


@pytest.mark.cuda
def test_double_backward_on_cuda():
    """create_graph on the GPU (where cuDNN refuses double backward): torch.nn's float64 CPU
    second derivatives."""
    from fusedrnn import _backend
    if not _backend.HAS_CUDA:
        pytest.skip("needs a CUDA GPU and fusedrnn._cuda")
    theirs, ours = make_modules(Case(cell="gru", layers=2, bidirectional=True, seq_len=4,
                                     batch=3, hidden=6, dtype=torch.float64))
    x = torch.randn(4, 3, 4, dtype=torch.float64)
    results = []
    for m, device in ((theirs, "cpu"), (ours.to("cuda"), "cuda")):
        xm = x.to(device).requires_grad_()
        (gx,) = torch.autograd.grad(m(xm)[0].pow(2).sum(), xm, create_graph=True)
        results.append([g.cpu() for g in torch.autograd.grad(gx.pow(2).sum(),
                                                            [xm, *m.parameters()])])
    for a, e in zip(results[1], results[0]):
        assert_close(a, e, 1e-10, "second derivative on cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_on_cuda(dtype):
    """On the GPU fp16/bf16 run natively; error against fp64 at most 2x torch.nn's (cuDNN's)."""
    from fusedrnn import _backend
    if not _backend.HAS_CUDA:
        pytest.skip("needs a CUDA GPU and fusedrnn._cuda")
    from _helpers import rel_err
    case = Case(cell="lstm", layers=2, bidirectional=True, seq_len=9, batch=8, hidden=64,
                input_size=32, dtype=torch.float64, device="cuda")
    exact, ours = make_modules(case)
    theirs = make_modules(case)[0].to(dtype)
    ours = ours.to(dtype)
    x = torch.randn(9, 8, 32, device="cuda", dtype=torch.float64)
    reference, _ = exact(x)
    out, _ = ours(x.to(dtype))
    assert out.dtype == dtype
    torch_out, _ = theirs(x.to(dtype))
    assert rel_err(out, reference) <= max(2 * rel_err(torch_out, reference), 1e-3)


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_zero_hidden_cell_like_torch(name):
    """torch.nn's cells accept hidden_size=0 (empty states); so do ours, without a native call."""
    x = torch.randn(3, 4)
    ours, theirs = getattr(fusedrnn, name)(4, 0)(x), getattr(nn, name)(4, 0)(x)
    ours, theirs = (o if isinstance(o, tuple) else (o,) for o in (ours, theirs))
    assert [t.shape for t in ours] == [t.shape for t in theirs]


def test_grid_covers_every_triple_of_feature_values():
    """The covering design behind test_matches_torch really is 3-wise, in each dtype."""
    import itertools
    for dtype in (torch.float64, torch.float32):
        rows = [c for c in grid() if c.dtype == dtype]
        names = list(FACTORS)
        for a, b, c in itertools.combinations(names, 3):
            seen = {(getattr(r, a), getattr(r, b), getattr(r, c)) for r in rows}
            for values in itertools.product(FACTORS[a], FACTORS[b], FACTORS[c]):
                assert values in seen, f"{a, b, c} = {values} never tested in {dtype}"


@requires_native
def test_torch_compile_runs_the_layer_eagerly():
    """Under torch.compile the native layer is a clean graph break: same results and gradients."""
    case = Case(cell="gru", layers=2, bidirectional=True)
    _, ours = make_modules(case)
    x = make_inputs(case).leaf
    expected = ours(x)[0]
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    compiled = torch.compile(ours, backend="eager")
    actual = compiled(x)[0]
    (actual_grad,) = torch.autograd.grad(actual.sum(), x)
    assert_close(actual, expected, 0, "compiled output")
    assert_close(actual_grad, expected_grad, 0, "compiled gradient")


@requires_native
@pytest.mark.parametrize("torch_cls, our_cls, kwargs", SURFACE_CASES,
                         ids=["lstm-proj-bidir", "lstm-nobias", "gru-bidir", "rnn-relu"])
def test_state_dict_round_trip_gives_same_results(torch_cls, our_cls, kwargs):
    """torch.nn -> fusedrnn -> torch.nn: every hop computes the same function."""
    kwargs = {**kwargs, "dtype": torch.float64}
    torch.manual_seed(11)
    theirs = torch_cls(5, 7, **kwargs).eval()
    ours = our_cls(5, 7, **kwargs).eval()
    ours.load_state_dict(theirs.state_dict())
    back = torch_cls(5, 7, **kwargs).eval()
    back.load_state_dict(ours.state_dict())
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    if kwargs.get("batch_first"):
        x = x.transpose(0, 1)
    expected = theirs(x)[0]
    assert_close(ours(x)[0], expected, 1e-9, "fusedrnn after loading torch.nn's state_dict")
    assert torch.equal(back(x)[0], expected)


@pytest.mark.emu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_through_emulator(dtype, monkeypatch):
    """With FUSEDRNN_BACKEND=emu, fp16/bf16 reach the (emulated) CUDA half kernels natively."""
    from fusedrnn import _backend
    from _helpers import rel_err
    if not _backend.HAS_EMU:
        pytest.skip("fusedrnn._emu is not built (configure with -DFUSEDRNN_EMU=ON)")
    monkeypatch.setenv("FUSEDRNN_BACKEND", "emu")
    case = Case(cell="lstm", layers=1, bidirectional=True, seq_len=3, batch=2, hidden=5,
                input_size=3, dtype=torch.float64)
    exact, ours = make_modules(case)
    theirs = make_modules(case)[0].to(dtype)
    ours = ours.to(dtype)
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    reference, _ = exact(x)
    out, _ = ours(x.to(dtype))
    assert out.dtype == dtype
    torch_out, _ = theirs(x.to(dtype))
    _assert_within_twice_torch_error(dtype, (exact, reference), (theirs, torch_out), (ours, out))


@pytest.mark.parametrize("cell", ["lstm", "lstm_proj", "gru", "rnn_tanh"])
@pytest.mark.parametrize("packing", ["padded", "packed_unsorted"])
def test_threads_on_their_own_rows_match_torch(cell, packing):
    """Shapes whose CPU threads take rows of the batch unforced (csrc/cpu/row_groups.h: B=40,
    W_hh small, two threads): the training forward (LSTM: gates saved over the input
    projection, by the thread that owns the row) and the backward, against torch.nn."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs for two threads")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        compare_with_torch(Case(cell=cell, layers=2, bidirectional=False, packing=packing,
                                hx=True, seq_len=6, batch=40, hidden=48, input_size=8))
    finally:
        torch.set_num_threads(threads)


@requires_native
@pytest.mark.parametrize("name, weight", [("LSTM", "bias_ih_l0"), ("GRU", "bias_hh_l0"),
                                          ("RNN", "weight_hh_l0"), ("LSTMCell", "weight_ih"),
                                          ("GRUCell", "weight_hh")])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_a_parameter_set_to_none_raises_a_type_error_naming_it(name, weight, grad):
    """As torch.nn (a TypeError from inside its op). fusedrnn raised a TypeError about a weak
    reference, an AttributeError, or with one bias left ran without it (review, session 29)."""
    module = getattr(fusedrnn, name)(3, 4)
    setattr(module, weight, None)
    x = torch.randn(2, 3) if name.endswith("Cell") else torch.randn(3, 2, 3)
    with torch.set_grad_enabled(grad), pytest.raises(TypeError, match=f"{name}: {weight} is None"):
        module(x)


@requires_native
@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("weight", ["bias_ih", "bias_hh"])
def test_a_cell_with_one_bias_set_to_none_computes_as_torch_nn(name, weight):
    """torch.nn's cell ops take each bias as optional: the cell runs with the other one."""
    torch.manual_seed(0)
    theirs = getattr(nn, name)(3, 4, dtype=torch.float64)
    ours = getattr(fusedrnn, name)(3, 4, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())
    for module in (theirs, ours):
        setattr(module, weight, None)
    x = torch.randn(2, 3, dtype=torch.float64)
    first = (lambda r: r[0] if isinstance(r, tuple) else r)
    assert_close(first(ours(x)), first(theirs(x)), 1e-12, f"{name} without {weight}")


@requires_native
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tm", "bf"])
@pytest.mark.parametrize("num_layers, bidirectional", [(1, False), (2, True)])
def test_input_made_in_inference_mode_trains_like_torch(kind, batch_first, num_layers,
                                                        bidirectional):
    """An input made under torch.inference_mode, then trained on outside it: torch.nn's
    batch_first modules run (its transpose makes a normal tensor) and its time-major ones refuse
    it; fusedrnn read the inference tensor's version counter, which it has none of, and raised
    "Inference tensors do not track version counter" for batch_first too (review, session 30)."""
    with torch.inference_mode():
        x = torch.randn(*((2, 5, 3) if batch_first else (5, 2, 3)), dtype=torch.float64)
    results = []
    for lib in (nn, fusedrnn):
        torch.manual_seed(0)
        m = getattr(lib, kind)(3, 4, num_layers=num_layers, bidirectional=bidirectional,
                               batch_first=batch_first, dtype=torch.float64)
        try:
            out, _ = m(x)
            out.pow(2).sum().backward()
        except RuntimeError as error:
            results.append(str(error))
            continue
        results.append(([out.detach()], [p.grad for p in m.parameters()]))
    theirs, ours = results
    if isinstance(theirs, str):
        assert ours == theirs
    else:
        assert_runs_close(theirs, ours, 1e-10)


@requires_native
@pytest.mark.parametrize("kind, seq_len", [("GRU", 1), ("GRU", 3), ("RNN", 1), ("RNN", 3),
                                           ("GRUCell", 1), ("RNNCell", 1)])
def test_state_made_in_inference_mode_with_an_input_that_needs_grad(kind, seq_len):
    """A frozen model, an input that needs a gradient (saliency, adversarial input) and a state
    made under torch.inference_mode (an encoder run for inference): torch.nn runs; fusedrnn
    raised "Inference tensors do not track version counter" (review, session 30)."""
    cell = kind.endswith("Cell")
    with torch.inference_mode():
        h = torch.randn(*((2, 4) if cell else (1, 2, 4)), dtype=torch.float64)
    x0 = torch.randn(*((2, 3) if cell else (seq_len, 2, 3)), dtype=torch.float64)
    grads = []
    for lib in (nn, fusedrnn):
        torch.manual_seed(0)
        m = getattr(lib, kind)(3, 4, dtype=torch.float64).requires_grad_(False)
        x = x0.clone().requires_grad_()
        out = m(x, h)
        (out if cell else out[0]).pow(2).sum().backward()
        grads.append(x.grad)
    assert_close(grads[1], grads[0], 1e-10, "input gradient")


@requires_native
@pytest.mark.parametrize("kind", ["GRU", "RNN"])
def test_float32_bias_gradients_of_a_long_sequence_as_accurate_as_torch(kind):
    """The bias gradients sum the gate gradients over T*B rows. As a matrix-vector product with
    ones the float32 error grew with the rows: T=5000 B=8 gave bias_ih's gradient 17x (GRU) and
    50x (RNN) torch.nn's error against float64 (review, session 30)."""
    torch.manual_seed(0)
    truth = getattr(nn, kind)(6, 8, dtype=torch.float64)
    x = torch.randn(5000, 8, 6, dtype=torch.float64)
    errors = {}
    for lib in (nn, fusedrnn):
        grads = {}
        for dtype in (torch.float64, torch.float32):
            m = getattr(lib, kind)(6, 8, dtype=dtype)
            m.load_state_dict(truth.state_dict())
            out, _ = m(x.to(dtype))
            ramp_loss([out]).backward()
            grads[dtype] = {name: p.grad.double() for name, p in m.named_parameters()}
        errors[lib] = {name: ((grads[torch.float32][name] - g).norm() / g.norm()).item()
                       for name, g in grads[torch.float64].items() if name.startswith("bias")}
    for name, theirs in errors[nn].items():
        assert errors[fusedrnn][name] <= 3 * theirs + 1e-7, (name, errors[fusedrnn][name], theirs)
