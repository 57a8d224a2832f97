"""The modules' cached inference plan (python/fusedrnn/_inference.py) never serves stale weights:
after every way a weight can change (in place, with or without a version bump, or by swapping
tensors or memory), a no-grad call must give what torch.nn gives with the same change, and
copies of a module must not share the original's plan."""
import copy
import io
import os
import pickle

import pytest
import torch
from torch import nn
from torch.func import functional_call

import fusedrnn
from fusedrnn import _backend, _inference

from _helpers import TOLERANCE, assert_close, concurrent_mismatches, requires_native

DTYPE = torch.float64
TOL = TOLERANCE[DTYPE]


def make_pair(kind="LSTM", **kwargs):
    kwargs = {"input_size": 3, "hidden_size": 5, "dtype": DTYPE, **kwargs}
    torch.manual_seed(0)
    theirs = getattr(nn, kind)(**kwargs)
    ours = getattr(fusedrnn, kind)(**kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def fresh_input(seed, batch=2, steps=4):
    return torch.randn(steps, batch, 3, dtype=DTYPE,
                       generator=torch.Generator().manual_seed(seed))


def flat(result):
    out, state = result
    return [out, *(state if isinstance(state, tuple) else (state,))]


def check_same(theirs, ours, seed=1, **kwargs):
    """A sequence, then a single step: a call of one step runs as cell steps with weights
    checked once per set of parameters (_inference.one_step_weights), which must not go stale
    either."""
    for steps in (4, 1):
        x = fresh_input(seed, steps=steps)
        with torch.no_grad():
            expected, actual = flat(theirs(x, **kwargs)), flat(ours(x, **kwargs))
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, TOL, f"T={steps} result {i}")


pytestmark = requires_native


@pytest.mark.parametrize("kind,kwargs", [
    ("LSTM", {}), ("GRU", {"num_layers": 2, "bidirectional": True}),
    ("RNN", {"nonlinearity": "relu"}), ("LSTM", {"proj_size": 2, "bidirectional": True}),
])
def test_in_place_updates_are_seen(kind, kwargs):
    theirs, ours = make_pair(kind, **kwargs)
    check_same(theirs, ours)  # builds and caches the plan
    for name in ("weight_hh_l0", "bias_ih_l0", "weight_ih_l0"):
        with torch.no_grad():
            for m in (theirs, ours):
                getattr(m, name).mul_(1.5).add_(0.25)
        check_same(theirs, ours, seed=2)


def test_optimizer_step_is_seen():
    theirs, ours = make_pair()
    check_same(theirs, ours)
    for m in (theirs, ours):
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        out, _ = m(fresh_input(3))
        out.sum().backward()
        opt.step()
    check_same(theirs, ours, seed=4)


@pytest.mark.parametrize("write", ["fused_adam", "data_add", "numpy"])
@pytest.mark.parametrize("kind,kwargs", [("LSTM", {"bidirectional": True}), ("GRU", {})])
def test_writes_without_a_version_bump_are_seen(write, kind, kwargs):
    """Fused optimizers, `p.data` in-place ops and numpy views change values without bumping the
    tensor's version counter: the plan must not hold anything derived from the values."""
    theirs, ours = make_pair(kind, **kwargs)
    check_same(theirs, ours)
    for m in (theirs, ours):
        if write == "fused_adam":
            opt = torch.optim.Adam(m.parameters(), lr=0.1, fused=True)
            out, _ = m(fresh_input(15))
            out.sum().backward()
            opt.step()
        else:
            for p in m.parameters():
                if write == "data_add":
                    p.data.add_(0.5)
                else:
                    p.detach().numpy()[...] *= -1.5
    check_same(theirs, ours, seed=16)


