"""`lengths=`: per-sequence lengths for a padded input, fusedrnn's addition to torch.nn's forward.

`module(x, hx, lengths=lengths)` gives what torch.nn gives for `pack_padded_sequence(x, lengths,
enforce_sorted=False)` -> module -> `pad_packed_sequence(total_length=T)`: zero outputs past each
sequence's end, the final states at each sequence's last valid step (the reverse direction starting
there), and the gradients of that. Without the packing, the call keeps static shapes, so it also
compiles with fullgraph=True, exports with a dynamic batch and length (torch.export and both ONNX
exporters), scripts and traces, where a PackedSequence breaks the graph or does not export.
"""
import io
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import fusedrnn

from _helpers import assert_close, ramp_loss, requires_native

pytestmark = requires_native

# id, class, constructor arguments
CONFIGS = [
    ("lstm-L2-bidir", "LSTM", dict(num_layers=2, bidirectional=True)),
    ("lstm-proj-batch-first", "LSTM", dict(proj_size=3, batch_first=True)),
    ("gru-bidir-batch-first", "GRU", dict(bidirectional=True, batch_first=True)),
    ("gru-L2", "GRU", dict(num_layers=2)),
    ("rnn-tanh", "RNN", {}),
    ("rnn-relu-bidir", "RNN", dict(nonlinearity="relu", bidirectional=True)),
]
LENGTHS = {"unsorted": [6, 2, 5, 1, 6], "sorted": [6, 6, 5, 2, 1], "full": [6, 6, 6, 6, 6]}


