"""Shared test tools.

- Comparing fusedrnn modules with their torch.nn twins: a `Case` describes one configuration;
  `compare_with_torch` builds both modules with the same weights, feeds both the same random input
  (padded or packed, sorted or not) and initial state, backpropagates the same random projection
  of every result, and compares outputs, final states and every parameter, input and state
  gradient.
- Driving the native recurrence of one layer directly (kernel-level tests): `run_forward_layer` /
  `run_backward_layer` call `_backend.forward_layer` / `backward_layer`, the calls the modules
  make, on NaN-poisoned outputs; `minimal_fwd_params` / `minimal_bwd_params` build a valid
  FwdParams / BwdParams of any native module by hand for the bad-parameter and plan tests.
- `assert_second_derivatives_match`: double backward (a gradient penalty) against torch.nn's.
"""
from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fusedrnn
from fusedrnn import _backend

TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5}
# The half types' (and float32's) unit roundoff: low-precision bars are twice torch.nn's own
# error in that dtype plus two of these (torch's error on one draw can be ~0).
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24}


def native_available() -> bool:
    from fusedrnn import _backend
    if not _backend.HAS_CPU and os.environ.get("FUSEDRNN_REQUIRE_NATIVE", "") not in ("", "0"):
        # CI sets this so that a broken build fails loudly instead of skipping every native test.
        raise RuntimeError("FUSEDRNN_REQUIRE_NATIVE is set but fusedrnn._cpu cannot be imported")
    return _backend.HAS_CPU


requires_native = pytest.mark.skipif(
    not native_available(), reason="fusedrnn._cpu is not built (build the _cpu target)")


def use_backend(name: str, monkeypatch) -> None:
    """Routes the modules' recurrence through `name` ('cpu' or 'emu') for one test (a test
    parametrized by name where the `backend` fixture's cuda does not apply); skips 'emu' where
    fusedrnn._emu is not built."""
    if name == "emu":
        if not _backend.HAS_EMU:
            pytest.skip("fusedrnn._emu is not built (configure with -DFUSEDRNN_EMU=ON)")
        monkeypatch.setenv("FUSEDRNN_BACKEND", "emu")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; NaN anywhere never passes."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(actual).all():
        return float("inf")
    scale = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff


def assert_close(actual, expected, tol: float, what: str) -> None:
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.1g}"


def ramp_loss(results) -> torch.Tensor:
    """A scalar that weighs every element of every result by a different fixed value (a ramp from
    -1 to 1), so its gradient reaches every output element with a distinct weight."""
    return sum((r * torch.linspace(-1, 1, r.numel(), dtype=r.dtype, device=r.device).view_as(r))
               .sum() for r in results)


def assert_runs_close(expected_run, actual_run, tol: float, what: str = "") -> None:
    """Compares two runs, each (results, gradients), element by element."""
    (results_e, grads_e), (results_a, grads_a) = expected_run, actual_run
    for name, actual, expected in (("result", results_a, results_e),
                                   ("gradient", grads_a, grads_e)):
        assert len(actual) == len(expected), f"{what}{name}s: {len(actual)} != {len(expected)}"
        for a, e in zip(actual, expected):
            assert_close(a, e, tol, what + name)


# --- configurations -------------------------------------------------------------------------------

CELL_VARIANTS = ("lstm", "lstm_proj", "gru", "rnn_tanh", "rnn_relu")
PACKING = ("padded", "packed_sorted", "packed_unsorted")


