"""How many threads to run compute on: the one answer for llama.cpp and onnxruntime.

Physical cores, not hyper-threads (decode is memory-bound and GEMMs are compute-bound: SMT siblings only
contend), counted among the CPUs this process may run on (`os.sched_getaffinity`: `taskset`, `docker
--cpuset-cpus`, systemd CPUAffinity), and capped by a cgroup CPU quota (`docker --cpus`, Kubernetes limits),
so a restricted process does not start more threads than it has cores and oversubscribe them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional


def allowed_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def _core_of_cpu() -> dict[int, tuple[str, str]]:
    """logical CPU -> (package, core), from sysfs, else /proc/cpuinfo; {} where neither says."""
    out = {}
    for topo in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        try:
            cpu = int(topo.parent.name[3:])
            out[cpu] = ((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip())
        except (OSError, ValueError):
            continue
    if out:
        return out
    try:
        cpu = phys = None
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines() + [""]:
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "processor":
                cpu = int(value)
            elif key == "physical id":
                phys = value
            elif key == "core id" and cpu is not None:
                out[cpu] = (phys or "0", value)
            elif not line.strip():
                cpu = phys = None
    except (OSError, ValueError):
        return {}
    return out


def cgroup_cpu_limit() -> Optional[float]:
    """CPUs the cgroup (v2 cpu.max, else v1 cfs quota) allows; None when unlimited or unknown."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def physical_cores() -> int:
    """Default thread count: physical cores among the allowed CPUs, capped by the cgroup quota; at least 1."""
    return describe()["threads"]


def describe() -> dict:
    """The count and what it came from (`doctor` prints this)."""
    allowed = allowed_cpus()
    topology = _core_of_cpu()
    cores = {topology[c] for c in allowed if c in topology}
    # CPUs missing from the topology (none known at all, or offline entries) count as one core each
    physical = len(cores) + len([c for c in allowed if c not in topology])
    quota = cgroup_cpu_limit()
    threads = physical if quota is None else min(physical, max(1, math.ceil(quota)))
    return {"threads": max(1, threads), "allowed_cpus": len(allowed), "physical_cores_allowed": physical,
            "physical_cores_total": len(set(topology.values())) or (os.cpu_count() or 1), "cgroup_cpu_limit": quota}
