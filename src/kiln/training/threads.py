"""How many CPU threads a training uses: ``train.threads``, or ``auto`` from what this process may really use.

PyTorch's pool (and kiln's C kernels, which run in the same OpenMP pool) takes every CPU it sees. On a busy
machine its threads then wait for each other at every operator while other processes hold the CPUs: the seed
model's 12,800 images took 4-63 s with two threads beside two busy processes on two cores, against 2.6-3.0 s
with one thread and 1.1-1.5 s with two on the idle machine. So ``auto`` counts the CPUs the process may use (its
affinity, a container's CPU quota) and leaves out those that other processes' runnable threads keep busy at the
start. The count then holds for the whole run, and a resumed run keeps it: one thread count gives one result.
"""

from __future__ import annotations

from kiln.hardware import other_runnable_threads, usable_cpus


def pick_threads(setting: str | int, resumed: int | None = None) -> tuple[int, str]:
    """(threads, why) for ``train.threads``; ``resumed``: the count the run started with, for a resumed run."""
    if setting != "auto":
        return int(setting), "set in the config"
    if resumed:
        return resumed, "auto: the count this run started with (a resumed run computes as it began)"
    usable, why = usable_cpus()
    busy = other_runnable_threads()
    threads = max(1, usable - round(busy))
    return threads, f"auto: {usable} usable ({why}), {busy:g} kept busy by other processes"