def _pair(name, kwargs, dtype=torch.float64):
    torch.manual_seed(0)
    ours = getattr(fusedrnn, name)(4, 5, **kwargs).to(dtype)
    theirs = getattr(nn, name)(4, 5, **kwargs).to(dtype)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _inputs(module, batch, seq_len, with_state, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    shape = (batch, seq_len, 4) if module.batch_first else (seq_len, batch, 4)
    x = torch.randn(*shape, generator=g, dtype=dtype)
    if not with_state:
        return x, None
    layers = module.num_layers * (2 if module.bidirectional else 1)
    h0 = torch.randn(layers, batch, module.proj_size or 5, generator=g, dtype=dtype)
    if isinstance(module, (nn.LSTM, fusedrnn.LSTM)):
        return x, (h0, torch.randn(layers, batch, 5, generator=g, dtype=dtype))
    return x, h0


def _leaves(x, hx):
    """Fresh leaves that require grad: x and the state tensors."""
    x = x.clone().requires_grad_()
    if hx is None:
        return x, None, []
    states = tuple(s.clone().requires_grad_() for s in (hx if isinstance(hx, tuple) else (hx,)))
    return x, (states if len(states) == 2 else states[0]), list(states)


def _results(output, state):
    return [output] + list(state if isinstance(state, tuple) else (state,))


def _run_with_lengths(module, x, hx, lengths):
    x, hx, states = _leaves(x, hx)
    results = _results(*module(x, hx, lengths=lengths))
    grads = torch.autograd.grad(ramp_loss(results), [x, *states, *module.parameters()])
    return results, grads


def _run_packed(module, x, hx, lengths):
    x, hx, states = _leaves(x, hx)
    packed = pack_padded_sequence(x, lengths, batch_first=module.batch_first,
                                  enforce_sorted=False)
    output, state = module(packed, hx)
    output, _ = pad_packed_sequence(output, batch_first=module.batch_first,
                                    total_length=x.size(1 if module.batch_first else 0))
    results = _results(output, state)
    grads = torch.autograd.grad(ramp_loss(results), [x, *states, *module.parameters()])
    return results, grads


@pytest.mark.parametrize("with_state", [False, True], ids=["no-hx", "hx"])
@pytest.mark.parametrize("order", list(LENGTHS))
@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_lengths_equal_torch_nn_packed(config, order, with_state, backend):
    """Outputs, final states and every gradient equal torch.nn's packed run (float64, 1e-12); the
    output is exactly zero past each sequence's end."""
    _, name, kwargs = config
    ours, theirs = _pair(name, kwargs)
    ours.to(backend.device)
    lengths = torch.tensor(LENGTHS[order])
    x, hx = _inputs(ours, len(lengths), 6, with_state)
    expected = _run_packed(theirs, x, hx, lengths)
    to = (lambda t: t.to(backend.device))
    hx_dev = None if hx is None else (tuple(map(to, hx)) if isinstance(hx, tuple) else to(hx))
    got = _run_with_lengths(ours, to(x), hx_dev, lengths)
    for what, a_list, e_list in (("result", got[0], expected[0]), ("gradient", got[1], expected[1])):
        for a, e in zip(a_list, e_list):
            assert_close(a.cpu(), e, 1e-12, what)
    output = got[0][0].cpu()
    time_major = output.transpose(0, 1) if ours.batch_first else output
    past_end = torch.arange(6).unsqueeze(1) >= lengths.unsqueeze(0)  # [T, B]
    assert (time_major[past_end] == 0).all()


@pytest.mark.parametrize("kwargs", [dict(peephole=True, bidirectional=True),
                                    dict(coupled_input_forget=True, num_layers=2)],
                         ids=["peephole-bidir", "cifg-L2"])
def test_lengths_of_the_lstm_variants_equal_their_packed_run(kwargs):
    """The variants torch.nn has not: lengths= gives what the same module gives fed the packed
    sequence (float64, 1e-12)."""
    torch.manual_seed(0)
    module = fusedrnn.LSTM(4, 5, **kwargs).double()
    lengths = torch.tensor(LENGTHS["unsorted"])
    x, hx = _inputs(module, len(lengths), 6, with_state=True)
    expected, got = _run_packed(module, x, hx, lengths), _run_with_lengths(module, x, hx, lengths)
    for a, e in zip(got[0] + list(got[1]), expected[0] + list(expected[1])):
        assert_close(a, e, 1e-12, "variant with lengths")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lengths_without_gradients_equal_the_training_call(dtype):
    """The inference call (no_grad) gives the training call's results, bit for bit."""
    ours, _ = _pair("LSTM", dict(num_layers=2, bidirectional=True), dtype)
    lengths = torch.tensor([3, 9, 1, 7])
    x, hx = _inputs(ours, 4, 9, with_state=True, dtype=dtype)
    trained = _results(*ours(x, hx, lengths=lengths))
    with torch.no_grad():
        inferred = _results(*ours(x, hx, lengths=lengths))
    for a, e in zip(inferred, trained):
        assert torch.equal(a, e.detach())


class _Caller(nn.Module):
    """Calls an RNN with lengths. torch.jit.script compiles an RNN's overloaded forward as a
    submodule (as torch.nn's)."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, lengths: torch.Tensor):
        return self.rnn(x, lengths=lengths)[0]


def _caller(module, scripted: bool):
    if not scripted:
        return lambda x, lengths: module(x, lengths=lengths)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(_Caller(module))


@pytest.mark.parametrize("lengths, message", [
    (torch.tensor([2.0, 3.0]), r"lengths must be an integer tensor of shape \(2,\)"),
    (torch.tensor([True, True]), r"lengths must be an integer tensor of shape \(2,\)"),
    (torch.tensor([2, 3, 1]), r"lengths must be an integer tensor of shape \(2,\)"),
    (torch.tensor([0, 3]), r"lengths must lie in \[1, 6\] .* from 0 to 3"),
    (torch.tensor([7, 3]), r"lengths must lie in \[1, 6\] .* from 3 to 7"),
])
@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
def test_bad_lengths_are_refused(lengths, message, scripted):
    call = _caller(fusedrnn.GRU(4, 5), scripted)
    with pytest.raises((ValueError, torch.jit.Error), match=message):
        call(torch.randn(6, 2, 4), lengths)


@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
def test_lengths_go_with_a_batched_padded_input(scripted):
    call = _caller(fusedrnn.LSTM(4, 5), scripted)
    with pytest.raises((ValueError, torch.jit.Error), match=r"LSTM: lengths needs a batched input"):
        call(torch.randn(6, 4), torch.tensor([3]))
    packed = pack_padded_sequence(torch.randn(6, 2, 4), torch.tensor([6, 3]))
    if scripted:  # (_Caller's script takes a tensor)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            call = torch.jit.script(_PackedCaller(fusedrnn.LSTM(4, 5)))
    with pytest.raises((ValueError, torch.jit.Error),
                       match=r"LSTM: lengths is for a padded tensor input; a PackedSequence"):
        call(packed, torch.tensor([6, 3]))


class _PackedCaller(_Caller):
    def forward(self, x: PackedSequence, lengths: torch.Tensor):
        return self.rnn(x, lengths=lengths)[0].data


class _Tagger(nn.Module):
    """A model that takes a padded batch and its lengths, as a speech or tagging model does."""

    def __init__(self, cls=fusedrnn.LSTM, **kwargs):
        super().__init__()
        self.rnn = cls(4, 5, num_layers=2, bidirectional=True, batch_first=True, **kwargs)
        self.head = nn.Linear(10, 3)

    def forward(self, x, lengths):
        out, state = self.rnn(x, lengths=lengths)
        h = state[0] if isinstance(state, tuple) else state
        return self.head(out), h


def _examples():
    g = torch.Generator().manual_seed(3)
    first = (torch.randn(3, 7, 4, generator=g), torch.tensor([7, 3, 5]))
    other = (torch.randn(5, 9, 4, generator=g), torch.tensor([2, 9, 4, 1, 8]))
    return first, other


def _assert_same(got, expected, tol=1e-6):
    for a, e in zip(got, expected):
        assert_close(a, e, tol, "against eager")


def test_lengths_compile_fullgraph_with_dynamic_shapes():
    """torch.compile(fullgraph=True, dynamic=True): no graph break (a PackedSequence breaks it),
    the eager results and gradients at two batch sizes and lengths."""
    torch.manual_seed(0)
    model = _Tagger()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    for x, lengths in _examples():
        expected = model(x, lengths)
        got = compiled(x, lengths)
        _assert_same(got, expected)
        g_expected = torch.autograd.grad(ramp_loss(expected), list(model.parameters()))
        g_got = torch.autograd.grad(ramp_loss(got), list(model.parameters()))
        _assert_same(g_got, g_expected)


def test_lengths_torch_export_with_dynamic_batch_and_length():
    """torch.export with a dynamic batch and length: the program gives the eager results at
    another batch, length and lengths, and checks the lengths when it runs."""
    torch.manual_seed(0)
    model = _Tagger(fusedrnn.GRU)
    (x, lengths), (x2, lengths2) = _examples()
    batch, seq_len = torch.export.Dim("batch"), torch.export.Dim("seq_len")
    program = torch.export.export(model, (x, lengths),
                                  dynamic_shapes=({0: batch, 1: seq_len}, {0: batch}))
    _assert_same(program.module()(x2, lengths2), model(x2, lengths2))
    with pytest.raises(ValueError, match=r"lengths\[1\] must be in \[1, 9\], got 10"):
        program.module()(x2, torch.tensor([2, 10, 4, 1, 8]))


def test_lengths_script_and_trace():
    """torch.jit.script and torch.jit.trace of a model that passes lengths: the eager results at
    another batch, length and lengths."""
    torch.manual_seed(0)
    model = _Tagger()
    (x, lengths), (x2, lengths2) = _examples()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(model)
        traced = torch.jit.trace(model, (x, lengths))
    expected = model(x2, lengths2)
    _assert_same(scripted(x2, lengths2), expected)
    _assert_same(traced(x2, lengths2), expected)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo-exporter"])
@pytest.mark.parametrize("cls, kwargs", [(fusedrnn.LSTM, {}), (fusedrnn.GRU, {}),
                                         (fusedrnn.RNN, dict(nonlinearity="relu")),
                                         (fusedrnn.LSTM, dict(peephole=True))],
                         ids=["lstm", "gru", "rnn-relu", "lstm-peephole"])
def test_lengths_onnx_export_runs_in_onnxruntime(cls, kwargs, dynamo):
    """Both ONNX exporters write each layer as ONNX's node with sequence_lens (the TorchScript
    exporter through torch's packed op, the dynamo exporter directly); onnxruntime then gives the
    eager results at another batch, length and lengths. A peephole LSTM exports with the dynamo
    exporter only (torch's packed op has no peepholes) and is refused clearly by the other."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    model = _Tagger(cls, **kwargs).eval()
    (x, lengths), (x2, lengths2) = _examples()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch, seq_len = torch.export.Dim("batch"), torch.export.Dim("seq_len")
            torch.onnx.export(model, (x, lengths), dynamo=True, input_names=["x", "lengths"],
                              dynamic_shapes=({0: batch, 1: seq_len}, {0: batch})
                              ).save(buffer)
        elif kwargs.get("peephole"):
            with pytest.raises(RuntimeError, match="peephole LSTM: per-sequence lengths"):
                torch.onnx.export(model, (x, lengths), buffer, dynamo=False)
            return
        else:
            torch.onnx.export(model, (x, lengths), buffer, dynamo=False,
                              input_names=["x", "lengths"],
                              dynamic_axes={"x": {0: "batch", 1: "seq_len"},
                                            "lengths": {0: "batch"}})
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x2.numpy(), "lengths": lengths2.numpy()})
    with torch.no_grad():
        expected = model(x2, lengths2)
    _assert_same([torch.from_numpy(g) for g in got], expected, 1e-5)


