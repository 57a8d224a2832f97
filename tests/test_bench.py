"""Fast tests of the benchmark harness (python -m fusedrnn.bench) on tiny CPU configurations.

Most tests stand torch.nn in for fusedrnn's modules (the harness only needs torch.nn's API), so
they check the harness whether or not the native modules are built; one test runs the real
fusedrnn modules and skips, saying why, where they are not there yet. Timings are never asserted.
"""
from __future__ import annotations

import io
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

from fusedrnn.bench import cli, configs, flops, impls
from fusedrnn.bench.configs import BenchConfig
from fusedrnn.bench.progress import Progress

TINY = [
    BenchConfig("lstm", seq_len=5, batch=2, hidden=8, input_size=4, modes=("inference", "training")),
    BenchConfig("gru", seq_len=4, batch=3, hidden=6, modes=("training",)),
    BenchConfig("lstm", seq_len=3, batch=2, hidden=5, layers=2, proj_size=3, step_calls=True),
]
FEATURES = [
    BenchConfig("lstm", seq_len=6, batch=3, hidden=8, input_size=5, layers=2, bidirectional=True),
    BenchConfig("lstm", seq_len=5, batch=4, hidden=8, proj_size=4, packed=True),
    BenchConfig("gru", seq_len=6, batch=4, hidden=7, packed=True, bidirectional=True),
    BenchConfig("rnn_relu", seq_len=4, batch=2, hidden=5, modes=("training",)),
    BenchConfig("rnn_tanh", seq_len=4, batch=2, hidden=5, dtype="float64", modes=("inference",)),
]
FAST_ARGS = ["--device", "cpu", "--warmup", "1", "--repeats", "2", "--input-sets", "2", "--quiet"]


@pytest.fixture
def tiny_presets(monkeypatch):
    monkeypatch.setitem(configs.PRESETS, "tiny", TINY)
    monkeypatch.setitem(configs.PRESET_HELP, "tiny", "test")
    monkeypatch.setitem(configs.PRESETS, "features", FEATURES)
    monkeypatch.setitem(configs.PRESET_HELP, "features", "test")


class WrongLstm(torch.nn.LSTM):
    """torch.nn's LSTM with every output 1% off: a fast wrong answer."""

    def forward(self, x, hx=None):
        out, state = super().forward(x, hx)
        return out * 1.01, state


@pytest.fixture
def torch_as_fusedrnn(monkeypatch):
    """fusedrnn rows run torch.nn: the harness is tested apart from the kernels."""
    monkeypatch.setattr(impls, "fused_module_class", lambda cell: impls.TORCH_CLASSES[cell])
    monkeypatch.setattr(impls, "native_backend_problem", lambda device: None)


def run_cli(args, capsys):
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def _run_as_preset(configurations, tmp_path, capsys, monkeypatch):
    """The configurations run as a preset of their own: (exit code, stdout, the JSON rows)."""
    monkeypatch.setitem(configs.PRESETS, "given", configurations)
    path = tmp_path / "given.json"
    code, out, _ = run_cli(FAST_ARGS + ["--preset", "given", "--json", str(path)], capsys)
    return code, out, json.loads(path.read_text())["results"]


def test_json_schema_table_and_error_column(tmp_path, capsys, tiny_presets, torch_as_fusedrnn):
    path = tmp_path / "bench.json"
    code, out, _ = run_cli(FAST_ARGS + ["--preset", "tiny", "--impls", "fusedrnn,torch", "--json", str(path)],
                           capsys)
    assert code == 0
    data = json.loads(path.read_text())
    assert set(data) >= {"machine", "results"}
    for key in ("cpu", "cpu_family", "cpu_cores", "torch_threads", "torch", "fusedrnn", "commit",
                "gpu"):
        assert key in data["machine"], key
    rows = data["results"]
    cells = {(r["config"]["name"], r["mode"]) for r in rows}
    assert len(cells) == 5  # lstm inference + training, gru training, steps inference + training
    assert {r["impl"] for r in rows} == {"fusedrnn", "torch"}
    for r in rows:
        assert r["median_ms"] > 0 and r["q1_ms"] <= r["median_ms"] <= r["q3_ms"]
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["repeats"] == 2
        assert r["gflops_per_s"] > 0 and r["flops"] > 0
        assert r["speedup_vs_torch"] > 0
        assert r["error"] is None
    for r in (r for r in rows if r["impl"] == "fusedrnn"):
        assert r["max_rel_err"] is not None and r["max_rel_err"] < 1e-3
        assert r["err_ok"] is True
    # The table shows every column, and every row's error.
    header = next(line for line in out.splitlines() if line.startswith("config"))
    for column in ("median ms", "IQR ms", "GFLOP/s", "vs torch", "max rel err"):
        assert column in header
    assert "CPU " in out and "torch threads" in out and "commit" in out
    assert out.count("e-0") >= len(rows)  # an error figure on every row


def test_training_error_covers_gradients(capsys, tiny_presets, torch_as_fusedrnn, monkeypatch):
    """A module right in the forward but wrong in one weight gradient must show in max_rel_err."""

    class WrongGrad(torch.nn.GRU):
        def forward(self, x, hx=None):
            out, h = super().forward(x, hx)
            w = self.weight_hh_l0[0, 0]
            return out, h + 0.1 * (w - w.detach())  # same values, an extra gradient into weight_hh_l0

    monkeypatch.setattr(impls, "fused_module_class",
                        lambda cell: WrongGrad if cell == "gru" else impls.TORCH_CLASSES[cell])
    code, out, _ = run_cli(FAST_ARGS + ["--preset", "tiny", "--cell", "gru", "--impls", "fusedrnn"], capsys)
    assert code == cli.EXIT_WRONG
    assert "!!" in out and "grad_weight_hh_l0" in out and "WRONG OR FAILED" in out