@dataclass(frozen=True)
class Case:
    cell: str = "lstm"           # one of CELL_VARIANTS
    layers: int = 1
    bidirectional: bool = False
    batch_first: bool = False
    bias: bool = True
    packing: str = "padded"      # one of PACKING
    hx: bool = False             # pass an initial state
    seq_len: int = 5
    batch: int = 3
    hidden: int = 7
    input_size: int = 4
    dtype: torch.dtype = torch.float64
    device: str = "cpu"

    @property
    def id(self) -> str:
        parts = [self.cell.replace("_", "-"), f"L{self.layers}"]
        parts += ["bidir"] if self.bidirectional else []
        parts += ["bf"] if self.batch_first else []
        parts += [] if self.bias else ["nobias"]
        parts += [] if self.packing == "padded" else [self.packing.replace("_", "-")]
        parts += ["hx"] if self.hx else []
        parts += [f"T{self.seq_len}", f"B{self.batch}", f"H{self.hidden}"]
        parts += ["fp64" if self.dtype == torch.float64 else "fp32"]
        parts += [] if self.device == "cpu" else [self.device]
        return "-".join(parts)

    @property
    def proj_size(self) -> int:
        return max(1, self.hidden // 2) if self.cell == "lstm_proj" else 0


def make_modules(case: Case, seed: int = 0):
    """(torch.nn module, fusedrnn module) with identical weights."""
    kwargs = dict(num_layers=case.layers, bias=case.bias, batch_first=case.batch_first,
                  bidirectional=case.bidirectional, dtype=case.dtype)
    if case.cell.startswith("lstm"):
        kwargs["proj_size"] = case.proj_size
        pair = nn.LSTM, fusedrnn.LSTM
    elif case.cell == "gru":
        pair = nn.GRU, fusedrnn.GRU
    else:
        kwargs["nonlinearity"] = case.cell.split("_")[1]
        pair = nn.RNN, fusedrnn.RNN
    torch.manual_seed(seed)
    ours = pair[1](case.input_size, case.hidden, **kwargs)
    theirs = pair[0](case.input_size, case.hidden, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    return theirs.to(case.device), ours.to(case.device)


def make_lengths(case: Case, generator: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(1, case.seq_len + 1, (case.batch,), generator=generator)
    lengths[torch.randint(0, case.batch, (1,), generator=generator)] = case.seq_len
    if case.packing == "packed_sorted":
        lengths = lengths.sort(descending=True).values
    return lengths


@dataclass
class Inputs:
    input: object                 # tensor or PackedSequence, what the modules receive
    leaf: torch.Tensor            # the tensor whose gradient is compared (x or packed data)
    hx: object                    # None, tensor or (h, c)
    hx_leaves: tuple


def make_inputs(case: Case, seed: int = 1) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    shape = ((case.batch, case.seq_len) if case.batch_first else (case.seq_len, case.batch))
    x = torch.randn(*shape, case.input_size, generator=g, dtype=case.dtype).to(case.device)
    if case.packing == "padded":
        leaf = x.requires_grad_()
        inp = leaf
    else:
        packed = pack_padded_sequence(x, make_lengths(case, g), batch_first=case.batch_first,
                                      enforce_sorted=case.packing == "packed_sorted")
        leaf = packed.data.clone().requires_grad_()
        inp = PackedSequence(leaf, packed.batch_sizes, packed.sorted_indices,
                             packed.unsorted_indices)
    hx, leaves = None, ()
    if case.hx:
        num = case.layers * (2 if case.bidirectional else 1)
        state = case.proj_size or case.hidden
        h = torch.randn(num, case.batch, state, generator=g, dtype=case.dtype)
        h = h.to(case.device).requires_grad_()
        leaves = (h,)
        hx = h
        if case.cell.startswith("lstm"):
            c = torch.randn(num, case.batch, case.hidden, generator=g, dtype=case.dtype)
            c = c.to(case.device).requires_grad_()
            leaves, hx = (h, c), (h, c)
    return Inputs(inp, leaf, hx, leaves)


def flat_results(output, state) -> list:
    out = output.data if isinstance(output, PackedSequence) else output
    states = list(state) if isinstance(state, tuple) else [state]
    return [out] + states


def concurrent_mismatches(module, inputs: list, calls_per_thread: int, threads: int = 4) -> list:
    """Python threads calling module(x) for the inputs at once, under no_grad, each starting at
    another input: the indices of the inputs whose output differed from a call alone (bit for
    bit), once per differing call."""
    import threading
    with torch.no_grad():
        alone = [module(x)[0] for x in inputs]
    mismatches = []

    def calls(first):
        with torch.no_grad():
            for i in range(calls_per_thread):
                k = (first + i) % len(inputs)
                if not torch.equal(module(inputs[k])[0], alone[k]):
                    mismatches.append(k)

    workers = [threading.Thread(target=calls, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return mismatches


def run_module(module, inputs: Inputs, seed: int = 2):
    """Forward, then backward of a fixed random projection of every result.
    Returns (results, gradients by name)."""
    for leaf in (inputs.leaf, *inputs.hx_leaves):
        leaf.grad = None
    module.zero_grad()
    output, state = module(inputs.input, inputs.hx)
    results = flat_results(output, state)
    g = torch.Generator().manual_seed(seed)
    loss = sum((r * torch.randn(r.shape, generator=g, dtype=r.dtype).to(r.device)).sum()
               for r in results)
    loss.backward()
    grads = {"input": inputs.leaf.grad}
    for i, leaf in enumerate(inputs.hx_leaves):
        grads[f"hx[{i}]"] = leaf.grad
    for name, p in module.named_parameters():
        grads[name] = p.grad
    return [r.detach() for r in results], grads, output


def compare_with_torch(case: Case) -> None:
    theirs, ours = make_modules(case)
    inputs = make_inputs(case)
    # On a GPU torch.nn runs float32 RNNs in TF32 by default (torch.backends.cudnn.allow_tf32), with
    # errors near 3e-4 against float64: the yardstick here is true float32, which fusedrnn computes.
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
        expected, expected_grads, expected_out = run_module(theirs, inputs)
    actual, actual_grads, actual_out = run_module(ours, inputs)
    tol = TOLERANCE[case.dtype]
    names = ["output", "h_n", "c_n"]
    for name, a, e in zip(names, actual, expected):
        assert a.dtype == e.dtype, f"{name}: dtype {a.dtype} != {e.dtype}"
        assert_close(a, e, tol, name)
    if isinstance(expected_out, PackedSequence):
        assert torch.equal(actual_out.batch_sizes, expected_out.batch_sizes)
        for attr in ("sorted_indices", "unsorted_indices"):
            a, e = getattr(actual_out, attr), getattr(expected_out, attr)
            assert (a is None) == (e is None) and (a is None or torch.equal(a, e)), attr
    assert expected_grads.keys() == actual_grads.keys()
    for name, e in expected_grads.items():
        a = actual_grads[name]
        assert a is not None, f"no gradient for {name}"
        assert_close(a, e, tol, f"grad {name}")


# --- covering designs -----------------------------------------------------------------------------

def covering_design(factors: dict, strength: int = 2, seed: int = 0) -> list[dict]:
    """A small set of rows such that every combination of `strength` factor values appears in
    at least one row (greedy construction, deterministic for a seed)."""
    names = list(factors)
    rng = random.Random(seed)
    uncovered = set()
    for combo in itertools.combinations(range(len(names)), strength):
        for values in itertools.product(*(range(len(factors[names[i]])) for i in combo)):
            uncovered.add((combo, values))
    rows = []
    while uncovered:
        best, best_gain = None, -1
        for _ in range(8):  # candidates: each starts from an uncovered combination
            combo, values = rng.choice(sorted(uncovered))
            row = [rng.randrange(len(factors[n])) for n in names]
            for i, v in zip(combo, values):
                row[i] = v
            # improve the free positions one at a time
            for i in rng.sample(range(len(names)), len(names)):
                if i in combo:
                    continue
                scores = []
                for v in range(len(factors[names[i]])):
                    row[i] = v
                    scores.append(_gain(row, uncovered, strength))
                row[i] = max(range(len(scores)), key=scores.__getitem__)
            gain = _gain(row, uncovered, strength)
            if gain > best_gain:
                best, best_gain = list(row), gain
        rows.append(best)
        for combo in itertools.combinations(range(len(names)), strength):
            uncovered.discard((combo, tuple(best[i] for i in combo)))
    return [{n: factors[n][v] for n, v in zip(names, row)} for row in rows]


def _gain(row, uncovered, strength) -> int:
    return sum(((combo, tuple(row[i] for i in combo)) in uncovered)
               for combo in itertools.combinations(range(len(row)), strength))


# --- the native recurrence of one layer (kernel-level tests) --------------------------------------
#
# The layouts are those of _backend.forward_layer / backward_layer: direction d of a [T, B, D*X]
# sequence is its d-th block of X columns, of a state or saved tensor its index d along dim 0; a
# layer has 1 or 2 directions and direction 1 runs reversed.

def column_block(t: torch.Tensor, d: int, num_dirs: int) -> torch.Tensor:
    """Direction d of a [T, B, D*X] sequence: a view of its d-th block of columns."""
    width = t.shape[-1] // num_dirs
    return t[..., d * width:(d + 1) * width]


def _nan(like: torch.Tensor, *shape) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)


@dataclass
class LayerRun:
    """What run_forward_layer passed to and got from the native forward (outputs NaN-poisoned
    before the call); run_backward_layer reads it."""
    cell: str
    xproj: torch.Tensor             # [T, B, D*G*H]
    w_hh: list                      # D tensors [G*H, P]
    b_hh: list                      # D tensors [G*H] or Nones
    w_hr: list                      # D tensors [P, H] (projected LSTM) or Nones
    h0: Optional[torch.Tensor]      # [D, B, P]
    c0: Optional[torch.Tensor]      # [D, B, H] (LSTM)
    lengths: Optional[torch.Tensor]
    out: torch.Tensor               # [T, B, D*P]
    hn: torch.Tensor                # [D, B, P]
    cn: Optional[torch.Tensor]      # [D, B, H] (LSTM)
    gates: Optional[torch.Tensor]   # [D, T, B, S*H], S saved gates (training LSTM and GRU)
    c_seq: Optional[torch.Tensor]   # [D, T, B, H] (training LSTM)
    r_seq: Optional[torch.Tensor]   # [D, T, B, H] (training projected LSTM)
    peephole: list = field(default_factory=list)  # D tensors [3, H] or empty

    @property
    def num_dirs(self) -> int:
        return len(self.w_hh)


@dataclass
class LayerGrads:
    """The outputs of one native backward call (NaN-poisoned before the call)."""
    d_xproj: torch.Tensor            # [T, B, D*G*H]
    d_hproj: Optional[torch.Tensor]  # [T, B, D*G*H] (GRU)
    d_h_seq: Optional[torch.Tensor]  # [D, T, B, P] (projected LSTM)
    d_h0: torch.Tensor               # [D, B, P]
    d_c0: Optional[torch.Tensor]     # [D, B, H] (LSTM)


def run_forward_layer(cell: str, xproj, w_hh, b_hh, w_hr, h0=None, c0=None, lengths=None, *,
                      training: bool = True, out: Optional[torch.Tensor] = None,
                      peephole=()) -> LayerRun:
    """One native forward call for the 1 or 2 directions of a layer (the lists w_hh, b_hh, w_hr
    and, for a peephole LSTM, peephole have one entry per direction). Without `training` the
    saved tensors are not asked for (inference). `out` [T, B, D*P] may be given to choose its
    storage (strides); it is poisoned."""
    num_dirs, lstm = len(w_hh), cell in _backend.LSTM_CELLS
    seq_len, batch = xproj.shape[0], xproj.shape[1]
    hidden = xproj.shape[2] // num_dirs // _backend.GATE_COUNT[cell]
    state = w_hh[0].shape[1]
    saved_gates = _backend.SAVED_GATE_COUNT[cell] if training else 0
    if out is None:
        out = _nan(xproj, seq_len, batch, num_dirs * state)
    out.fill_(float("nan"))
    run = LayerRun(
        cell, xproj, list(w_hh), list(b_hh), list(w_hr), h0, c0, lengths, out,
        hn=_nan(xproj, num_dirs, batch, state),
        cn=_nan(xproj, num_dirs, batch, hidden) if lstm else None,
        gates=_nan(xproj, num_dirs, seq_len, batch, saved_gates * hidden) if saved_gates else None,
        c_seq=_nan(xproj, num_dirs, seq_len, batch, hidden) if training and lstm else None,
        r_seq=(_nan(xproj, num_dirs, seq_len, batch, hidden)
               if training and w_hr[0] is not None else None),
        peephole=list(peephole))
    _backend.forward_layer(cell, xproj, run.w_hh, run.b_hh, run.w_hr, h0, c0, out, run.hn,
                           run.cn, run.gates, run.c_seq, run.r_seq, lengths, run.peephole)
    return run


def run_backward_layer(run: LayerRun, d_out, d_hn, d_cn, *,
                       d_xproj: Optional[torch.Tensor] = None) -> LayerGrads:
    """One native backward call for the layer of a training run_forward_layer. d_out [T, B, D*P],
    d_hn [D, B, P] and d_cn [D, B, H] may be None (zero gradients). `d_xproj` [T, B, D*G*H] may be
    given to choose its storage; it is poisoned."""
    num_dirs, lstm = run.num_dirs, run.cell in _backend.LSTM_CELLS
    seq_len, batch, width = run.xproj.shape
    state, hidden = run.w_hh[0].shape[1], width // num_dirs // _backend.GATE_COUNT[run.cell]
    if d_xproj is None:
        d_xproj = _nan(run.xproj, seq_len, batch, width)
    d_xproj.fill_(float("nan"))
    grads = LayerGrads(
        d_xproj,
        d_hproj=_nan(run.xproj, seq_len, batch, width) if run.cell == "gru" else None,
        d_h_seq=(_nan(run.xproj, num_dirs, seq_len, batch, state)
                 if run.w_hr[0] is not None else None),
        d_h0=_nan(run.xproj, num_dirs, batch, state),
        d_c0=_nan(run.xproj, num_dirs, batch, hidden) if lstm else None)
    _backend.backward_layer(run.cell, run.w_hh, run.b_hh, run.w_hr, run.h0, run.c0, run.out,
                            run.gates, run.c_seq, d_out, d_hn, d_cn, grads.d_xproj,
                            grads.d_hproj, grads.d_h_seq, grads.d_h0, grads.d_c0, run.lengths,
                            run.peephole)
    return grads


def minimal_fwd_params(module, cell: str = "lstm", T: int = 2, B: int = 2, H: int = 3,
                       P: Optional[int] = None, dtype: torch.dtype = torch.float32,
                       directions: int = 1):
    """FwdParams of the native `module` (_cpu, _emu, _cuda) for a small valid forward, built
    field by field as a bad-parameter test needs them: the required pointers point at host
    buffers kept alive in the returned dict, optional ones are null, one thread. Returns
    ([FwdParams per direction], buffers); direction 1 is reversed and shares direction 0's
    buffers (enough for the workspace and launch-plan queries, not for running it)."""
    P = P or H
    G = _backend.GATE_COUNT[cell]
    keep = dict(xproj=torch.randn(T, B, G * H).to(dtype), w_hh=torch.randn(G * H, P).to(dtype),
                out=torch.full((T, B, P), float("nan"), dtype=dtype),
                hn=torch.full((B, P), float("nan"), dtype=dtype),
                cn=torch.full((B, H), float("nan"), dtype=dtype), w_hr=torch.randn(P, H).to(dtype))
    params = []
    for d in range(directions):
        p = module.FwdParams()
        p.cell, p.dtype = _backend.CELL_CODES[cell], _backend.DTYPE_CODES[dtype]
        p.seq_len, p.batch, p.hidden, p.state = T, B, H, P
        p.reverse = d == 1
        p.xproj = (keep["xproj"].data_ptr(), B * G * H, G * H)
        p.w_hh = keep["w_hh"].data_ptr()
        p.out = (keep["out"].data_ptr(), B * P, P)
        p.hn = keep["hn"].data_ptr()
        if cell == "lstm":
            p.cn = keep["cn"].data_ptr()
        if P != H:
            p.w_hr = keep["w_hr"].data_ptr()
        p.num_threads = 1
        params.append(p)
    return params, keep


def minimal_bwd_params(module, cell: str = "lstm", T: int = 2, B: int = 2, H: int = 3,
                       P: Optional[int] = None, dtype: torch.dtype = torch.float32):
    """The backward twin of minimal_fwd_params, one direction: BwdParams whose required pointers
    point at host buffers kept alive in the returned dict (every sequence shares one [T, B, G*H]
    buffer: enough for the workspace and launch-plan queries, not for running it)."""
    P = P or H
    G = _backend.GATE_COUNT[cell]
    keep = dict(w_hh=torch.zeros(G * H, P, dtype=dtype), w_hr=torch.zeros(P, H, dtype=dtype),
                seq=torch.zeros(T, B, G * H, dtype=dtype), d_h0=torch.zeros(B, P, dtype=dtype))
    p = module.BwdParams()
    p.cell, p.dtype = _backend.CELL_CODES[cell], _backend.DTYPE_CODES[dtype]
    p.seq_len, p.batch, p.hidden, p.state = T, B, H, P
    seq = (keep["seq"].data_ptr(), B * G * H, G * H)
    p.w_hh, p.out, p.d_xproj, p.d_h0 = keep["w_hh"].data_ptr(), seq, seq, keep["d_h0"].data_ptr()
    p.gates, p.c_seq, p.d_hproj = seq, seq, seq
    if P != H:
        p.w_hr, p.d_h_seq = keep["w_hr"].data_ptr(), seq
    p.num_threads = 1
    return [p], keep


def assert_second_derivatives_match(run, theirs, ours, x, tol=1e-10):
    """run(module, x) -> a tensor. The gradient of run(module, x).pow(2).sum() wrt x, taken with
    create_graph=True, differentiated again (a gradient penalty) wrt x and every parameter:
    fusedrnn's module (the native backward recomputed as reference ops under create_graph) as
    torch.nn's, by backward() and by torch.autograd.grad alike."""
    results = []
    for module in (theirs, ours):
        xm = x.detach().clone().requires_grad_()
        (gx,) = torch.autograd.grad(run(module, xm).pow(2).sum(), xm, create_graph=True)
        penalty = gx.pow(2).sum()
        targets = [xm, *module.parameters()]
        results.append(torch.autograd.grad(penalty, targets, allow_unused=True, retain_graph=True))
        module.zero_grad()
        penalty.backward()
        results.append([xm.grad, *(p.grad for p in module.parameters())])
    for route, (expected, actual) in (("autograd.grad", results[0::2]), ("backward", results[1::2])):
        for i, (e, a) in enumerate(zip(expected, actual)):
            if e is None or a is None:  # no path: the other must be zero, if any
                assert not (e if a is None else a).any(), f"{route}: target {i} on one side only"
                continue
            assert_close(a, e, tol, f"{route}: second derivative wrt target {i}")
