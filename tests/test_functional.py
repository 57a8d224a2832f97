"""fusedrnn.functional.rnn against fusedrnn.reference.rnn (same signature, same semantics):
lengths in any order (the modules only ever pass sorted ones), the dropout hook, the cell step,
lengths validation, and autocast through the modules."""
import pytest
import torch

import fusedrnn
from fusedrnn import _layer_recurrence, functional, reference

from _helpers import assert_close, assert_runs_close, ramp_loss, requires_native, use_backend

pytestmark = requires_native


def random_weights(cell, input_size, hidden, layers, directions, proj=0, bias=True):
    gates = {"lstm": 4, "lstm_cifg": 3, "gru": 3}.get(cell, 1)
    state = proj or hidden
    weights = []
    for layer in range(layers):
        in_size = input_size if layer == 0 else state * directions
        for _ in range(directions):
            w = [torch.randn(gates * hidden, in_size), torch.randn(gates * hidden, state)]
            w += [torch.randn(gates * hidden), torch.randn(gates * hidden)] if bias else [None, None]
            w += [torch.randn(proj, hidden)] if proj else [None]
            weights.append(tuple(t.double().mul_(0.4).requires_grad_() if t is not None else None
                                 for t in w))
    return weights


@pytest.mark.parametrize("cell, proj", [("lstm", 0), ("lstm", 3), ("gru", 0), ("rnn_tanh", 0),
                                        ("rnn_relu", 0)])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tm", "bf"])
def test_matches_reference_with_unsorted_lengths(cell, proj, batch_first):
    torch.manual_seed(0)
    layers, directions, seq_len, batch, hidden = 2, 2, 6, 5, 7
    weights = random_weights(cell, 4, hidden, layers, directions, proj)
    shape = (batch, seq_len, 4) if batch_first else (seq_len, batch, 4)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([3, 6, 1, 6, 2])
    num = layers * directions
    h0 = torch.randn(num, batch, proj or hidden, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(num, batch, hidden, dtype=torch.float64, requires_grad=True)
    hx = (h0, c0) if cell == "lstm" else h0
    leaves = [x, h0] + ([c0] if cell == "lstm" else []) + \
        [w for ws in weights for w in ws if w is not None]
    options = dict(num_layers=layers, bidirectional=True, batch_first=batch_first, lengths=lengths)

    results = []
    for impl in (reference.rnn, functional.rnn):
        out, h_n, c_n = impl(cell, x, weights, hx, **options)
        flat = [out, h_n] + ([c_n] if c_n is not None else [])
        results.append((flat, torch.autograd.grad(ramp_loss(flat), leaves)))
    assert_runs_close(*results, 1e-9)


def test_dropout_hook_is_called_between_layers_only():
    weights = random_weights("gru", 4, 5, 3, 1)
    x = torch.randn(4, 2, 4, dtype=torch.float64)
    seen = []

    def hook(output):
        seen.append(tuple(output.shape))
        return output * 0.5

    out, _, _ = functional.rnn("gru", x, weights, num_layers=3, dropout=0.5, training=True,
                               dropout_fn=hook)
    expected, _, _ = reference.rnn("gru", x, weights, num_layers=3, dropout=0.5, training=True,
                                   dropout_fn=lambda o: o * 0.5)
    assert seen == [(4, 2, 5), (4, 2, 5)]
    assert_close(out, expected, 1e-9, "output")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_relu"])
def test_cell_step_matches_reference(cell):
    weights = random_weights(cell, 3, 6, 1, 1)[0]
    x = torch.randn(4, 3, dtype=torch.float64)
    h = torch.randn(4, 6, dtype=torch.float64)
    c = torch.randn(4, 6, dtype=torch.float64)
    hx = (h, c) if cell == "lstm" else h
    got = functional.cell_step(cell, x, *weights[:4], hx)
    w_ih, w_hh, b_ih, b_hh, _ = weights
    if cell == "lstm":
        expected = reference.lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh)
        for a, e in zip(got, expected):
            assert_close(a, e, 1e-9, "lstm cell")
    elif cell == "gru":
        assert_close(got, reference.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh), 1e-9, "gru cell")
    else:
        assert_close(got, reference.rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh, "relu"), 1e-9, "rnn")