def test_instruction_set_switch_between_calls(monkeypatch):
    """The CPU workspace size depends on the SIMD width (FUSEDRNN_CPU_ISA lowers it)."""
    theirs, ours = make_pair()
    monkeypatch.setenv("FUSEDRNN_CPU_ISA", "generic")
    check_same(theirs, ours)
    monkeypatch.delenv("FUSEDRNN_CPU_ISA")
    check_same(theirs, ours, seed=17)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_thread_split_switch_between_calls(kind, monkeypatch):
    """The CPU workspace size depends on how the threads split the work: threads that take
    rows of the batch each have their own (csrc/cpu/row_groups.h). One plan, called with every
    split and thread count in turn, including the default and torch's own thread count."""
    theirs, ours = make_pair(kind, num_layers=2, bidirectional=True)
    monkeypatch.setenv("FUSEDRNN_CPU_TEST_THREADS", "2")
    for seed, split in enumerate(["units", "rows", "units"]):
        monkeypatch.setenv("FUSEDRNN_CPU_TEST_SPLIT", split)
        check_same(theirs, ours, seed=30 + seed)
    monkeypatch.setenv("FUSEDRNN_CPU_TEST_THREADS", "3")
    check_same(theirs, ours, seed=33)
    monkeypatch.delenv("FUSEDRNN_CPU_TEST_THREADS")
    monkeypatch.delenv("FUSEDRNN_CPU_TEST_SPLIT")
    # A shape the threads take rows of unforced (B=40, enough multiply-adds per step): with one
    # thread, then two, one plan.
    theirs, ours = make_pair(kind, hidden_size=64)
    x = torch.randn(4, 40, 3, dtype=DTYPE)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 1):
            torch.set_num_threads(count)
            with torch.no_grad():
                for a, e in zip(flat(ours(x)), flat(theirs(x))):
                    assert_close(a, e, TOL, f"{count} threads")
    finally:
        torch.set_num_threads(threads)


def test_backend_switch_between_calls(monkeypatch):
    """A cached plan runs on the native module FUSEDRNN_BACKEND picks at each call, and a bad
    value still raises, plan or not."""
    from fusedrnn import _backend
    theirs, ours = make_pair()
    monkeypatch.setenv("FUSEDRNN_BACKEND", "cpu")
    check_same(theirs, ours)
    assert _inference._plans[ours].module is _backend._cpu
    if _backend.HAS_EMU:
        monkeypatch.setenv("FUSEDRNN_BACKEND", "emu")
        check_same(theirs, ours, seed=18)
        assert _inference._plans[ours].module is _backend._emu
    monkeypatch.setenv("FUSEDRNN_BACKEND", "nonsense")
    with torch.no_grad(), pytest.raises(RuntimeError, match="FUSEDRNN_BACKEND"):
        ours(fresh_input(19))
    monkeypatch.setenv("FUSEDRNN_BACKEND", "cpu")
    check_same(theirs, ours, seed=20)


@pytest.mark.parametrize("value", [None, "", "emu", "caf\u00e9", "\udcff"])
def test_env_value_reads_what_os_environ_holds(value, monkeypatch):
    """The fast path reads variables through _backend.env_value: the same answer as
    os.environ.get, for unset, empty, non-ASCII and undecodable values, right after a change."""
    name = "FUSEDRNN_TEST_ENV_VALUE"
    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)
    assert _backend.env_value(name) == os.environ.get(name)


def test_load_state_dict_is_seen():
    theirs, ours = make_pair(num_layers=2)
    check_same(theirs, ours)
    other, _ = make_pair(num_layers=2)
    with torch.no_grad():
        for p in other.parameters():
            p.normal_()
    theirs.load_state_dict(other.state_dict())
    ours.load_state_dict(other.state_dict())
    check_same(theirs, ours, seed=5)


def test_data_assignment_is_seen():
    """`.data =` keeps the Parameter object and its version but moves its storage."""
    theirs, ours = make_pair()
    check_same(theirs, ours)
    new = torch.randn_like(theirs.weight_hh_l0)
    theirs.weight_hh_l0.data = new.clone()
    ours.weight_hh_l0.data = new.clone()
    check_same(theirs, ours, seed=6)


def test_parameter_replacement_is_seen():
    theirs, ours = make_pair("GRU")
    check_same(theirs, ours)
    new = torch.randn_like(theirs.weight_ih_l0)
    theirs.weight_ih_l0 = nn.Parameter(new.clone())
    ours.weight_ih_l0 = nn.Parameter(new.clone())
    check_same(theirs, ours, seed=7)


def test_functional_call_uses_the_given_weights():
    theirs, ours = make_pair()
    check_same(theirs, ours)
    params = {k: torch.randn_like(v) for k, v in theirs.named_parameters()}
    x = fresh_input(8)
    with torch.no_grad():
        expected = flat(functional_call(theirs, params, (x,)))
        actual = flat(functional_call(ours, params, (x,)))
        after = flat(ours(x))  # and the module's own weights again afterwards
        own = flat(theirs(x))
    for a, e in zip(actual + after, expected + own):
        assert_close(a, e, TOL, "functional_call")


