"""Runs configurations x implementations x modes and returns one result row per combination."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import accuracy, execution, flops, impls as impl_registry
from .configs import BenchConfig
from .inputs import make_input_set, materialize, rounded
from .progress import Progress
from .timing import Plan, Runner, Stats, clock_for, measure


@dataclass
class Outcome:
    results: List[dict] = field(default_factory=list)
    # {"config", "impl", "mode", "reason"}; "config" is a dict, as in results
    skipped: List[dict] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    device: str = "cpu"
    busy: bool = False  # other processes competed for the CPU (load average, /proc/stat: cli.py)

    @property
    def fused_failures(self) -> List[dict]:
        """fusedrnn rows (eager, compiled or graphed) that crashed or were outside the accuracy
        tolerance."""
        return [r for r in self.results
                if is_fusedrnn(r["impl"]) and (r.get("error") or r.get("err_ok") is False)]


def is_fusedrnn(impl: str) -> bool:
    """Whether a row runs fusedrnn (eagerly, or wrapped: fusedrnn+compile, fusedrnn+cudagraph):
    the rows that are judged against their tolerance."""
    return impl == "fusedrnn" or impl.startswith("fusedrnn+")


def _resolve_impls(names: Sequence[str], device: torch.device, outcome: Outcome) -> List[impl_registry.Impl]:
    chosen = []
    for name in names:
        impl = impl_registry.REGISTRY[name]
        why = impl.unavailable(device)
        if why is None:
            chosen.append(impl)
        elif not impl.silent_when_missing:
            outcome.notes.append(f"{name}: not run ({why})")
    return chosen


def _row(cfg: BenchConfig, impl: str, mode: str, input_sets: int) -> dict:
    return {"config": cfg.to_dict(), "impl": impl, "mode": mode, "median_ms": None, "q1_ms": None,
            "q3_ms": None, "iqr_ms": None, "min_ms": None, "max_ms": None, "repeats": 0,
            "input_sets": input_sets, "flops": None, "gflops_per_s": None, "speedup_vs_torch": None,
            "max_rel_err": None, "max_rel_err_at": None, "err_ok": None, "error": None}


def _expected(cfg, mode, module, sets, device, dtype):
    """torch.nn in float64 on the same (rounded) weights and inputs: the yardstick of every row.
    An LSTM variant, which torch.nn lacks, has fusedrnn.reference's step loop in float64."""
    module64 = impl_registry.build_torch_module(cfg, device, torch.float64)
    module64.load_state_dict({k: v.to(torch.float64) for k, v in module.state_dict().items()})
    if cfg.variant:
        module64 = impl_registry.ReferenceStack(cfg, module64)
    if cfg.lengths:
        module64 = impl_registry.PacksAround(module64)
    mat64 = materialize(rounded(sets[0], dtype), device, torch.float64, mode == "training",
                        with_lengths=cfg.lengths)
    return execution.results_of(module64, mat64, mode)


def run(configs: Sequence[BenchConfig], impl_names: Sequence[str], device: torch.device,
        plan: Plan, progress: Optional[Progress] = None, check: bool = True,
        on_cell: Optional[Callable[[Outcome], None]] = None) -> Outcome:
    """on_cell(outcome) runs after every (configuration, mode), e.g. to save partial results."""
    outcome = Outcome(device=device.type)
    impls = _resolve_impls(impl_names, device, outcome)
    progress = progress or Progress(sum(len(c.modes) for c in configs), enabled=False)
    clock = clock_for(device)
    for cfg in configs:
        dtype = getattr(torch, cfg.dtype)
        sets = [make_input_set(cfg, seed=1000 + i) for i in range(plan.input_sets)]
        lengths = [s.lengths.tolist() if s.lengths is not None else None for s in sets]
        torch_module = impl_registry.build_torch_module(cfg, device, dtype)
        for impl in impls:
            impl.before_config()
        built: Dict[str, object] = {}
        build_errors: Dict[str, str] = {}
        for impl in impls:
            try:
                built[impl.name] = impl.build(cfg, torch_module)
            except Exception as exc:
                build_errors[impl.name] = f"build failed: {type(exc).__name__}: {exc}"
        for mode in cfg.modes:
            progress.begin(f"{cfg.name} {mode}")
            training = mode == "training"
            rows: Dict[str, dict] = {}
            active: Dict[str, object] = {}
            for impl in impls:
                why = impl.skip_reason(cfg, mode, device)
                if why:
                    outcome.skipped.append({"config": cfg.to_dict(), "impl": impl.name, "mode": mode, "reason": why})
                    continue
                rows[impl.name] = _row(cfg, impl.name, mode, plan.input_sets)
                if impl.name in build_errors:
                    rows[impl.name]["error"] = build_errors[impl.name]
                else:
                    active[impl.name] = built[impl.name]
            try:
                mats = [materialize(s, device, dtype, training, with_lengths=cfg.lengths)
                        for s in sets]
            except Exception as exc:
                for row in rows.values():
                    row["error"] = row["error"] or f"inputs: {type(exc).__name__}: {exc}"
                mats = None
            expected = None
            if mats is not None and check:
                progress.stage("checking against float64 "
                               + ("fusedrnn.reference" if cfg.variant else "torch.nn"))
                expected = _check_accuracy(cfg, mode, torch_module, sets, mats, device, dtype,
                                           active, rows, impls)
            if mats is not None:
                runners = [_runner(name, module, mats, training) for name, module in active.items()
                           if rows[name]["error"] is None]
                measured = measure(runners, clock, plan, tick=progress.update,
                                   stage=progress.stage)
                for name, r in measured.items():
                    if r.error:  # (its timings, if any, are of calls before it failed: none)
                        rows[name]["error"] = r.error
                    elif r.samples:
                        _fill_timing(rows[name], Stats.of(r.samples), cfg, mode, lengths)
                if expected is not None:
                    _check_warm_calls(cfg, mode, mats, active, rows, expected)
            _fill_speedups(rows)
            outcome.results.extend(rows.values())
            progress.end_cell(cell_summary(rows))
            if on_cell is not None:
                on_cell(outcome)
        del built, torch_module
        if device.type == "cuda":
            torch.cuda.empty_cache()
    progress.close()
    return outcome


