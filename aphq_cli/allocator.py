"""Keep freed memory in the process, so a loop that frees and allocates the same tensors does not page-fault.

A reconstruction iteration on a CPU allocates and frees dozens of
activation-sized tensors (a few MB each at the testbed's size). glibc's
malloc serves blocks that large with ``mmap`` (above its dynamic threshold)
or returns the top of its heap to the system on free (above its trim
threshold), so the next iteration touches fresh pages and pays a page fault
for every 4 KiB of them. Raising both thresholds keeps freed blocks of up to
32 MiB (glibc's ceiling for the ``mmap`` threshold; larger ones stay
mappings of their own) for the next allocation: on the issue #23 block, the
iteration measured 12 % faster (docs/speed.md). Numbers cannot change: only
where a tensor's memory comes from does.

The trim threshold must not move alone: alone it measured three times
slower than glibc's defaults (setting it turns the dynamic ``mmap``
threshold off, so every large block became a mapping again). Peak memory is
what the process held at its peak, as before; what changes is that it keeps
up to that much until it exits.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc caps the mmap threshold at 32 MiB on 64-bit systems (HEAP_MAX_SIZE / 2); mallopt refuses more.
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024

OPT_OUT_ENV = "APHQ_MALLOC"  # "default" (or "off"): leave glibc's malloc as it is
# A user's own malloc tuning (glibc reads these when a process starts) wins over ours.
USER_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


@functools.cache
def retain_freed_memory() -> bool:
    """Raise glibc malloc's mmap and trim thresholds for this process (once); True if they were set.

    A no-op (False) off glibc (macOS, musl), under another malloc preloaded
    (jemalloc, tcmalloc), when ``$APHQ_MALLOC`` is ``default`` or ``off``, and
    when the user tunes glibc's malloc (the ``MALLOC_*`` variables above, or
    ``glibc.malloc.*`` in ``$GLIBC_TUNABLES``). Never raises: a command must
    not fail over a speed setting.
    """
    if not sys.platform.startswith("linux") or os.environ.get(OPT_OUT_ENV, "").lower() in ("default", "off"):
        return False
    if any(name in os.environ for name in USER_ENV) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    libc = _glibc_malloc()
    if libc is None:
        return False
    # The mmap threshold first: it is the one glibc may refuse (above its ceiling, on a 32-bit build), and
    # then nothing has changed; the trim threshold alone would be slower than the defaults.
    if not libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES):
        return False
    return bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def _glibc_malloc() -> ctypes.CDLL | None:
    """This process's C library if it is glibc and its ``malloc`` is the one the process uses, else None."""
    try:
        process = ctypes.CDLL(None)  # the symbols the process resolves: a preloaded malloc comes first
        if not hasattr(process, "gnu_get_libc_version") or not hasattr(process, "mallopt"):
            return None
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if ctypes.cast(process.malloc, ctypes.c_void_p).value != ctypes.cast(libc.malloc, ctypes.c_void_p).value:
        return None  # another allocator serves malloc; glibc's mallopt would tune nothing in use
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc
