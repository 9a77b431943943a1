"""Host runtime settings."""

from __future__ import annotations

import resource
import sys

import numpy as np
import pytest

from recis_jax.runtime import keep_freed_host_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings: Linux only")
def test_freed_memory_is_reused_without_page_faults():
    assert keep_freed_host_memory()
    n = 64 << 20  # bytes: larger than glibc's largest mmap threshold (32 MB)
    a = np.ones(n // 8)
    del a
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    b = np.ones(n // 8)  # the same size again: served from the kept pages
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del b
    # without the setting: a fresh mapping, faulted in again (33 faults with NumPy's huge
    # pages, 16384 with 4 KB pages as XLA's buffers get)
    assert faults < 8, f"{faults} page faults re-touching {n >> 20} MB"
