"""Bad input (issue 2, item 6): every mistake raises the exception class torch.nn raises for it,
with a message that names the argument and what was expected and received. Validation runs
before any native call, so these tests need no native module."""
import itertools
import warnings
import re
from typing import Optional, Tuple

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fusedrnn

from _helpers import requires_native


def torch_error(make):
    try:
        make()
    except Exception as error:  # noqa: BLE001 - we want whatever torch raises
        return error
    return None


def check_same_class(torch_call, our_call, *message_parts):
    """Our error is an instance of torch's error class and its message names what it should."""
    expected = torch_error(torch_call)
    assert expected is not None, "torch.nn accepted this input: the test case is wrong"
    with pytest.raises(Exception) as info:
        our_call()
    assert isinstance(info.value, type(expected)), (
        f"fusedrnn raised {type(info.value).__name__}({info.value}), "
        f"torch.nn raises {type(expected).__name__}({expected})")
    for part in message_parts:
        assert part in str(info.value), f"{part!r} not in message {str(info.value)!r}"


# --- constructor arguments -----------------------------------------------------------------------

CONSTRUCTOR_CASES = [
    # (id, class name, args, kwargs, words the message must contain)
    ("dropout-negative", "LSTM", (4, 6, 2), dict(dropout=-0.1), ["dropout", "-0.1"]),
    ("dropout-above-one", "GRU", (4, 6, 2), dict(dropout=1.5), ["dropout", "1.5"]),
    ("dropout-bool", "RNN", (4, 6, 2), dict(dropout=True), ["dropout"]),
    ("dropout-none", "LSTM", (4, 6, 2), dict(dropout=None), ["NoneType"]),
    ("dropout-string", "GRU", (4, 6, 2), dict(dropout="abc"), ["abc"]),
    ("hidden-zero", "LSTM", (4, 0), {}, ["hidden_size", "0"]),
    ("hidden-negative", "GRU", (4, -3), {}, ["hidden_size", "-3"]),
    ("hidden-float", "RNN", (4, 2.0), {}, ["hidden_size", "float"]),
    ("input-zero", "GRU", (0, 6), {}, ["input_size"]),
    ("layers-zero", "LSTM", (4, 6, 0), {}, ["num_layers"]),
    ("proj-equal-hidden", "LSTM", (4, 6), dict(proj_size=6), ["proj_size", "hidden_size", "6"]),
    ("proj-above-hidden", "LSTM", (4, 6), dict(proj_size=9), ["proj_size", "9"]),
    ("proj-negative", "LSTM", (4, 6), dict(proj_size=-1), ["proj_size", "-1"]),
    ("proj-on-gru", "GRU", (4, 6), dict(proj_size=2), ["proj_size"]),
    ("proj-on-rnn", "RNN", (4, 6), dict(proj_size=2), ["proj_size"]),
    ("bias-not-bool", "LSTM", (4, 6), dict(bias=1), ["bias", "int"]),
    ("batch-first-not-bool", "GRU", (4, 6), dict(batch_first="yes"), ["batch_first"]),
    ("nonlinearity", "RNN", (4, 6), dict(nonlinearity="sigmoid"), ["sigmoid", "tanh", "relu"]),
]


@pytest.mark.parametrize("case", CONSTRUCTOR_CASES, ids=[c[0] for c in CONSTRUCTOR_CASES])
def test_constructor(case):
    _, name, args, kwargs, words = case
    check_same_class(lambda: getattr(nn, name)(*args, **kwargs),
                     lambda: getattr(fusedrnn, name)(*args, **kwargs), *words)


