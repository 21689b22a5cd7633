"""An ordered process map: ``fn`` over items in worker processes, results in input order, memory bounded.

Workers ignore Ctrl-C (the parent handles it), keep freed memory for reuse, and exit when their parent dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

R = TypeVar("R")

# Results a pool may hold beyond those being written, per worker: keeps workers busy, bounds memory.
_IN_FLIGHT_PER_WORKER = 2
# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _init_worker(parent_pid: int, initializer: Callable[..., Any] | None, initargs: tuple) -> None:
    """Pool initializer: leave Ctrl-C to the parent, exit if the parent dies, then the caller's set-up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _keep_freed_memory()
    # A SIGKILLed parent cannot stop its pool, and an idle worker would wait on its queue forever.
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


def _keep_freed_memory() -> None:
    """Let glibc reuse freed arrays rather than hand them back to the kernel after every clip.

    Each clip allocates and frees a few MB of arrays; by default glibc unmaps or trims them and the next
    clip page-faults them back in, which costs a fifth of the CPU time. A pool worker is ours to tune;
    it then keeps at most its high-water mark. A no-op where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's ceiling on 64-bit; larger arrays are still mapped
    mallopt(_M_TRIM_THRESHOLD, 256 << 20)


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)

@contextlib.contextmanager
def ordered_process_map(
    fn: Callable[..., R],
    items: Iterable[Any],
    *args: Any,
    workers: int,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple = (),
) -> Iterator[Iterator[R]]:
    """Yield an iterator of ``fn(item, *args)`` over ``items``, in order, computed by ``workers`` processes.

    The pool starts (forks) on entry, before the caller opens files or starts threads. At most
    ``_IN_FLIGHT_PER_WORKER * workers`` results wait in memory at any time. ``workers == 1`` runs ``fn`` in
    this process (no pool, no initializer). A worker that dies raises ``BrokenProcessPool`` from the iterator.
    """
    if workers == 1:
        yield (fn(item, *args) for item in items)
        return
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_init_worker,
                               initargs=(os.getpid(), initializer, initargs))
    try:
        todo = iter(items)
        first = itertools.islice(todo, _IN_FLIGHT_PER_WORKER * workers)
        pending = deque(pool.submit(fn, item, *args) for item in first)

        def in_order() -> Iterator[R]:
            while pending:
                result = pending.popleft().result()
                for item in itertools.islice(todo, 1):
                    pending.append(pool.submit(fn, item, *args))
                yield result

        yield in_order()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