def test_deepcopy_and_pickle_do_not_share_the_plan():
    theirs, ours = make_pair(bidirectional=True)
    check_same(theirs, ours)
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        twin = copy.deepcopy(theirs)
        with torch.no_grad():
            for m in (twin, clone):
                m.weight_hh_l0_reverse.mul_(-2.0)
        check_same(twin, clone, seed=9)
        check_same(theirs, ours, seed=9)  # the original is unaffected
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    check_same(theirs, torch.load(buffer, weights_only=False), seed=10)


def test_modules_built_in_inference_mode():
    """Inference tensors (no version counter) changed in place."""
    with torch.inference_mode():
        theirs, ours = make_pair()
        check_same(theirs, ours)
        for m in (theirs, ours):
            m.weight_hh_l0.add_(1.0)
        check_same(theirs, ours, seed=11)


def test_parametrized_weights_take_the_fresh_path():
    theirs, ours = make_pair()
    for m in (theirs, ours):
        torch.nn.utils.parametrize.register_parametrization(m, "weight_hh_l0", _Double())
    check_same(theirs, ours)
    with torch.no_grad():
        for m in (theirs, ours):
            m.parametrizations.weight_hh_l0.original.add_(0.5)
    check_same(theirs, ours, seed=12)


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("name", ["bias_ih", "bias_hh", "weight_ih", "weight_hh"])
@pytest.mark.parametrize("grad", [False, True])
def test_cells_read_parametrized_weights_and_biases(kind, name, grad):
    """A parametrized cell weight or bias is no entry of _parameters: the cells' fast path read
    such a bias as absent and ran without it, silently."""
    torch.manual_seed(0)
    theirs = getattr(nn, kind)(3, 4, dtype=torch.float64)
    ours = getattr(fusedrnn, kind)(3, 4, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())
    for m in (theirs, ours):
        torch.nn.utils.parametrize.register_parametrization(m, name, _Double())
    x = torch.randn(2, 3, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        expected, actual = theirs(x), ours(x)
    if kind != "LSTMCell":
        expected, actual = (expected,), (actual,)
    for e, a in zip(expected, actual):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


def test_mixed_dtypes_fall_back_to_the_full_checks():
    _, ours = make_pair()
    ours.weight_hh_l0.data = ours.weight_hh_l0.data.float()
    with torch.no_grad(), pytest.raises(RuntimeError, match="weight_hh_l0 is torch.float32"):
        ours(fresh_input(13))


def test_plans_do_not_keep_modules_alive():
    import gc
    import weakref
    _, ours = make_pair()
    check_same(*make_pair())
    with torch.no_grad():
        ours(fresh_input(14))
    ref = weakref.ref(ours)
    del ours
    gc.collect()
    assert ref() is None


class _LstmWithInitialState(fusedrnn.LSTM):
    """A subclass with one more parameter: its plan is still cached and still checked."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h_init = nn.Parameter(torch.zeros(1, 1, self.hidden_size, dtype=DTYPE))


def test_subclass_with_extra_parameters_is_cached_and_checked():
    theirs, _ = make_pair()
    ours = _LstmWithInitialState(3, 5, dtype=DTYPE)
    ours.load_state_dict(theirs.state_dict(), strict=False)
    check_same(theirs, ours)
    assert ours in _inference._plans and _inference._plans[ours] is not None
    with torch.no_grad():
        for m in (theirs, ours):
            m.weight_hh_l0.data.mul_(0.5)
    check_same(theirs, ours, seed=18)


class _LstmWithOptionalInitialState(fusedrnn.LSTM):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_parameter("h_init", None)  # torch's idiom for an optional parameter


class _GruWithOptionalInitialState(fusedrnn.GRU):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_parameter("h_init", None)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("seq_len", [1, 4])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_subclass_with_a_parameter_registered_as_none_runs(kind, seq_len, grad):
    """A parameter name registered as None: the plan held every registered value weakly and
    read its address, so each no-grad call (and a one-step call with grad) raised TypeError
    ("cannot create weak reference to 'NoneType' object"; review, session 31)."""
    theirs, _ = make_pair(kind)
    cls = _LstmWithOptionalInitialState if kind == "LSTM" else _GruWithOptionalInitialState
    ours = cls(3, 5, dtype=DTYPE)
    ours.load_state_dict(theirs.state_dict())
    with torch.set_grad_enabled(grad):
        for seed in (3, 4):  # (the second call reuses what the first cached)
            x = fresh_input(seed, steps=seq_len)
            for a, e in zip(flat(ours(x)), flat(theirs(x))):
                assert_close(a, e, TOL, f"{kind} T={seq_len}")


@pytest.mark.parametrize("with_state", [True, False], ids=["hx", "no-hx"])
@pytest.mark.parametrize("kind, kwargs", [
    ("LSTM", {}), ("LSTM", dict(proj_size=3, num_layers=2, bidirectional=True)),
    ("GRU", dict(num_layers=2, bidirectional=True)), ("GRU", dict(bias=False, batch_first=True)),
    ("RNN", dict(nonlinearity="relu", bidirectional=True)), ("RNN", dict(num_layers=2))],
    ids=["lstm", "lstm-proj-2l-bidir", "gru-2l-bidir", "gru-nobias-bf", "relu-bidir", "tanh-2l"])
@pytest.mark.parametrize("batch", [1, 2, 3], ids=["B1", "B2", "B3"])
def test_one_step_sequences_match_torch(kind, kwargs, with_state, batch):
    """T=1 (streaming inference) runs every layer and direction as a cell step (_cell_step),
    whose native pass forms the products at B <= 2 and follows torch's GEMMs at B=3: outputs
    and final states as torch.nn's, after an in-place weight change too."""
    theirs, ours = make_pair(kind, **kwargs)
    batch_first = kwargs.get("batch_first", False)
    num_states = theirs.num_layers * (2 if theirs.bidirectional else 1)
    state = theirs.proj_size or theirs.hidden_size
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, batch, 3, dtype=DTYPE, generator=gen)
    x = x.transpose(0, 1) if batch_first else x
    hx = None
    if with_state:
        h = torch.randn(num_states, batch, state, dtype=DTYPE, generator=gen)
        hx = (h, torch.randn(num_states, batch, 5, dtype=DTYPE, generator=gen)) if kind == "LSTM" else h
    for round_ in range(2):
        with torch.no_grad():
            expected, got = flat(theirs(x, hx)), flat(ours(x, hx))
            for e, g in zip(expected, got):
                assert g.shape == e.shape
                assert_close(g, e, TOL, f"round {round_}")
            for module in (theirs, ours):
                module.weight_hh_l0.mul_(0.5)  # seen by the next call