# --- found by review (helper-55): all failed before their fix -------------------------------------

def test_lengths_checked_under_a_compiled_torch_func_transform():
    """A compiled torch.func.grad runs the layers as fusedrnn.reference's ops, not the layer op
    that checks lengths when it runs: the graph holds an assert of its own. (Lengths of 0 and 9
    for T=6 were taken silently.)"""
    torch.manual_seed(0)
    module = fusedrnn.GRU(3, 4)
    params = dict(module.named_parameters())
    x = torch.randn(6, 3, 3)

    def loss(p, lengths):
        return torch.func.functional_call(module, p, (x,), {"lengths": lengths})[0].sum()

    compiled = torch.compile(torch.func.grad(loss), fullgraph=True, backend="aot_eager")
    good = torch.tensor([6, 2, 4])
    expected = torch.func.grad(loss)(params, good)
    got = compiled(params, good)
    for name in params:
        assert_close(got[name], expected[name], 1e-6, name)
    with pytest.raises(RuntimeError, match=r"lengths must lie in \[1, 6\]"):
        compiled(params, torch.tensor([0, 9, 3]))


def test_vmap_over_per_example_lengths():
    """torch.func.vmap over a batch of lengths (not only over x): each example's result is its
    own call's, and the values of every example are checked. (The check read a batched tensor:
    torch's .item() error.)"""
    torch.manual_seed(0)
    module = fusedrnn.GRU(3, 4)
    xs = torch.randn(2, 5, 3, 3)
    all_lengths = torch.tensor([[5, 2, 1], [3, 5, 4]])
    got = torch.func.vmap(lambda x, lengths: module(x, lengths=lengths)[0])(xs, all_lengths)
    for x, lengths, one in zip(xs, all_lengths, got):
        assert_close(one, module(x, lengths=lengths)[0], 1e-6, "vmapped example")
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 5\] .* from 1 to 6"):
        torch.func.vmap(lambda x, lengths: module(x, lengths=lengths)[0])(
            xs, torch.tensor([[5, 2, 1], [3, 6, 4]]))