def test_fast_wrong_answer_shows_and_fails(capsys, tiny_presets, torch_as_fusedrnn, monkeypatch):
    monkeypatch.setattr(impls, "fused_module_class",
                        lambda cell: WrongLstm if cell == "lstm" else impls.TORCH_CLASSES[cell])
    code, out, _ = run_cli(FAST_ARGS + ["--preset", "tiny", "--cell", "lstm", "--impls", "fusedrnn"], capsys)
    assert code == cli.EXIT_WRONG
    assert "!! (output)" in out


def test_crashing_implementation_is_a_row_not_a_crash(tmp_path, capsys, tiny_presets, torch_as_fusedrnn,
                                                     monkeypatch):
    class Crash(torch.nn.LSTM):
        def forward(self, x, hx=None):
            raise RuntimeError("kernel exploded")

    monkeypatch.setattr(impls, "fused_module_class", lambda cell: Crash)
    path = tmp_path / "b.json"
    code, out, _ = run_cli(FAST_ARGS + ["--preset", "tiny", "--cell", "lstm", "--impls", "fusedrnn",
                                        "--json", str(path)], capsys)
    assert code == cli.EXIT_WRONG
    assert "FAILED: RuntimeError: kernel exploded" in out
    rows = json.loads(path.read_text())["results"]
    assert all(r["median_ms"] is None and "kernel exploded" in r["error"] for r in rows if r["impl"] == "fusedrnn")
    assert all(r["median_ms"] > 0 for r in rows if r["impl"] == "torch")


def test_features_reference_packed_bidirectional_projection(tmp_path, capsys, tiny_presets, torch_as_fusedrnn):
    path = tmp_path / "f.json"
    code, out, _ = run_cli(FAST_ARGS + ["--preset", "features", "--json", str(path)], capsys)
    assert code == 0, out
    rows = json.loads(path.read_text())["results"]
    assert {r["impl"] for r in rows} >= {"fusedrnn", "torch", "reference"}
    for r in rows:
        assert r["error"] is None, r
        limit = 1e-10 if r["config"]["dtype"] == "float64" else 1e-4
        assert r["max_rel_err"] is not None and r["max_rel_err"] < limit, r


