"""fusedrnn.reference pinned to torch.nn: same weights give the same outputs, final states and
gradients in float64 (the oracle is only as good as this test)."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fusedrnn import reference

from _helpers import assert_close

CONFIGS = [
    # (cell, proj_size, num_layers, bidirectional, batch_first, bias)
    ("lstm", 0, 1, False, False, True),
    ("lstm", 0, 2, True, True, False),
    ("lstm", 3, 2, True, False, True),
    ("lstm", 2, 1, False, True, False),
    ("gru", 0, 1, False, False, True),
    ("gru", 0, 3, True, True, True),
    ("gru", 0, 2, False, False, False),
    ("rnn_tanh", 0, 2, True, False, True),
    ("rnn_relu", 0, 1, False, True, True),
    ("rnn_relu", 0, 3, True, False, False),
]


def config_id(config):
    cell, proj, layers, bidir, bf, bias = config
    return "-".join([cell] + ([f"proj{proj}"] if proj else []) + [f"L{layers}"]
                    + (["bidir"] if bidir else []) + (["bf"] if bf else [])
                    + ([] if bias else ["nobias"]))


def torch_module(cell, proj, layers, bidir, bf, bias, input_size=4, hidden=7):
    kwargs = dict(num_layers=layers, bidirectional=bidir, batch_first=bf, bias=bias,
                  dtype=torch.float64)
    if cell == "lstm":
        return nn.LSTM(input_size, hidden, proj_size=proj, **kwargs)
    if cell == "gru":
        return nn.GRU(input_size, hidden, **kwargs)
    return nn.RNN(input_size, hidden, nonlinearity=cell.split("_")[1], **kwargs)


def initial_state(module, batch, cell):
    num = module.num_layers * (2 if module.bidirectional else 1)
    h = torch.randn(num, batch, module.proj_size or module.hidden_size, dtype=torch.float64,
                    requires_grad=True)
    if cell != "lstm":
        return h, (h,)
    c = torch.randn(num, batch, module.hidden_size, dtype=torch.float64, requires_grad=True)
    return (h, c), (h, c)


def results_and_grads(results, leaves):
    """Backpropagates a fixed random projection of `results`; returns results and gradients."""
    g = torch.Generator().manual_seed(7)
    loss = sum((r * torch.randn(r.shape, generator=g, dtype=r.dtype)).sum() for r in results)
    grads = torch.autograd.grad(loss, leaves)
    return [r.detach() for r in results], grads


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
@pytest.mark.parametrize("with_hx", [False, True], ids=["nohx", "hx"])
def test_padded_matches_torch(config, with_hx):
    torch.manual_seed(0)
    cell = config[0]
    module = torch_module(*config)
    seq_len, batch = 5, 3
    shape = (batch, seq_len, 4) if module.batch_first else (seq_len, batch, 4)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    hx, hx_leaves = initial_state(module, batch, cell) if with_hx else (None, ())
    leaves = (x, *hx_leaves, *module.parameters())

    out, state = module(x, hx)
    expected = [out] + (list(state) if cell == "lstm" else [state])
    out, h_n, c_n = reference.rnn(cell, x, reference.weights_of(module), hx,
                                  num_layers=module.num_layers,
                                  bidirectional=module.bidirectional,
                                  batch_first=module.batch_first)
    actual = [out, h_n] + ([c_n] if cell == "lstm" else [])

    expected, expected_grads = results_and_grads(expected, leaves)
    actual, actual_grads = results_and_grads(actual, leaves)
    for a, e, name in zip(actual, expected, ["output", "h_n", "c_n"]):
        assert_close(a, e, 1e-12, name)
    for a, e in zip(actual_grads, expected_grads):
        assert_close(a, e, 1e-11, "gradient")


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_lengths_match_packed_torch(config):
    """reference.rnn with lengths is what torch.nn computes for a PackedSequence."""
    torch.manual_seed(1)
    cell = config[0]
    module = torch_module(*config)
    seq_len, batch = 6, 4
    lengths = torch.tensor([3, 6, 1, 4])
    shape = (batch, seq_len, 4) if module.batch_first else (seq_len, batch, 4)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    hx, hx_leaves = initial_state(module, batch, cell)
    leaves = (x, *hx_leaves, *module.parameters())

    packed = pack_padded_sequence(x, lengths, batch_first=module.batch_first, enforce_sorted=False)
    out, state = module(packed, hx)
    out, _ = pad_packed_sequence(out, batch_first=module.batch_first, total_length=seq_len)
    expected = [out] + (list(state) if cell == "lstm" else [state])
    out, h_n, c_n = reference.rnn(cell, x, reference.weights_of(module), hx,
                                  num_layers=module.num_layers, bidirectional=module.bidirectional,
                                  batch_first=module.batch_first, lengths=lengths)
    actual = [out, h_n] + ([c_n] if cell == "lstm" else [])

    expected, expected_grads = results_and_grads(expected, leaves)
    actual, actual_grads = results_and_grads(actual, leaves)
    for a, e, name in zip(actual, expected, ["output", "h_n", "c_n"]):
        assert_close(a, e, 1e-12, name)
    for a, e in zip(actual_grads, expected_grads):
        assert_close(a, e, 1e-11, "gradient")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_dropout_draws_torch_masks(cell):
    """With the same RNG state the default dropout hook draws torch.nn's masks exactly (another
    mask would change the output by O(1), not by rounding)."""
    module = torch_module(cell, 0, 3, True, True, True)
    module.dropout = 0.4
    module.train()
    x = torch.randn(5, 6, 4, dtype=torch.float64)
    torch.manual_seed(123)
    expected, _ = module(x)
    torch.manual_seed(123)
    actual, _, _ = reference.rnn(cell, x, reference.weights_of(module), num_layers=3,
                                 bidirectional=True, batch_first=True, dropout=0.4, training=True)
    assert_close(actual, expected, 1e-12, "output with dropout")


def test_dropout_hook_and_eval():
    module = torch_module("gru", 0, 2, False, False, True)
    x = torch.randn(4, 2, 4, dtype=torch.float64)
    weights = reference.weights_of(module)
    calls = []

    def hook(output):
        calls.append(output.shape)
        return output * 0

    out, _, _ = reference.rnn("gru", x, weights, num_layers=2, dropout=0.5, training=True,
                              dropout_fn=hook)
    assert calls == [torch.Size([4, 2, 7])]
    # The last layer sees zeros, so its output only depends on its biases and recurrence.
    out_eval, _, _ = reference.rnn("gru", x, weights, num_layers=2, dropout=0.5, training=False,
                                   dropout_fn=hook)
    assert len(calls) == 1 and not torch.equal(out, out_eval)


def test_torch_style_wrappers():
    module = torch_module("lstm", 2, 1, False, False, True)
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    out, (h, c) = reference.lstm(x, reference.weights_of(module))
    expected, (eh, ec) = module(x)
    assert_close(out, expected, 1e-12, "output")
    assert_close(c, ec, 1e-12, "c_n")
    for cell, fn in [("gru", reference.gru), ("rnn_tanh", reference.rnn_tanh),
                     ("rnn_relu", reference.rnn_relu)]:
        module = torch_module(cell, 0, 1, False, False, True)
        out, h = fn(x, reference.weights_of(module))
        expected, eh = module(x)
        assert_close(out, expected, 1e-12, cell)
        assert_close(h, eh, 1e-12, cell)
        assert reference.cell_of(module) == cell


def test_bad_cell_and_weights():
    with pytest.raises(ValueError, match="cell"):
        reference.rnn("lstmx", torch.randn(2, 1, 3), [])
    with pytest.raises(ValueError, match="layer weights"):
        reference.rnn("gru", torch.randn(2, 1, 3), [], num_layers=1)
