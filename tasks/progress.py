"""What a run says on the terminal while it works: a line when each stage starts and ends, and its progress.

Lines go to the ``tasks.progress`` logger; the CLI shows them on stderr unless ``--quiet`` (tqdm's bars show
only on a terminal, these lines always). Luigi calls the handlers below in the worker that runs the task; they
speak for every stage task (those with a ``stage``), which :mod:`tasks.base` makes sure are registered.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import luigi

log = logging.getLogger(__name__)

# The figures a stage line and ``status`` show, in this order.
HEADLINE_FIGURES = ("tracks", "ok", "rejected", "failed", "extracted", "reused", "computed", "trained", "epochs_run",
                    "best_epoch", "test_accuracy", "test_macro_f1", "count", "recall_at_10", "genre_precision_at_10")
REPORT_EVERY_S = 5.0  # a long stage's progress line at most this often: readable, and never silent for long

_started: dict[str, float] = {}


def headline(figures: dict[str, Any]) -> str:
    """``tracks=24, ok=24``: the headline figures among ``figures``, floats rounded."""
    return ", ".join(f"{key}={round(value, 4) if isinstance(value, float) else value}"
                     for key, value in figures.items() if key in HEADLINE_FIGURES)


def task_name(task: luigi.Task) -> str:
    """``train cifar10``, ``features shard 3``, ``dataset``: the stage, and what tells its tasks apart."""
    parts = [task.stage, getattr(task, "model", "")]
    if hasattr(task, "shard"):
        parts.append(f"shard {task.shard}")
    if hasattr(task, "files"):  # a library's LibraryPart
        parts.append(f"(library, {len(task.files)} files)")
    if hasattr(task, "rows"):  # a library's VectorBatch: its model is the folder's name
        parts.append(f"{Path(task.model_dir).name.split('-')[0]} (library, {len(task.rows)} files)")
    if getattr(task, "library", "") and task.stage in ("dataset", "features"):
        parts.append("(library)")
    return " ".join(part for part in parts if part)


def _is_stage(task: luigi.Task) -> bool:
    return isinstance(getattr(type(task), "stage", None), str) and bool(task.stage)


@luigi.Task.event_handler(luigi.Event.START)
def _stage_started(task: luigi.Task) -> None:
    # a task with dynamic dependencies (features) starts again once they are done: one line for both
    if _is_stage(task) and task.task_id not in _started:
        _started[task.task_id] = time.monotonic()
        log.info("%s started", task_name(task))


@luigi.Task.event_handler(luigi.Event.SUCCESS)
def _stage_finished(task: luigi.Task) -> None:
    if _is_stage(task):
        seconds = time.monotonic() - _started.pop(task.task_id, time.monotonic())
        figures = headline(task.figures()) if task._marks_folder else ""
        log.info("%s done in %.1f s%s", task_name(task), seconds, f": {figures}" if figures else "")


@luigi.Task.event_handler(luigi.Event.FAILURE)
def _stage_failed(task: luigi.Task, exception: BaseException) -> None:
    if _is_stage(task):
        _started.pop(task.task_id, None)
        log.info("%s failed", task_name(task))


class ProgressLine:
    """Throttled ``<task>: done/total <unit> (rate, time left)`` lines for one task's progress callbacks."""

    def __init__(self, task: luigi.Task, unit: str) -> None:
        self.name, self.unit = task_name(task), unit
        # rates count from the task's start (its first report may come only when the work is done)
        self.start = _started.get(task.task_id, time.monotonic())
        self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last < REPORT_EVERY_S:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        left = f", about {(total - done) / rate:.0f} s left" if 0 < done < total else ""
        log.info("%s: %d/%d %s (%.1f/s%s)", self.name, done, total, self.unit, rate, left)
