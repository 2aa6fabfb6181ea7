"""Keep freed memory in the process, so a loop that frees and allocates the same tensors does not page-fault.

A reconstruction iteration on a CPU allocates and frees dozens of
activation-sized tensors (a few MB each at the testbed's size, tens of MB at
COCO's). glibc's malloc serves blocks that large with ``mmap`` (above its
dynamic threshold) or returns the top of its heap to the system on free
(above its trim threshold), so the next iteration touches fresh pages and
pays a page fault for every 4 KiB of them. Raising both thresholds keeps the
freed memory for the next allocation of the same size: on the issue #23
block, the iteration measured 11 % faster (docs/speed.md). Numbers cannot
change: only where a tensor's memory comes from does.

Both thresholds must move together: either alone measures slower than
glibc's defaults (setting one turns off the dynamic ``mmap`` threshold, and a
heap that is trimmed at once faults as ``mmap`` does). Peak memory is what
the process held at its peak, as before; what changes is that it keeps up to
that much until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc caps the mmap threshold at 32 MiB on 64-bit systems (HEAP_MAX_SIZE / 2); mallopt refuses more.
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 1024 * 1024 * 1024

OPT_OUT_ENV = "APHQ_MALLOC"  # "default": leave glibc's malloc as it is
# A user's own MALLOC_* tuning (glibc reads these at start) wins over ours.
USER_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


@functools.cache
def retain_freed_memory() -> bool:
    """Raise glibc malloc's mmap and trim thresholds for this process (once); True if they were set.

    A no-op (False) off glibc (macOS, musl), when ``$APHQ_MALLOC`` is
    ``default``, or when the user set glibc's own ``MALLOC_*`` variables.
    """
    if not sys.platform.startswith("linux") or os.environ.get(OPT_OUT_ENV, "").lower() == "default":
        return False
    if any(name in os.environ for name in USER_ENV):
        return False
    libc = _glibc()
    if libc is None:
        return False
    # The mmap threshold first: it is the one glibc may refuse (above its ceiling, on a 32-bit build), and
    # then nothing has changed; the trim threshold alone would be slower than the defaults.
    if not libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        return False
    return bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def _glibc():
    """This process's C library if it is glibc (it has ``gnu_get_libc_version``), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc
