"""One process pool per process, shared by every task run in it: started once, one worker per core.

A stage made of many Luigi tasks (the feature shards) runs them one after another in one process; starting
a pool per task would pay the workers' start-up and warm-up every time, so :func:`shared_pool` keeps one
alive until :func:`shutdown_shared_pool` (or the interpreter's exit). Its workers:

- run one BLAS/OpenMP thread each (the pool already has a process per core; more threads only compete);
- come from a ``forkserver`` that imported the ``preload`` modules once, so a worker starts in milliseconds
  without inheriting the parent's threads, open HDF5 files or locks (``fork`` would, and Python 3.12
  warns about forking a threaded process);
- ignore Ctrl-C (the parent handles it), keep freed memory for reuse, and exit when their parent dies.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.util
import os
import signal
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

from threadpoolctl import threadpool_limits

from pipeline.runtime import keep_freed_memory

log = logging.getLogger(__name__)

_pool: ProcessPoolExecutor | None = None
_pool_key: tuple[int, int, str] | None = None  # (owner pid, workers, start method)


def _start_method() -> str:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def shared_pool(workers: int, *, preload: Sequence[str] = ()) -> ProcessPoolExecutor:
    """This process's pool of ``workers`` processes, started on the first call and reused by later ones.

    A call with another ``workers``, or after a worker died (the pool is then broken), replaces the pool.
    ``preload``: modules the forkserver imports once for every worker (effective before it first starts).
    """
    global _pool, _pool_key
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    method = _start_method()
    key = (os.getpid(), workers, method)
    if _pool is not None and (_pool_key != key or getattr(_pool, "_broken", False)):
        shutdown_shared_pool()
    if _pool is None:
        context = multiprocessing.get_context(method)
        if method == "forkserver" and preload:
            context.set_forkserver_preload(list(preload))
        started = time.perf_counter()
        _pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                                    initargs=(os.getpid(),))
        _pool_key = key
        # Stopped at this process's exit, before multiprocessing joins its children: in a Luigi task process
        # (a multiprocessing child, which skips atexit) that join would otherwise wait on idle workers forever.
        multiprocessing.util.Finalize(None, _stop_at_exit, exitpriority=10)
        log.debug("process pool: %d %s workers (%.2f s)", workers, method, time.perf_counter() - started)
    return _pool


def start_shared_pool(workers: int, *, preload: Sequence[str] = ()) -> None:
    """Start :func:`shared_pool`'s workers now, in the background, and return at once.

    Their start-up (the forkserver importing ``preload``: 1.3 s for torch on a 2-core machine) then overlaps
    what this process does before it first submits work, instead of delaying that work. Only in a main process:
    a task process (Luigi's ``--workers N``) could exit before using them.
    """
    if multiprocessing.parent_process() is not None:
        return
    pool = shared_pool(workers, preload=preload)

    def spawn() -> None:  # each submit starts a worker while none is idle; starting one waits for the forkserver
        with contextlib.suppress(RuntimeError):  # shut down meanwhile: nothing to start
            for _ in range(workers):
                pool.submit(os.getpid)

    threading.Thread(target=spawn, name="shared pool start-up", daemon=True).start()


def shutdown_shared_pool() -> None:
    """Stop this process's shared pool, if any (waiting for running work); the next call starts a new one."""
    global _pool, _pool_key
    pool, owner = _pool, _pool_key
    _pool = _pool_key = None
    # A forked child inherits the parent's pool object but not its processes: not its to stop.
    if pool is not None and owner is not None and owner[0] == os.getpid():
        pool.shutdown(wait=True, cancel_futures=True)



def _stop_at_exit() -> None:
    """At exit nothing waits on the pool any more: stop its workers at once.

    The orderly :func:`shutdown_shared_pool` handshake hangs when run from multiprocessing's exit hook in a
    forked child (seen in Luigi task processes under ``--workers 2``), so the idle workers are terminated.
    """
    global _pool, _pool_key
    pool, owner = _pool, _pool_key
    _pool = _pool_key = None
    if pool is None or owner is None or owner[0] != os.getpid():
        return
    for process in list(getattr(pool, "_processes", {}).values()):
        process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)


def _init_worker(owner_pid: int) -> None:
    """Pool initializer: one BLAS thread, leave Ctrl-C to the parent, reuse freed memory, die with the parent."""
    threadpool_limits(limits=1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keep_freed_memory()  # each clip's few MB of arrays, freed and faulted in again, cost a fifth of its CPU
    # A SIGKILLed owner cannot stop its pool, and an idle worker would wait on its queue forever. Our parent is
    # the forkserver (which outlives the owner while any process forked from the owner lives) or the owner.
    threading.Thread(target=_exit_with_owner, args=(owner_pid, os.getppid()), daemon=True).start()


def _exit_with_owner(owner_pid: int, parent_pid: int) -> None:
    while os.getppid() == parent_pid and _alive(owner_pid):
        time.sleep(1.0)
    os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process took the number: ours is gone
        return False
    return True
