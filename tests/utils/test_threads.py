"""torch's CPU threads on a shared machine: one per core that other processes leave free, measured from
the kernel's counters; a requested count is kept."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from comoe.utils import threads as threads_module
from comoe.utils.threads import CpuThreads, usable_cores


@pytest.fixture
def all_cores():
    previous = torch.get_num_threads()
    torch.set_num_threads(usable_cores())
    yield usable_cores()
    torch.set_num_threads(previous)


def _busy_processes(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


@pytest.mark.parametrize(
    ("others", "expected"),
    [(0.0, 4), (0.4, 4), (0.6, 3), (1.0, 3), (2.5, 2), (3.6, 1), (9.0, 1)],
)
def test_the_count_is_one_thread_per_core_the_others_leave_free(monkeypatch, others, expected):
    """Counters 10 s apart: the machine's busy CPU seconds grew by ``others`` cores plus this process's."""
    readings = iter([(0.0, 100.0, 5.0), (10.0, 100.0 + 10 * others + 7.0, 12.0)])
    monkeypatch.setattr(threads_module, "_cpu_seconds", lambda: next(readings))
    monkeypatch.setattr(threads_module, "usable_cores", lambda: 4)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        chosen = CpuThreads()
        assert chosen.adjust(force=True) == expected and torch.get_num_threads() == expected
        assert chosen.history == [(others, expected)]
    finally:
        torch.set_num_threads(previous)


def test_a_measurement_waits_for_its_interval_without_reading_the_counters(monkeypatch):
    readings = iter([(0.0, 0.0, 0.0)])  # a second read of the counters would raise StopIteration
    monkeypatch.setattr(threads_module, "_cpu_seconds", lambda: next(readings))
    chosen = CpuThreads(every_s=10.0)
    before = torch.get_num_threads()
    assert chosen.adjust() == before and chosen.history == []  # less than 10 s after the last: not yet


@pytest.mark.skipif(usable_cores() < 2, reason="needs two cores")
def test_a_busy_core_takes_a_thread_away_and_a_requested_count_is_kept(all_cores):
    competitors = _busy_processes(all_cores)  # every core busy: the fewest threads
    try:
        assert CpuThreads().settle(0.5) == 1
        assert torch.get_num_threads() == 1
        assert CpuThreads(requested=2).settle() == 2 and torch.get_num_threads() == 2
    finally:
        for process in competitors:
            process.kill()
            process.wait()


def test_the_counters_are_read_on_linux():
    reading = threads_module._cpu_seconds()
    if not sys.platform.startswith("linux"):
        assert reading is None
        return
    wall, busy, own = reading
    assert busy >= own > 0 and wall > 0