def test_the_caller_may_update_its_lengths_after_the_forward():
    """torch.nn's packing keeps nothing of the caller's lengths; neither does fusedrnn now (it
    saved the caller's own int64 tensor, and `lengths -= 1` before backward made it raise)."""
    torch.manual_seed(0)
    module = fusedrnn.LSTM(3, 4)
    x = torch.randn(5, 3, 3, requires_grad=True)
    lengths = torch.tensor([5, 4, 2])  # sorted int64: nothing else copied it
    expected = torch.autograd.grad(module(x, lengths=lengths)[0].sum(), x)[0]
    out = module(x, lengths=lengths)[0]
    lengths -= 1
    assert_close(torch.autograd.grad(out.sum(), x)[0], expected, 1e-12, "d_x")


def test_an_empty_batch_takes_an_empty_list():
    """(torch.as_tensor([]) is a float tensor, which was refused as one.)"""
    out, h = fusedrnn.GRU(4, 5)(torch.randn(6, 0, 4), lengths=[])
    assert out.shape == (6, 0, 5) and h.shape == (1, 0, 5)


def test_onnx_refusal_of_a_projected_lstm_with_lengths_gives_no_false_advice():
    """ONNX's node with sequence_lens has no projection, and the TorchScript-based exporter takes
    no projected LSTM either: the dynamo exporter's refusal says so (it advised dynamo=False)."""
    pytest.importorskip("onnxscript")
    model = _Tagger(fusedrnn.LSTM, proj_size=3)
    model.head = nn.Linear(6, 3)
    (x, lengths), _ = _examples()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception, match="proj_size and per-sequence lengths is not supported"):
            torch.onnx.export(model, (x, lengths), dynamo=True)