@pytest.mark.parametrize("lengths, words", [
    (torch.tensor([3, 0]), ["[1, 4]", "0"]),
    (torch.tensor([5, 1]), ["[1, 4]", "5"]),
    (torch.tensor([3]), ["(2,)"]),
    (torch.tensor([3.0, 1.0]), ["integer"]),
])
def test_bad_lengths(lengths, words):
    weights = random_weights("gru", 3, 4, 1, 1)
    with pytest.raises(ValueError) as info:
        functional.rnn("gru", torch.randn(4, 2, 3, dtype=torch.float64), weights, lengths=lengths)
    for word in words:
        assert word in str(info.value)


def test_lengths_on_any_device_and_dtype_are_accepted():
    weights = random_weights("gru", 3, 4, 1, 1)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    a = functional.rnn("gru", x, weights, lengths=[4, 2])[0]
    b = functional.rnn("gru", x, weights, lengths=torch.tensor([4, 2], dtype=torch.int32))[0]
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["cpu", "emu"])
@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_autocast_runs_in_autocast_dtype(name, backend, monkeypatch):
    """Under autocast the recurrence runs in the autocast dtype, as torch.nn's CUDA RNNs do: the
    output is bfloat16, close to the float32 result, and gradients reach the float32 parameters.
    With the emulator the CUDA kernels run natively in bfloat16 (the GPU's path)."""
    if backend == "emu":
        pytest.importorskip("fusedrnn._emu")
        monkeypatch.setenv("FUSEDRNN_BACKEND", "emu")
    torch.manual_seed(0)
    ours = getattr(fusedrnn, name)(4, 6, 2, bidirectional=True)
    x = torch.randn(5, 3, 4)
    expected, _ = ours(x)
    expected.sum().backward()
    expected_grads = [p.grad.clone() for p in ours.parameters()]
    ours.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = ours(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), expected, 3e-2, "autocast output")
    out.float().sum().backward()
    for p, g in zip(ours.parameters(), expected_grads):
        assert p.grad.dtype == torch.float32
        assert_close(p.grad, g, 5e-2, "autocast gradient")
    if name == "LSTM":  # torch.nn's CPU LSTM also runs in bfloat16 under autocast
        theirs = torch.nn.LSTM(4, 6, 2, bidirectional=True)
        theirs.load_state_dict(ours.state_dict())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            try:
                their_out = theirs(x)[0]
            except RuntimeError as e:
                # torch.nn's own LSTM fails here on a CPU without AVX-512 (oneDNN builds no
                # bfloat16 LSTM for AVX2: "could not create a primitive descriptor"); there is
                # nothing to compare with. fusedrnn's ran above.
                if "primitive descriptor" not in str(e):
                    raise
                pytest.skip("torch.nn's bfloat16 LSTM does not run on this CPU")
        assert their_out.dtype == out.dtype
        assert_close(out.float(), their_out.float(), 3e-2, "autocast output against torch.nn")


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_autocast_cells_accept_lower_precision_input(name):
    """torch.nn's cells take a bfloat16 input with float32 weights under autocast; so do ours."""
    torch.manual_seed(0)
    ours = getattr(fusedrnn, name)(4, 6)
    theirs = getattr(torch.nn, name)(4, 6)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mine, ref = ours(x), theirs(x)
    mine = mine[0] if name == "LSTMCell" else mine
    ref = ref[0] if name == "LSTMCell" else ref
    assert mine.dtype == ref.dtype == torch.bfloat16
    assert_close(mine.float(), ref.float(), 3e-2, "autocast cell output")


def test_mismatched_dtypes_raise_instead_of_reaching_native():
    weights = random_weights("lstm", 3, 4, 1, 1)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    h0 = torch.randn(1, 2, 4, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="h0 must be torch.float64"):
        functional.rnn("lstm", x, weights, (h0, h0.double()))


