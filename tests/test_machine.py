"""What kiln reads of the machine: the CPUs and memory a process may really use, in a container too."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from kiln.hardware import cpu_quota, memory_bytes, other_runnable_threads, usable_cpus


def files(contents: dict[str, str] | None = None):
    """A stand-in for /sys/fs/cgroup: file name -> text."""
    return lambda name: (contents or {}).get(name)


@pytest.mark.parametrize(("cgroup", "quota"), [
    (files({"cpu.max": "150000 100000"}), 1.5),  # cgroup v2: quota and period in microseconds
    (files({"cpu.max": "max 100000"}), None),  # v2, unlimited
    (files({"cpu/cpu.cfs_quota_us": "50000", "cpu/cpu.cfs_period_us": "100000"}), 0.5),  # v1
    (files({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}), None),  # v1, unlimited
    (files(), None),  # no control group files
])
def test_cpu_quota_of_cgroup_v1_and_v2(cgroup, quota):
    assert cpu_quota(cgroup) == quota


def test_a_quota_below_the_visible_cpus_decides_how_many_are_used():
    """A container sees every core of the host; its quota says how many it may keep busy."""
    visible = len(os.sched_getaffinity(0))
    count, why = usable_cpus(files({"cpu.max": "50000 100000"}))
    assert count == 1 and "quota" in why
    assert usable_cpus(files()) == (visible, "CPUs this process may run on")
    assert usable_cpus(files({"cpu.max": f"{visible * 400000} 100000"}))[0] == visible  # more quota than CPUs


def test_memory_is_the_lower_of_the_machine_and_the_control_group_limit():
    machine = memory_bytes(files())
    assert machine > 2**28
    assert memory_bytes(files({"memory.max": str(2**30)})) == min(machine, 2**30)
    assert memory_bytes(files({"memory/memory.limit_in_bytes": str(2**62)})) == machine  # v1 "unlimited"
    assert memory_bytes(files({"memory.max": "max"})) == machine


def test_other_processes_runnable_threads_are_counted_on_the_cpus_this_process_may_use():
    stat = "cpu  1 2 3\nprocs_running 4\nprocs_blocked 0\n"
    assert other_runnable_threads(samples=3, interval_s=0, read=lambda: stat) == 3  # this process left out
    assert other_runnable_threads(read=lambda: None) == 0  # no /proc/stat: nothing known to be busy


def test_busy_processes_are_seen(tmp_path):
    """Two processes spinning on the CPU show up as about two busy threads (more if the machine is busy anyway)."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(0.3)
        assert other_runnable_threads() >= 1.5 * min(1, len(os.sched_getaffinity(0)) / (os.cpu_count() or 1))
    finally:
        for p in spinners:
            p.kill()


@pytest.mark.parametrize(("usable", "busy", "threads"), [(2, 0.0, 2), (2, 2.0, 1), (2, 1.0, 1), (8, 3.0, 5), (1, 5.0, 1)])
def test_auto_threads_leave_out_the_cpus_other_processes_keep_busy(monkeypatch, usable, busy, threads):
    from kiln.training import threads as module

    monkeypatch.setattr(module, "usable_cpus", lambda: (usable, "test"))
    monkeypatch.setattr(module, "other_runnable_threads", lambda: busy)
    chosen, why = module.pick_threads("auto")
    assert chosen == threads and "auto" in why
    assert module.pick_threads("auto", resumed=2)[0] == 2  # a resumed run keeps the count it started with
    assert module.pick_threads(3) == (3, "set in the config")
