"""What this machine can do and what this process may use of it, read from the operating system: the CPU's
features, the CPUs and memory a process may use (its affinity, and a container's control-group limits)."""

from __future__ import annotations

import functools
import math
import os
import statistics
import time
from pathlib import Path


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``); empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return parse_cpu_flags(f.read())
    except OSError:
        return frozenset()


def cpu_model() -> str:
    """The CPU's name (Linux ``/proc/cpuinfo``'s ``model name``), else what ``platform`` says; for reports."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags in the text of a ``/proc/cpuinfo``: its first ``flags`` line (x86) or ``Features``
    line (ARM)."""
    for line in cpuinfo.splitlines():
        name, colon, value = line.partition(":")
        if colon and name.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


# Control-group files that limit a container's CPUs and memory (v2 first, then v1), relative to /sys/fs/cgroup.
CPU_QUOTA_FILES = ("cpu.max", "cpu/cpu.cfs_quota_us", "cpu,cpuacct/cpu.cfs_quota_us")
MEMORY_LIMIT_FILES = ("memory.max", "memory/memory.limit_in_bytes")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def cpu_quota(read=None) -> float | None:
    """CPUs' worth of time the control group allows per period (e.g. 1.5), or None when unlimited. ``read``
    maps a file name under /sys/fs/cgroup to its text, or None where it does not exist (a seam for tests)."""
    read = read or _read_cgroup
    v2 = read("cpu.max")  # "<quota> <period>" in microseconds, or "max <period>"
    if v2 is not None:
        quota, _, period = v2.partition(" ")
        return None if quota == "max" or not period.strip().isdigit() else int(quota) / int(period)
    for name in CPU_QUOTA_FILES[1:]:
        quota = read(name)
        period = read(name.replace("cfs_quota_us", "cfs_period_us"))
        if quota is not None and period is not None:
            return None if int(quota) <= 0 else int(quota) / int(period)
    return None


def usable_cpus(read=None) -> tuple[int, str]:
    """How many CPUs this process can really use, and why: the CPUs it may run on (its affinity), fewer when
    the control group's quota allows less time (containers see every core of the host but may use few)."""
    cpus, why = len(_affinity()), "CPUs this process may run on"
    quota = cpu_quota(read)
    if quota is not None and quota < cpus:
        return max(1, math.floor(quota)), f"the container's CPU quota ({quota:g} CPUs)"
    return cpus, why


def memory_bytes(read=None) -> int:
    """Memory this process may use: the machine's, or the control group's limit when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    read = read or _read_cgroup
    for name in MEMORY_LIMIT_FILES:
        limit = read(name)
        if limit is not None and limit.strip().isdigit():
            total = min(total, int(limit))
    return total


def _read_cgroup(name: str) -> str | None:
    try:
        return (CGROUP_ROOT / name).read_text().strip()
    except OSError:
        return None


def other_runnable_threads(samples: int = 10, interval_s: float = 0.005, read=None) -> float:
    """Threads of other processes that are running or waiting for a CPU right now, on the CPUs this process may
    use: the kernel's count of runnable threads (``procs_running`` in /proc/stat) less this one, the median of a
    few samples, scaled down when this process may use only some of the machine's CPUs. ``read`` returns the
    text of /proc/stat (a seam for tests); 0 where it cannot be read."""
    read = read or _read_proc_stat
    counts = []
    for i in range(samples):
        text = read()
        line = next((ln for ln in (text or "").splitlines() if ln.startswith("procs_running")), None)
        if line is None:
            return 0.0
        counts.append(int(line.split()[1]) - 1)
        if i + 1 < samples:
            time.sleep(interval_s)
    others = max(0.0, statistics.median(counts))
    usable, machine = len(_affinity()), os.cpu_count() or 1
    return others * usable / machine if usable < machine else others


def _affinity() -> set[int]:
    try:
        return os.sched_getaffinity(0)
    except AttributeError:
        return set(range(os.cpu_count() or 1))


def _read_proc_stat() -> str | None:
    try:
        return Path("/proc/stat").read_text()
    except OSError:
        return None
