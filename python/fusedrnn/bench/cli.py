"""Command line of ``python -m fusedrnn.bench``."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import sys
import threading
from typing import List, Optional

import torch

from . import configs as config_registry
from . import contention, harness, impls, machine, report
from .plot import PlotUnavailable, plot_speedups, require_matplotlib
from .progress import Progress
from .timing import Plan

# Timed seconds per (configuration, mode) cell, per device; repeats follow from it.
DEFAULT_BUDGET_S = {"cpu": 2.0, "cuda": 1.0}
EXIT_WRONG = 1      # a fusedrnn row crashed or was outside its accuracy tolerance
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports it
EXIT_TERMINATED = 143   # SIGTERM (`timeout`, a job scheduler), as a shell reports it


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: the cells measured so far are printed and kept."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _csv(text: Optional[str]) -> Optional[List[str]]:
    return [t for t in (s.strip() for s in text.split(",")) if t] if text else None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fusedrnn.bench",
        description="Time fusedrnn against torch.nn (and the reference loop, FlashRNN, haste) in inference "
                    "and training mode; check every fusedrnn result against torch.nn in float64.",
        epilog="Exit status: 0 ok, 1 a fusedrnn row failed or was outside its accuracy tolerance, 2 bad usage, "
               "130 interrupted by Ctrl-C, 143 by SIGTERM (either way the cells measured so far are "
               "printed, and kept in --json).")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where to run (default: cuda when available, else cpu)")
    p.add_argument("--preset", default="quick", choices=sorted(config_registry.PRESETS),
                   help="configuration list (see --list); default quick")
    p.add_argument("--cell", help="only these cells, comma-separated: lstm,gru,rnn_tanh,rnn_relu (rnn = rnn_tanh)")
    p.add_argument("--dtype", help="run every configuration in these dtypes instead, comma-separated: "
                                   "fp32,fp64,fp16,bf16")
    p.add_argument("--only", metavar="SUBSTRINGS", help="only configurations whose name contains one "
                                                        "of these comma-separated substrings")
    p.add_argument("--impls", help=f"implementations, comma-separated (torch is always added): "
                                   f"{', '.join(impls.DEFAULT_ORDER + impls.OPT_IN)}; default: the "
                                   f"preset's, else all of {', '.join(impls.DEFAULT_ORDER)} "
                                   f"that are available")
    p.add_argument("--threads", type=int, help="torch.set_num_threads(N) before timing (default: torch's default)")
    p.add_argument("--repeats", type=int, help="timed calls per implementation and cell (default: adaptive, "
                                               "from --budget)")
    p.add_argument("--budget", type=float, help="timed seconds per configuration and mode, shared by all "
                                                "implementations (default: 2 on cpu, 1 on cuda, and at "
                                                f"most {Plan.max_repeats} rounds; given, the rounds are "
                                                "not capped)")
    p.add_argument("--warmup", type=int, help="untimed calls per implementation first (default 2, "
                                              "fewer for a cell whose calls take more than half "
                                              "the budget)")
    p.add_argument("--input-sets", type=int, default=3, help="distinct random input sets cycled through (default 3)")
    p.add_argument("--no-check", action="store_true", help="skip the float64 accuracy check (timing only)")
    p.add_argument("--json", metavar="PATH", help="write machine, settings and every result row as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the header and table as markdown")
    p.add_argument("--plot", metavar="PATH", help="write a PNG chart of speed-ups (needs matplotlib)")
    p.add_argument("--list", action="store_true", help="list presets, their configurations and implementations")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def list_everything(device: torch.device) -> str:
    lines = ["presets:"]
    for name, cfgs in config_registry.PRESETS.items():
        lines.append(f"  {name}: {config_registry.PRESET_HELP[name]}")
        for c in cfgs:
            lines.append(f"    {c.name:40s} {','.join(c.modes)}" + ("  (cuda only)" if c.cuda_only else ""))
    lines.append(f"implementations on {device.type}:")
    names = impls.DEFAULT_ORDER + impls.OPT_IN
    width = max(len(name) for name in names)
    for name in names:
        why = impls.REGISTRY[name].unavailable(device)
        lines.append(f"  {name:{width}s} {'available' if why is None else 'unavailable: ' + why}")
    return "\n".join(lines)


def _usage_problem(args, device: torch.device) -> Optional[str]:
    """What is wrong with the numeric options and output paths, checked before a run that may
    take many minutes; None when nothing is."""
    for name in ("cell", "dtype", "impls", "only"):
        value = getattr(args, name)
        if value is not None and not _csv(value):  # "" would mean "no filter": all of them
            return f"--{name} names nothing: {value!r}"
    for name in ("threads", "repeats", "warmup", "input_sets"):
        value = getattr(args, name)
        least = 0 if name == "warmup" else 1
        if value is not None and value < least:
            return f"--{name.replace('_', '-')} must be >= {least}, got {value}"
    if args.warmup == 0 and args.no_check:
        # (the accuracy check's call is the first, untimed one: without it the first timed call
        # would be cold, and a compiled row's would include the compilation)
        return "--warmup 0 needs the accuracy check: with --no-check the first timed call is cold"
    cpus = machine.usable_cores()
    if device.type == "cpu" and args.threads and args.threads > cpus:
        # fusedrnn's CPU kernels never run more threads than cores (thread_team.h) while torch
        # would: the ratio would measure torch's oversubscription, not the kernels.
        return (f"--threads {args.threads} is more than the {cpus} CPUs this process may use; "
                f"fusedrnn never oversubscribes them, so torch.nn would be timed at a disadvantage")
    if args.budget is not None and not (math.isfinite(args.budget) and args.budget > 0):
        return f"--budget must be a positive number of seconds, got {args.budget}"
    for option in ("json", "markdown", "plot"):
        path = getattr(args, option)
        if path is None:
            continue
        parent = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path) or not os.path.isdir(parent):
            return (f"--{option} {path}: " + ("is a directory" if os.path.isdir(path)
                                              else f"no directory {parent}"))
        problem = _unwritable(path)
        if problem:
            return f"--{option} {path}: not writable ({problem})"
    return None


def _unwritable(path: str) -> Optional[str]:
    """Why path cannot be written, or None: opened for appending (and removed again if that
    made it), so that a run does not time every cell and then fail to save them (a read-only
    directory, /proc)."""
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as error:
        return error.strerror or str(error)
    if not existed:
        os.remove(path)
    return None


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return EXIT_USAGE
    device = torch.device(device_name)
    if args.list:
        print(list_everything(device))
        return 0
    if args.plot and not os.path.splitext(args.plot)[1]:
        args.plot += ".png"  # what matplotlib would write; said as written
    problem = _usage_problem(args, device)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if args.plot:
        try:
            require_matplotlib()  # before a long run, not after it
        except PlotUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        configs, notes = config_registry.select(args.preset, device_name, _csv(args.cell), _csv(args.dtype), _csv(args.only))
        impl_names = impls.parse_impls(args.impls, config_registry.PRESET_IMPLS.get(args.preset))
        # Third-party libraries that are not installed drop out silently, also from the header.
        impl_names = [n for n in impl_names if not (impls.REGISTRY[n].silent_when_missing
                                                    and impls.REGISTRY[n].unavailable(device))]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not configs:
        why = f" ({'; '.join(notes)})" if notes else ""
        print(f"error: no configuration left after --cell/--dtype/--only filters{why}",
              file=sys.stderr)
        return EXIT_USAGE
    # A run without fusedrnn rows cannot say how fusedrnn compares: refuse it up front (the
    # newcomer's first command on a GPU whose fusedrnn was built without CUDA lands here).
    why = impls.REGISTRY["fusedrnn"].unavailable(device) if "fusedrnn" in impl_names else None
    if why:
        print(f"error: fusedrnn cannot run on {device_name}: {why}", file=sys.stderr)
        return EXIT_USAGE
    if args.impls:  # asked for by name: say why one drops out
        dropped = sorted(set(_csv(args.impls)) & set(impls.REGISTRY) - set(impl_names))
        reasons = {name: impls.REGISTRY[name].unavailable(device) for name in dropped}
        if dropped and impl_names == ["torch"]:  # nothing asked for is left to compare
            print(f"error: none of --impls {args.impls} can run on {device_name}: " + "; ".join(
                f"{name}: {why}" for name, why in reasons.items()), file=sys.stderr)
            return EXIT_USAGE
        notes += [f"{name}: not run ({why})" for name, why in reasons.items()]
    if args.threads:
        torch.set_num_threads(args.threads)

    # The default budget stops fast cells at max_repeats rounds, to keep the quick preset quick; a
    # budget asked for is spent (the "noise" advice asks for a larger one).
    plan = Plan(warmup=args.warmup if args.warmup is not None else 2, repeats=args.repeats,
                input_sets=args.input_sets,
                budget_s=args.budget if args.budget is not None else DEFAULT_BUDGET_S[device_name],
                shorten_warmup=args.warmup is None and args.repeats is None)
    if args.budget is not None:
        plan.max_repeats = None
    info = machine.collect(device_name)
    clock = "CUDA events" if device.type == "cuda" else f"wall clock, {torch.get_num_threads()} torch threads"
    rounds = f"{plan.min_repeats}-{plan.max_repeats}" if plan.max_repeats else f"at least {plan.min_repeats}"
    repeats = f"{plan.repeats} repeats" if plan.repeats else f"repeats adaptive ({rounds}, ~{plan.budget_s:g} s per cell)"
    settings = {"preset": args.preset, "device": device_name, "configs": len(configs), "impls": impl_names,
                "threads": torch.get_num_threads(), "warmup": plan.warmup, "repeats": plan.repeats,
                "budget_s": plan.budget_s if plan.repeats is None else None, "input_sets": plan.input_sets, "accuracy_check": not args.no_check,
                "timing": f"{clock}; warm-up {plan.warmup}"
                          f"{' (fewer for slow cells)' if plan.shorten_warmup else ''}; {repeats}; {plan.input_sets} input sets; "
                          f"implementations interleaved; median and IQR"}
    print(report.header_text(info, settings))
    print(flush=True)

    progress = Progress(sum(len(c.modes) for c in configs), enabled=not args.quiet)

    measured = []

    def save_partial(partial):  # a long run that is stopped still leaves what it measured
        measured[:] = [partial]
        if args.json:  # (with the selection's notes, which the full run adds at its end)
            report.write_json(args.json, report.payload(
                info, dict(settings, partial=True),
                dataclasses.replace(partial, notes=notes + partial.notes)))

    # Only the main thread may set a handler (a caller running main() in a thread keeps its own).
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    taken_by_others = contention.CpuTakenByOthers()
    try:
        outcome = harness.run(configs, impl_names, device, plan, progress,
                              check=not args.no_check, on_cell=save_partial)
    except KeyboardInterrupt as stop:
        terminated = isinstance(stop, Terminated)
        print(f"\n{'terminated (SIGTERM)' if terminated else 'interrupted'}: the cells measured so far" + (
            f" (also in {args.json}, marked partial)" if args.json and measured else ""),
            file=sys.stderr)
        if measured:
            print(report.format_table(measured[0].results))
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    finally:
        if in_main_thread:  # (None: a handler not set from Python; the default stands in)
            signal.signal(signal.SIGTERM,
                          signal.SIG_DFL if previous_handler is None else previous_handler)
    outcome.notes[:0] = notes
    if device.type == "cpu":  # (the load average at the start, then the run's own measure)
        info["cpu_cores_taken_by_others"] = taken_by_others.cores()
        for busy in (machine.busy_warning(info),
                     contention.busy_warning(info["cpu_cores_taken_by_others"],
                                             info["cpu_cores"])):
            if busy:
                outcome.notes.append(busy)
                outcome.busy = True

    print(report.format_table(outcome.results))
    print()
    for line in report.summary_lines(outcome):
        print(line)
    data = report.payload(info, settings, outcome)
    if args.json:
        report.write_json(args.json, data)
        print(f"wrote {args.json}")
    if args.markdown:
        report.write_markdown(args.markdown, info, settings, outcome)
        print(f"wrote {args.markdown}")
    if args.plot:
        where = info.get("gpu") if device.type == "cuda" else info["cpu"]
        title = f"fusedrnn vs torch.nn, {args.preset} on {where}"
        plot_speedups(outcome.results, args.plot, title)
        print(f"wrote {args.plot}")
    return EXIT_WRONG if outcome.fused_failures else 0