def test_dropout_with_one_layer_warns_like_torch():
    with pytest.warns(UserWarning, match="num_layers greater than 1"):
        fusedrnn.LSTM(4, 6, dropout=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fusedrnn.LSTM(4, 6, 2, dropout=0.5)
        fusedrnn.LSTM(4, 6, dropout=0)


INTEGER_LIKE_CASES = [
    # (id, class name, args, kwargs): sizes torch.nn takes without a type check
    ("layers-numpy", "LSTM", (4, 6), dict(num_layers=np.int64(2))),
    ("layers-tensor", "GRU", (4, 6), dict(num_layers=torch.tensor(2))),
    ("proj-numpy", "LSTM", (4, 6), dict(proj_size=np.int32(3))),
    ("cell-numpy", "GRUCell", (np.int64(4), np.int64(6)), {}),
    ("cell-tensor", "LSTMCell", (torch.tensor(4), 6), {}),
]


@pytest.mark.parametrize("case", INTEGER_LIKE_CASES, ids=[c[0] for c in INTEGER_LIKE_CASES])
def test_integer_like_sizes_are_taken_like_torch(case):
    """torch.nn checks num_layers and proj_size by value only and its cells hand the sizes to
    torch.empty, so any integer works there; the module then has torch.nn's parameters and
    results, and keeps the sizes as ints."""
    _, name, args, kwargs = case
    torch.manual_seed(0)
    theirs = getattr(nn, name)(*args, **kwargs).double()
    ours = getattr(fusedrnn, name)(*args, **kwargs).double()
    ours.load_state_dict(theirs.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    if "Cell" in name:
        x = x[0]
    expected, actual = theirs(x), ours(x)
    expected = expected[0] if isinstance(expected, tuple) else expected
    actual = actual[0] if isinstance(actual, tuple) else actual
    torch.testing.assert_close(actual, expected)
    for attr in ("num_layers", "proj_size", "input_size", "hidden_size"):
        if hasattr(ours, attr):
            assert type(getattr(ours, attr)) is int, attr


def test_cell_negative_hidden():
    check_same_class(lambda: nn.GRUCell(4, -1), lambda: fusedrnn.GRUCell(4, -1), "hidden_size")


# --- forward arguments ---------------------------------------------------------------------------

def lstm_pair(**kwargs):
    torch.manual_seed(0)
    return nn.LSTM(4, 6, 2, **kwargs), fusedrnn.LSTM(4, 6, 2, **kwargs)


def gru_pair(**kwargs):
    return nn.GRU(4, 6, 2, **kwargs), fusedrnn.GRU(4, 6, 2, **kwargs)


def rnn_pair(**kwargs):
    return nn.RNN(4, 6, 2, **kwargs), fusedrnn.RNN(4, 6, 2, **kwargs)


X = torch.randn(3, 2, 4)
H = torch.randn(2, 2, 6)
META = "meta"


def packed_input(unsorted=False):
    lengths = torch.tensor([2, 3]) if unsorted else torch.tensor([3, 2])
    return pack_padded_sequence(X, lengths, enforce_sorted=not unsorted)


FORWARD_CASES = [
    # (id, pair factory, args, words)
    ("input-size", lstm_pair, (torch.randn(3, 2, 5),), ["input_size", "4", "5"]),
    ("input-size-gru", gru_pair, (torch.randn(3, 2, 5),), ["input_size", "4", "5"]),
    ("input-size-unbatched", rnn_pair, (torch.randn(3, 7),), ["input_size", "4", "7"]),
    ("input-1d", lstm_pair, (torch.randn(4),), ["2D or 3D", "1D"]),
    ("input-4d", gru_pair, (torch.randn(1, 3, 2, 4),), ["2D or 3D", "4D"]),
    ("input-1d-rnn", rnn_pair, (torch.randn(4),), ["1D"]),
    ("input-dtype", lstm_pair, (X.double(),), ["float64", "float32"]),
    ("input-int", gru_pair, (X.long(),), ["int64", "float32"]),
    ("input-int-rnn", rnn_pair, (X.int(),), ["int32"]),
    ("hx-batch", gru_pair, (X, torch.randn(2, 3, 6)), ["hx", "(2, 2, 6)", "[2, 3, 6]"]),
    ("hx-layers", gru_pair, (X, torch.randn(3, 2, 6)), ["(2, 2, 6)", "[3, 2, 6]"]),
    ("hx-size", rnn_pair, (X, torch.randn(2, 2, 5)), ["(2, 2, 6)", "[2, 2, 5]"]),
    ("hx-2d-for-batched", gru_pair, (X, torch.randn(2, 6)), ["3-D", "2-D"]),
    ("hx-3d-for-unbatched", gru_pair, (X[:, 0], torch.randn(2, 1, 6)), ["2-D", "3-D"]),
    ("lstm-h-shape", lstm_pair, (X, (torch.randn(2, 3, 6), H)), ["h_0", "(2, 2, 6)", "[2, 3, 6]"]),
    ("lstm-c-shape", lstm_pair, (X, (H, torch.randn(2, 2, 5))), ["c_0", "(2, 2, 6)", "[2, 2, 5]"]),
    ("lstm-c-layers", lstm_pair, (X, (H, torch.randn(1, 2, 6))), ["c_0", "[1, 2, 6]"]),
    ("lstm-hx-tensor", lstm_pair, (X, H), ["tuple", "Tensor"]),
    ("lstm-hx-tensor-4d", lstm_pair, (X, torch.randn(2, 2, 2, 6)), ["tuple", "Tensor"]),
    ("lstm-hx-1-tuple", lstm_pair, (X, (H,)), ["tuple", "1"]),
    ("lstm-hx-3-tuple", lstm_pair, (X, (H, H, H)), ["tuple", "3"]),
    ("lstm-hx-none-pair", lstm_pair, (X, (None, None)), ["hx[0]", "NoneType"]),
    ("lstm-hx-unbatched-3d", lstm_pair,
     (X[:, 0], (torch.randn(2, 1, 6), torch.randn(2, 1, 6))), ["2-D", "3-D"]),
    ("hx-dtype", gru_pair, (X, H.double()), ["dtype", "float64", "float32"]),
    ("lstm-h-dtype", lstm_pair, (X, (H.double(), H)), ["h_0", "float64"]),
    ("lstm-c-dtype", lstm_pair, (X, (H, H.double())), ["c_0", "float64"]),
    ("hx-device", gru_pair, (X, H.to(META)), ["device", "meta", "cpu"]),
    ("lstm-c-device", lstm_pair, (X, (H, H.to(META))), ["device", "meta", "cpu"]),
    ("input-device", gru_pair, (X.to(META),), ["device", "meta", "cpu"]),
    ("zero-steps", gru_pair, (torch.randn(0, 2, 4),), ["sequence length", "0"]),
    ("packed-input-size", gru_pair,
     (pack_padded_sequence(torch.randn(3, 2, 5), torch.tensor([3, 2])),), ["input_size", "5"]),
    ("packed-dtype", rnn_pair,
     (pack_padded_sequence(X.double(), torch.tensor([3, 2])),), ["float64"]),
    ("packed-hx-batch", gru_pair, (packed_input(), torch.randn(2, 3, 6)), ["(2, 2, 6)", "[2, 3, 6]"]),
    ("packed-unsorted-hx-batch", lstm_pair,
     (packed_input(True), (torch.randn(2, 1, 6), torch.randn(2, 1, 6))), ["h_0", "[2, 1, 6]"]),
    ("packed-hx-2d", gru_pair, (packed_input(), torch.randn(2, 6)), ["[2, 6]"]),
    ("packed-lstm-hx-2d", lstm_pair,
     (packed_input(), (torch.randn(2, 6), torch.randn(2, 6))), ["h_0", "[2, 6]"]),
    ("packed-dtype-lstm", lstm_pair,
     (pack_padded_sequence(X.double(), torch.tensor([3, 2])),), ["float64"]),
    ("input-none", gru_pair, (None,), ["Tensor", "NoneType"]),
    ("input-list", lstm_pair, ([X],), ["Tensor", "list"]),
]


@pytest.mark.parametrize("case", FORWARD_CASES, ids=[c[0] for c in FORWARD_CASES])
def test_forward(case):
    _, factory, args, words = case
    theirs, ours = factory()
    check_same_class(lambda: theirs(*args), lambda: ours(*args), *words)


# --- cells ----------------------------------------------------------------------------------------

def cell_pair(name, **kwargs):
    return getattr(nn, name)(4, 6, **kwargs), getattr(fusedrnn, name)(4, 6, **kwargs)


B = torch.randn(2, 4)
CELL_CASES = [
    ("input-3d", "GRUCell", (torch.randn(1, 2, 4),), ["1D or 2D", "3D"]),
    ("input-3d-lstm", "LSTMCell", (torch.randn(1, 2, 4),), ["1D or 2D", "3D"]),
    ("input-size", "RNNCell", (torch.randn(2, 5),), ["input_size", "5", "4"]),
    ("input-size-lstm", "LSTMCell", (torch.randn(2, 5),), ["input_size", "5"]),
    ("input-dtype", "GRUCell", (B.double(),), ["float64", "float32"]),
    ("input-int", "RNNCell", (B.long(),), ["int64"]),
    ("hx-3d", "GRUCell", (B, torch.randn(1, 2, 6)), ["1D or 2D", "3D"]),
    ("hx-batch", "GRUCell", (B, torch.randn(3, 6)), ["batch size", "2", "3"]),
    ("hx-size", "RNNCell", (B, torch.randn(2, 5)), ["hidden_size", "5", "6"]),
    ("hx-2d-unbatched", "GRUCell", (B[0], torch.randn(1, 6)), ["hidden"]),
    ("hx-1d-batched", "RNNCell", (B, torch.randn(6)), ["hidden"]),
    ("hx-1d-batched-size-of-batch", "GRUCell", (torch.randn(6, 4), torch.randn(6)), ["hidden"]),
    ("lstm-c-1d-batched", "LSTMCell", (B, (torch.randn(2, 6), torch.randn(2))), ["hidden1"]),
    ("hx-dtype", "GRUCell", (B, torch.randn(2, 6).double()), ["float64"]),
    ("hx-device", "GRUCell", (B, torch.randn(2, 6, device=META)), ["meta"]),
    ("lstm-hx-tensor", "LSTMCell", (B, torch.randn(2, 6)), ["tuple", "Tensor"]),
    ("lstm-hx-1-tuple", "LSTMCell", (B, (torch.randn(2, 6),)), ["tuple", "1"]),
    ("lstm-hx-3-tuple", "LSTMCell", (B, (torch.randn(2, 6),) * 3), ["tuple", "3"]),
    ("lstm-hx-tensor-unbatched", "LSTMCell", (B[0], torch.randn(6)), ["tuple", "Tensor"]),
    ("lstm-c-batch", "LSTMCell", (B, (torch.randn(2, 6), torch.randn(3, 6))), ["hidden1", "3"]),
    ("lstm-h-3d", "LSTMCell", (B, (torch.randn(1, 2, 6), torch.randn(2, 6))), ["hx[0]", "3D"]),
    ("input-none", "GRUCell", (None,), ["Tensor", "NoneType"]),
    ("hx-int", "RNNCell", (B, 3), ["Tensor", "int"]),
    ("hx-1-tuple", "GRUCell", (B, (torch.randn(2, 6),)), ["Tensor", "tuple"]),
]


@pytest.mark.parametrize("case", CELL_CASES, ids=[c[0] for c in CELL_CASES])
def test_cell_forward(case):
    _, name, args, words = case
    theirs, ours = cell_pair(name)
    check_same_class(lambda: theirs(*args), lambda: ours(*args), *words)


def test_rnn_cell_unknown_nonlinearity_fails_in_forward_like_torch():
    check_same_class(lambda: nn.RNNCell(4, 6, nonlinearity="x")(B),
                     lambda: fusedrnn.RNNCell(4, 6, nonlinearity="x")(B), "nonlinearity", "x")


@pytest.mark.parametrize("args", [(torch.randn(2, 2, 4),), (B, torch.randn(1, 2, 6))],
                         ids=["3-D input", "3-D hx"])
def test_rnn_cell_unknown_nonlinearity_comes_after_the_rank_checks(args):
    """torch.nn checks the ranks of input and hx first (ValueError); fusedrnn raised the
    nonlinearity's RuntimeError before them (review, session 31)."""
    check_same_class(lambda: nn.RNNCell(4, 6, nonlinearity="x")(*args),
                     lambda: fusedrnn.RNNCell(4, 6, nonlinearity="x")(*args), "Expected")
    scripted = torch.jit.script(fusedrnn.RNNCell(4, 6, nonlinearity="x"))
    with pytest.raises(Exception, match="Expected"):
        scripted(*args)


def test_lstm_state_error_is_catchable_as_every_torch_class():
    from fusedrnn._validation import HiddenStateError
    for cls in (RuntimeError, TypeError, IndexError, AttributeError, ValueError):
        assert issubclass(HiddenStateError, cls)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("weight", ["weight_ih_l0_reverse", "weight_ih_l1", "weight_ih_l1_reverse"])
@pytest.mark.parametrize("seq_len", [1, 5])
@pytest.mark.parametrize("inference", [False, True], ids=["train", "no-grad"])
def test_bidirectional_input_weight_of_another_dtype_refused_like_torch(kind, weight, seq_len,
                                                                        inference):
    """One direction's W_ih in float32 in a float64 module: torch.nn refuses it; fusedrnn
    concatenated the directions' W_ih (one GEMM for both), which promoted it silently."""
    theirs, ours = (lib(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
                    for lib in (getattr(nn, kind), getattr(fusedrnn, kind)))
    for m in (theirs, ours):
        setattr(m, weight, nn.Parameter(getattr(m, weight).detach().float()))
        m.train(not inference)
    x = torch.randn(seq_len, 2, 3, dtype=torch.float64)
    with torch.set_grad_enabled(not inference):
        check_same_class(lambda: theirs(x), lambda: ours(x), "float")


@pytest.mark.parametrize("name", ["GRUCell", "LSTMCell", "RNNCell"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("batch", [1, 2])
def test_cell_bias_of_another_dtype_refused_like_torch(name, contiguous, batch):
    """A float32 bias_ih in a float64 cell: torch.nn refuses it whatever x's strides; fusedrnn's
    GRUCell once promoted it silently when x was not contiguous."""
    theirs, ours = cell_pair(name, dtype=torch.float64)
    for m in (theirs, ours):
        m.bias_ih = nn.Parameter(m.bias_ih.detach().float())
    x = torch.randn(batch, 8, dtype=torch.float64)[:, ::2]
    x = x.contiguous() if contiguous else x
    check_same_class(lambda: theirs(x), lambda: ours(x), "float")


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("bias", ["bias_ih", "bias_hh"])
@pytest.mark.parametrize("shape", ["[1]", "[1, G*H]"])
@pytest.mark.parametrize("inference", [False, True], ids=["train", "no-grad"])
def test_bias_that_broadcasts_refused_naming_it(kind, bias, shape, inference):
    """torch.nn's CPU modules take a bias of shape [1] or [1, G*H] (it broadcasts); fusedrnn
    refuses it on every path, naming the bias. An LSTM or RNN folded b_ih + b_hh before any
    check, so a [1] bias ran while a GRU's raised, naming b_hh also for an odd bias_ih. (The
    module's own parameter name since session 30.)"""
    cell = kind.endswith("Cell")
    m = getattr(fusedrnn, kind)(3, 4)
    name = bias if cell else f"{bias}_l0"
    rows = getattr(m, name).shape[0]
    setattr(m, name, nn.Parameter(torch.zeros(1) if shape == "[1]" else torch.zeros(1, rows)))
    x = torch.randn(*((2, 3) if cell else (5, 2, 3)))
    with torch.set_grad_enabled(not inference):
        with pytest.raises(RuntimeError, match=re.escape(f"{name} must have shape [{rows}]")):
            m(x)


@pytest.mark.parametrize("rows, batch_sizes", [(5, [3, 2, 1]), (6, [1, 2, 3]), (6, [3, 1, 2])],
                         ids=["fewer-rows", "increasing", "increasing-later"])
def test_malformed_packed_sequence_like_torch(rows, batch_sizes):
    """A hand-built PackedSequence that is not one: torch.nn fails inside its kernel with an
    unrelated RuntimeError; ours names what is wrong, catchable as torch.nn's class. (It was an
    IndexError from index_copy_.)"""
    from torch.nn.utils.rnn import PackedSequence
    packed = PackedSequence(torch.randn(rows, 3), torch.tensor(batch_sizes))
    with pytest.raises(RuntimeError, match="PackedSequence's (data|batch_sizes)"):
        fusedrnn.LSTM(3, 4)(packed)


def test_packed_sequence_with_extra_data_rows_is_refused():
    """torch.nn ignores data rows past what batch_sizes count: a silently dropped row."""
    from torch.nn.utils.rnn import PackedSequence
    packed = PackedSequence(torch.randn(7, 3), torch.tensor([3, 2, 1]))
    assert nn.GRU(3, 4)(packed)[0].data.shape[0] == 6
    with pytest.raises(ValueError, match=r"their sum, 6\), got 7 rows"):
        fusedrnn.GRU(3, 4)(packed)


# --- torch.nn's own words -------------------------------------------------------------------------
#
# Code and tests written against torch.nn match its messages (its own test_nn and the ModuleInfo
# error inputs do, with regexes). Where torch.nn's message states the problem, ours holds its text
# word for word and adds what it leaves out; for cells that means every shape is checked before
# any dtype, in torch.nn's order. (Where torch.nn's text is an accident of its internals, like
# "mat1 and mat2 must have the same dtype", ours says what is wrong instead.)

def _cell_input(batch=3, width=10):
    return torch.randn(batch, width, dtype=torch.float64)  # the module is float32: shapes first


TORCH_TEXT_CASES = [
    # (id, class name, constructor args and kwargs, forward args)
    ("gru-hidden-size", "GRU", (10, 20), {}, (torch.randn(3, 2, 10), torch.randn(1, 2, 19))),
    ("rnn-hidden-size", "RNN", (10, 20), {}, (torch.randn(3, 2, 10), torch.randn(1, 2, 19))),
    ("lstm-h-size", "LSTM", (10, 20), {},
     (torch.randn(3, 2, 10), (torch.randn(1, 2, 19), torch.randn(1, 2, 20)))),
    ("lstm-c-size", "LSTM", (10, 20), {},
     (torch.randn(3, 2, 10), (torch.randn(1, 2, 20), torch.randn(1, 2, 19)))),
    ("lstm-proj-h-size", "LSTM", (10, 20), dict(proj_size=10),
     (torch.randn(3, 2, 10), (torch.randn(1, 2, 20), torch.randn(1, 2, 20)))),
    ("rnn-input-4d", "RNN", (3, 5), {}, (torch.randn(6, 4, 3, 1),)),
    ("rnn-input-1d", "RNN", (3, 5), {}, (torch.randn(3),)),
    ("gru-input-4d", "GRU", (3, 5), {}, (torch.randn(6, 4, 3, 1),)),
    ("lstm-input-4d", "LSTM", (3, 5), {}, (torch.randn(6, 4, 3, 1),)),
    ("rnn-hx-2d-batched", "RNN", (3, 5), {}, (torch.randn(4, 2, 3), torch.randn(2, 5))),
    ("lstm-hx-2d-batched", "LSTM", (3, 5), {},
     (torch.randn(4, 2, 3), (torch.randn(2, 5), torch.randn(2, 5)))),
    ("lstm-hx-3d-unbatched", "LSTM", (3, 5), {},
     (torch.randn(4, 3), (torch.randn(1, 1, 5), torch.randn(1, 1, 5)))),
    ("lstm-input-dtype", "LSTM", (3, 5), {}, (torch.randn(2, 4, 3, dtype=torch.float64),)),
    ("gru-input-size", "GRU", (3, 5), {}, (torch.randn(2, 4, 7),)),
]
for _cell in ("RNNCell", "GRUCell", "LSTMCell"):
    def _state(*shape, lstm=_cell == "LSTMCell"):
        h = torch.randn(*shape, dtype=torch.float64)
        return (h, h.clone()) if lstm else h
    TORCH_TEXT_CASES += [
        (f"{_cell}-input-size", _cell, (10, 20), {}, (_cell_input(width=11), _state(3, 20))),
        (f"{_cell}-hidden-size", _cell, (10, 20), {}, (_cell_input(), _state(3, 21))),
        (f"{_cell}-hidden-batch", _cell, (10, 20), {}, (_cell_input(), _state(5, 20))),
        (f"{_cell}-hidden-4d", _cell, (10, 20), {}, (_cell_input(), _state(3, 1, 1, 20))),
        (f"{_cell}-input-3d", _cell, (10, 20), {}, (torch.randn(1, 3, 10),)),
    ]


# A packed input's states are checked by their shape alone (no rank check first). (Not an LSTM's:
# torch 2.13's packed LSTM fails on a wrong state in its kernel, with texts about other things.)
_PACKED = pack_padded_sequence(torch.randn(3, 2, 10), [3, 2])
TORCH_TEXT_CASES += [
    ("gru-packed-hx-2d", "GRU", (10, 20), {}, (_PACKED, torch.randn(2, 20))),
    ("rnn-packed-hx-size", "RNN", (10, 20), {}, (_PACKED, torch.randn(1, 3, 20))),
]


@pytest.mark.parametrize("case", TORCH_TEXT_CASES, ids=[c[0] for c in TORCH_TEXT_CASES])
def test_message_holds_torch_nn_text(case):
    _, name, args, kwargs, forward_args = case
    expected = torch_error(lambda: getattr(nn, name)(*args, **kwargs)(*forward_args))
    assert expected is not None, "torch.nn accepted this input: the test case is wrong"
    with pytest.raises(type(expected)) as info:
        getattr(fusedrnn, name)(*args, **kwargs)(*forward_args)
    assert str(expected) in str(info.value), (
        f"torch.nn says {str(expected)!r}, fusedrnn says {str(info.value)!r}")


class _ScriptedCaller(nn.Module):
    """A scripted caller of a GRU/RNN (their forward is overloaded, as torch.nn's is, so they
    script as submodules): a padded or a packed input, with or without a state."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor, h0: Optional[torch.Tensor] = None):
        return self.rnn(x, h0)[0]


class _ScriptedPackedCaller(_ScriptedCaller):
    def forward(self, x: PackedSequence, h0: Optional[torch.Tensor] = None):
        return self.rnn(x, h0)[0].data


class _ScriptedLstmCaller(_ScriptedCaller):
    def forward(self, x: torch.Tensor,
                hx: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        return self.rnn(x, hx)[0]


class _ScriptedPackedLstmCaller(_ScriptedCaller):
    def forward(self, x: PackedSequence,
                hx: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        return self.rnn(x, hx)[0].data


def _scripted(module, packed):
    if type(module).__name__.endswith("Cell"):
        return torch.jit.script(module)
    lstm = isinstance(module, fusedrnn.LSTM)
    caller = ((_ScriptedPackedLstmCaller if lstm else _ScriptedPackedCaller) if packed else
              (_ScriptedLstmCaller if lstm else _ScriptedCaller))
    return torch.jit.script(caller(module))


# Where a scripted module cannot say torch.nn's words: a script cannot format a dtype.
_SCRIPTED_DTYPE_TEXT = (r"RNN input dtype .* does not match weight dtype .* "
                        r"Convert input: input\.to\(.*\), or convert model: model\.to\(.*\)")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("case", TORCH_TEXT_CASES, ids=[c[0] for c in TORCH_TEXT_CASES])
def test_scripted_message_holds_torch_nn_text(case):
    """The TorchScript path (_script.py) checks on its own, and says what eager torch.nn says
    (TorchScript raises torch.jit.Error, whose message ends with the original text)."""
    _, name, args, kwargs, forward_args = case
    expected = torch_error(lambda: getattr(nn, name)(*args, **kwargs)(*forward_args))
    scripted = _scripted(getattr(fusedrnn, name)(*args, **kwargs),
                         isinstance(forward_args[0], PackedSequence))
    with pytest.raises(Exception) as info:
        scripted(*forward_args)
    if case[0].endswith("input-dtype"):
        assert re.search(_SCRIPTED_DTYPE_TEXT, str(info.value)), str(info.value)
    else:
        assert str(expected) in str(info.value), (
            f"torch.nn says {str(expected)!r}, scripted fusedrnn says {str(info.value)!r}")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_scripted_lstm_states_rank_checked_together_like_torch():
    scripted = torch.jit.script(_ScriptedLstmCaller(fusedrnn.LSTM(10, 20)))
    with pytest.raises(Exception, match=r"hx and cx should also be 3-D but got \(2-D, 2-D\)"):
        scripted(torch.randn(4, 2, 10), (torch.randn(2, 20), torch.randn(2, 20)))


def _mistakes(count):
    """Every non-empty combination of `count` independent mistakes, as tuples of 0/1."""
    return [c for c in itertools.product((0, 1), repeat=count) if any(c)]


def _raises_torch_nn_s(call, expected, scripted):
    """call() fails as torch.nn did (`expected`): the same class and text eagerly; under
    TorchScript (torch.jit.Error) the same text, but for the input's dtype, which a script
    cannot format (_SCRIPTED_DTYPE_TEXT)."""
    with pytest.raises(Exception if scripted else type(expected)) as info:
        call()
    if scripted and "RNN input dtype" in str(expected):
        assert re.search(_SCRIPTED_DTYPE_TEXT, str(info.value)), str(info.value)
    else:
        assert str(expected) in str(info.value), (
            f"torch.nn says {str(expected)!r}, fusedrnn says {str(info.value)!r}")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("mistakes", _mistakes(4), ids=lambda c: "".join(map(str, c)))
def test_first_problem_reported_is_torch_nn_s(name, batched, mistakes, scripted):
    """Several mistakes at once: the one reported is the one torch.nn reports (its checks run in
    a fixed order: the states' rank, the input's dtype and size, the states' shapes)."""
    wrong_dtype, wrong_input_size, wrong_state_rank, wrong_state_size = mistakes
    dtype = torch.float64 if wrong_dtype else torch.float32
    x = torch.randn(4, 2, 7 if wrong_input_size else 3, dtype=dtype)
    x = x if batched else x[:, 0]
    shape = ([1, 2] if batched else [1]) + [6 if wrong_state_size else 5]
    h = torch.zeros(*(shape[1:] if wrong_state_rank else shape), dtype=dtype)
    hx = (h, h.clone()) if name == "LSTM" else h
    expected = torch_error(lambda: getattr(nn, name)(3, 5)(x, hx))
    ours = getattr(fusedrnn, name)(3, 5)
    call = _scripted(ours, packed=False) if scripted else ours
    _raises_torch_nn_s(lambda: call(x, hx), expected, scripted)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("mistakes", _mistakes(5), ids=lambda c: "".join(map(str, c)))
def test_first_problem_reported_by_a_cell_is_torch_nn_s(name, mistakes, scripted):
    wrong_dtype, wrong_input_size, wrong_state_rank, wrong_batch, wrong_state_size = mistakes
    x = torch.randn(3, 11 if wrong_input_size else 10)
    shape = [5 if wrong_batch else 3, 21 if wrong_state_size else 20]
    h = torch.zeros(*([1] + shape if wrong_state_rank else shape),
                    dtype=torch.float64 if wrong_dtype else torch.float32)
    x = x.to(h.dtype)  # a float64 input and states against float32 weights
    hx = (h, h.clone()) if name == "LSTMCell" else h
    expected = torch_error(lambda: getattr(nn, name)(10, 20)(x, hx))
    ours = getattr(fusedrnn, name)(10, 20)
    call = _scripted(ours, packed=False) if scripted else ours
    with pytest.raises(Exception if scripted else type(expected)) as info:
        call(x, hx)
    if not ("mat1 and mat2" in str(expected) or "same dtype" in str(expected)):
        assert str(expected) in str(info.value)  # (torch's dtype text is its GEMM's)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
def test_every_state_shape_checked_before_any_state_dtype(scripted):
    """h_0 of the wrong dtype and c_0 of the wrong size: torch.nn reports c_0's size (it checks
    all shapes first). fusedrnn reported h_0's dtype, checking each state whole in turn."""
    x = torch.randn(4, 2, 3)
    h0, c0 = torch.randn(1, 2, 5, dtype=torch.float64), torch.randn(1, 2, 6)
    expected = torch_error(lambda: nn.LSTM(3, 5)(x, (h0, c0)))
    ours = fusedrnn.LSTM(3, 5)
    call = torch.jit.script(_ScriptedLstmCaller(ours)) if scripted else ours
    with pytest.raises(Exception if scripted else type(expected)) as info:
        call(x, (h0, c0))
    assert str(expected) in str(info.value)


_SHAPE_CASES = {  # (class, constructor keywords) whose every parameter is replaced in turn
    "LSTM": ("LSTM", {"num_layers": 2, "bidirectional": True}),
    "LSTM-proj": ("LSTM", {"num_layers": 2, "proj_size": 3}),
    "LSTM-peephole-cifg": ("LSTM", {"num_layers": 2, "peephole": True,
                                    "coupled_input_forget": True}),
    "GRU": ("GRU", {"num_layers": 2, "bidirectional": True}),
    "RNN": ("RNN", {"num_layers": 2}),
    "LSTMCell": ("LSTMCell", {}),
    "LSTMCell-peephole": ("LSTMCell", {"peephole": True}),
    "GRUCell": ("GRUCell", {}),
    "RNNCell": ("RNNCell", {}),
}


@pytest.mark.parametrize("case, seq_len", [(case, seq_len) for case in _SHAPE_CASES
                                             for seq_len in ((1,) if "Cell" in case else (1, 5))])
@pytest.mark.parametrize("inference", [False, True], ids=["train", "no-grad"])
def test_parameter_of_another_shape_is_named_with_its_shape(case, seq_len, inference):
    """A parameter replaced by one of another shape is named, with the shape the module's sizes
    give it. The layer checks named the layer API's operands (w_hh[0], "weights[0]") and took
    W_hh's rows as the gate width: a GRU whose weight_hh_l0 had an LSTM's rows was told that
    weight_ih_l0 was wrong."""
    kind, keywords = _SHAPE_CASES[case]
    cell = kind.endswith("Cell")
    x = torch.randn(*((2, 4) if cell else (seq_len, 2, 4)))
    for name, weight in getattr(fusedrnn, kind)(4, 5, **keywords).named_parameters():
        module = getattr(fusedrnn, kind)(4, 5, **keywords)
        wrong = (weight.shape[0] + 1,) + tuple(weight.shape[1:])
        setattr(module, name, nn.Parameter(torch.zeros(wrong)))
        with torch.set_grad_enabled(not inference), pytest.raises(
                RuntimeError, match=re.escape(f"{kind}: {name} must have shape "
                                              f"{list(weight.shape)}")):
            module(x)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("inference", [False, True], ids=["train", "no-grad"])
def test_parameter_of_another_dtype_is_named(kind, inference):
    """A weight of another dtype than the module's first is named with both dtypes (it was
    named w_hh[0], compared with "xproj", an internal operand)."""
    cell = kind.endswith("Cell")
    module = getattr(fusedrnn, kind)(4, 5)
    name = "weight_hh" if cell else "weight_hh_l0"
    setattr(module, name, nn.Parameter(getattr(module, name).detach().double()))
    x = torch.randn(*((2, 4) if cell else (3, 2, 4)))
    with torch.set_grad_enabled(not inference), pytest.raises(
            RuntimeError, match=f"{name} is torch.float64 on cpu but weight_ih"):
        module(x)


@pytest.mark.filterwarnings("ignore:Complex modules are a new feature")
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("inference", [False, True], ids=["train", "no-grad"])
def test_complex_modules_are_refused_naming_the_dtype(kind, inference):
    """torch.nn's CPU modules run complex tensors; fusedrnn's kernels do not, and the refusal
    named an internal operand ("xproj must be float32, float64, float16 or bfloat16")."""
    module = getattr(fusedrnn, kind)(4, 5).to(torch.complex64)
    x = torch.randn(*((2, 4) if kind.endswith("Cell") else (3, 2, 4)), dtype=torch.complex64)
    with torch.set_grad_enabled(not inference), pytest.raises(
            RuntimeError, match=r"fusedrnn runs float32, float64, float16 and bfloat16 tensors, "
                                r"got torch.complex64"):
        module(x)


@requires_native  # (the first call runs the kernels)
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("name", ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"])
@pytest.mark.parametrize("seq_len", [1, 3])
@pytest.mark.parametrize("inference", [False, True], ids=["train", "no-grad"])
def test_a_parameter_whose_storage_was_freed_is_named(kind, name, seq_len, inference):
    """A parameter whose storage was freed (resized to 0, as FSDP does to a sharded one), in a
    module called anyway, also after a cached call: torch.nn's LSTM segfaults in torch's own
    add, and so did fusedrnn's for a bias; now a RuntimeError naming it (review, session 29)."""
    module = getattr(fusedrnn, kind)(4, 5)
    x = torch.randn(seq_len, 2, 4)
    with torch.set_grad_enabled(not inference):
        module(x)
        with torch.no_grad():
            getattr(module, name).untyped_storage().resize_(0)
        with pytest.raises(RuntimeError, match=f"{kind}: {name} has no memory"):
            module(x)
