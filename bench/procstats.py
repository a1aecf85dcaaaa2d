"""CPU time and peak memory of the processes a benchmark row runs, read from ``/proc``.

A row names its processes by *role* ("forwarder", "redis-server", "nginx", ...); a role may
hold several processes (nginx's master and worker, sshd's listener and its per-connection
children). CPU is summed over a role's processes, peak RSS (``VmHWM``) is the largest of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")

PidSource = Callable[[], list[int]]
"""Returns the pids a role has right now (it may grow: sshd forks per connection)."""


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name (field 3 onwards), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` in seconds (its children not included), or None if gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot): with the pid, it names one process."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def vm_hwm_kib(pid: int) -> int | None:
    """Peak resident set size of ``pid`` in KiB (``VmHWM``), or None if gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def children_map() -> dict[int, list[int]]:
    """Every live process's children, by parent pid (one scan of ``/proc``)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(name))
    return children


def with_descendants(pid: int) -> list[int]:
    """``pid`` and all its live descendants (empty if ``pid`` is gone)."""
    if _stat_fields(pid) is None:
        return []
    children, found, todo = children_map(), [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


@dataclass(frozen=True)
class Snapshot:
    """CPU seconds per pid, grouped by role, at one moment."""

    cpu: Mapping[str, Mapping[int, float]]

    @staticmethod
    def take(roles: Mapping[str, PidSource]) -> Snapshot:
        cpu: dict[str, dict[int, float]] = {}
        for role, source in roles.items():
            per_pid = {pid: cpu_seconds(pid) for pid in source()}
            cpu[role] = {pid: seconds for pid, seconds in per_pid.items() if seconds is not None}
        return Snapshot(cpu)

    def since(self, earlier: Snapshot) -> dict[str, float]:
        """CPU seconds each role used between ``earlier`` and this snapshot.

        A process born in between counts from zero; one that died in between is lost.
        """
        used: dict[str, float] = {}
        for role, now in self.cpu.items():
            before = earlier.cpu.get(role, {})
            used[role] = sum(max(0.0, seconds - before.get(pid, 0.0)) for pid, seconds in now.items())
        return used


def peak_rss_mib(roles: Mapping[str, PidSource]) -> dict[str, float]:
    """Largest ``VmHWM`` among each role's processes, in MiB."""
    peaks: dict[str, float] = {}
    for role, source in roles.items():
        values = [v for v in (vm_hwm_kib(pid) for pid in source()) if v is not None]
        if values:
            peaks[role] = max(values) / 1024
    return peaks


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (``/proc/stat``, everything but idle
    and iowait): the difference over a measurement, minus what our processes used, is what
    the rest of the machine took meanwhile."""
    with open("/proc/stat", "rb") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` prints them."""
    with open("/proc/loadavg") as f:
        return ", ".join(f.read().split()[:3])