def _runner(name, module, mats, training) -> Runner:
    if training:
        return Runner(name, prepare=lambda i: execution.clear_grads(module, mats[i]),
                      call=lambda i: execution.training_call(module, mats[i]))
    return Runner(name, prepare=lambda i: None, call=lambda i: execution.inference_call(module, mats[i]))


def _check_accuracy(cfg, mode, torch_module, sets, mats, device, dtype, active, rows, impls):
    """Each implementation's first call on input set 0 against float64 (rows' max_rel_err and,
    for fusedrnn, err_ok); returns the float64 results (None where there were none)."""
    comparable = [i.name for i in impls
                  if i.computes(cfg) and i.name in active and rows[i.name]["error"] is None]
    if not comparable:
        return None
    try:
        expected = _expected(cfg, mode, torch_module, sets, device, dtype)
    except Exception as exc:
        for name in comparable:
            rows[name]["max_rel_err_at"] = f"float64 torch.nn failed: {type(exc).__name__}: {exc}"
        return None
    for name in comparable:
        try:
            found = execution.results_of(active[name], mats[0], mode)
        except Exception as exc:
            rows[name]["error"] = f"{type(exc).__name__}: {exc}"
            continue
        report = accuracy.compare(found, expected)
        rows[name]["max_rel_err"] = report.max_rel_err
        rows[name]["max_rel_err_at"] = report.note or report.worst
    # Only fusedrnn is judged; the other rows' errors are context (torch's own error in the dtype,
    # the reference's, which computes half types without fp32 state).
    torch_err = rows.get("torch", {}).get("max_rel_err")
    for name in comparable:
        row = rows[name]
        if is_fusedrnn(name) and row["error"] is None:
            row["err_ok"] = accuracy.within_tolerance(cfg.dtype, row["max_rel_err"], torch_err)
    return expected


def _check_warm_calls(cfg, mode, mats, active, rows, expected) -> None:
    """The fusedrnn rows that passed, once more after their timed calls, on input set 0: what was
    timed is the warm path (a cached inference plan, buffers kept from call to call), and the
    first check saw only the cold first call (review, session 31). A row that fails now is
    WRONG, named as a warm call."""
    torch_err = rows.get("torch", {}).get("max_rel_err")
    for name, module in active.items():
        row = rows[name]
        if not is_fusedrnn(name) or row["error"] is not None or row.get("err_ok") is not True:
            continue
        try:
            report = accuracy.compare(execution.results_of(module, mats[0], mode), expected)
        except Exception as exc:
            report = accuracy.ErrorReport(None, "", f"{type(exc).__name__}: {exc}")
        if not accuracy.within_tolerance(cfg.dtype, report.max_rel_err, torch_err):
            row.update(err_ok=False, max_rel_err=report.max_rel_err,
                       max_rel_err_at=f"{report.note or report.worst} (a warm call, after timing)")


def _fill_timing(row: dict, stats: Stats, cfg: BenchConfig, mode: str, lengths) -> None:
    row.update(median_ms=stats.median_ms, q1_ms=stats.q1_ms, q3_ms=stats.q3_ms, iqr_ms=stats.iqr_ms,
               min_ms=stats.min_ms, max_ms=stats.max_ms, repeats=stats.repeats)
    per_set = [flops.count_flops(cfg, mode, l) for l in lengths]
    row["flops"] = int(sum(per_set) / len(per_set))
    row["gflops_per_s"] = row["flops"] / (stats.median_ms * 1e-3) / 1e9 if stats.median_ms > 0 else None


def _fill_speedups(rows: Dict[str, dict]) -> None:
    base = rows.get("torch", {}).get("median_ms")
    for row in rows.values():
        if base and row["median_ms"]:
            row["speedup_vs_torch"] = base / row["median_ms"]


def cell_summary(rows: Dict[str, dict]) -> str:
    """One line per finished cell for logs: each implementation's median and speed-up."""
    parts = []
    for name, row in rows.items():
        if row["median_ms"] is None:
            parts.append(f"{name} failed" if row["error"] else f"{name} -")
            continue
        speed = f" ({row['speedup_vs_torch']:.2f}x)" if name != "torch" and row["speedup_vs_torch"] else ""
        parts.append(f"{name} {row['median_ms']:.3g} ms{speed}")
    return ", ".join(parts)


def geometric_mean(values: Sequence[float]) -> Optional[float]:
    values = [v for v in values if v and v > 0]
    if not values:
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))
