"""This process's memory: its peak resident size per stage, and handing freed memory back to the system.

`cai.runs.StageRun` calls these around each stage, so a stage's manifest records its own peak even
when several stages run in one process (``cai run``).
"""

from __future__ import annotations

import ctypes
import gc
import resource
import sys


def peak_rss_gb() -> float:
    """This process's peak resident memory, in GB, since the last ``reset_peak_rss`` (or since it began).

    On Linux this is the kernel's high-water mark (VmHWM), which ``reset_peak_rss`` sets back to the
    current size, so a stage run after another in one process reports its own peak, not the earlier
    stage's. Elsewhere it is ``ru_maxrss`` (the whole process's peak; macOS reports bytes). The
    reset also lowers the maximum RSS that ``/usr/bin/time`` reports for the process, so a run's
    peak is the largest of its stages' peaks (``cai status``), not that figure.
    """
    hwm = _read_vm_hwm_kib()
    if hwm is not None:
        return round(hwm * 1024 / 1e9, 2)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak * (1 if sys.platform == "darwin" else 1024) / 1e9, 2)


def release_memory() -> None:
    """Hand memory freed by earlier work back to the system before a stage starts.

    A stage drops its models when it ends, but the C allocator keeps the freed pages of its heap
    for reuse, so the next stage in the same process (``cai run``) would start from the earlier
    stage's high-water mark; ``malloc_trim`` returns them (glibc only; elsewhere a no-op).
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Start a new peak-memory window for this process (Linux); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak RSS to the current RSS
        return True
    except OSError:
        return False


def _read_vm_hwm_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None