@pytest.mark.parametrize("cell", ["lstm", "lstm_cifg", "gru"])
def test_state_structure_and_input_weights_named_in_errors(cell):
    """An hx of the wrong structure, and a w_ih of the wrong width, are named as such (they
    used to fail as "not enough values to unpack" and inside torch's projection GEMM)."""
    weights = random_weights(cell, 3, 4, 2, 2)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    h0 = torch.randn(4, 2, 4, dtype=torch.float64)
    wrong = h0 if cell != "gru" else (h0, h0)
    with pytest.raises(ValueError, match=r"hx must be None or a (pair|tensor)"):
        functional.rnn(cell, x, weights, wrong, num_layers=2, bidirectional=True)
    if cell != "gru":  # either state of an LSTM may be None (zeros), as reference.rnn takes it
        for hx in ((h0, None), (None, torch.zeros(4, 2, 4, dtype=torch.float64))):
            got = functional.rnn(cell, x, weights, hx, num_layers=2, bidirectional=True)
            want = reference.rnn(cell.replace("_cifg", ""), x, weights, hx, num_layers=2,
                                 bidirectional=True, **({"coupled_input_forget": True}
                                                         if cell == "lstm_cifg" else {}))
            assert_close(got[0], want[0], 1e-10, "output")
    bad = [list(w) for w in weights]
    bad[3][0] = torch.randn(bad[3][1].shape[0], 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"w_ih of weights\[3\] \(layer 1, reverse\) must be "
                                         r"\[\d+, 8\]"):
        functional.rnn(cell, x, [tuple(w) for w in bad], num_layers=2, bidirectional=True)


