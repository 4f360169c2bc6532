"""The process's memory helpers: keeping freed blocks for reuse within a run."""

from __future__ import annotations

import platform
import resource
import sys

import pytest

from cai.memory import keep_freed_memory


def _page_faults_of(work) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    work()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's allocator settings")
def test_freed_blocks_are_kept_for_the_next_pass():
    """Passes that each allocate eight 4 MB blocks and free them: glibc's defaults hand the freed top of the
    heap back after every pass (about 7,800 pages faulted in again per pass on the reference machine);
    once the allocator keeps freed blocks, a pass after the first few finds its pages already there."""
    import torch

    def one_pass():
        blocks = [torch.empty(1_000_000).fill_(1.0) for _ in range(8)]  # written, so resident
        del blocks

    assert keep_freed_memory()
    for _ in range(4):
        one_pass()
    assert _page_faults_of(lambda: [one_pass() for _ in range(5)]) < 1_000
