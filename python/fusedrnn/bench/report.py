"""The printed table, its markdown twin, the summary lines and the JSON file."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence

from .configs import STANDARD_FLOOR
from .harness import Outcome, geometric_mean, is_fusedrnn
from .machine import header_lines

COLUMNS = ("config", "mode", "impl", "median ms", "IQR ms", "min ms", "GFLOP/s", "vs torch", "max rel err")
NOISY_IQR = 0.25   # an IQR above this fraction of the median says the machine was not quiet
MODE_SHORT = {"inference": "inf", "training": "train"}


def _num(v: Optional[float], digits: int = 3) -> str:
    if v is None:
        return "-"
    if v >= 1000:
        return f"{v:.0f}"
    if v >= 100:
        return f"{v:.1f}"
    return f"{v:.{digits}f}"


def _err(row: dict) -> str:
    if row.get("max_rel_err") is None:
        at = row.get("max_rel_err_at")
        return f"FAIL ({at})" if at else "-"
    text = f"{row['max_rel_err']:.1e}"
    if row.get("err_ok") is False:
        text += f" !! ({row['max_rel_err_at']})"
    return text


def table_rows(results: Sequence[dict]) -> List[List[str]]:
    rows, previous = [], None
    for r in results:
        key = (r["config"]["name"], r["mode"])
        first = key != previous
        previous = key
        cells = [r["config"]["name"] if first else "", MODE_SHORT.get(r["mode"], r["mode"]) if first else "",
                 r["impl"]]
        if r.get("error"):
            cells += [f"FAILED: {r['error']}"[:100], "", "", "", "", ""]
        else:
            speed = r.get("speedup_vs_torch")
            cells += [_num(r["median_ms"]), _num(r["iqr_ms"]), _num(r["min_ms"]), _num(r["gflops_per_s"], 2),
                      f"{speed:.2f}x" if speed else "-", _err(r)]
        rows.append(cells)
    return rows


def format_table(results: Sequence[dict]) -> str:
    rows = table_rows(results)
    widths = [max([len(c)] + [len(row[i]) for row in rows if i < len(row) and not row[i].startswith("FAILED")])
              for i, c in enumerate(COLUMNS)]
    right = {3, 4, 5, 6, 7}

    def line(cells):
        out = []
        for i, c in enumerate(cells):
            if c.startswith("FAILED"):
                out.append(c)
                break
            out.append(c.rjust(widths[i]) if i in right else c.ljust(widths[i]))
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(COLUMNS), sep] + [line(r) for r in rows])


def format_markdown(results: Sequence[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for cells in table_rows(results):
        cells = cells + [""] * (len(COLUMNS) - len(cells))
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def _speed_rows(outcome: Outcome, variants: bool) -> List[dict]:
    """The fusedrnn rows a speed summary counts: timed, not failed, not outside their accuracy
    tolerance (a fast wrong answer is no speed-up), and either the plain cells or the LSTM
    variants (whose 'vs torch' is torch.nn's plain LSTM: another problem)."""
    return [r for r in outcome.results
            if r["impl"] == "fusedrnn" and r.get("speedup_vs_torch") and not r.get("error")
            and r.get("err_ok") is not False and bool(r["config"].get("variant")) == variants]


def _geometric_mean_line(rows: List[dict]) -> str:
    worst = min(rows, key=lambda r: r["speedup_vs_torch"])
    return (f"geometric mean {geometric_mean([r['speedup_vs_torch'] for r in rows]):.2f}x over "
            f"{len(rows)} rows, lowest {worst['speedup_vs_torch']:.2f}x ({worst['config']['name']} "
            f"{worst['mode']})")


def summary_lines(outcome: Outcome) -> List[str]:
    lines = []
    fused = [r for r in outcome.results if r["impl"] == "fusedrnn"]
    busy = " (on a busy machine: unreliable)" if outcome.busy else ""
    plain = _speed_rows(outcome, variants=False)
    if plain:
        lines.append(f"fusedrnn vs torch.nn: {_geometric_mean_line(plain)}{busy}")
    lines += wrapped_lines(outcome)
    variants = sorted({r["config"]["variant"] for r in fused if r["config"].get("variant")})
    if variants:
        timed = _speed_rows(outcome, variants=True)
        lines.append(f"LSTM variants ({', '.join(variants)}): torch.nn has none; their 'vs torch' "
                     f"is torch.nn's plain LSTM of the shape over fusedrnn's variant, and they are "
                     f"checked against fusedrnn.reference in float64"
                     + (f"; {_geometric_mean_line(timed)}{busy}" if timed else ""))
    lines += target_lines(outcome)
    judged = [r for r in outcome.results if is_fusedrnn(r["impl"])]
    checked = [r for r in judged if r.get("err_ok") is not None]
    bad = outcome.fused_failures
    unchecked = [r for r in judged if r.get("err_ok") is None and not r.get("error")]
    if judged and not checked and not unchecked:
        lines.append("fusedrnn accuracy: no fusedrnn row ran to the end (FAILED below)")
    elif judged and not checked:
        lines.append("fusedrnn accuracy: not checked (--no-check, or no float64 torch.nn result to compare with)")
    elif judged:
        worst_err = max((r["max_rel_err"] for r in checked if r.get("max_rel_err") is not None), default=None)
        lines.append(f"fusedrnn accuracy: {len(checked) - sum(1 for r in checked if not r['err_ok'])}/{len(checked)} "
                     f"rows within tolerance" + (f", largest max rel err {worst_err:.1e}" if worst_err is not None else ""))
    for r in unchecked if checked else []:  # a row that could not be judged is not a row that passed
        why = r.get('max_rel_err_at') or 'no float64 result'
        lines.append(f"NOT CHECKED: {r['impl']} {r['config']['name']} {r['mode']}: {why}")
    for r in bad:
        why = r.get("error") or f"max rel err {r.get('max_rel_err')} at {r.get('max_rel_err_at')}"
        lines.append(f"WRONG OR FAILED: {r['impl']} {r['config']['name']} {r['mode']}: {why}")
    timed = [r for r in outcome.results if r.get("median_ms")]
    noisy = [r for r in timed if r["iqr_ms"] > NOISY_IQR * r["median_ms"]]
    if noisy:
        lines.append(f"noise: {len(noisy)} of {len(timed)} rows have an IQR above {NOISY_IQR:.0%} of their median "
                     f"(a busy machine?); compare min ms, or rerun with a larger --budget")
    for note in outcome.notes:
        lines.append(f"note: {note}")
    if outcome.skipped:
        reasons: Dict[str, int] = {}
        for s in outcome.skipped:
            key = f"{s['impl']}: {s['reason'].split(':')[0]}"
            reasons[key] = reasons.get(key, 0) + 1
        for key, n in sorted(reasons.items()):
            lines.append(f"skipped {n} row(s), {key}")
    return lines


def _ratio_line(outcome: Outcome, impl: str, base: str) -> Optional[str]:
    """base median / impl median over the (configuration, mode) cells both timed: their
    geometric mean and lowest cell, or None when no cell has both."""
    medians = {(r["config"]["name"], r["mode"], r["impl"]): r["median_ms"]
               for r in outcome.results if r.get("median_ms")}
    ratios = {(c, m): medians[(c, m, base)] / t for (c, m, i), t in medians.items()
              if i == impl and (c, m, base) in medians}
    if not ratios:
        return None
    (config, mode), lowest = min(ratios.items(), key=lambda kv: kv[1])
    return (f"{impl} vs {base}: geometric mean {geometric_mean(list(ratios.values())):.2f}x over "
            f"{len(ratios)} rows, lowest {lowest:.2f}x ({config} {mode})")


def wrapped_lines(outcome: Outcome) -> List[str]:
    """Compiled and CUDA-graphed rows (wrapped.py) against their eager selves and each other."""
    lines = []
    for wrapper in ("compile", "cudagraph"):
        for impl, base in ((f"fusedrnn+{wrapper}", f"torch+{wrapper}"),
                           (f"fusedrnn+{wrapper}", "fusedrnn"), (f"torch+{wrapper}", "torch")):
            line = _ratio_line(outcome, impl, base)
            if line:
                lines.append(line)
    return lines


def target_lines(outcome: Outcome) -> List[str]:
    """Issue 4's CPU goals next to what this run measured (information: timings never assert)."""
    lines = []
    for r in outcome.results:
        goal = r["config"].get("target_speedup")
        # The goals are float32's (another --dtype runs another problem).
        if (r["impl"] != "fusedrnn" or goal is None or outcome.device != "cpu"
                or r["config"].get("dtype") != "float32"):
            continue
        got = r.get("speedup_vs_torch")
        verdict = "-" if got is None else ("met" if got >= goal else "NOT met")
        if outcome.busy and got is not None:
            verdict += " (on a busy machine: unreliable)"
        if r.get("error"):
            verdict = "not met: the fusedrnn row FAILED"
        elif r.get("err_ok") is False:
            verdict = "not met: the result is WRONG"  # a fast wrong answer meets nothing
        shown = f"{got:.2f}x" if got is not None else "not measured"
        lines.append(f"target {r['config']['name']} {r['mode']}: {shown} (goal >= {goal:g}x) {verdict}")
    if lines:
        lines.append("targets: the project's CPU goals, information only; bench/README.md says "
                     "which are out of reach on 2 cores and why")
    slow = [r for r in _speed_rows(outcome, variants=False)
            if r["speedup_vs_torch"] < STANDARD_FLOOR]
    if outcome.device == "cpu" and slow:
        names = ", ".join(f"{r['config']['name']} {r['mode']} {r['speedup_vs_torch']:.2f}x" for r in slow[:6])
        lines.append(f"below the {STANDARD_FLOOR:g}x floor: {len(slow)} fusedrnn row(s): {names}"
                     + (", ..." if len(slow) > 6 else ""))
    return lines


def header_text(machine: dict, settings: dict) -> str:
    head = [f"fusedrnn benchmark: preset {settings['preset']} on {settings['device']}, "
            f"{settings['configs']} configurations, impls {', '.join(settings['impls'])}"]
    head += header_lines(machine)
    head.append(f"timing: {settings['timing']}")
    return "\n".join(head)


def _clean(value):
    """JSON has no NaN/inf: non-finite numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def payload(machine: dict, settings: dict, outcome: Outcome) -> dict:
    return _clean({"machine": machine, "settings": settings, "results": outcome.results,
                   "skipped": outcome.skipped, "notes": outcome.notes})


def write_json(path: str, data: dict) -> None:
    """Written whole or not at all: to a temporary file beside `path`, then renamed over it, so
    that a run stopped while it writes (SIGTERM, Ctrl-C) leaves the previous cells' file."""
    text = json.dumps(data, indent=1, allow_nan=False) + "\n"
    temporary = f"{path}.partial-{os.getpid()}"
    try:
        with open(temporary, "w") as f:
            f.write(text)
        os.replace(temporary, path)
    except OSError:  # a directory that takes no new file (the path itself was checked)
        if os.path.exists(temporary):
            os.remove(temporary)
        with open(path, "w") as f:
            f.write(text)


def write_markdown(path: str, machine: dict, settings: dict, outcome: Outcome) -> None:
    text = ["# fusedrnn benchmark", "", "```", header_text(machine, settings), "```", "",
            format_markdown(outcome.results), ""]
    text += [f"- {line}" for line in summary_lines(outcome)]
    text += ["", "speed-up = torch.nn median / implementation median, measured in the same run; "
             "max rel err = max over outputs (and gradients when training) of ||a-b||/||b|| against "
             "torch.nn in float64 on the same weights and inputs; GFLOP/s counts the matrix products "
             "(bench/README.md).", ""]
    with open(path, "w") as f:
        f.write("\n".join(text))