@pytest.mark.parametrize("directions", [1, 2], ids=["uni", "bidir"])
@pytest.mark.parametrize("proj", [0, 3], ids=["noproj", "proj"])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "lengths"])
def test_lstm_gates_saved_over_xproj(directions, proj, padded, monkeypatch):
    """An LSTM layer saves its gates over its own input projection (CPU), each direction over its
    own columns, and a backward that frees the graph writes d_xproj over those gates: results
    and every gradient match the reference, with retain_graph (gates kept: d_xproj has its own
    tensor) and then without."""
    torch.manual_seed(0)
    if fusedrnn._backend.backend_name() != "cpu":
        pytest.skip("the in-place gates are a _cpu feature")
    used = []
    check = _layer_recurrence._gates_can_overwrite_xproj
    monkeypatch.setattr(_layer_recurrence, "_gates_can_overwrite_xproj",
                        lambda *a: used.append(check(*a)) or used[-1])
    over_gates = []
    run_backward = _layer_recurrence._run_backward
    monkeypatch.setattr(_layer_recurrence, "_run_backward", lambda *a, d_xproj_over_gates=False: (
        over_gates.append(d_xproj_over_gates), run_backward(
            *a, d_xproj_over_gates=d_xproj_over_gates))[1])
    layers, seq_len, batch, hidden = 2, 7, 5, 9
    weights = random_weights("lstm", 4, hidden, layers, directions, proj)
    x = torch.randn(seq_len, batch, 4, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([7, 3, 7, 1, 5]) if padded else None
    leaves = [x] + [w for ws in weights for w in ws if w is not None]
    runs = []
    for impl in (reference.rnn, functional.rnn):
        out, h_n, c_n = impl("lstm", x, weights, None, num_layers=layers,
                             bidirectional=directions == 2, lengths=lengths)
        flat = [out, h_n, c_n]
        loss = ramp_loss(flat)
        first = torch.autograd.grad(loss, leaves, retain_graph=True)
        second = torch.autograd.grad(loss, leaves)
        assert_runs_close((flat, first), (flat, second), 0.0)
        runs.append((flat, first))
    assert_runs_close(*runs, 1e-9)
    assert used and all(used)
    assert over_gates == [False] * layers + [True] * layers


@pytest.mark.parametrize("backend", ["cpu", "emu"])
@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell", "LSTM", "GRU", "RNN"])
def test_autocast_state_carried_into_the_next_call(name, backend, monkeypatch):
    """The usual loops under autocast: `h = cell(x_t, h)`, and truncated backpropagation through
    time (`out, h = rnn(chunk, h)`). The state a call returns is in the autocast dtype, the next
    input in float32; torch.nn runs the loop (autocast casts every operand), and so does fusedrnn
    now (it refused the state: "hidden0 dtype torch.bfloat16 does not match input dtype
    torch.float32"), with torch.nn's results."""
    use_backend(backend, monkeypatch)
    torch.manual_seed(0)
    ours = getattr(fusedrnn, name)(4, 6)
    theirs = getattr(torch.nn, name)(4, 6)
    theirs.load_state_dict(ours.state_dict())
    cell = name.endswith("Cell")
    x = torch.randn(3, 2, 4)  # three steps (cells) or three one-step chunks (modules)
    chunks = x.unbind(0) if cell else x.split(1, dim=0)
    results = []
    for module in (ours, theirs):
        state, outputs = None, []
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for chunk in chunks:
                try:
                    if cell:
                        state = module(chunk, state)
                        outputs.append(state[0] if isinstance(state, tuple) else state)
                    else:
                        out, state = module(chunk, state)
                        outputs.append(out)
                except RuntimeError as e:
                    # torch.nn's CPU LSTM has no bfloat16 kernel without AVX-512 (oneDNN:
                    # "could not create a primitive descriptor"): nothing to compare with.
                    if module is theirs and "primitive descriptor" in str(e):
                        pytest.skip("torch.nn's bfloat16 LSTM does not run on this CPU")
                    raise
        results.append(torch.cat([o.float() for o in outputs]))
    assert_close(results[0], results[1], 3e-2, "outputs of the loop")


# --- biases given in part ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "emu"])
@pytest.mark.parametrize("seq_len", [1, 3])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_a_bias_given_in_part_is_not_dropped(cell, seq_len, backend, monkeypatch):
    """A lone b_hh (b_ih None), and biases in the reverse direction only, count as in the
    reference (None: no term). The layers ran with biases only when the first entry had a b_ih:
    both were dropped silently for T > 1 (found by review, session 29)."""
    use_backend(backend, monkeypatch)
    torch.manual_seed(0)
    forward, reverse = random_weights(cell, 3, 4, 1, 2)
    lone = (forward[0], forward[1], None, forward[3], None)
    without = (reverse[0], reverse[1], None, None, None)
    x = torch.randn(seq_len, 2, 3, dtype=torch.float64, requires_grad=True)
    for weights, bidirectional in (([lone], False), ([without, reverse], True)):
        leaves = [x] + [w for ws in weights for w in ws if w is not None]
        results = []
        for impl in (reference.rnn, functional.rnn):
            out, h_n, _ = impl(cell, x, weights, bidirectional=bidirectional)
            results.append(([out, h_n], torch.autograd.grad(ramp_loss([out, h_n]), leaves)))
        assert_runs_close(*results, 1e-9)


def test_cell_step_refuses_a_stacked_lstm_state():
    """An LSTM state is a pair: a stacked [2, B, H] tensor was read as (h, c) by iterating it
    (the modules refuse it, README)."""
    x, w_ih, w_hh = torch.randn(3, 3), torch.randn(16, 3), torch.randn(16, 4)
    with pytest.raises(ValueError, match=r"hx must be None or a pair \(h_0, c_0\) of tensors .*"
                                         r"got a tensor of shape \(2, 3, 4\)"):
        functional.cell_step("lstm", x, w_ih, w_hh, None, None, torch.randn(2, 3, 4))


def test_public_entry_points_name_their_bad_arguments():
    """functional.rnn and cell_step are public: an input of the wrong rank, num_layers below 1,
    an unknown cell, peephole weights for another cell than an LSTM, and lengths that hold no
    values are named (they raised IndexError, KeyError or "Cannot copy out of meta tensor")."""
    weights = random_weights("lstm", 3, 4, 1, 1)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    for bad in (x[0], x[None]):
        with pytest.raises(ValueError, match=r"input must be a 3-D tensor \[T, B, I\].*got "
                                             rf"{bad.dim()}-D"):
            functional.rnn("lstm", bad, weights)
    for layers, given in ((0, []), (0, weights), (-1, weights)):
        with pytest.raises(ValueError, match=rf"num_layers must be an int >= 1, got {layers}"):
            functional.rnn("lstm", x, given, num_layers=layers)
    with pytest.raises(ValueError, match=r"lengths is a meta tensor \(no values\) but input is "
                                         r"on cpu"):
        functional.rnn("lstm", x, weights, lengths=torch.tensor([5, 3], device="meta"))
    gru = random_weights("gru", 3, 4, 1, 1)[0][:4]
    step_x, h = x[0], torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"cell must be one of .* got 'grux'"):
        functional.cell_step("grux", step_x, *gru, h)
    with pytest.raises(ValueError, match=r"peephole weights are for the LSTM cells .* not 'gru'"):
        functional.cell_step("gru", step_x, *gru, h, peephole=torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"input must be a 2-D tensor \[B, I\], got 3-D"):
        functional.cell_step("gru", x, *gru, h)