@pytest.mark.parametrize("given", ["list", "tuple", "int32", "uint8", "strided"])
def test_lengths_in_any_integer_form(given):
    """A list, a tuple, another integer dtype or a strided tensor: the results of an int64
    tensor."""
    module, _ = _pair("GRU", dict(bidirectional=True))
    values = LENGTHS["unsorted"]
    x, _ = _inputs(module, len(values), 6, with_state=False)
    forms = {"list": list(values), "tuple": tuple(values),
             "int32": torch.tensor(values, dtype=torch.int32),
             "uint8": torch.tensor(values, dtype=torch.uint8),
             "strided": torch.tensor([[v, 0] for v in values])[:, 0]}
    expected = _results(*module(x, lengths=torch.tensor(values)))
    got = _results(*module(x, lengths=forms[given]))
    for a, e in zip(got, expected):
        assert torch.equal(a, e)


def test_the_cpu_runs_unsorted_lengths_longest_first():
    """The CPU kernel computes each step's rows up to the last one still running, so unsorted
    lengths are put longest first (functional._longest_first); sorted ones are left alone."""
    from fusedrnn import functional
    x = torch.zeros(6, 5, 4)
    order = functional._longest_first(x, torch.tensor(LENGTHS["unsorted"]))
    assert order is not None
    assert torch.tensor(LENGTHS["unsorted"])[order].tolist() == sorted(LENGTHS["unsorted"],
                                                                      reverse=True)
    assert functional._longest_first(x, torch.tensor(LENGTHS["sorted"])) is None


# --- dropout between layers -----------------------------------------------------------------------

DROPOUT_CONFIGS = [("lstm-L3-bidir", "LSTM", dict(num_layers=3, bidirectional=True)),
                   ("gru-L2-batch-first", "GRU", dict(num_layers=2, batch_first=True)),
                   ("rnn-relu-L2", "RNN", dict(num_layers=2, nonlinearity="relu"))]
# Ties in the lengths: pack_padded_sequence's sort decides their packed order, so it must be the
# one that places the mask.
DROPOUT_LENGTHS = {"unsorted-ties": [6, 2, 5, 2, 6], "sorted": [6, 6, 5, 2, 1]}


