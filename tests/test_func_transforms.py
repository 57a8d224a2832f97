"""torch.func transforms (grad, jvp, vmap) and forward-mode AD over the modules and cells.

Under them a layer runs as fusedrnn.reference's plain torch ops (_backend.under_transform): the
native recurrence's autograd Functions have no forward-mode formula and are not in the form the
transforms need. grad and jvp are compared with torch.nn's (which supports both on the CPU);
vmap, which torch.nn's RNNs do not support, with a loop of eager calls.
"""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, grad, jvp, vmap

import fusedrnn

from _helpers import assert_close, ramp_loss, requires_native

pytestmark = requires_native

DTYPE = torch.float64
TOLERANCE = 1e-10

CASES = [
    # (id, class name, kwargs, sequence length or None for a cell)
    ("lstm-proj-bidir-L2", "LSTM", dict(num_layers=2, bidirectional=True, proj_size=2), 4),
    ("lstm-one-step", "LSTM", {}, 1),
    ("gru-batch_first", "GRU", dict(batch_first=True), 4),
    ("rnn-relu", "RNN", dict(nonlinearity="relu"), 3),
    ("lstm-cell", "LSTMCell", {}, None),
    ("gru-cell", "GRUCell", {}, None),
]
IDS = [c[0] for c in CASES]


def _pair(cls, kwargs):
    torch.manual_seed(0)
    theirs = getattr(torch.nn, cls)(3, 4, dtype=DTYPE, **kwargs)
    ours = getattr(fusedrnn, cls)(3, 4, dtype=DTYPE, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _input(seq_len, *leading):
    shape = (*leading, 2, 3) if seq_len is None else (*leading, seq_len, 2, 3)
    return torch.randn(*shape, dtype=DTYPE)


def _output(result):
    return result[0] if isinstance(result, tuple) else result


def _loss(module, x):
    return ramp_loss([_output(module(x))])


@pytest.mark.parametrize("name, cls, kwargs, seq_len", CASES, ids=IDS)
def test_grad_matches_torch(name, cls, kwargs, seq_len):
    theirs, ours = _pair(cls, kwargs)
    x = _input(seq_len)
    assert_close(grad(lambda x: _loss(ours, x))(x), grad(lambda x: _loss(theirs, x))(x),
                 TOLERANCE, "torch.func.grad w.r.t. the input")
    params = [{k: v.detach() for k, v in m.named_parameters()} for m in (theirs, ours)]
    expected, actual = (grad(lambda p, m=m: _loss(lambda x: functional_call(m, p, (x,)), x))(p)
                        for m, p in zip((theirs, ours), params))
    for key in expected:
        assert_close(actual[key], expected[key], TOLERANCE, f"torch.func.grad w.r.t. {key}")


@pytest.mark.parametrize("name, cls, kwargs, seq_len", CASES, ids=IDS)
def test_gradient_penalty_matches_torch(name, cls, kwargs, seq_len):
    """Second order through torch.func (eager double backward: test_modules): the gradient wrt
    the parameters of a penalty on the input gradient, grad of grad."""
    theirs, ours = _pair(cls, kwargs)
    x = _input(seq_len)

    def penalty(p, m):
        gx = grad(lambda x: _loss(lambda x: functional_call(m, p, (x,)), x))(x)
        return gx.pow(2).sum()

    params = [{k: v.detach() for k, v in m.named_parameters()} for m in (theirs, ours)]
    expected, actual = (grad(penalty)(p, m) for m, p in zip((theirs, ours), params))
    for key in expected:
        assert_close(actual[key], expected[key], TOLERANCE, f"grad of grad w.r.t. {key}")


@pytest.mark.parametrize("name, cls, kwargs, seq_len", CASES, ids=IDS)
def test_forward_mode_matches_torch(name, cls, kwargs, seq_len):
    theirs, ours = _pair(cls, kwargs)
    x, tangent = _input(seq_len), _input(seq_len)
    expected = jvp(lambda x: _output(theirs(x)), (x,), (tangent,))[1]
    assert_close(jvp(lambda x: _output(ours(x)), (x,), (tangent,))[1], expected, TOLERANCE,
                 "torch.func.jvp")
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, tangent)
        actual = fwAD.unpack_dual(_output(ours(dual))).tangent
    assert_close(actual, expected, TOLERANCE, "forward_ad dual tensors")