@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_one_step_with_large_weights(kind, batch, monkeypatch):
    """At B <= 2 with weights past the cell step's own products (H=240 float64: 1.4-1.8 MB), a
    one-step inference call is still a cell step, with torch's GEMMs forming the products: same
    results as torch.nn. (Cell steps are the _cpu backend's, pinned here.)"""
    from fusedrnn import _cell_step
    monkeypatch.setenv("FUSEDRNN_BACKEND", "cpu")
    theirs, ours = make_pair(kind, hidden_size=240)
    x = torch.randn(1, batch, 3, dtype=DTYPE)
    weights = ours._one_step_weights(x, None, None)
    assert weights is not None
    assert not _cell_step.uses_native_products(batch, weights[0][0], weights[0][1])
    with torch.no_grad():
        for e, g in zip(flat(theirs(x)), flat(ours(x))):
            assert_close(g, e, TOL, "one step, large weights")


@pytest.mark.parametrize("seq_len, batch", [(1, 1), (1, 3), (4, 1)])
def test_bias_of_another_dtype_is_refused(seq_len, batch):
    """torch.nn refuses a float32 bias in a float64 LSTM; b_ih + b_hh must not promote it."""
    for module in make_pair("LSTM"):
        module.bias_ih_l0.data = module.bias_ih_l0.data.float()
        ours = isinstance(module, fusedrnn.LSTM)
        with pytest.raises(RuntimeError, match="bias_ih_l0 is torch.float32" if ours else None), \
                torch.no_grad():
            module(torch.randn(seq_len, batch, 3, dtype=DTYPE))


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
@pytest.mark.parametrize("seq_len", [1, 2])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_parameter_of_another_shape_is_refused(kind, seq_len, grad):
    """A parameter replaced by one of another shape is an error, as in torch.nn, on every path
    (the native calls would read past its end)."""
    for module in make_pair(kind):
        module.bias_hh_l0 = nn.Parameter(torch.randn(19, dtype=DTYPE))
        ours = not isinstance(module, nn.RNNBase)
        with pytest.raises(RuntimeError, match="bias_hh_l0 must have shape" if ours else None), \
                torch.set_grad_enabled(grad):
            module(torch.randn(seq_len, 1, 3, dtype=DTYPE))


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
@pytest.mark.parametrize("seq_len", [1, 4])
@pytest.mark.parametrize("how", ["data", "parameter"])
def test_shape_change_after_a_cached_call_is_refused(kind, seq_len, how):
    """The same after a call has cached the module's plan or its checked one-step weights:
    `.data =` keeps the Parameter object, so only the cached memory layout tells the change."""
    for module in make_pair(kind):
        with torch.no_grad():
            module(torch.randn(seq_len, 1, 3, dtype=DTYPE))
        if how == "data":
            module.bias_hh_l0.data = torch.randn(19, dtype=DTYPE)
        else:
            module.bias_hh_l0 = nn.Parameter(torch.randn(19, dtype=DTYPE))
        ours = not isinstance(module, nn.RNNBase)
        with pytest.raises(RuntimeError, match="bias_hh_l0 must have shape" if ours else None), \
                torch.no_grad():
            module(torch.randn(seq_len, 1, 3, dtype=DTYPE))


