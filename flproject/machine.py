"""What this machine lends the process: the CPUs it may run on. Imports no Django, so that
the settings can use it."""

import math
import os
from pathlib import Path

# cgroup v2 keeps "<quota> <period>" in cpu.max; v1 keeps them in two files.
CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def cgroup_cpu_limit() -> float | None:
    """The CPUs a container's quota allows (2.5 for 250 ms per 100 ms), None without one."""
    try:
        quota, period = CGROUP_V2_CPU_MAX.read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = CGROUP_V1_QUOTA.read_text().strip()
            period = CGROUP_V1_PERIOD.read_text().strip()
        except OSError:
            return None
    if quota in {"max", "-1"}:
        return None
    try:
        limit = int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None
    return limit if limit > 0 else None


def available_cpus() -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup's quota (a
    container sees every core of its host in os.cpu_count())."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        # A quota of 1.5 CPUs still keeps two threads busy most of the time.
        cpus = min(cpus, max(1, math.ceil(limit)))
    return max(1, cpus)
