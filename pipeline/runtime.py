"""Process-wide settings for a process that runs numerics: glibc keeps freed memory, OpenMP threads sleep.

Both are set in the process itself, so every command gets them, not only users who know the environment
variables. Measured on a 2-core x86_64 machine, musicnn's forward on 3 s patches (``bench/library.py``):

- by default glibc hands every large freed buffer back to the kernel and the next pass faults it in again:
  25,000 minor faults and half the CPU time in the kernel per patch, 16-19 patches/s; with freed memory
  kept (:func:`keep_freed_memory`) and passes small enough to stay in glibc's heap
  (:func:`pipeline.inference.crops_per_pass`), under 100 faults per patch and 42-43 patches/s;
- OpenMP's default is to spin while waiting for the other threads: when another program holds a core, the
  two threads of a forward pass wait on each other's time slices, 5-7 patches/s; sleeping threads
  (:func:`quiet_openmp`) keep 24 patches/s on the same busy machine, and cost 5-15% on a quiet one (43-45
  against 49-51 patches/s). A library's vectors come from single-threaded pool workers, which never wait.
"""

from __future__ import annotations

import ctypes
import os

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_CEILING = 32 << 20  # glibc's largest mmap threshold on 64-bit: larger blocks are always mapped and unmapped
_TRIM_THRESHOLD = 256 << 20


def keep_freed_memory() -> None:
    """Let glibc reuse freed arrays rather than hand them back to the kernel after every use.

    Blocks up to :data:`MMAP_CEILING` then come from the heap and stay there, and the heap is trimmed only
    past 256 MB free, so the process keeps at most its high-water mark. A no-op where the C library is not
    glibc. Idempotent.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return
    mallopt(_M_MMAP_THRESHOLD, MMAP_CEILING)
    mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)


def quiet_openmp() -> None:
    """OpenMP threads that wait by sleeping, not spinning (``OMP_WAIT_POLICY=PASSIVE``), unless the user chose.

    The OpenMP runtime reads the variable once, when torch loads it: called before torch is imported it
    applies (the CLI calls it first thing); afterwards it changes nothing.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

