"""The benchmark's compiled and CUDA-graphed implementations (fusedrnn/bench/wrapped.py): their
rows are checked like the eager ones, a graph break in fusedrnn's compiled row is a failure, and
the summary compares each wrapper's rows with their eager selves and with torch.nn's. Timings are
never asserted. The CUDA-graph rows need a GPU; on the CPU the tests check that they drop out."""
from __future__ import annotations

import json

import pytest
import torch

from fusedrnn.bench import cli, configs, execution, flops, impls, wrapped
from fusedrnn.bench.configs import BenchConfig

from test_bench import FAST_ARGS, _real_fusedrnn_reason, run_cli, torch_as_fusedrnn  # noqa: F401

TINY_COMPILE = [
    BenchConfig("lstm", seq_len=4, batch=2, hidden=8, input_size=4),
    BenchConfig("gru", seq_len=3, batch=1, hidden=6, step_calls=True, modes=("inference",)),
    BenchConfig("lstm", seq_len=3, batch=2, hidden=6, input_size=5, bidirectional=True,
                in_model=True),
]
WRAPPED = ["fusedrnn", "fusedrnn+compile", "fusedrnn+cudagraph", "torch", "torch+compile",
           "torch+cudagraph"]


@pytest.fixture
def tiny_compile_preset(monkeypatch):
    monkeypatch.setitem(configs.PRESETS, "compile", TINY_COMPILE)


def _compile_unavailable():
    return (_real_fusedrnn_reason()
            or wrapped.compile_problem(torch.device("cpu")))


@pytest.mark.skipif(_compile_unavailable() is not None, reason=str(_compile_unavailable()))
def test_compiled_rows_are_checked_and_compared(tmp_path, capsys, tiny_compile_preset):
    """The compile preset's default implementations on a CPU: the CUDA-graph ones drop out
    silently, the compiled ones run fusedrnn's real modules with fullgraph=True, within tolerance,
    and the summary puts each compiled row beside its eager self and beside torch.nn's."""
    path = tmp_path / "compile.json"
    code, out, _ = run_cli(FAST_ARGS + ["--preset", "compile", "--json", str(path)], capsys)
    assert code == 0, out
    data = json.loads(path.read_text())
    assert data["settings"]["impls"] == ["fusedrnn", "fusedrnn+compile", "torch", "torch+compile"]
    rows = data["results"]
    assert {(r["config"]["name"], r["mode"]) for r in rows} == {
        ("lstm-B2-T4-I4-H8-fp32", "inference"), ("lstm-B2-T4-I4-H8-fp32", "training"),
        ("gru-B1-T3-H6-steps-fp32", "inference"), ("lstm-bi-B2-T3-I5-H6-model-fp32", "inference"),
        ("lstm-bi-B2-T3-I5-H6-model-fp32", "training")}
    for r in rows:
        assert r["error"] is None and r["median_ms"] is not None, r
        assert r["max_rel_err"] < 1e-5, r
        if r["impl"].startswith("fusedrnn"):
            assert r["err_ok"] is True, r
    for line in ("fusedrnn+compile vs torch+compile: geometric mean",
                 "fusedrnn+compile vs fusedrnn: geometric mean",
                 "torch+compile vs torch: geometric mean",
                 "fusedrnn accuracy: 10/10 rows within tolerance"):
        assert line in out


@pytest.mark.skipif(wrapped.compile_problem(torch.device("cpu")) is not None,
                    reason=str(wrapped.compile_problem(torch.device("cpu"))))
def test_a_graph_break_fails_the_fusedrnn_compiled_row(capsys, monkeypatch, torch_as_fusedrnn,
                                                       tiny_compile_preset):
    """fusedrnn's compiled rows run with fullgraph=True. Standing torch.nn's LSTM in for fusedrnn
    (Dynamo graph-breaks on it on purpose) must fail that row and the run, not time it eagerly;
    torch.nn's own compiled row (fullgraph=False) runs."""
    monkeypatch.setitem(configs.PRESETS, "compile", TINY_COMPILE[:1])
    code, out, _ = run_cli(FAST_ARGS + ["--preset", "compile"], capsys)
    assert code == cli.EXIT_WRONG
    assert "WRONG OR FAILED: fusedrnn+compile lstm-B2-T4-I4-H8-fp32 inference" in out
    assert "torch+compile vs torch: geometric mean" in out


def test_wrapped_implementations_listed_and_refused_by_name_on_cpu(capsys, torch_as_fusedrnn,
                                                                   tiny_compile_preset):
    code, out, _ = run_cli(["--device", "cpu", "--list"], capsys)
    assert code == 0
    assert "fusedrnn+cudagraph unavailable: CUDA only" in out
    assert "  compile:" in out
    code, out, _ = run_cli(FAST_ARGS + ["--preset", "compile", "--only", "gru",
                                        "--impls", "fusedrnn,fusedrnn+cudagraph"], capsys)
    assert code == 0
    assert "note: fusedrnn+cudagraph: not run (CUDA only)" in out
    code, _, err = run_cli(FAST_ARGS + ["--impls", "fusedrnn+jit"], capsys)
    assert code == cli.EXIT_USAGE and "fusedrnn+cudagraph" in err  # the names it takes