def test_parametrized_recurrent_weight_one_step():
    """weight_hh_l0 under a parametrization (pruning, weight norm) at T=1, B=1."""
    import torch.nn.utils.parametrize as parametrize

    class Halve(nn.Module):
        def forward(self, w):
            return w * 0.5

    theirs, ours = make_pair("GRU")
    for module in (theirs, ours):
        parametrize.register_parametrization(module, "weight_hh_l0", Halve())
    x = torch.randn(1, 1, 3, dtype=DTYPE)
    with torch.no_grad():
        for e, g in zip(flat(theirs(x)), flat(ours(x))):
            assert_close(g, e, TOL, "parametrized W_hh, one step")


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_frozen_module_with_gradients_enabled_takes_the_plan(kind):
    """Gradients enabled, nothing requiring one (model.requires_grad_(False), no no_grad): an
    inference call, like torch.nn's, through the plan; an input or a state that requires grad
    still gets its graph and gradient."""
    theirs, ours = make_pair(kind)
    theirs.requires_grad_(False)
    ours.requires_grad_(False)
    x = fresh_input(4)
    expected, actual = flat(theirs(x)), flat(ours(x))
    assert ours in _inference._plans
    for a, e in zip(actual, expected):
        assert not a.requires_grad
        assert_close(a, e, TOL, "frozen module")
    for grad_of in ("input", "state"):
        grads = []
        for module in (theirs, ours):
            x = fresh_input(4).requires_grad_(grad_of == "input")
            h0 = torch.zeros(1, 2, 5, dtype=DTYPE, requires_grad=grad_of == "state")
            hx = (h0, torch.zeros(1, 2, 5, dtype=DTYPE)) if kind == "LSTM" else h0
            module(x, hx)[0].sum().backward()
            grads.append(x.grad if grad_of == "input" else h0.grad)
        assert_close(grads[1], grads[0], TOL, f"gradient of the {grad_of}")


def test_frozen_parameters_with_a_trainable_parametrization_keep_the_graph():
    """The plain parameters frozen, a parametrized weight trainable (its original lives in a
    submodule): the output requires grad and the gradient reaches the parametrization."""
    theirs, ours = make_pair("GRU")
    for module in (theirs, ours):
        module.requires_grad_(False)
        torch.nn.utils.parametrizations.weight_norm(module, "weight_hh_l0")
        module.parametrizations.weight_hh_l0.requires_grad_(True)
    x = fresh_input(5)
    grads = []
    for module in (theirs, ours):
        out = module(x)[0]
        assert out.requires_grad
        out.sum().backward()
        grads.append([p.grad for p in module.parametrizations.weight_hh_l0.parameters()])
    for a, e in zip(grads[1], grads[0]):
        assert_close(a, e, TOL, "parametrization gradient")


