"""torch.compile(fullgraph=True) of the modules, training and inference, against the eager module
and torch.nn (outputs and every gradient), and torch.library.opcheck of the custom ops that make
the native recurrence traceable (schema, fake kernels, autograd registration, AOT dispatch).

Compiling costs seconds per configuration even for tiny shapes, so this file keeps few of them:
one per cell, each with the features that change the traced graph (projection, two layers,
bidirectional, batch_first, given or absent states, no bias), and one cell module. The backend is aot_eager: it runs
dynamo, the fake kernels and AOTAutograd's joint forward/backward trace, which is everything the
custom ops have to support; inductor only generates code for the torch ops around them.
"""
import pytest
import torch
from torch import nn

import fusedrnn
from fusedrnn import _layer_recurrence, functional

from _helpers import assert_close, ramp_loss, requires_native

pytestmark = requires_native


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch: no test depends on (or fills up) another's cache of
    compiled frames, which all the modules share through RNNBase.forward."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


TOLERANCE_TORCH = 1e-9    # float64, against torch.nn
TOLERANCE_EAGER = 1e-12   # float64, against the same module run eagerly (same kernels, same GEMMs)

CASES = [
    # (id, torch.nn class, fusedrnn class, kwargs, with initial state)
    ("lstm-proj-bidir-L2", nn.LSTM, fusedrnn.LSTM,
     dict(num_layers=2, bidirectional=True, proj_size=2), True),
    ("gru-batch_first", nn.GRU, fusedrnn.GRU, dict(batch_first=True), True),
    ("rnn-relu-nobias", nn.RNN, fusedrnn.RNN, dict(nonlinearity="relu", bias=False), False),
]


