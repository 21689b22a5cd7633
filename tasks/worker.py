"""Workers against a luigid: a run's, which waits for its tasks that others run, and ``melsearch worker``'s.

``melsearch worker`` takes from luigid the pending tasks of the heavy work that any machine may do, whoever
listed them (:data:`PORTABLE`: feature shards, a library's feature parts and vector batches). Their parameters
say everything that shapes their output, so the worker needs none of the run's settings (``features.processes``
is its own). It adds each such task to its own Luigi worker, so luigid hands it to whichever worker asks
first; a worker that dies while running one is dropped by luigid after ``[scheduler] worker_disconnect_delay``,
and the task is pending again after ``retry_delay``.
"""

from __future__ import annotations

import logging
import signal
import time
import urllib.request
from types import FrameType

import luigi
import luigi.interface
import luigi.rpc
import luigi.worker
from luigi.scheduler import DONE, FAILED

from pipeline.errors import MelsearchError
from pipeline.layout import WorkDir
from tasks.features import FeatureShard
from tasks.library import LibraryPart, VectorBatch
from tasks.progress import task_name

log = logging.getLogger(__name__)

PORTABLE: tuple[type[luigi.Task], ...] = (FeatureShard, LibraryPart, VectorBatch)  # their parameters say everything
POLL_S = 1.0  # an idle worker asks luigid for pending tasks this often


class Worker(luigi.worker.Worker):
    """A Luigi worker that, with ``keep_alive``, waits while its tasks are pending or run elsewhere; keeps what it ran.

    Kept alive, it asks luigid again as long as some of its tasks are not done and none it ran has failed: a shard
    another machine is making is waited for, not taken for missing. ``ran``: the tasks this worker finished or
    failed, as ``(name, status)``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ran: list[tuple[str, str]] = []

    def _keep_alive(self, get_work_response) -> bool:
        return self._config.keep_alive and self.run_succeeded and get_work_response.n_pending_tasks > 0

    def _add_task(self, *args, **kwargs) -> None:
        task = self._scheduled_tasks.get(kwargs["task_id"])
        if task is not None and kwargs["status"] in (DONE, FAILED) and kwargs.get("runnable") is None:
            self.ran.append((_describe(task), kwargs["status"]))
        super()._add_task(*args, **kwargs)


def _describe(task: luigi.Task) -> str:
    return task_name(task) if isinstance(getattr(task, "stage", None), str) and task.stage else task.task_family


class WorkerFactory(luigi.interface._WorkerSchedulerFactory):
    """``luigi.build``'s factory, with a kept-alive :class:`Worker` for a run against luigid."""

    def create_worker(self, scheduler, worker_processes: int, assistant: bool = False) -> Worker:
        return Worker(scheduler=scheduler, worker_processes=worker_processes, assistant=assistant, keep_alive=True)


def _pending(scheduler: luigi.rpc.RemoteScheduler, workdir: str) -> list[luigi.Task]:
    """The tasks luigid holds as pending that any machine may run (:data:`PORTABLE`), of ``workdir``'s runs."""
    found = []
    for cls in PORTABLE:
        listing = scheduler.task_list(status="PENDING", upstream_status="", search=f"{cls.__name__}(")
        for info in listing.values():
            if isinstance(info, dict) and info.get("name") == cls.__name__ and info["params"]["workdir"] == workdir:
                found.append(cls.from_str_params(info["params"]))
    return found


def run_worker(workdir: str, scheduler_url: str, workers: int = 1) -> list[tuple[str, str]]:
    """Run the pending :data:`PORTABLE` tasks of ``workdir`` that luigid has, until SIGTERM or SIGUSR1.

    Returns what ran here. On either signal the worker asks for no more work and returns once its running tasks
    are done (a task killed half-way leaves nothing half-written, and luigid gives it to another worker later).
    A task that reads settings from the configuration (a stage that lists its shards, training) stays with the
    runs that listed it: the worker knows none of their settings.
    """
    WorkDir(workdir).check_writable()  # the run's work directory: reachable from here (its bucket, its folder)
    try:  # once, at once: Luigi's client tries three times, half a minute apart, then raises a traceback
        urllib.request.urlopen(scheduler_url, timeout=10).close()
    except (OSError, ValueError) as exc:
        raise MelsearchError(f"{scheduler_url}: no luigid answers here ({exc}; --scheduler-url)") from None
    scheduler = luigi.rpc.RemoteScheduler(scheduler_url)
    luigi.configuration.get_config().set("core", "no_configure_logging", "true")
    worker = Worker(scheduler=scheduler, worker_processes=workers, keep_alive=False)

    def stop(signum: int, frame: FrameType | None) -> None:
        log.warning("melsearch worker: %s; finishing the running tasks, taking no more", signal.Signals(signum).name)
        worker._start_phasing_out()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with worker:
            while not worker._stop_requesting_work:
                todo = _pending(scheduler, workdir)
                if not todo:
                    time.sleep(POLL_S)
                    continue
                for task in todo:
                    worker.add(task)
                worker.run()
    except luigi.rpc.RPCError as exc:
        raise MelsearchError(f"{scheduler_url}: luigid stopped answering ({exc}); start the worker again once it "
                             "is back (a task it was running is given again)") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    return worker.ran