def _training_pair(name, kwargs):
    ours, theirs = _pair(name, dict(kwargs, dropout=0.4))
    return ours.train(), theirs.train()


@pytest.mark.parametrize("order", list(DROPOUT_LENGTHS))
@pytest.mark.parametrize("config", DROPOUT_CONFIGS, ids=[c[0] for c in DROPOUT_CONFIGS])
def test_dropout_with_lengths_draws_torch_nn_packed_mask(config, order, backend):
    """In training, dropout between layers draws the mask torch.nn draws behind
    pack_padded_sequence (on the packed rows), so the same seed gives torch.nn's results and
    gradients, and leaves the RNG where torch.nn leaves it. (A mask over the padded output was as
    random, but another draw: found in session 29.)"""
    _, name, kwargs = config
    ours, theirs = _training_pair(name, kwargs)
    ours.to(backend.device)
    lengths = torch.tensor(DROPOUT_LENGTHS[order])
    x, _ = _inputs(ours, len(lengths), 6, with_state=False)
    torch.manual_seed(7)
    expected = _run_packed(theirs, x, None, lengths)
    after_theirs = torch.rand(3)
    torch.manual_seed(7)
    got = _run_with_lengths(ours, x.to(backend.device), None, lengths)
    after_ours = torch.rand(3)
    for what, a_list, e_list in (("result", got[0], expected[0]), ("gradient", got[1], expected[1])):
        for a, e in zip(a_list, e_list):
            assert_close(a.cpu(), e, 1e-12, f"{what} with dropout")
    assert torch.equal(after_ours, after_theirs)


def test_scripted_dropout_with_lengths_draws_the_eager_mask():
    """A scripted module given lengths draws, in training, the mask the eager module draws (and
    torch.nn behind pack_padded_sequence)."""
    ours, _ = _training_pair("GRU", dict(num_layers=3))
    x, _ = _inputs(ours, 5, 6, with_state=False)
    lengths = torch.tensor(DROPOUT_LENGTHS["unsorted-ties"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(_Caller(ours))
    torch.manual_seed(7)
    expected = ours(x, lengths=lengths)[0]
    torch.manual_seed(7)
    assert_close(scripted(x, lengths), expected, 1e-12, "scripted output with dropout")


def test_reference_dropout_with_lengths_draws_torch_nn_packed_mask():
    """fusedrnn.reference.rnn given lengths draws torch.nn's packed mask too, so the oracle and
    the modules agree in training."""
    ours, theirs = _training_pair("LSTM", dict(num_layers=2, bidirectional=True))
    lengths = torch.tensor(DROPOUT_LENGTHS["unsorted-ties"])
    x, _ = _inputs(ours, len(lengths), 6, with_state=False)
    torch.manual_seed(7)
    expected = _run_packed(theirs, x, None, lengths)[0]
    torch.manual_seed(7)
    output, h_n, c_n = fusedrnn.reference.rnn(
        "lstm", x, fusedrnn.reference.weights_of(ours), num_layers=2, bidirectional=True,
        lengths=lengths, dropout=0.4, training=True)
    for a, e in zip((output, h_n, c_n), expected):
        assert_close(a, e, 1e-12, "reference with dropout")


def test_dropout_with_lengths_compiles_fullgraph():
    """Under torch.compile the mask covers the padded output (packing would give shapes that
    depend on the lengths' values; compiled dropout draws from its own stream anyway): still no
    graph break, and zeros past each end."""
    torch.manual_seed(0)
    model = _Tagger(dropout=0.5).train()
    compiled = torch.compile(model.rnn, fullgraph=True, dynamic=True, backend="aot_eager")
    for x, lengths in _examples():
        output, _ = compiled(x, lengths=lengths)
        past_end = torch.arange(x.size(1)).unsqueeze(0) >= lengths.unsqueeze(1)  # [B, T]
        assert (output[past_end] == 0).all()
        assert (output[~past_end] != 0).any()