def _modules(torch_cls, ours_cls, kwargs):
    torch.manual_seed(0)
    theirs = torch_cls(3, 4, dtype=torch.float64, **kwargs)
    ours = ours_cls(3, 4, dtype=torch.float64, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _inputs(module, with_state: bool, requires_grad: bool, seq_len: int, batch: int):
    g = torch.Generator().manual_seed(seq_len * 100 + batch)
    shape = (batch, seq_len, 3) if module.batch_first else (seq_len, batch, 3)
    x = torch.randn(shape, dtype=torch.float64, generator=g).requires_grad_(requires_grad)
    if not with_state:
        return x, None, [x]
    num = module.num_layers * (2 if module.bidirectional else 1)
    state = module.proj_size or module.hidden_size
    h0 = torch.randn(num, batch, state, dtype=torch.float64,
                     generator=g).requires_grad_(requires_grad)
    if module.mode != "LSTM":
        return x, h0, [x, h0]
    c0 = torch.randn(num, batch, module.hidden_size, dtype=torch.float64,
                     generator=g).requires_grad_(requires_grad)
    return x, (h0, c0), [x, h0, c0]


def _run(module, params, x, hx, leaves, train: bool):
    """(results, gradients of the input, states and `params`) of one call; no .grad accumulation,
    so the eager and the compiled module can share their parameters."""
    output, state = module(x, hx)
    results = [output, *(state if isinstance(state, tuple) else (state,))]
    if not train:
        return results, []
    return results, torch.autograd.grad(ramp_loss(results), [*leaves, *params])


def _assert_same(actual, expected, tol, what):
    (results_a, grads_a), (results_e, grads_e) = actual, expected
    assert len(results_a) == len(results_e) and len(grads_a) == len(grads_e)
    for i, (a, e) in enumerate(zip(results_a, results_e)):
        assert_close(a, e, tol, f"{what}: result {i}")
    for i, (a, e) in enumerate(zip(grads_a, grads_e)):
        assert_close(a, e, tol, f"{what}: gradient {i}")


@pytest.mark.parametrize("train", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("name, torch_cls, ours_cls, kwargs, with_state", CASES,
                         ids=[c[0] for c in CASES])
def test_compiled_module_matches_eager_and_torch(name, torch_cls, ours_cls, kwargs, with_state,
                                                 train):
    theirs, ours = _modules(torch_cls, ours_cls, kwargs)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    # A second shape recompiles with symbolic sizes (automatic dynamic shapes): the fake kernels
    # then compute with SymInts.
    for seq_len, batch in ((5, 3), (7, 2)):
        x, hx, leaves = _inputs(ours, with_state, train, seq_len, batch)
        with torch.set_grad_enabled(train):
            run_theirs = _run(theirs, list(theirs.parameters()), x, hx, leaves, train)
            run_eager = _run(ours, list(ours.parameters()), x, hx, leaves, train)
            run_compiled = _run(compiled, list(ours.parameters()), x, hx, leaves, train)
        what = f"{name} T={seq_len} B={batch} compiled vs"
        _assert_same(run_compiled, run_eager, TOLERANCE_EAGER, f"{what} eager")
        _assert_same(run_compiled, run_theirs, TOLERANCE_TORCH, f"{what} torch.nn")


@pytest.mark.parametrize("gemm", ["auto", "onednn"])
@pytest.mark.parametrize("kind", ["LSTM", "GRUCell"])
def test_float32_fullgraph_like_the_readme(kind, gemm, monkeypatch):
    """The README's example: a float32 model under torch.compile(fullgraph=True), forward and
    backward. float32 is where the eager path may pick oneDNN for the input GEMM by the CPU
    vendor (read from /proc/cpuinfo, which Dynamo cannot trace): compiling must not get there."""
    monkeypatch.setenv("FUSEDRNN_CPU_GEMM", gemm)
    torch.manual_seed(0)
    ours = getattr(fusedrnn, kind)(3, 4, **({} if "Cell" in kind else dict(num_layers=2,
                                                                          batch_first=True)))
    theirs = getattr(nn, kind)(3, 4, **({} if "Cell" in kind else dict(num_layers=2,
                                                                      batch_first=True)))
    theirs.load_state_dict(ours.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3) if "Cell" in kind else torch.randn(2, 5, 3)
    runs = []
    for module in (theirs, compiled):
        out = module(x)
        out = out[0] if isinstance(out, tuple) else out
        runs.append([out, *torch.autograd.grad(out.sum(), list(module.parameters()))])
    for a, e in zip(*reversed(runs)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_compiled_cell_matches_eager_and_torch():
    """The cells run as sequences of one step (functional.cell_step): the same op."""
    torch.manual_seed(0)
    theirs = nn.LSTMCell(3, 4, dtype=torch.float64)
    ours = fusedrnn.LSTMCell(3, 4, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    x, h, c = (torch.randn(2, size, dtype=torch.float64, requires_grad=True) for size in (3, 4, 4))
    runs = []
    for module in (theirs, ours, compiled):
        results = list(module(x, (h, c)))
        runs.append((results, torch.autograd.grad(ramp_loss(results),
                                                  [x, h, c, *module.parameters()])))
    _assert_same(runs[2], runs[1], TOLERANCE_EAGER, "LSTMCell compiled vs eager")
    _assert_same(runs[2], runs[0], TOLERANCE_TORCH, "LSTMCell compiled vs torch.nn")


# --- the custom ops --------------------------------------------------------------------------------

def _layer_args(cell: str, directions: int, bias: bool, proj: int, states: bool, lengths: bool):
    """layer_forward's arguments for a random layer: T=4, B=3, H=5, float64, requiring grad."""
    torch.manual_seed(0)
    seq_len, batch, hidden = 4, 3, 5
    gates = {"lstm": 4, "gru": 3}.get(cell, 1) * hidden
    state = proj or hidden

    def rand(*shape):
        return (torch.randn(*shape, dtype=torch.float64) * 0.5).requires_grad_()

    w_hh = [rand(gates, state) for _ in range(directions)]
    b_hh = [rand(gates) for _ in range(directions)] if bias else []
    w_hr = [rand(proj, hidden) for _ in range(directions)] if proj else []
    h0 = rand(directions, batch, state) if states else None
    c0 = rand(directions, batch, hidden) if states and cell == "lstm" else None
    seq_lengths = torch.tensor([4, 2, 3]) if lengths else None
    xproj = rand(seq_len, batch, directions * gates)
    return [cell, xproj, h0, c0, w_hh, b_hh, w_hr, [], seq_lengths, True]


OP_CASES = [
    ("lstm-proj-bidir-states-lengths", dict(cell="lstm", directions=2, bias=True, proj=2,
                                            states=True, lengths=True)),
    ("gru", dict(cell="gru", directions=1, bias=True, proj=0, states=False, lengths=False)),
    ("gru-bidir-states-lengths", dict(cell="gru", directions=2, bias=True, proj=0, states=True,
                                      lengths=True)),
    ("rnn_relu-bidir-nobias-states", dict(cell="rnn_relu", directions=2, bias=False, proj=0,
                                          states=True, lengths=False)),
]


@pytest.mark.parametrize("name, case", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_opcheck_layer_ops(name, case):
    args = _layer_args(**case)
    torch.library.opcheck(functional.layer_forward, args)
    # layer_backward on what a forward saved and random output gradients
    cell, xproj, h0, c0, w_hh, b_hh, w_hr, _, lengths, _ = args
    with torch.no_grad():
        out, hn, cn, gates, c_seq, r_seq = functional.layer_forward(*args)
    d_out, d_hn = torch.randn_like(out), torch.randn_like(hn)
    d_cn = torch.randn_like(cn) if cell == "lstm" else None
    # Not differentiable itself (its autograd formula raises): checked on detached inputs.
    w_hh, b_hh, w_hr = ([t.detach() for t in ts] for ts in (w_hh, b_hh, w_hr))
    h0, c0 = (t.detach() if t is not None else None for t in (h0, c0))
    torch.library.opcheck(functional.layer_backward, [
        cell, w_hh, b_hh, w_hr, [], h0, c0, out, gates if gates.numel() else None,
        c_seq if c_seq.numel() else None, d_out, d_hn, d_cn, lengths])


def test_op_gradients_match_eager_and_double_backward_raises():
    """The op's registered backward gives the autograd.Function's gradients, and keeps its
    refusal of double backward (compiled graphs are never differentiated twice; the eager
    Function recomputes instead: test_modules)."""
    args = _layer_args("lstm", directions=2, bias=True, proj=2, states=True, lengths=True)
    cell, xproj, h0, c0, w_hh, b_hh, w_hr, _, lengths, _ = args
    leaves = [xproj, h0, c0, *w_hh, *b_hh, *w_hr]
    out, hn, cn = functional.layer_forward(*args)[:3]
    grads_op = torch.autograd.grad(ramp_loss([out, hn, cn]), leaves, create_graph=True)
    spec = _layer_recurrence._LayerSpec(cell, 2, True, True)
    identity = (xproj, torch.eye(xproj.shape[-1], dtype=xproj.dtype), None)  # xproj's projection
    results = _layer_recurrence._LayerRecurrence.apply(spec, lengths, xproj, h0, c0, identity,
                                                       *w_hh, *b_hh, *w_hr)
    grads_eager = torch.autograd.grad(ramp_loss(results), leaves)
    for i, (a, e) in enumerate(zip(grads_op, grads_eager)):
        assert torch.equal(a.detach(), e), f"gradient {i}"
    with pytest.raises(RuntimeError, match="double backward"):
        grads_op[0].sum().backward(retain_graph=True)
    for i, leaf in enumerate(leaves):  # every route: a missing path would read as no dependence
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(grads_op[0].sum(), leaf, retain_graph=True, allow_unused=True)
            pytest.fail(f"differentiating d_xproj wrt leaf {i} did not raise")


# --- the inference op (fusedrnn::rnn_inference, _compiled_inference.py) --------------------------

def _graph_ops(module, *args, grad: bool):
    """The custom ops of the graph torch.compile records for module(*args) (aot_eager after
    recording)."""
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    compiled = torch.compile(module, fullgraph=True, backend=backend)
    with torch.set_grad_enabled(grad):
        compiled(*args)
    return [op for op in seen if op.startswith("fusedrnn.")], compiled


INFERENCE_CASES = [
    # (id, class, kwargs, T): one op per call for every feature the plan takes
    ("lstm-peephole-L2-bidir", fusedrnn.LSTM, dict(num_layers=2, bidirectional=True,
                                                   peephole=True), 5),
    ("lstm-cifg-proj", fusedrnn.LSTM, dict(coupled_input_forget=True, proj_size=2), 4),
    ("gru-batch_first-T1", fusedrnn.GRU, dict(batch_first=True, num_layers=2), 1),
    ("rnn-tanh-bidir-T1", fusedrnn.RNN, dict(bidirectional=True), 1),
]


@pytest.mark.parametrize("name, cls, kwargs, seq_len", INFERENCE_CASES,
                         ids=[c[0] for c in INFERENCE_CASES])
def test_compiled_inference_is_one_op_and_matches_eager(name, cls, kwargs, seq_len):
    """Without gradients a compiled stack is ONE fusedrnn::rnn_inference (the eager fast path:
    the inference plan, or cell steps at T=1), equal to the eager module in float64; with
    gradients it stays the layer ops, whose backward AOTAutograd records."""
    torch.manual_seed(0)
    module = cls(3, 4, dtype=torch.float64, **kwargs)
    batch_first = kwargs.get("batch_first", False)
    x = torch.randn((2, seq_len, 3) if batch_first else (seq_len, 2, 3), dtype=torch.float64)
    ops, compiled = _graph_ops(module, x, grad=False)
    assert ops == ["fusedrnn.rnn_inference.default"], ops
    with torch.no_grad():
        got, want = compiled(x), module(x)
    for a, e in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        assert_close(a, e, TOLERANCE_EAGER, name)
    torch._dynamo.reset()
    ops, _ = _graph_ops(module, x, grad=True)
    assert "fusedrnn.layer_forward.default" in ops and "fusedrnn.rnn_inference.default" not in ops


def test_compiled_inference_follows_weight_updates_and_new_weights():
    """The op reuses a plan made for the same weight tensors at the same memory, which reads the
    weights' current values: an in-place update is seen; new tensors (.to) get a new plan."""
    torch.manual_seed(0)
    module = fusedrnn.LSTM(3, 4, num_layers=2, dtype=torch.float64)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        compiled(x)
        for p in module.parameters():
            p.mul_(0.5)
        assert_close(compiled(x)[0], module(x)[0], TOLERANCE_EAGER, "after an in-place update")
        module.to(torch.float32)
        x32 = x.float()
        torch.testing.assert_close(compiled(x32)[0], module(x32)[0], rtol=0, atol=0)


@requires_native
def test_compiled_functional_rnn_takes_a_peephole_entry_of_none():
    """functional.rnn reads a sixth layer-weights entry of None as "no peephole weights", and
    so did its eager path; the compiled inference op counted the entry as peephole weights and
    raised "expected 1 x 5 weights ... got 4" (review, session 31)."""
    torch.manual_seed(0)
    module = fusedrnn.LSTM(3, 4, dtype=torch.float64)
    weights = [(*layer, None) for layer in module._layer_weights()]
    x = torch.randn(5, 2, 3, dtype=torch.float64)

    def run(x):
        return functional.rnn("lstm", x, weights)

    with torch.no_grad():
        want = run(x)
        got = torch.compile(run, fullgraph=True, backend="eager")(x)
    for a, e in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        assert_close(a, e, TOLERANCE_EAGER, "compiled")


def test_opcheck_inference_op_and_its_errors():
    torch.manual_seed(0)
    module = fusedrnn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2,
                           dtype=torch.float64)
    # (Detached: the op runs only where no gradient is needed; its backward raises.)
    weights = [w.detach() for layer in module._layer_weights() for w in layer if w is not None]
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    h0 = torch.randn(4, 2, 2, dtype=torch.float64)
    c0 = torch.randn(4, 2, 4, dtype=torch.float64)
    args = ["lstm", x, h0, c0, weights, 2, 2, True, True, False]
    torch.library.opcheck(torch.ops.fusedrnn.rnn_inference, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_static", "test_aot_dispatch_dynamic"))
    out, h_n, c_n = torch.ops.fusedrnn.rnn_inference(*args)
    want = module(x, (h0, c0))
    assert_close(out, want[0], TOLERANCE_EAGER, "output")
    assert_close(c_n, want[1][1], TOLERANCE_EAGER, "c_n")
    bad = [
        (dict(h0=torch.randn(4, 3, 2, dtype=torch.float64)), "h0 must be"),
        (dict(weights=weights[:-1]), "expected 4 x 5 weights"),
        (dict(x=torch.randn(5, 2, 6, dtype=torch.float64)), "x must be"),
        (dict(x=x.float()), "x must be"),
        (dict(x=x[:, :0]), "empty sizes"),
        # the second layer's w_ih (after 2 x 5 weights of the first layer), one column short
        (dict(weights=[*weights[:10], weights[10][:, :-1], *weights[11:]]),
         "weight shapes do not fit"),
        (dict(weights=[*weights[:-1], weights[-1].float()]), "every weight must have"),
        (dict(cell="gru"), "has no projection"),
    ]
    names = ["cell", "x", "h0", "c0", "weights"]
    for change, message in bad:
        call = list(args)
        for key, value in change.items():
            call[names.index(key)] = value
        with pytest.raises(ValueError, match=message):
            torch.ops.fusedrnn.rnn_inference(*call)
    # Called where a gradient is needed (functional.rnn never does so), its backward says why.
    live = [w for layer in module._layer_weights() for w in layer if w is not None]
    out = torch.ops.fusedrnn.rnn_inference("lstm", x, h0, c0, live, 2, 2, True, True, False)[0]
    with pytest.raises(RuntimeError, match="has no backward"):
        out.sum().backward()


def test_compiled_inference_keeps_no_weights_alive():
    """The op's plans are found by the weight tensors, and go with them: a compiled module that is
    deleted frees its weights (a plan that held them kept every model ever run alive)."""
    import gc
    import weakref
    from fusedrnn import _compiled_inference
    refs = []
    for _ in range(2):
        module = fusedrnn.LSTM(3, 4, num_layers=2)
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            compiled(torch.randn(5, 2, 3))
            compiled(torch.randn(5, 2, 3))
        refs.append(weakref.ref(module.weight_ih_l0))
        del module, compiled
        torch._dynamo.reset()
    gc.collect()
    assert [r() for r in refs] == [None, None]
    assert len(_compiled_inference._plans) == 0


def test_compiled_inference_under_autocast_keeps_the_autocast_dtype():
    """Under autocast the layer ops run in the autocast dtype (functional.rnn's casts), as
    eagerly: the inference op, whose plan takes other dtypes, is not used there."""
    torch.manual_seed(0)
    module = fusedrnn.LSTM(3, 4)
    x = torch.randn(5, 2, 3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ops, compiled = _graph_ops(module, x, grad=False)
        got, want = compiled(x)[0], module(x)[0]
    assert "fusedrnn.rnn_inference.default" not in ops
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@requires_native
@pytest.mark.parametrize("kind, seq_len", [("GRU", 5), ("LSTM", 4), ("LSTMCell", None)])
def test_compiled_create_graph_over_an_eager_graph(kind, seq_len):
    """A compiled helper that takes torch.autograd.grad(..., create_graph=True) of a loss whose
    graph was recorded eagerly (a MAML inner step, a gradient penalty, a Hessian-vector
    product): Dynamo traced the eager layer's backward, whose recomputation then gave zero
    gradients for x and W_ih, silently. The backward now runs eagerly."""
    torch._dynamo.reset()

    @torch.compile(backend="aot_eager")
    def grads_with_graph(loss, inputs):
        return torch.autograd.grad(loss, inputs, create_graph=True)

    torch.manual_seed(0)
    theirs = getattr(nn, kind)(3, 4, dtype=torch.float64)
    ours = getattr(fusedrnn, kind)(3, 4, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())
    x0 = torch.randn(*((seq_len,) if seq_len else ()), 2, 3, dtype=torch.float64)
    results = []
    for module in (theirs, ours):
        x = x0.clone().requires_grad_()
        out = module(x)[0]
        grads = grads_with_graph(out.sin().sum(), [x, *module.parameters()])
        penalty = sum(g.square().sum() for g in grads)
        second = torch.autograd.grad(penalty, list(module.parameters()))
        results.append((*grads, *second))
    for i, (e, a) in enumerate(zip(*results)):
        assert_close(a, e, 1e-10, f"gradient {i}")


@requires_native
@pytest.mark.parametrize("kind, seq_len", [("LSTM", 4), ("GRU", 1), ("GRUCell", None)])
def test_gradient_penalty_compiled_whole_with_the_eager_backend_raises(kind, seq_len):
    """A gradient penalty compiled as a whole with Dynamo's eager backend: the compiled graph
    holds the layer op, and its registered backward, called by the torch.autograd.grad inside
    the compiled function, was traced by Dynamo, so it skipped the tag that refuses double
    backward and the penalty's recurrent second-order terms were dropped silently (d loss/d W_hh
    came back as d score/d W_hh). It now raises, as under aot_eager and inductor."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = getattr(fusedrnn, kind)(3, 4, dtype=torch.float64)
    x0 = torch.randn(*((seq_len,) if seq_len else ()), 2, 3, dtype=torch.float64)

    @torch.compile(backend="eager")
    def critic_loss(x):
        x = x.clone().requires_grad_()
        out = module(x)
        score = (out[0] if isinstance(out, tuple) else out).sin().sum()
        grad_x, = torch.autograd.grad(score, x, create_graph=True)
        return score + grad_x.square().sum()

    loss = critic_loss(x0)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, [p for n, p in module.named_parameters() if "weight_hh" in n])


@requires_native
def test_fullgraph_checkpoint_of_a_module_never_called():
    """torch.utils.checkpoint under fullgraph refuses side effects in its forward: the modules
    used to cache their weight names at their first call, so a fresh module failed there."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = fusedrnn.LSTM(3, 4, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    loss = torch.compile(lambda x: torch.utils.checkpoint.checkpoint(
        module, x, use_reentrant=False)[0].sum(), fullgraph=True, backend="aot_eager")(x)
    loss.backward()
    compiled = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    module(x)[0].sum().backward()
    for c, e in zip(compiled, (p.grad for p in module.parameters())):
        assert_close(c, e, 1e-12, "checkpointed gradient")