def test_plot_message_when_matplotlib_missing(tmp_path, capsys, tiny_presets, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    code, _, err = run_cli(FAST_ARGS + ["--preset", "tiny", "--plot", str(tmp_path / "p.png")], capsys)
    assert code == cli.EXIT_USAGE
    assert "--plot needs matplotlib" in err and "pip install" in err
    assert not (tmp_path / "p.png").exists()


def test_plot_and_markdown_written(tmp_path, capsys, tiny_presets, torch_as_fusedrnn):
    pytest.importorskip("matplotlib")
    png, md = tmp_path / "p.png", tmp_path / "t.md"
    code, _, _ = run_cli(FAST_ARGS + ["--preset", "tiny", "--cell", "gru", "--impls", "fusedrnn",
                                      "--plot", str(png), "--markdown", str(md)], capsys)
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert "| config | mode | impl |" in text and "gru-B3-T4-H6-fp32" in text


def test_list_and_bad_usage(capsys):
    code, out, _ = run_cli(["--device", "cpu", "--list"], capsys)
    assert code == 0
    for preset in ("quick", "standard", "anchor"):
        assert f"  {preset}:" in out
    assert "lstm-B16-T1024-H768-bf16" in out
    assert re.search(r"^  torch +available$", out, re.M)  # the column fits the longest name
    code, _, err = run_cli(["--device", "cpu", "--cell", "transformer"], capsys)
    assert code == cli.EXIT_USAGE and "--cell" in err and "transformer" in err
    code, _, err = run_cli(["--device", "cpu", "--dtype", "fp8"], capsys)
    assert code == cli.EXIT_USAGE and "--dtype" in err


def test_presets_hold_the_issue_targets():
    names = {c.name: c for c in configs.STANDARD}
    for target in configs.ISSUE4_TARGETS:
        assert target.name in names and names[target.name].modes == target.modes
    anchor = {(c.dtype, c.batch, c.seq_len, c.hidden) for c in configs.ANCHOR}
    assert {("float16", 16, 1024, 768), ("bfloat16", 16, 1024, 768)} <= anchor
    quick, notes = configs.select("quick", "cpu")
    assert {"lstm-B1-T100-H64-fp32", "lstm-B1-T100-H128-fp32", "gru-B1-T100-H128-fp32"} <= {c.name for c in quick}
    on_cpu, notes = configs.select("anchor", "cpu")
    assert [c.dtype for c in on_cpu] == ["float32"] and len(notes) == 2
    swapped, _ = configs.select("quick", "cpu", cells=["gru"], dtypes=["fp64", "bf16"])
    assert {c.dtype for c in swapped} == {"float64", "bfloat16"} and {c.cell for c in swapped} == {"gru"}


def test_flop_formula():
    lstm = BenchConfig("lstm", seq_len=10, batch=2, hidden=8, input_size=4)
    assert flops.count_flops(lstm, "inference") == 10 * 2 * (2 * 32 * 4 + 2 * 32 * 8)
    assert flops.count_flops(lstm, "training") == 3 * flops.count_flops(lstm, "inference")
    bi = BenchConfig("gru", seq_len=3, batch=1, hidden=4, input_size=2, layers=2, bidirectional=True)
    per_token = 2 * (2 * 12 * 2 + 2 * 12 * 4) + 2 * (2 * 12 * 8 + 2 * 12 * 4)
    assert flops.count_flops(bi, "inference") == 3 * per_token
    proj = BenchConfig("lstm", seq_len=1, batch=1, hidden=8, input_size=8, proj_size=2)
    assert flops.count_flops(proj, "inference", lengths=[1]) == 2 * 32 * 8 + 2 * 32 * 2 + 2 * 2 * 8
    cifg = BenchConfig("lstm", seq_len=10, batch=2, hidden=8, input_size=4, variant="cifg")
    assert flops.count_flops(cifg, "inference") == 10 * 2 * (2 * 24 * 4 + 2 * 24 * 8)


def test_progress_prints_one_line_per_cell_off_a_terminal(tmp_path):
    with open(tmp_path / "log", "w+") as stream:
        bar = Progress(2, stream=stream)
        for label in ("a", "b"):
            bar.begin(label)
            bar.update(0.5)
            bar.end_cell()
        bar.close()
        stream.seek(0)
        lines = stream.read().splitlines()
    assert len(lines) == 2 and "100.0%" in lines[-1] and "\r" not in "".join(lines)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_names_the_stage_of_a_quiet_cell():
    """The float64 check and the warm-up time nothing: the bar says which runs, then forgets it."""
    stream = _Terminal()
    bar = Progress(1, stream=stream)
    bar.begin("lstm-B16 training")
    bar.stage("checking against float64 torch.nn")
    assert stream.getvalue().endswith("lstm-B16 training (checking against float64 torch.nn)")
    bar.update(0.5)
    assert stream.getvalue().endswith("(checking against float64 torch.nn)")  # kept until changed
    bar.end_cell()
    assert stream.getvalue().endswith("lstm-B16 training")


def test_stages_reported_in_order_and_skipped_configs_are_dicts(tmp_path, capsys, tiny_presets,
                                                                 torch_as_fusedrnn, monkeypatch):
    stages = []
    monkeypatch.setattr(Progress, "stage", lambda self, name: stages.append(name))
    path = tmp_path / "s.json"
    code, _, _ = run_cli(["--device", "cpu", "--warmup", "1", "--repeats", "2", "--input-sets", "1",
                          "--preset", "tiny", "--json", str(path)], capsys)
    assert code == 0
    first_cell = stages[:stages.index("timing") + 1]
    assert first_cell[0] == "checking against float64 torch.nn"
    assert [s for s in first_cell if s.startswith("warm-up")] == [
        "warm-up fusedrnn", "warm-up torch", "warm-up reference"]
    skipped = json.loads(path.read_text())["skipped"]
    assert skipped, "the tiny preset's per-step configuration skips the reference"
    for s in skipped:
        assert isinstance(s["config"], dict) and s["config"]["name"], s


def _real_fusedrnn_reason():
    why = impls.REGISTRY["fusedrnn"].unavailable(torch.device("cpu"))
    return None if why is None else f"fusedrnn cannot run on the CPU here: {why}"


@pytest.mark.skipif(_real_fusedrnn_reason() is not None, reason=str(_real_fusedrnn_reason()))
def test_real_fusedrnn_modules_within_tolerance(tmp_path, capsys, tiny_presets):
    path = tmp_path / "real.json"
    code, out, _ = run_cli(FAST_ARGS + ["--preset", "tiny", "--json", str(path)], capsys)
    rows = json.loads(path.read_text())["results"]
    fused = [r for r in rows if r["impl"] == "fusedrnn"]
    assert fused, out
    for r in fused:
        assert r["error"] is None, r["error"]
        assert r["max_rel_err"] < 1e-3, r
    assert code == 0


VARIANT_CONFIGS = [
    BenchConfig("lstm", seq_len=5, batch=3, hidden=6, input_size=4, variant="peephole"),
    BenchConfig("lstm", seq_len=4, batch=2, hidden=5, bidirectional=True, packed=True,
                variant="peephole-cifg", modes=("training",)),
]


@pytest.mark.skipif(_real_fusedrnn_reason() is not None, reason=str(_real_fusedrnn_reason()))
def test_variants_are_checked_against_the_reference(tmp_path, capsys, monkeypatch):
    """A variant's rows: fusedrnn and the reference checked against the float64 reference loop,
    torch.nn's plain LSTM of the shape timed only (it computes another function)."""
    code, out, rows = _run_as_preset(VARIANT_CONFIGS, tmp_path, capsys, monkeypatch)
    assert {r["config"]["name"] for r in rows} == {
        "lstm-peephole-B3-T5-I4-H6-fp32", "lstm-peephole-cifg-bi-B2-T4-H5-packed-fp32"}
    for r in rows:
        assert r["error"] is None and r["median_ms"] is not None, r
        if r["impl"] == "torch":
            assert r["max_rel_err"] is None  # another function: timed, not compared
        else:
            assert r["max_rel_err"] < 1e-5, r
        if r["impl"] == "fusedrnn":
            assert r["err_ok"] is True and r["speedup_vs_torch"] is not None
    assert code == 0, out
    assert "LSTM variants (peephole, peephole-cifg): torch.nn has none" in out


@pytest.mark.skipif(_real_fusedrnn_reason() is not None, reason=str(_real_fusedrnn_reason()))
def test_a_plain_lstm_in_a_variants_row_fails_its_check(tmp_path, capsys, monkeypatch):
    """The yardstick is the variant's own reference: fusedrnn running the plain LSTM there is
    a wrong answer."""
    monkeypatch.setitem(configs.PRESETS, "variants-tiny", VARIANT_CONFIGS[:1])

    def plain_build(self, cfg, weights_from):
        module = impls.fused_module_class(cfg.cell)(**cfg.module_kwargs())
        module.load_state_dict({k: v for k, v in weights_from.state_dict().items()
                                if "peephole" not in k})
        return module

    monkeypatch.setattr(impls.FusedImpl, "build", plain_build)
    code, out, _ = run_cli(FAST_ARGS + ["--preset", "variants-tiny"], capsys)
    assert code == 1 and "0/2 rows within tolerance" in out, out


LENGTHS_CONFIGS = [
    BenchConfig("lstm", seq_len=6, batch=4, hidden=8, input_size=5, layers=2, bidirectional=True,
                lengths=True),
    BenchConfig("gru", seq_len=6, batch=4, hidden=7, lengths=True, dtype="float64"),
]


@pytest.mark.skipif(_real_fusedrnn_reason() is not None, reason=str(_real_fusedrnn_reason()))
def test_lengths_rows_give_fusedrnn_the_lengths_and_pack_for_torch(tmp_path, capsys, monkeypatch):
    """A padded batch with its lengths: fusedrnn's module takes them (lengths=), torch.nn and
    the reference pack, run and pad inside the call, and every row is checked against torch.nn's
    packed run in float64, gradients included."""
    seen = []
    real_forward = impls.GivesLengths.forward

    def spy(self, batch, state):
        seen.append(tuple(batch.lengths.shape))
        return real_forward(self, batch, state)

    monkeypatch.setattr(impls.GivesLengths, "forward", spy)
    code, out, rows = _run_as_preset(LENGTHS_CONFIGS, tmp_path, capsys, monkeypatch)
    assert {r["config"]["name"] for r in rows} == {
        "lstm-L2-bi-B4-T6-I5-H8-lengths-fp32", "gru-B4-T6-H7-lengths-fp64"}
    assert {r["impl"] for r in rows} == {"fusedrnn", "torch", "reference"}
    for r in rows:
        assert r["error"] is None and r["max_rel_err"] is not None, r
        assert r["max_rel_err"] < (1e-10 if r["config"]["dtype"] == "float64" else 1e-5), r
    assert seen and set(seen) == {(4,)}
    assert code == 0, out


def test_lengths_and_packed_are_one_or_the_other():
    with pytest.raises(ValueError, match="packed and lengths are two forms"):
        BenchConfig("lstm", seq_len=2, batch=1, hidden=3, packed=True, lengths=True)
    with pytest.raises(ValueError, match="step_calls feeds one forward step"):
        BenchConfig("lstm", seq_len=2, batch=1, hidden=3, lengths=True, step_calls=True)
    assert "lengths" not in BenchConfig("lstm", seq_len=2, batch=1, hidden=3).to_dict()


def test_variant_configs_are_lstm_only():
    with pytest.raises(ValueError, match="variant must be one of"):
        BenchConfig("gru", seq_len=2, batch=1, hidden=3, variant="peephole")
    with pytest.raises(ValueError, match="variant must be one of"):
        BenchConfig("lstm", seq_len=2, batch=1, hidden=3, variant="forgetful")
    assert "variant" not in BenchConfig("lstm", seq_len=2, batch=1, hidden=3).to_dict()
    assert impls.FlashRnnImpl().skip_reason(VARIANT_CONFIGS[0], "inference", "cuda") == \
        "no peephole LSTM"


def test_timing_rounds_interleave_and_survive_a_failing_implementation():
    from fusedrnn.bench.timing import CpuClock, Plan, Runner, measure

    order = []

    def call_of(name, fail_at=None):
        def call(i):
            order.append((name, i))
            if fail_at is not None and len(order) >= fail_at:
                raise RuntimeError("boom")
        return call

    good = Runner("good", prepare=lambda i: None, call=call_of("good"))
    plan = Plan(warmup=1, repeats=None, budget_s=0.0, min_repeats=4, max_repeats=50, input_sets=2)
    measured = measure([good, Runner("other", lambda i: None, call_of("other"))], CpuClock(), plan)
    assert len(measured["good"].samples) == 4 and len(measured["other"].samples) == 4  # budget 0: min rounds
    timed = order[2:]
    assert timed[0][0] != timed[2][0]  # the order rotates between rounds
    assert [i for n, i in timed if n == "good"] == [0, 1, 0, 1]  # input sets cycle

    order.clear()
    flaky = Runner("flaky", lambda i: None, call_of("flaky", fail_at=4))
    steady = Runner("steady", lambda i: None, call_of("steady"))
    measured = measure([flaky, steady], CpuClock(), Plan(warmup=0, repeats=5, input_sets=1))
    assert "boom" in measured["flaky"].error and len(measured["steady"].samples) == 5


def test_dtype_override_deduplicates_shapes():
    chosen, notes = configs.select("anchor", "cpu", dtypes=["fp32"])
    assert [c.name for c in chosen] == ["lstm-B16-T1024-H768-fp32"] and notes == []


def test_issue4_targets_are_reported_on_cpu(capsys, monkeypatch, torch_as_fusedrnn):
    target = BenchConfig("lstm", seq_len=4, batch=1, hidden=8, modes=("inference",), target_speedup=1e9)
    monkeypatch.setitem(configs.PRESETS, "target", [target])
    monkeypatch.setitem(configs.PRESET_HELP, "target", "test")
    code, out, _ = run_cli(FAST_ARGS + ["--preset", "target", "--impls", "fusedrnn"], capsys)
    assert code == 0  # a missed speed goal is information, never a failure
    assert "target lstm-B1-T4-H8-fp32 inference" in out and "(goal >= 1e+09x) NOT met" in out
    assert "targets: the project's CPU goals, information only" in out  # a newcomer asks what they are


@pytest.mark.parametrize("extra, words", [
    (["--threads", "100000"], ["--threads", "CPUs"]),
    (["--budget", "0"], ["--budget"]),
    (["--budget", "nan"], ["--budget"]),
    (["--budget", "-1"], ["--budget"]),
    (["--json", "{tmp}/missing/x.json"], ["--json", "no directory"]),
    (["--json", "{tmp}"], ["--json", "is a directory"]),
    (["--markdown", "{tmp}/missing/x.md"], ["--markdown"]),
    (["--json", "/proc/fusedrnn-bench.json"], ["--json", "not writable"]),
    (["--cell", ""], ["--cell", "names nothing"]),
    (["--dtype", " , "], ["--dtype", "names nothing"]),
    (["--impls", ""], ["--impls", "names nothing"]),
    (["--only", ""], ["--only", "names nothing"]),
], ids=["threads-above-cores", "budget-zero", "budget-nan", "budget-negative", "json-dir-missing",
        "json-is-dir", "markdown-dir-missing", "json-not-writable", "cell-empty", "dtype-empty",
        "impls-empty", "only-empty"])
def test_bad_options_refused_before_the_run(extra, words, tmp_path, capsys, tiny_presets):
    """Caught up front (exit 2), not after a long run or as a traceback: output paths, the
    budget, and more threads than cores (fusedrnn never oversubscribes; torch.nn would)."""
    extra = [e.format(tmp=tmp_path) for e in extra]
    code, out, err = run_cli(FAST_ARGS + ["--preset", "tiny"] + extra, capsys)
    assert code == cli.EXIT_USAGE and not out
    for word in words:
        assert word in err


def test_a_run_without_fusedrnn_is_refused(capsys, tiny_presets, monkeypatch):
    """No fusedrnn rows would be no comparison: refused with the reason (e.g. a GPU machine whose
    fusedrnn was built without CUDA), not a table of torch rows and exit 0."""
    monkeypatch.setattr(impls, "native_backend_problem", lambda device: "built without CUDA")
    code, out, err = run_cli(FAST_ARGS + ["--preset", "tiny"], capsys)
    assert code == cli.EXIT_USAGE and "fusedrnn cannot run" in err and "without CUDA" in err


def test_header_names_fusedrnn_overrides(capsys, tiny_presets, torch_as_fusedrnn, monkeypatch):
    monkeypatch.setenv("FUSEDRNN_BACKEND", "emu")
    code, out, _ = run_cli(FAST_ARGS + ["--preset", "tiny", "--cell", "gru", "--impls", "fusedrnn"],
                           capsys)
    env = [line for line in out.splitlines() if line.startswith("env    ")]
    assert code == 0 and len(env) == 1
    assert "FUSEDRNN_BACKEND=emu" in env[0] and "time the CPU emulator" in env[0]


def test_a_wrong_row_meets_no_target(capsys, monkeypatch, torch_as_fusedrnn):
    target = BenchConfig("lstm", seq_len=4, batch=1, hidden=8, modes=("inference",), target_speedup=1e-9)
    monkeypatch.setitem(configs.PRESETS, "target", [target])
    monkeypatch.setitem(configs.PRESET_HELP, "target", "test")
    monkeypatch.setattr(impls, "fused_module_class", lambda cell: WrongLstm)
    code, out, _ = run_cli(FAST_ARGS + ["--preset", "target", "--impls", "fusedrnn"], capsys)
    assert code == cli.EXIT_WRONG and "not met: the result is WRONG" in out


@pytest.mark.parametrize("layout", ["inner-package", "top-level"])
def test_flashrnn_entry_point_in_both_layouts(layout, tmp_path, monkeypatch):
    """FlashRNN's function is flashrnn.flashrnn.flashrnn where pip installed its repository (the
    outer folder has no __init__.py) and flashrnn.flashrnn where its inner package is on the
    path (its README): both are found."""
    package = tmp_path / "flashrnn" / ("flashrnn" if layout == "inner-package" else "")
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("def flashrnn(*args, **kwargs):\n    return 'ran'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "flashrnn" or m.startswith("flashrnn.")]:
        monkeypatch.delitem(sys.modules, name)
    assert impls._flashrnn_function()() == "ran"
    for name in [m for m in sys.modules if m == "flashrnn" or m.startswith("flashrnn.")]:
        monkeypatch.delitem(sys.modules, name)


def test_commit_of_an_installed_copy_is_the_one_it_was_built_from(tmp_path, monkeypatch):
    """A package that is not tracked where it lies (installed, maybe into a checkout's .venv)
    reports the commit CMake wrote into it at build time, not the HEAD of a repository around
    it; a tracked one reports its checkout's HEAD."""
    import types
    from fusedrnn.bench import machine
    installed = tmp_path / "site-packages" / "fusedrnn"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("")
    monkeypatch.setattr(machine, "package_dir", lambda: installed)
    monkeypatch.delenv("FUSEDRNN_BENCH_COMMIT", raising=False)
    built = types.SimpleNamespace(COMMIT="b" * 40, DIRTY=False)
    # (An installed fusedrnn has a real _build_info, maybe imported already: replace it both
    # where `from fusedrnn import _build_info` looks first and in sys.modules.)
    import fusedrnn
    monkeypatch.setattr(fusedrnn, "_build_info", built, raising=False)
    monkeypatch.setitem(sys.modules, "fusedrnn._build_info", built)
    assert machine.git_commit() == {"commit": "b" * 40, "dirty": False}
    monkeypatch.setenv("FUSEDRNN_BENCH_COMMIT", "c" * 40)
    assert machine.git_commit()["commit"] == "c" * 40
    # gpu_check's commit wins also over a checkout (a copied checkout's .git may lag)
    monkeypatch.setattr(machine, "package_dir", lambda: Path(fusedrnn.__file__).parent)
    assert machine.git_commit()["commit"] == "c" * 40


def test_ctrl_c_prints_what_was_measured(tmp_path, capsys, tiny_presets, torch_as_fusedrnn,
                                         monkeypatch):
    """An interrupted run prints the cells measured so far and exits 130, keeping the partial
    JSON; no traceback."""
    from fusedrnn.bench import harness
    real_run = harness.run

    def interrupted_after_one_cell(*args, on_cell, **kwargs):
        def then_stop(outcome):
            on_cell(outcome)
            raise KeyboardInterrupt
        return real_run(*args, on_cell=then_stop, **kwargs)

    monkeypatch.setattr(harness, "run", interrupted_after_one_cell)
    path = tmp_path / "partial.json"
    code, out, err = run_cli(FAST_ARGS + ["--preset", "tiny", "--json", str(path)], capsys)
    assert code == cli.EXIT_INTERRUPTED and "interrupted" in err
    assert "fusedrnn" in out and json.loads(path.read_text())["settings"]["partial"] is True


def test_json_has_the_gpu_keys_without_a_gpu(tmp_path, capsys, tiny_presets, torch_as_fusedrnn):
    path = tmp_path / "r.json"
    code, _, _ = run_cli(FAST_ARGS + ["--preset", "tiny", "--cell", "gru", "--json", str(path)],
                         capsys)
    machine = json.loads(path.read_text())["machine"]
    assert code == 0 and all(key in machine for key in ("gpu", "driver", "cuda_runtime", "cudnn"))


@pytest.mark.skipif(_real_fusedrnn_reason() is not None, reason=str(_real_fusedrnn_reason()))
@pytest.mark.parametrize("variable, words", [
    ("FUSEDRNN_CPU_ISA", ["FUSEDRNN_CPU_ISA must be", "'bogus'"]),
    ("FUSEDRNN_CPU_GEMM", ["FUSEDRNN_CPU_GEMM must be", "'bogus'"]),
])
def test_a_bad_kernel_setting_is_refused_before_the_run(variable, words, capsys, tiny_presets,
                                                       monkeypatch):
    """A value the kernels refuse would fail every fusedrnn row of a long run, and the summary
    would not say why: refused up front, naming the variable, as a bad FUSEDRNN_BACKEND is."""
    monkeypatch.setenv(variable, "bogus")
    code, out, err = run_cli(FAST_ARGS + ["--preset", "tiny"], capsys)
    assert code == cli.EXIT_USAGE and not out
    assert "fusedrnn cannot run on cpu" in err and all(word in err for word in words), err


def test_impls_that_cannot_run_here_are_refused(capsys, tiny_presets, torch_as_fusedrnn):
    """--impls haste on a CPU would time torch.nn alone and exit 0: refused, saying why."""
    code, out, err = run_cli(FAST_ARGS + ["--preset", "tiny", "--impls", "haste"], capsys)
    assert code == cli.EXIT_USAGE and not out
    assert "none of --impls haste can run on cpu" in err and "haste: CUDA only" in err


def test_sigterm_prints_what_was_measured(tmp_path, capsys, tiny_presets, torch_as_fusedrnn,
                                          monkeypatch):
    """SIGTERM (`timeout`, a job scheduler) stops the run as Ctrl-C does: the cells measured so
    far printed and kept as partial JSON, exit 143, and the caller's handler back in place."""
    import os
    import signal

    from fusedrnn.bench import harness
    real_run = harness.run

    def terminated_after_one_cell(*args, on_cell, **kwargs):
        def then_terminate(outcome):
            on_cell(outcome)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_run(*args, on_cell=then_terminate, **kwargs)

    monkeypatch.setattr(harness, "run", terminated_after_one_cell)
    before = signal.getsignal(signal.SIGTERM)
    path = tmp_path / "partial.json"
    code, out, err = run_cli(FAST_ARGS + ["--preset", "tiny", "--json", str(path)], capsys)
    assert code == cli.EXIT_TERMINATED and "terminated (SIGTERM)" in err
    assert "fusedrnn" in out and json.loads(path.read_text())["settings"]["partial"] is True
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_budget_asked_for_is_spent_on_fast_cells():
    """The default plan stops a fast cell at max_repeats rounds; with max_repeats=None (what an
    explicit --budget sets) the budget alone decides, so a larger --budget does time more."""
    from fusedrnn.bench.timing import CpuClock, Plan, Runner, measure
    plan = Plan(warmup=0, budget_s=0.05, max_repeats=None, input_sets=1)
    measured = measure([Runner("noop", lambda i: None, lambda i: None)], CpuClock(), plan)
    assert len(measured["noop"].samples) > Plan.max_repeats


def test_budget_option_lifts_the_round_cap(capsys, tiny_presets, torch_as_fusedrnn):
    code, out, _ = run_cli(["--device", "cpu", "--warmup", "0", "--input-sets", "1", "--quiet",
                            "--budget", "0.01", "--preset", "tiny", "--cell", "gru"], capsys)
    assert code == 0 and "repeats adaptive (at least 3, ~0.01 s per cell)" in out


def test_every_fusedrnn_row_failed_is_not_called_unchecked(capsys, monkeypatch, torch_as_fusedrnn):
    """When no fusedrnn row ran, the summary says so (not "not checked (--no-check ...)"), and a
    target is not met because the row failed, not because its result was wrong."""
    class Crash(torch.nn.LSTM):
        def forward(self, x, hx=None):
            raise RuntimeError("kernel exploded")

    target = BenchConfig("lstm", seq_len=4, batch=1, hidden=8, modes=("inference",), target_speedup=1e-9)
    monkeypatch.setitem(configs.PRESETS, "target", [target])
    monkeypatch.setitem(configs.PRESET_HELP, "target", "test")
    monkeypatch.setattr(impls, "fused_module_class", lambda cell: Crash)
    code, out, _ = run_cli(FAST_ARGS + ["--preset", "target", "--impls", "fusedrnn"], capsys)
    assert code == cli.EXIT_WRONG
    assert "fusedrnn accuracy: no fusedrnn row ran to the end" in out and "not checked" not in out
    assert "not met: the fusedrnn row FAILED" in out


def test_a_machine_that_turns_busy_during_the_run_is_reported(capsys, monkeypatch, tmp_path,
                                                               torch_as_fusedrnn):
    """The load average is read before the run only; a job that starts later showed only in the
    times (torch.nn 792 ms for a 0.4 ms call, a target reported met at 59x). The CPU time other
    processes took during the run marks it busy, and the JSON records it."""
    from fusedrnn.bench import contention
    target = BenchConfig("lstm", seq_len=4, batch=1, hidden=8, modes=("inference",), target_speedup=1e-9)
    monkeypatch.setitem(configs.PRESETS, "target", [target])
    monkeypatch.setitem(configs.PRESET_HELP, "target", "test")
    monkeypatch.setattr(contention.CpuTakenByOthers, "cores", lambda self: 1.5)
    path = tmp_path / "busy.json"
    code, out, _ = run_cli(FAST_ARGS + ["--preset", "target", "--impls", "fusedrnn", "--json",
                                        str(path)], capsys)
    assert code == 0 and "met (on a busy machine: unreliable)" in out
    assert "other processes kept 1.50 of the" in out
    assert json.loads(path.read_text())["machine"]["cpu_cores_taken_by_others"] == 1.5


def test_cpu_taken_by_others_is_measured():
    """Where /proc/stat can be read: a share of the usable cores, from 0 to all of them."""
    from fusedrnn.bench import contention
    taken = contention.CpuTakenByOthers()
    sum(i * i for i in range(200_000))  # this process's own time is not counted
    cores = taken.cores()
    if cores is None:
        pytest.skip("no /proc/stat")
    assert 0.0 <= cores <= len(os.sched_getaffinity(0)) + 0.5
    assert contention.busy_warning(0.4, 2) is None and contention.busy_warning(None, 2) is None
    assert "kept 0.60 of the 2 usable cores" in contention.busy_warning(0.6, 2)


def test_impls_named_twice_run_once():
    assert impls.parse_impls("fusedrnn,torch,fusedrnn") == ["fusedrnn", "torch"]


def test_a_filter_that_leaves_only_cuda_configurations_says_so(capsys):
    code, _, err = run_cli(["--device", "cpu", "--preset", "anchor", "--only", "fp16"], capsys)
    assert code == cli.EXIT_USAGE
    assert "CUDA-only configuration, skipped on cpu" in err


def test_targets_on_a_busy_machine_are_qualified(capsys, monkeypatch, torch_as_fusedrnn):
    from fusedrnn.bench import machine
    target = BenchConfig("lstm", seq_len=4, batch=1, hidden=8, modes=("inference",), target_speedup=1e-9)
    monkeypatch.setitem(configs.PRESETS, "target", [target])
    monkeypatch.setitem(configs.PRESET_HELP, "target", "test")
    monkeypatch.setattr(machine, "busy_warning", lambda info: "the machine was busy")
    code, out, _ = run_cli(FAST_ARGS + ["--preset", "target", "--impls", "fusedrnn"], capsys)
    assert code == 0 and "met (on a busy machine: unreliable)" in out


def test_a_row_that_fails_while_timed_keeps_no_timings(tmp_path, capsys, monkeypatch,
                                                       torch_as_fusedrnn):
    """A fusedrnn row that crashed on a later call kept the timings of the calls before it, was
    shown as a normal row and counted in the geometric mean (review, session 31); its timing
    fields are null, as bench/README.md says, and it is FAILED."""
    calls = []

    class LateCrash(torch.nn.LSTM):
        def forward(self, x, hx=None):
            calls.append(1)
            if len(calls) >= 4:
                raise RuntimeError("boom on a late call")
            return super().forward(x, hx)

    monkeypatch.setitem(configs.PRESETS, "one", [BenchConfig("lstm", seq_len=3, batch=2, hidden=4,
                                                             modes=("inference",))])
    monkeypatch.setattr(impls, "fused_module_class", lambda cell: LateCrash)
    path = tmp_path / "b.json"
    code, out, _ = run_cli(FAST_ARGS + ["--preset", "one", "--impls", "fusedrnn", "--repeats", "4",
                                        "--json", str(path)], capsys)
    assert code == cli.EXIT_WRONG
    row = next(r for r in json.loads(path.read_text())["results"] if r["impl"] == "fusedrnn")
    assert "boom" in row["error"] and row["median_ms"] is None and row["speedup_vs_torch"] is None
    assert "FAILED: RuntimeError: boom" in out and "geometric mean" not in out


def test_the_headline_counts_neither_wrong_rows_nor_variants():
    """A fast wrong answer is no speed-up, and a variant's 'vs torch' is another problem: the
    geometric mean and the floor line leave both out (review, session 31)."""
    from fusedrnn.bench import report
    from fusedrnn.bench.harness import Outcome

    def row(name, speedup, err_ok=True, variant=""):
        return {"impl": "fusedrnn", "mode": "inference", "speedup_vs_torch": speedup,
                "err_ok": err_ok, "error": None, "config": {"name": name, "variant": variant}}

    outcome = Outcome(device="cpu", results=[row("right", 1.0), row("wrong", 10.0, err_ok=False),
                                             row("peephole", 0.5, variant="peephole")])
    lines = report.summary_lines(outcome)
    headline = next(line for line in lines if line.startswith("fusedrnn vs torch.nn"))
    assert "1.00x over 1 rows" in headline
    variants = next(line for line in lines if line.startswith("LSTM variants"))
    assert "0.50x over 1 rows" in variants
    assert not any("below the" in line for line in lines)


def test_accuracy_of_a_non_finite_reference_and_the_half_bar():
    """A NaN in the float64 reference compared false with every error and was dropped once an
    earlier tensor had set the worst (review, session 31); the half types' bar is twice torch's
    error plus two unit roundoffs, not a 1e-2 floor when torch's error is exactly 0."""
    from fusedrnn.bench import accuracy
    exact = torch.ones(3, dtype=torch.float64)
    poisoned = torch.tensor([1.0, float("nan"), 1.0], dtype=torch.float64)
    report = accuracy.compare({"output": exact, "h_n": exact}, {"output": exact, "h_n": poisoned})
    assert report.max_rel_err is None and "h_n" in report.note
    assert not accuracy.within_tolerance("float16", 5e-3, 0.0)
    assert accuracy.within_tolerance("float16", 3e-5, 1e-5)
    assert accuracy.within_tolerance("bfloat16", 2e-2, None)


def test_only_takes_several_substrings(capsys, tiny_presets, torch_as_fusedrnn):
    code, out, _ = run_cli(FAST_ARGS + ["--preset", "tiny", "--impls", "fusedrnn",
                                        "--only", "gru-B3,L2"], capsys)
    assert code == 0
    assert "gru-B3-T4-H6-fp32" in out and "L2" in out and "lstm-B2-T5" not in out


def test_warmup_asked_for_is_done_and_never_zero_unchecked(capsys, tiny_presets):
    """A given --warmup (or --repeats) is done as asked, however long a call takes; --warmup 0
    with --no-check would time a cold first call (review, session 31)."""
    from fusedrnn.bench.timing import CpuClock, Plan, Runner, measure
    calls = []
    slow = Runner("slow", lambda i: None, lambda i: calls.append(i))
    measure([slow], CpuClock(), Plan(warmup=3, repeats=2, budget_s=0.0, shorten_warmup=False))
    assert len(calls) == 5
    calls.clear()
    measure([slow], CpuClock(), Plan(warmup=3, repeats=2, budget_s=0.0))
    assert len(calls) == 3  # a budget-driven plan stops warming up after a long round
    code, out, err = run_cli(FAST_ARGS + ["--preset", "tiny", "--warmup", "0", "--no-check"], capsys)
    assert code == cli.EXIT_USAGE and "--warmup 0" in err and not out


def test_a_row_wrong_only_on_warm_calls_is_wrong(capsys, tiny_presets, torch_as_fusedrnn,
                                                 monkeypatch):
    """The check saw only the first, cold call; what is timed is the warm path (a cached plan).
    A module right on its first call and wrong from then on passed (review, session 31)."""
    class WrongWhenWarm(torch.nn.LSTM):
        calls = 0

        def forward(self, x, hx=None):
            out, state = super().forward(x, hx)
            type(self).calls += 1
            return (out if type(self).calls == 1 else out * 1.01), state

    monkeypatch.setattr(impls, "fused_module_class", lambda cell: WrongWhenWarm)
    code, out, _ = run_cli(FAST_ARGS + ["--preset", "tiny", "--cell", "gru,lstm", "--only", "B2-T5",
                                        "--impls", "fusedrnn", "--dtype", "fp64"], capsys)
    assert code == cli.EXIT_WRONG
    assert "(a warm call, after timing)" in out and "WRONG OR FAILED" in out


def test_turn_order_does_not_follow_the_input_sets():
    """With as many implementations as input sets, the rotation ran each implementation in the
    same place on the same set every time (review, session 31)."""
    from fusedrnn.bench.timing import CpuClock, Plan, Runner, measure
    order = []
    runners = [Runner(name, lambda i: None, lambda i, name=name: order.append((name, i)))
               for name in ("a", "b", "c")]
    measure(runners, CpuClock(), Plan(warmup=0, repeats=9, input_sets=3))
    rounds = [order[k:k + 3] for k in range(0, len(order), 3)]
    for name in ("a", "b", "c"):
        places = {[n for n, _ in r].index(name) for r in rounds if (name, 0) in r}
        assert len(places) > 1, (name, rounds)
