"""How many CPU threads torch should use when the user did not say (``lipmargin --threads``).

On a machine shared with other busy processes torch's default (one thread per core) is 10-50x
slower than one thread: its OpenMP workers spin waiting for cores that another process holds.
The rule here gives each process only the cores nobody else is running on, and one thread as
soon as every core is taken.  ``benchmarks/threads.py`` measures the rule against the
alternatives (see ``benchmarks/RESULTS.md``).

:func:`choose_threads` is pure (it takes the readings); :func:`read_cpu_load` reads them from
``/proc`` on Linux.  No torch import: the CLI decides before it imports torch.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

__all__ = ["CpuLoad", "choose_threads", "read_cpu_load", "auto_threads"]


@dataclass(frozen=True)
class CpuLoad:
    """What the machine looks like from this process.

    ``cpus``: cores this process may run on (its affinity mask).  ``runnable``: tasks running or
    waiting for a core right now, this process included (``procs_running`` of ``/proc/stat``,
    the median of a few samples), or ``None`` where unknown.  ``load1``: the one-minute load
    average, or ``None``.
    """

    cpus: int
    runnable: float | None = None
    load1: float | None = None


def choose_threads(load: CpuLoad) -> int:
    """Threads for torch: the cores not busy with other processes, at least 1.

    Other processes are counted from the instantaneous runnable count (minus this process);
    without it, from the one-minute load average (which lags, so it is used only as a fallback).
    With no readings at all every allowed core is used (torch's own default).

    >>> choose_threads(CpuLoad(cpus=2, runnable=1))      # idle 2-core machine
    2
    >>> choose_threads(CpuLoad(cpus=2, runnable=3))      # two busy processes besides us
    1
    >>> choose_threads(CpuLoad(cpus=16, runnable=5))     # four others on 16 cores
    12
    """
    cpus = max(1, int(load.cpus))
    if load.runnable is not None:
        others = max(0.0, load.runnable - 1)
    elif load.load1 is not None:
        others = max(0.0, load.load1)
    else:
        return cpus
    # A core is free only when no other task wants it: round the others up.
    free = cpus - int(-(-others // 1))
    return max(1, min(cpus, free))


def _procs_running(text: str) -> int | None:
    for line in text.splitlines():
        if line.startswith("procs_running"):
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                return int(parts[1])
    return None


def read_cpu_load(samples: int = 5, interval: float = 0.01) -> CpuLoad:
    """Read :class:`CpuLoad` for this process (``/proc`` on Linux; ``cpus`` only elsewhere).

    ``samples`` readings of ``procs_running``, ``interval`` seconds apart, give the median, so
    that a process between two bursts is not missed nor a passing one counted.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    counts: list[int] = []
    for i in range(max(1, samples)):
        try:
            with open("/proc/stat") as f:
                n = _procs_running(f.read())
        except OSError:
            n = None
        if n is None:
            break
        counts.append(n)
        if i + 1 < samples:
            time.sleep(interval)
    runnable = float(sorted(counts)[len(counts) // 2]) if counts else None
    try:
        load1: float | None = os.getloadavg()[0]
    except (AttributeError, OSError):
        load1 = None
    return CpuLoad(cpus=cpus, runnable=runnable, load1=load1)


def auto_threads() -> int:
    """:func:`choose_threads` of the current :func:`read_cpu_load`."""
    return choose_threads(read_cpu_load())