@pytest.mark.parametrize("seq_len", [1, 5])
def test_frozen_module_with_a_trainable_plain_weight_keeps_the_graph(seq_len):
    """Every parameter frozen, one weight replaced by a plain tensor that requires grad (a hook
    sets base + A @ B, a low-rank adapter): the output requires grad and the gradient reaches
    the adapter, as in torch.nn (the plan, which runs without autograd, must not take it)."""
    theirs, ours = make_pair("LSTM")
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(20, 2, dtype=DTYPE, generator=gen)
    b = torch.randn(2, 5, dtype=DTYPE, generator=gen)
    x = fresh_input(7, steps=seq_len)
    grads = []
    for module in (theirs, ours):
        module.requires_grad_(False)
        base = module.weight_hh_l0.detach().clone()
        del module.weight_hh_l0
        a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
        module.register_forward_pre_hook(
            lambda mod, args, base=base, a_=a_, b_=b_: setattr(mod, "weight_hh_l0", base + a_ @ b_))
        out = module(x)[0]
        assert out.requires_grad
        out.sum().backward()
        grads.append((a_.grad, b_.grad))
    for a_grad, e_grad in zip(grads[1], grads[0]):
        assert_close(a_grad, e_grad, TOL, "adapter gradient")


# --- the input projection's kept block (_projection_buffer) ------------------------------------

PROJECTION_CASES = [
    ("LSTM", dict(num_layers=2), DTYPE),                            # folded biases: mm
    ("GRU", dict(bidirectional=True, batch_first=True), DTYPE),     # b_ih in addmm; strided x
    ("LSTM", dict(proj_size=2, bias=False), DTYPE),
    ("RNN", dict(num_layers=2, bidirectional=True), torch.float32),
    ("LSTM", dict(bidirectional=True), torch.bfloat16),
]


@pytest.mark.parametrize("kind,kwargs,dtype", PROJECTION_CASES,
                         ids=["lstm-L2", "gru-bidir-bf", "lstm-proj-nobias", "rnn-L2-bidir-fp32",
                              "lstm-bidir-bf16"])
def test_kept_projection_block_gives_identical_results(kind, kwargs, dtype, monkeypatch):
    """With the block lent at every size, results are bit-identical to fresh projections, the
    block is kept and reused by the next call, grows for a larger call and serves a smaller one,
    and a call that finds it lent (another thread's) allocates its own."""
    from fusedrnn import _projection_buffer
    _, ours = make_pair(kind, **kwargs)
    ours.to(dtype)
    x_small, x_large = (torch.randn(steps, 2, 3, dtype=torch.float64).to(dtype)
                        for steps in (3, 6))
    if ours.batch_first:
        x_small, x_large = x_small.transpose(0, 1), x_large.transpose(0, 1)
    with torch.no_grad():
        expected = [flat(ours(x)) for x in (x_small, x_large)]
        monkeypatch.setattr(_projection_buffer, "REUSE_MIN_BYTES", 0)
        plan = _inference.plan_for(ours, ours._cell, ours.num_layers,
                                   2 if ours.bidirectional else 1)
        buffer = plan.projection_buffer
        blocks = []
        for x, want in [(x_small, expected[0]), (x_small, expected[0]), (x_large, expected[1]),
                        (x_small, expected[0])]:
            got = flat(ours(x))
            for i, (a, e) in enumerate(zip(got, want)):
                assert torch.equal(a, e), f"result {i}"
            blocks.append(buffer._block.data_ptr())
        assert blocks[0] == blocks[1] and blocks[2] == blocks[3], "the block is kept and reused"
        assert buffer._lock.acquire(blocking=False)  # as if another thread held the block
        try:
            got = flat(ours(x_large))
        finally:
            buffer._lock.release()
        for i, (a, e) in enumerate(zip(got, expected[1])):
            assert torch.equal(a, e), f"result {i} with the block lent elsewhere"


def test_kept_projection_block_across_inference_mode(monkeypatch):
    """A block first lent under torch.inference_mode serves a later call under no_grad, and the
    other way round (an inference tensor cannot be written outside inference mode)."""
    from fusedrnn import _projection_buffer
    monkeypatch.setattr(_projection_buffer, "REUSE_MIN_BYTES", 0)
    for first, then in [(torch.inference_mode, torch.no_grad), (torch.no_grad, torch.inference_mode)]:
        theirs, ours = make_pair("GRU", num_layers=2)
        x = fresh_input(3)
        with first():
            a = flat(ours(x))
        with then():
            b = flat(ours(x))
            expected = flat(theirs(x))
        for got in (a, b):
            for i, (g, e) in enumerate(zip(got, expected)):
                assert_close(g, e, TOL, f"result {i}")


