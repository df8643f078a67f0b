"""CPU threads for torch on a shared machine: one per core that other processes leave free.

torch's OpenMP threads wait for each other at the end of every parallel operator. When another process
holds a core, the thread that shares it is scheduled late and every other thread spins at the barrier:
on a 2-core machine with one busy process, two threads run a training step 5-10× slower than on an idle
machine, one thread about 2× (``benchmarks/busy_machine.py``). So the count follows what the other
processes use, measured from the kernel's CPU counters between two readings (Linux ``/proc``); elsewhere
it stays torch's.
"""

from __future__ import annotations

import math
import os
import time

import torch

CHECK_EVERY_S = 10.0  # how often a run re-measures the other processes' load


def _cpu_seconds() -> tuple[float, float, float] | None:
    """(wall clock, CPU seconds all cores have been busy, CPU seconds of this process), or None off Linux."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
        with open("/proc/self/stat") as fh:
            own = fh.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    except (OSError, ValueError, IndexError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is in user)
    return time.monotonic(), busy / tick, (int(own[11]) + int(own[12])) / tick  # utime + stime


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class CpuThreads:
    """Sets torch's CPU thread count: ``requested`` threads, or (None) one per core that other processes
    leave free, re-measured when :meth:`adjust` is called ``CHECK_EVERY_S`` or more after the last
    measurement. Never more than torch's count at construction (``OMP_NUM_THREADS`` caps it)."""

    def __init__(self, requested: int | None = None, every_s: float = CHECK_EVERY_S) -> None:
        self.requested, self.every_s = requested, every_s
        self.most = min(torch.get_num_threads(), usable_cores())
        self.last = _cpu_seconds()
        self.checked = time.monotonic()
        self.history: list[tuple[float, int]] = []  # (other processes' cores, threads chosen)
        if requested is not None:
            torch.set_num_threads(requested)

    def adjust(self, force: bool = False) -> int:
        """The thread count from here on, re-measured if due (or ``force``); returns it."""
        if self.requested is not None or self.last is None:
            return torch.get_num_threads()
        if not force and time.monotonic() - self.checked < self.every_s:  # a clock read, not /proc's files
            return torch.get_num_threads()
        now = _cpu_seconds()
        if now is None or now[0] <= self.last[0]:
            return torch.get_num_threads()
        self.checked = time.monotonic()
        wall = now[0] - self.last[0]
        others = max(0.0, (now[1] - self.last[1]) - (now[2] - self.last[2])) / wall
        self.last = now
        threads = max(1, min(self.most, math.floor(usable_cores() - others + 0.5)))
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        self.history.append((round(others, 2), threads))
        return threads

    def settle(self, seconds: float = 0.3) -> int:
        """Measure over ``seconds`` now and set the count: what a run does before its first step."""
        if self.requested is None and self.last is not None:
            time.sleep(seconds)
            return self.adjust(force=True)
        return torch.get_num_threads()