def test_compiling_leaves_the_eager_rows_module_alone():
    """nn.Module.compile() works in place, and torch.nn's eager row runs the very module that
    holds the weights: the compiled row compiles a copy, or the eager row would run compiled."""
    cfg = TINY_COMPILE[0]
    reference = impls.build_torch_module(cfg, torch.device("cpu"), torch.float32)
    compiled = impls.REGISTRY["torch+compile"].build(cfg, reference)
    eager = impls.REGISTRY["torch"].build(cfg, reference)
    assert eager is reference and compiled is not reference
    assert getattr(reference, "_compiled_call_impl", None) is None
    assert getattr(compiled, "_compiled_call_impl", None) is not None
    for (name, a), (_, b) in zip(compiled.named_parameters(), reference.named_parameters()):
        assert torch.equal(a, b), name


def test_a_model_around_the_rnn():
    """in_model: the RNN between Linear+tanh and a Linear, its parameters under their own names
    next to the layers', fusedrnn's model loading torch.nn's state dict; its FLOPs count both
    layers; the reference loop and third-party kernels leave it out."""
    cfg = BenchConfig("gru", seq_len=3, batch=2, hidden=6, input_size=5, bidirectional=True,
                      in_model=True)
    model = impls.build_torch_module(cfg, torch.device("cpu"), torch.float32)
    names = [n for n, _ in execution._named_parameters(model)]
    assert names[:4] == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]
    assert names[-4:] == ["pre.weight", "pre.bias", "post.weight", "post.bias"]
    assert model.post.in_features == 12
    plain = cfg.replace(in_model=False)
    assert (flops.count_flops(cfg, "inference") - flops.count_flops(plain, "inference")
            == 3 * 2 * (2 * 5 * 5 + 2 * 12 * 12))
    for name in ("reference", "flashrnn", "haste"):
        assert impls.REGISTRY[name].skip_reason(cfg, "inference", torch.device("cpu"))
    with pytest.raises(ValueError, match="in_model"):
        cfg.replace(packed=True)


def test_parameter_names_of_wrapped_modules_are_the_modules_own():
    module = torch.nn.LSTM(3, 4)
    nested = torch.nn.Module()
    nested.src = torch.nn.Module()
    nested.src.src = module
    names = [n for n, _ in execution._named_parameters(nested)]
    assert names == [n for n, _ in module.named_parameters()]


def test_preset_defaults_name_registered_implementations():
    for preset, names in configs.PRESET_IMPLS.items():
        assert preset in configs.PRESETS
        assert "torch" in names and set(names) <= set(impls.REGISTRY)
    assert set(impls.OPT_IN) <= set(impls.REGISTRY)


CUDA_GRAPH_CONFIGS = [
    BenchConfig("lstm", seq_len=5, batch=3, hidden=16, input_size=8),
    BenchConfig("gru", seq_len=4, batch=2, hidden=8, layers=2, bidirectional=True,
                modes=("training",)),
    BenchConfig("lstm", seq_len=3, batch=1, hidden=8, step_calls=True),
]


@pytest.mark.skipif(not torch.cuda.is_available() or _real_fusedrnn_reason() is not None
                    or impls.REGISTRY["fusedrnn"].unavailable(torch.device("cuda")) is not None,
                    reason="needs a CUDA GPU and fusedrnn._cuda")
def test_cuda_graph_rows_replay_correct_results(tmp_path, capsys, monkeypatch):
    """On a GPU: the CUDA-graphed rows (inference by stream capture, training by
    make_graphed_callables, a per-step loop captured whole) give results within tolerance on
    every input set they replay, fusedrnn's and cuDNN's alike."""
    monkeypatch.setitem(configs.PRESETS, "compile", CUDA_GRAPH_CONFIGS)
    path = tmp_path / "graphs.json"
    code, out, _ = run_cli(["--device", "cuda", "--warmup", "1", "--repeats", "3",
                            "--input-sets", "2", "--quiet", "--preset", "compile",
                            "--impls", "fusedrnn,fusedrnn+cudagraph,torch+cudagraph",
                            "--json", str(path)], capsys)
    assert code == 0, out
    rows = json.loads(path.read_text())["results"]
    graphed = [r for r in rows if r["impl"].endswith("+cudagraph")]
    assert len(graphed) == 2 * 4
    for r in graphed:
        assert r["error"] is None and r["median_ms"] is not None, r
        assert r["max_rel_err"] < 1e-4, r
    # A replay on another input set gives that set's results, not the captured one's.
    module = wrapped.CudaGraphed(torch.nn.LSTM(8, 16).cuda())
    for _ in range(2):
        x = torch.randn(5, 3, 8, device="cuda")
        state = (torch.randn(1, 3, 16, device="cuda"), torch.randn(1, 3, 16, device="cuda"))
        with torch.inference_mode():
            got = module(x, state)[0].clone()
            want = module.src(x, state)[0]
        torch.testing.assert_close(got, want)
