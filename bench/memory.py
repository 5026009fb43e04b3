"""Peak resident memory of a process and everything it started, read from /proc (Linux).

`VmHWM` in /proc/PID/status is the kernel's high-water mark of a process's
resident set, so reading it just before the processes end gives each one's
peak without sampling. A Ray cluster started by `specfleet up` is one tree:
the driver starts gcs_server, raylet and the dashboard, and the raylet starts
the worker processes that host the actors, so one walk finds them all.
"""

import os
from pathlib import Path

PROC = Path("/proc")


def process_tree_peaks(root_pid: int) -> list[dict]:
    """Peak RSS of `root_pid` and its live descendants: [{pid, name, peak_rss_mib}], root first.

    Empty where /proc is absent (not Linux); processes that vanish mid-walk are skipped.
    """
    if not PROC.is_dir():
        return []
    children = _children_by_parent()
    found, pending = [], [root_pid]
    while pending:
        pid = pending.pop(0)
        peak = peak_rss_mib(pid)
        if peak is not None:
            found.append({"pid": pid, "name": process_name(pid), "peak_rss_mib": round(peak, 1)})
        pending += children.get(pid, [])
    return found


def private_rss_mib(pid: int) -> float | None:
    """RssAnon of a process in MiB (its own heaps, arenas and stacks; shared object-store pages mapped in are
    left out), or None if it is gone or unreadable."""
    return _status_mib(pid, "RssAnon")


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM of a process in MiB, or None if it is gone or unreadable."""
    return _status_mib(pid, "VmHWM")


def _status_mib(pid: int, field: str) -> float | None:
    """A memory field of /proc/PID/status in MiB (the kernel reports kB), or None."""
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


def process_name(pid: int) -> str:
    """The command line as the process shows it (Ray workers rename themselves 'ray::TargetActor...')."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return "?"
    parts = [p for p in raw.decode(errors="replace").split("\0") if p]
    if not parts:
        return "?"
    if parts[0].startswith("ray::"):
        return parts[0].split()[0]
    return " ".join([os.path.basename(parts[0]), *parts[1:4]])[:120]


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])  # field 4, after the parenthesised command name
        children.setdefault(parent, []).append(int(entry.name))
    return children
