"""This process's memory: its peak resident size per stage, handing freed memory back to the system between
stages, and keeping it for reuse within one.

`cai.runs.StageRun` calls these around each stage, so a stage's manifest records its own peak even
when several stages run in one process (``cai run``).
"""

from __future__ import annotations

import ctypes
import gc
import resource
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
KEEP_FREED_BYTES = 1 << 30
"""Free memory the C allocator may hold at the top of its heap before it hands any back to the system."""
MMAP_ABOVE_BYTES = 32 << 20
"""Blocks above this size get their own mapping (glibc's largest default); smaller ones come from the heap."""


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


def keep_freed_memory() -> bool:
    """Let the C allocator keep the large blocks a model run frees, for the next pass to reuse.

    By default glibc maps blocks of a few MB (a batch's activations) afresh for each allocation, or
    hands the top of its heap back to the system once enough is free there, and the next pass then
    faults every page in again and the kernel zeroes it: on the reference machine the label bench's
    16 pairs took 440,000 page faults a run and 6.2 s cold / 5.3 s warm, against 4.8 s with this
    set. Blocks up to `MMAP_ABOVE_BYTES` come from the heap, and up to `KEEP_FREED_BYTES` of free heap
    is kept; `release_memory` still returns it all between stages. glibc only; False elsewhere.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_ABOVE_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES))


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
