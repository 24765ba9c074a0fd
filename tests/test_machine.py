"""What kiln reads of the machine: the CPUs and memory a process may really use, in a container too."""

from __future__ import annotations

import pytest

from kiln.hardware import cpu_quota, memory_bytes, usable_cpus


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
    import os

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