def test_kept_projection_block_with_concurrent_calls(monkeypatch):
    """Threads calling one module at once: one of them holds the block, the others allocate their
    own, and every call returns what a call alone does."""
    from fusedrnn import _projection_buffer
    monkeypatch.setattr(_projection_buffer, "REUSE_MIN_BYTES", 0)
    _, ours = make_pair("LSTM", num_layers=2, bidirectional=True)
    inputs = [fresh_input(seed, batch=seed + 1, steps=3 + seed) for seed in range(4)]
    mismatches = concurrent_mismatches(ours, inputs, calls_per_thread=40)
    assert not mismatches


def test_small_projections_keep_no_block():
    _, ours = make_pair("LSTM")
    with torch.no_grad():
        ours(fresh_input(0))
    plan = _inference.plan_for(ours, "lstm", 1, 1)
    assert plan.projection_buffer._block is None


def test_a_call_that_finds_the_block_lent_projects_the_same_way(monkeypatch):
    """A call whose block another call holds projects into a block of its own the same way
    (_input_projection.project_into): it once took oneDNN's GEMM there where the kept block took
    torch's, and threaded calls then got other bits than alone (4.5e-8 apart; review, session
    29; README: the same bits)."""
    from fusedrnn import _projection_buffer
    if not fusedrnn._input_projection.onednn_available():
        pytest.skip("this torch has no oneDNN linear op")
    monkeypatch.setattr(_projection_buffer, "REUSE_MIN_BYTES", 0)
    monkeypatch.setenv("FUSEDRNN_CPU_GEMM", "onednn")  # the GEMM the other road takes on AMD
    torch.manual_seed(0)
    module = fusedrnn.LSTM(32, 256, num_layers=2)  # (the two GEMMs agreed on smaller sizes)
    x = torch.randn(200, 16, 32)
    with torch.no_grad():
        alone = flat(module(x))
        buffer = _inference.plan_for(module, "lstm", 2, 1).projection_buffer
        assert buffer._lock.acquire(blocking=False)  # as if another thread held the block
        try:
            lent = flat(module(x))
        finally:
            buffer._lock.release()
    for i, (a, e) in enumerate(zip(lent, alone)):
        assert torch.equal(a, e), f"result {i}"


@pytest.mark.parametrize("how", ["plan", "op"])
def test_a_cached_plan_is_not_reused_for_weights_read_otherwise(how):
    """A bfloat16 weight given float16's dtype over the same memory (`.data = w.view(...)`), or
    the op's same tensors under other flags (W_hr read as a peephole weight), ran on the plan
    cached for the first reading: now as for fresh weights (review, session 29)."""
    torch.manual_seed(0)
    if how == "plan":
        module = fusedrnn.LSTM(4, 8).to(torch.bfloat16)
        x = torch.randn(5, 3, 4, dtype=torch.bfloat16)
        with torch.no_grad():
            module(x)
            module.weight_hh_l0.data = module.weight_hh_l0.data.view(torch.float16)
            with pytest.raises(RuntimeError, match="weight_hh_l0 is torch.float16 on cpu but "
                                                   "weight_ih_l0 is torch.bfloat16"):
                module(x)
        return
    w = [torch.randn(16, 2), torch.randn(16, 3), torch.randn(16), torch.randn(16),
         torch.randn(3, 4)]
    x = torch.randn(2, 1, 2)
    torch.ops.fusedrnn.rnn_inference("lstm", x, None, None, w, 1, 1, True, True, False)
    with pytest.raises(ValueError, match="weight shapes do not fit"):
        torch.ops.fusedrnn.rnn_inference("lstm", x, None, None, w, 1, 1, True, False, True)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("seq_len", [1, 3])
def test_a_bias_set_to_none_after_a_cached_call_is_refused(kind, num_layers, seq_len):
    """A plan keeps its parameters weakly: once the bias it was built from is freed, its dead
    reference read None, which "matched" a bias set to None, and the cached GRU plan then failed
    with AttributeError ('NoneType' object has no attribute 'data_ptr') instead of torch.nn's
    TypeError (review, session 30)."""
    for name in ("bias_hh_l0", "bias_ih_l0", f"bias_hh_l{num_layers - 1}"):
        theirs, ours = make_pair(kind, num_layers=num_layers)
        x = torch.randn(seq_len, 2, 3, dtype=DTYPE)
        with torch.no_grad():
            ours(x)
            for m in (theirs, ours):
                setattr(m, name, None)
            with pytest.raises(TypeError):
                theirs(x)
            with pytest.raises(TypeError, match=f"{name} is None, expected a tensor"):
                ours(x)
