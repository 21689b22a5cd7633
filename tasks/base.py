"""What every stage task shares: the work directory, the music source, its folder and its figures."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import luigi

from pipeline.dataset import folder_fingerprint
from pipeline.errors import DiskFullError
from pipeline.io import is_disk_full, params_key
from pipeline.layout import FIGURES_FILE, NOT_READ, WorkDir, damaged_outputs, read_figures, write_figures
from tasks.progress import ProgressLine

log = logging.getLogger(__name__)

# Which process made an output (``<host>:<pid>``, in figures): fixed at import, so a task in a process Luigi forked
# for it (``--workers N``) names the melsearch run or worker that forked it.
PROCESS = f"{socket.gethostname()}:{os.getpid()}"


@functools.lru_cache(maxsize=16)
def _source_fingerprint(audio_dir: str, archive: str) -> dict:
    """Identity of the input: a folder's listing (paths, sizes, mtimes), an archive's size and mtime."""
    if audio_dir:
        return {"audio_dir": str(Path(audio_dir).resolve()), "listing": folder_fingerprint(audio_dir)}
    if archive:
        stat = Path(archive).stat()
        return {"archive": str(Path(archive).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return {"gtzan": "genres.tar.gz"}


@contextlib.contextmanager
def _full_disk_named(task: StageTask) -> Iterator[None]:
    """A full disk during ``task`` as one line naming its stage and the path (from atomic_path, or its folder);
    the outputs were written atomically, so running again after freeing space completes the stage."""
    try:
        yield
    except DiskFullError as exc:
        raise DiskFullError(f"{task.stage}: {exc}") from exc
    except (OSError, RuntimeError) as exc:
        if not is_disk_full(exc):
            raise
        where = getattr(exc, "filename", None) or task.stage_dir
        raise DiskFullError(f"{task.stage}: no space left on device writing under {where}; "
                            "free some space and run again") from exc


def _staged(run: Callable) -> Callable:
    """``run`` between :meth:`StageTask.pull_inputs` and :meth:`StageTask.push_outputs` (no-ops locally).

    A generator ``run`` (dynamic dependencies) stays one: Luigi drops it at a ``yield`` of tasks not done
    yet and calls it anew once they are, so only the call that gets to the end pushes the outputs.
    """
    if inspect.isgeneratorfunction(run):
        @functools.wraps(run)
        def staged_generator(self: StageTask) -> Any:
            with _full_disk_named(self):
                self.pull_inputs()
                yield from run(self)
                self.push_outputs()

        return staged_generator

    @functools.wraps(run)
    def staged(self: StageTask) -> None:
        with _full_disk_named(self):
            self.pull_inputs()
            run(self)
            self.push_outputs()

    return staged


class StageTask(luigi.Task):
    """Base of every stage: ``workdir`` and the source (``audio_dir``, ``archive``, or neither for GTZAN).

    A subclass names its ``stage`` and its ``key``; its folder is the layout's, and its output is the
    ``figures.json`` that :meth:`finish` writes there last.

    With ``workdir=s3://BUCKET/PREFIX`` a task works in the local mirror (:mod:`pipeline.storage`): each
    subclass's ``run()`` is wrapped to download its inputs first and upload its outputs after (its folder,
    ``figures.json`` last), and the output is an ``S3Target``, so every machine's ``complete()`` asks the bucket.
    """

    workdir = luigi.Parameter(default="data/work")
    audio_dir = luigi.Parameter(default="")
    archive = luigi.Parameter(default="")
    stage: str = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "run" in cls.__dict__:  # every stage, tasks/features.py's too, moves its files to and from a bucket
            cls.run = _staged(cls.__dict__["run"])

    @property
    def layout(self) -> WorkDir:
        return WorkDir(self.workdir)

    @property
    def source_key(self) -> str:
        return params_key(_source_fingerprint(self.audio_dir, self.archive))

    @property
    def stage_dir(self) -> Path:
        """The folder this task's outputs live in (see :mod:`pipeline.layout`)."""
        return self.layout.stage_dir(self.stage, self.key, getattr(self, "model", None))

    @property
    def artifact(self) -> Path:
        """What downstream stages read: the stage's main file, or its folder."""
        return WorkDir.artifact(self.stage, self.stage_dir)

    def output(self) -> luigi.Target:
        marker = WorkDir.figures_path(self.stage_dir)
        store = self.layout.store
        if store is None:
            return luigi.LocalTarget(str(marker))
        from luigi.contrib.s3 import S3Target  # imports boto3: only for a bucket

        return S3Target(store.uri_of(marker))

    def complete(self) -> bool:
        store = self.layout.store
        if store is None:
            return super().complete() and not self.damage()
        # an output named by a path in the mirror (a feature shard, the comparison plot) is done once in the bucket
        return all(store.exists(target.path) if isinstance(target, luigi.LocalTarget) else target.exists()
                   for target in luigi.task.flatten(self.output()))

    @property
    def _marks_folder(self) -> bool:
        """Whether the output is the stage folder's figures.json (not files of a subclass's own ``output()``)."""
        return type(self).output is StageTask.output

    def damage(self) -> str:
        """Why this stage's finished folder cannot be used as it is, or "" (whole, or not finished).

        A file its figures.json recorded that is not as the stage wrote it (:func:`pipeline.layout.damaged_outputs`),
        or damage in a stage it was built from, which is then built again and this one after it. A local work
        directory's only: a bucket's objects are checked by the store.
        """
        if self.layout.store is not None or not self._marks_folder:
            return ""
        damaged = damaged_outputs(self.stage_dir)
        if damaged:
            return next(iter(damaged.values()))
        for task in luigi.task.flatten(self.requires()):
            upstream = task.damage() if isinstance(task, StageTask) else ""
            if upstream:
                return upstream if upstream.startswith("built on") else f"built on a damaged {task.stage} ({upstream})"
        return ""

    def discard_damaged(self) -> None:
        """Before ``run()``: a damaged finished folder loses its figures.json and its damaged files.

        So the stage writes them again; what is whole (checkpoints, feature shards, cache parts) serves the rewrite.
        """
        reason = self.damage()
        if not reason:
            return
        log.warning("%s: %s; writing it again", self.stage, reason)
        for path in damaged_outputs(self.stage_dir):  # its own damaged files (none when only upstream is damaged)
            path.unlink(missing_ok=True)
        WorkDir.figures_path(self.stage_dir).unlink(missing_ok=True)  # last: it names what was damaged

    def pull(self) -> None:
        """Download this task's outputs from the bucket into the mirror: its folder, or its output files."""
        store = self.layout.store
        if store is None:
            return
        if self._marks_folder:
            store.download_folder(self.stage_dir, exclude=NOT_READ.get(self.stage, ()))
        else:
            for target in luigi.task.flatten(self.output()):
                store.download_group(target.path)

    def pull_inputs(self) -> None:
        """Before ``run()`` in a bucket: download the dependencies' outputs, and what is already in our folder.

        That is what other workers left there (feature shards). A copy that this machine finished once but the
        bucket no longer holds (a ``--rerun`` elsewhere removed it) is stale: it goes first.
        """
        self.discard_damaged()
        store = self.layout.store
        if store is None:
            return
        for task in luigi.task.flatten(self.requires()):
            if isinstance(task, StageTask):
                task.pull()
        if self._marks_folder:
            marker = WorkDir.figures_path(self.stage_dir)
            if marker.is_file() and not store.exists(marker):
                shutil.rmtree(self.stage_dir)
            store.download_folder(self.stage_dir)

    def push_outputs(self) -> None:
        """After ``run()`` in a bucket: upload the stage folder (``figures.json`` last), or the output files."""
        store = self.layout.store
        if store is None:
            return
        if self._marks_folder:
            store.upload_folder(self.stage_dir, last=FIGURES_FILE)
        else:
            for target in luigi.task.flatten(self.output()):
                store.upload_group(target.path)

    def figures(self) -> dict[str, Any]:
        """The headline figures of this finished stage (from the bucket, for a bucket work directory)."""
        if self.layout.store is not None:
            self.layout.store.download(WorkDir.figures_path(self.stage_dir))
        return read_figures(self.stage_dir)

    def written_elsewhere(self) -> list[Path]:
        """Files outside the stage folder that its outputs point to, recorded (and checked) with the folder's."""
        return []

    def finish(self, figures: dict[str, Any]) -> None:
        """Record the stage's headline figures and its files' sizes and digests: the last write, which marks the
        folder finished."""
        write_figures(self.stage_dir, figures, extra=self.written_elsewhere())

    progress_unit = "parts"  # what report()'s done and total count ("": no terminal line, the stage logs its own)

    def report(self, done: int, total: int) -> None:
        """Forward a stage's progress to the scheduler's page and, every few seconds, to the terminal."""
        self.set_progress_percentage(round(100 * done / max(total, 1)))
        self.set_status_message(f"{done}/{total}")
        if not self.progress_unit:
            return
        if getattr(self, "_progress_line", None) is None:
            self._progress_line = ProgressLine(self, self.progress_unit)
        self._progress_line(done, total)


class ModelStageTask(StageTask):
    """A stage with one output folder per model: ``<workdir>/<stage>/<model>-<key>``."""

    model = luigi.Parameter(default="cifar10")
