"""Timing: one clock per device, and the interleaved repeat loop.

Implementations take turns within every repeat (in a rotating order), so a burst of machine noise
hits all of them alike, and the speed-up ratio is measured in the same run under the same load.
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch


class CpuClock:
    """Wall clock around the call (CPU work is synchronous)."""

    def time_ms(self, call: Callable[[], None]) -> float:
        start = time.perf_counter()
        call()
        return (time.perf_counter() - start) * 1e3


class CudaClock:
    """CUDA events on the current stream; the queue is drained first so calls never overlap."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def time_ms(self, call: Callable[[], None]) -> float:
        torch.cuda.synchronize(self.device)
        self.start.record()
        call()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end)


def clock_for(device: torch.device):
    return CudaClock(device) if device.type == "cuda" else CpuClock()


@dataclass
class Stats:
    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    repeats: int

    @staticmethod
    def of(samples: List[float]) -> "Stats":
        s = sorted(samples)
        if len(s) >= 2:
            q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
        else:
            q1 = q3 = s[0]
        return Stats(statistics.median(s), q1, q3, s[0], s[-1], len(s))

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms


@dataclass
class Plan:
    """How long to measure one (configuration, mode) cell."""
    warmup: int = 2              # calls per implementation before timing (first-call packing, caches)
    repeats: Optional[int] = None  # fixed number of timed calls; None = from the time budget
    budget_s: float = 2.0        # timed seconds per cell, shared by all implementations
    min_repeats: int = 3
    max_repeats: Optional[int] = 100  # None: the budget alone decides
    input_sets: int = 3
    # Stop warming up after a round that took more than half the budget (calls that long are warm
    # after one); off where --warmup or --repeats was given, which are then done as asked.
    shorten_warmup: bool = True

    def done(self, rounds: int, elapsed_s: float) -> bool:
        """Rounds run until the budget is spent (between min and max rounds), or `repeats` exactly.
        Decided as the rounds go, not from the warm-up, so one slow warm-up call cannot cut a cell
        short on a busy machine."""
        if self.repeats is not None:
            return rounds >= self.repeats
        if self.max_repeats is not None and rounds >= self.max_repeats:
            return True
        return rounds >= self.min_repeats and elapsed_s >= self.budget_s

    def fraction(self, rounds: int, elapsed_s: float) -> float:
        if self.repeats is not None:
            return rounds / self.repeats
        by_rounds = rounds / self.max_repeats if self.max_repeats else 0.0
        return min(1.0, max(by_rounds, min(elapsed_s / self.budget_s, rounds / self.min_repeats)))


@dataclass
class Runner:
    """One implementation in one cell: `prepare(i)` runs untimed before `call(i)` on input set i."""
    name: str
    prepare: Callable[[int], None]
    call: Callable[[int], None]
    samples: List[float] = field(default_factory=list)
    error: Optional[str] = None


def _attempt(runner: Runner, clock, index: int) -> Optional[float]:
    try:
        runner.prepare(index)
        return clock.time_ms(lambda: runner.call(index))
    except Exception as exc:  # a failing implementation is a row with an error, not a crash
        runner.error = f"{type(exc).__name__}: {exc}".strip()
        return None


def measure(runners: List[Runner], clock, plan: Plan,
            tick: Optional[Callable[[float], None]] = None,
            stage: Optional[Callable[[str], None]] = None) -> Dict[str, Runner]:
    """Warm-up, then interleaved timed rounds (Plan.done says when to stop); returns runners by
    name with their samples.

    tick(fraction_done) reports progress within the cell; stage(name) what runs before the
    first tick ("warm-up NAME", then "timing").
    """
    stage = stage or (lambda name: None)
    live = list(runners)
    last_ms: Dict[str, float] = {}
    for w in range(plan.warmup):
        for r in list(live):
            stage(f"warm-up {r.name}")
            t = _attempt(r, clock, w % plan.input_sets)
            if t is None:
                live.remove(r)
            else:
                last_ms[r.name] = t
        if plan.shorten_warmup and sum(last_ms.values()) > plan.budget_s * 1e3 / 2:
            break  # calls this long are warm after one; more warm-up would only cost time
    if not live:
        return {r.name: r for r in runners}
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()  # a collection inside one call would charge one implementation for all
    stage("timing")
    start = time.perf_counter()
    rep = 0
    try:
        while True:
            # The turn order rotates from round to round, and not in step with the input sets
            # (rep % input_sets): with as many implementations as sets, each would otherwise
            # always run in the same place on the same set, and a set's cost would read as noise.
            shift = (rep + rep // plan.input_sets) % max(1, len(live))
            for r in live[shift:] + live[:shift]:
                if r.error is not None:
                    continue
                t = _attempt(r, clock, rep % plan.input_sets)
                if t is not None:
                    r.samples.append(t)
            rep += 1
            elapsed = time.perf_counter() - start
            if plan.done(rep, elapsed) or all(r.error is not None for r in live):
                break
            if tick is not None:
                tick(plan.fraction(rep, elapsed))
    finally:
        if was_enabled:
            gc.enable()
    return {r.name: r for r in runners}