@pytest.mark.parametrize("grad_enabled", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("name, cls, kwargs, seq_len", CASES, ids=IDS)
def test_vmap_matches_a_loop(name, cls, kwargs, seq_len, grad_enabled):
    _, ours = _pair(cls, kwargs)
    xs = _input(seq_len, 5)
    with torch.set_grad_enabled(grad_enabled):
        actual = vmap(lambda x: _output(ours(x)))(xs)
        expected = torch.stack([_output(ours(x)) for x in xs])
    assert_close(actual, expected, TOLERANCE, "vmap")


@pytest.mark.parametrize("name, cls, kwargs, seq_len", CASES, ids=IDS)
def test_batched_grads_match_torch(name, cls, kwargs, seq_len):
    """torch.autograd.grad(is_grads_batched=True) and torch.autograd.functional's vectorized
    jacobian run the backward under the legacy vmap, whose gradients have no memory for the
    kernels: the backward takes the recomputation's torch ops there (it raised before)."""
    theirs, ours = _pair(cls, kwargs)
    x = _input(seq_len)
    expected, actual = (torch.autograd.functional.jacobian(lambda a, m=m: _output(m(a)), x,
                                                           vectorize=True)
                        for m in (theirs, ours))
    assert_close(actual, expected, TOLERANCE, "vectorized jacobian")
    leaf = x.clone().requires_grad_()
    out = _output(ours(leaf))
    params = list(ours.parameters())
    grads_out = torch.randn(3, *out.shape, dtype=DTYPE)
    batched = torch.autograd.grad(out, [leaf, *params], grads_out, is_grads_batched=True,
                                  retain_graph=True)
    for i, g in enumerate(grads_out):
        one_by_one = torch.autograd.grad(out, [leaf, *params], g, retain_graph=True)
        for b, o in zip(batched, one_by_one):
            assert_close(b[i], o, TOLERANCE, "is_grads_batched")


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("weights_require_grad", [False, True], ids=["frozen", "trainable"])
def test_compiled_jvp_matches_eager(kind, weights_require_grad):
    """torch.func.jvp inside torch.compile: the layers run as the reference's torch ops there too
    (the custom ops have no forward-mode formula; traced, their tangents came out as zeros,
    silently)."""
    torch.manual_seed(0)
    module = getattr(fusedrnn, kind)(4, 5, num_layers=2, dtype=torch.float64)
    module.requires_grad_(weights_require_grad)
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    tangent = torch.randn_like(x)

    def tangent_of_output(x, tangent):
        return jvp(lambda inp: module(inp)[0], (x,), (tangent,))[1]

    want = tangent_of_output(x, tangent)
    torch._dynamo.reset()
    got = torch.compile(tangent_of_output, backend="aot_eager", fullgraph=True)(x, tangent)
    torch._dynamo.reset()
    assert want.abs().max() > 0
    assert_close(got, want, 1e-12, f"compiled jvp of {kind}")


@pytest.mark.parametrize("name, cls, kwargs, seq_len", [CASES[0], CASES[2], CASES[4]],
                         ids=[IDS[0], IDS[2], IDS[4]])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_grad_and_vmap_match_torch(name, cls, kwargs, seq_len, backend):
    """torch.func.grad, jacrev and vmap inside torch.compile(fullgraph=True): the layers run as
    the reference's torch ops, as eagerly. The parameters handed to grad are detached, so the
    traced call saw no gradient needed and recorded the inference op, which failed in its fake
    kernel; asking for the transform in traced code broke the graph instead (and with the eager
    backend failed in the resumed frame)."""
    theirs, ours = _pair(cls, kwargs)
    x = _input(seq_len)
    params = [{k: v.detach() for k, v in m.named_parameters()} for m in (theirs, ours)]

    def loss_of(module):
        return lambda p, x: _loss(lambda x: functional_call(module, p, (x,)), x)

    def transforms(module, p, x):
        loss = loss_of(module)
        return (grad(loss)(p, x), torch.func.jacrev(loss, argnums=1)(p, x),
                vmap(lambda x: loss(p, x))(torch.stack([x, 2 * x])))

    loss = loss_of(theirs)  # (torch.nn's RNNs have no vmap: a loop)
    expected = (grad(loss)(params[0], x), torch.func.jacrev(loss, argnums=1)(params[0], x),
                torch.stack([loss(params[0], x), loss(params[0], 2 * x)]))
    torch._dynamo.reset()
    actual = torch.compile(transforms, backend=backend, fullgraph=True)(ours, params[1], x)
    torch._dynamo.reset()
    for key in expected[0]:
        assert_close(actual[0][key], expected[0][key], TOLERANCE, f"compiled grad wrt {key}")
    assert_close(actual[1], expected[1], TOLERANCE, "compiled jacrev wrt the input")
    assert_close(actual[2], expected[2], TOLERANCE, "compiled vmap of the loss")
