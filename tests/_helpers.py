"""Shared test tools: comparing fusedrnn modules with their torch.nn twins.

A `Case` describes one configuration; `run_pair` builds both modules with the same weights, feeds
both the same random input (padded or packed, sorted or not) and initial state, backpropagates the
same random projection of every result, and returns what each produced, so that a test compares
outputs, final states and every parameter, input and state gradient.
"""
from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fusedrnn

TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5}


def native_available() -> bool:
    from fusedrnn import _backend
    if not _backend.HAS_CPU and os.environ.get("FUSEDRNN_REQUIRE_NATIVE", "") not in ("", "0"):
        # CI sets this so that a broken build fails loudly instead of skipping every native test.
        raise RuntimeError("FUSEDRNN_REQUIRE_NATIVE is set but fusedrnn._cpu cannot be imported")
    return _backend.HAS_CPU


requires_native = pytest.mark.skipif(
    not native_available(), reason="fusedrnn._cpu is not built (build the _cpu target)")


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
    return sum((r * torch.linspace(-1, 1, r.numel(), dtype=r.dtype).view_as(r)).sum()
               for r in results)


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
