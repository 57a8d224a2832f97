"""How much CPU time other processes took while the benchmark ran.

The header's load average is read once, before the run, because during it the benchmark's own
threads count too. So it misses a job that starts later: a test suite started 27 s before a
quick run read 0.99 at the start on 2 cores (under the 1.5 that marks a run busy), 2.18 a few
minutes on; torch.nn's LSTM B=1 T=100 H=64 took 792 ms instead of 0.4, and the run reported a
target "59.00x (goal >= 6x) met" (found by review, session 29). Two-thread OpenMP teams suffer
the most when a core is taken.

Here the busy time of the CPUs this process may run on (/proc/stat, the hypervisor's steal time
included: a VM's neighbours compete too) is read when the run begins and when it ends, and what
this process itself used (all its threads, getrusage) is taken off. Linux only; elsewhere the
load average is all there is.
"""
from __future__ import annotations

import os
import resource
import time
from typing import NamedTuple, Optional

# Other processes keeping more than this share of the usable cores busy, on average over the run
# (half a core of 2), make its times and ratios unreliable.
BUSY_SHARE = 0.25


class _Sample(NamedTuple):
    wall_s: float
    busy_s: float  # busy time of the usable CPUs, every process's and the hypervisor's
    own_s: float   # this process's CPU time, all threads
    cpus: int      # how many CPUs this process may run on


def _sample() -> Optional[_Sample]:
    try:
        cpus = {f"cpu{n}" for n in os.sched_getaffinity(0)}
        ticks = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat") as stat:
            lines = [line.split() for line in stat if line.startswith("cpu")]
    except (AttributeError, OSError, ValueError):
        return None
    busy = 0
    for fields in lines:
        if fields[0] in cpus:
            # user nice system idle iowait irq softirq steal (guest time is inside user)
            user, nice, system, _, _, irq, softirq, steal = (int(v) for v in fields[1:9])
            busy += user + nice + system + irq + softirq + steal
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return _Sample(time.monotonic(), busy / ticks, usage.ru_utime + usage.ru_stime, len(cpus))


class CpuTakenByOthers:
    """Started when the run begins; cores() when it ends."""

    def __init__(self):
        self._start = _sample()

    def cores(self) -> Optional[float]:
        """How many cores other processes kept busy on average since the start (None where it
        cannot be read)."""
        end = _sample()
        if self._start is None or end is None or end.wall_s <= self._start.wall_s:
            return None
        others = (end.busy_s - self._start.busy_s) - (end.own_s - self._start.own_s)
        # /proc/stat counts whole clock ticks (10 ms) and getrusage does not: over a short run
        # the difference can pass what the cores can do (2.65 of 2 cores over ~10 ms, in a test
        # beside other work), so it is capped at the usable cores.
        return min(float(end.cpus), max(0.0, others / (end.wall_s - self._start.wall_s)))


def busy_warning(taken: Optional[float], cores: int) -> Optional[str]:
    """A note for a run during which other processes took more than BUSY_SHARE of the cores."""
    if taken is None or taken <= BUSY_SHARE * cores:
        return None
    return (f"other processes kept {taken:.2f} of the {cores} usable cores busy on average during "
            f"the run: they competed for the CPU, so times and ratios are unreliable")
