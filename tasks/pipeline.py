"""The whole pipeline: the wrapper task, running it (locally or against luigid), reruns and status."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import luigi
import luigi.configuration
from luigi.execution_summary import LuigiStatusCode

from pipeline.errors import MelsearchError
from pipeline.layout import FIGURES_FILE, PER_MODEL_STAGES, STAGES, WorkDir, damaged_outputs, read_figures
from pipeline.library import POOL_PRELOAD, TRACKS_FILE
from pipeline.parallel import start_shared_pool
from tasks.base import StageTask
from tasks.config import features
from tasks.dataset import Dataset
from tasks.features import Features, features_for
from tasks.library import LibraryFeatures, library_dataset, library_features_for
from tasks.search import Embeddings, Index
from tasks.train import CompareModels, model_task, untrained
from tasks.worker import WorkerFactory

log = logging.getLogger(__name__)


class Pipeline(luigi.WrapperTask):
    """Every stage up to ``stage`` for each model in ``models`` (plus a comparison plot for several models).

    With ``library``, the models train on the source and the embeddings and index are the library's.
    """

    workdir = luigi.Parameter(default="data/work")
    audio_dir = luigi.Parameter(default="")
    archive = luigi.Parameter(default="")
    library = luigi.Parameter(default="", description="a folder of music to index by the models")
    stage = luigi.ChoiceParameter(choices=list(STAGES), default="index")
    models = luigi.ListParameter(default=["cifar10"])

    def requires(self) -> list[luigi.Task]:
        source = {"workdir": self.workdir, "audio_dir": self.audio_dir, "archive": self.archive}
        library = {"library": self.library} if self.library else {}
        trained = [name for name in self.models if not untrained(self, name)]  # the others need no source
        if self.stage == "dataset":
            return [*([Dataset(**source)] if trained else []), *([library_dataset(self)] if self.library else [])]
        if self.stage == "features":  # one per distinct input the models need
            needs = [features_for(Features(**source, **library), name) for name in trained]
            if library:
                needs += [library_features_for(LibraryFeatures(**source, **library), name) for name in self.models]
            return list({task.task_id: task for task in needs}.values())
        if self.stage == "train":
            tasks = [model_task(self, name) for name in self.models]
        else:
            per_model = {"embeddings": Embeddings, "index": Index}[self.stage]
            tasks = [per_model(model=name, **source, **library) for name in self.models]
        if len(trained) > 1:  # validation curves side by side: a pretrained folder has none
            tasks.append(CompareModels(models=trained, **source, **library))
        return tasks


def stage_tasks(root: luigi.Task) -> dict[str, list[StageTask]]:
    """Every stage task in ``root``'s static DAG, grouped by stage name, upstream stages first."""
    found: dict[str, StageTask] = {}
    pending = [root]
    while pending:
        task = pending.pop()
        if isinstance(task, StageTask):
            found[task.task_id] = task
        pending.extend(luigi.task.flatten(task.requires()))
    grouped: dict[str, list[StageTask]] = {stage: [] for stage in STAGES}
    for task in found.values():
        # the comparison plot is drawn from the trained models: it belongs to their stage
        stage = "train" if isinstance(task, CompareModels) else task.stage
        grouped[stage].append(task)
    return grouped


def clear_outputs(task: StageTask) -> None:
    """Remove a stage task's current outputs (the dataset's extracted audio and downloads are kept).

    In a bucket work directory the bucket's objects go first, a folder's figures.json before the rest.
    """
    store = task.layout.store
    if isinstance(task, CompareModels):  # a file beside the model folders
        if store is not None:
            store.delete(task.output().path)
        Path(task.output().path).unlink(missing_ok=True)
        return
    if isinstance(task, Dataset):  # keep the extracted archive: it is the source, not a result
        for path in (WorkDir.figures_path(task.stage_dir), task.artifact):
            if store is not None:
                store.delete(path)
            path.unlink(missing_ok=True)
        return
    if store is not None:
        store.delete(task.stage_dir, first=FIGURES_FILE)
    folder = task.stage_dir
    if folder.is_dir():
        trash = folder.with_name(f".{folder.name}.removing")
        os.replace(folder, trash)  # one rename: a kill mid-removal never leaves a half-deleted output in place
        shutil.rmtree(trash)


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike) -> Iterator[None]:
    """Hold ``<workdir>/.lock`` for a local-scheduler run; a second run on the same folder is refused at once.

    The lock is local: for an ``s3://`` work directory it guards this machine's mirror only, and runs on
    several machines go through luigid.
    """
    path = WorkDir(workdir).lock_file
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise MelsearchError(
                f"{workdir}: another melsearch run (pid {holder}) is using this work directory; "
                "wait for it to finish, or run both against luigid (--scheduler-url)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)


def run_pipeline(
    *,
    workdir: str,
    audio_dir: str = "",
    archive: str = "",
    library: str = "",
    stage: str = "index",
    models: Sequence[str] = ("cifar10",),
    rerun: str | None = None,
    workers: int = 1,
    scheduler_url: str | None = None,
) -> luigi.Task:
    """Run the pipeline up to ``stage``; return the wrapper task. Raises MelsearchError when any task failed.

    ``rerun`` removes that stage's current outputs and every downstream stage's first, but for the folders an
    earlier rerun removed and did not finish rebuilding (``WorkDir.reruns``): the same rerun again resumes it
    (training from its last checkpoint) instead of starting over. Without
    ``scheduler_url`` Luigi's local scheduler runs it under a work-directory lock; with it, ``luigid``
    coordinates every worker (possibly on other machines sharing the work directory).
    """
    if audio_dir and not Path(audio_dir).is_dir():
        raise MelsearchError(f"{audio_dir}: no such folder (--audio-dir)")
    if archive and not Path(archive).is_file():
        raise MelsearchError(f"{archive}: no such file (--archive)")
    if library and not Path(library).is_dir():
        raise MelsearchError(f"{library}: no such folder (--library)")
    for folder, flag in ((audio_dir, "--audio-dir"), (library, "--library")):
        # its listing keys the stages: unreadable, it would fail inside Luigi's scheduling, in a traceback
        if folder and not os.access(folder, os.R_OK | os.X_OK):
            raise MelsearchError(f"{folder}: cannot list this folder, permission denied ({flag})")
    if workers < 1:
        raise MelsearchError(f"--workers {workers}: at least one worker runs the tasks")
    WorkDir(workdir).check_writable()
    root = Pipeline(workdir=workdir, audio_dir=audio_dir, archive=archive, library=library, stage=stage,
                    models=list(models))
    lock = workdir_lock(workdir) if scheduler_url is None else contextlib.nullcontext()
    with lock:
        if rerun:
            if STAGES.index(rerun) > STAGES.index(stage):
                raise MelsearchError(f"--rerun {rerun} is downstream of --stage {stage}")
            layout = WorkDir(workdir)
            pending = layout.reruns()
            for name in STAGES[STAGES.index(rerun):]:
                for task in stage_tasks(root)[name]:
                    if _rerun_key(task) in pending:
                        log.info("resuming the unfinished rerun of %s in %s", name, task.stage_dir)
                        continue
                    log.info("removing %s outputs in %s", name, task.stage_dir)
                    clear_outputs(task)
                    pending[_rerun_key(task)] = rerun
            layout.record_reruns(pending)
        if library and workers == 1 and stage != "dataset" and not library_dataset(root).complete():
            # a changed library is decoded and embedded by this process's pool: its workers start (and import
            # torch) while the dataset stage probes the files
            start_shared_pool(features().processes or os.cpu_count() or 1, preload=POOL_PRELOAD)
        # against luigid, a worker waits for the tasks of this run that others (melsearch worker) are running
        kwargs = {"scheduler_url": scheduler_url, "worker_scheduler_factory": WorkerFactory()} if scheduler_url \
            else {"local_scheduler": True}
        # the caller configures logging (the CLI: one handler, its level); Luigi adds no handler of its own
        luigi.configuration.get_config().set("core", "no_configure_logging", "true")
        result = luigi.build([root], workers=workers, detailed_summary=True, **kwargs)
    # Under luigid, a task another worker was running when this one asked is reported "not run" or "missing
    # external" even when that worker finished it: what counts is whether every output of the DAG now exists.
    finished = result.status in (LuigiStatusCode.SUCCESS, LuigiStatusCode.SUCCESS_WITH_RETRY) or (
        scheduler_url is not None and result.status in (LuigiStatusCode.NOT_RUN, LuigiStatusCode.MISSING_EXT)
        and root.complete())
    if not finished:
        outcome = result.status.name.lower().replace("_", " ")
        raise MelsearchError(f"pipeline did not finish ({outcome}); see the errors above")
    _record_run(root)
    layout = WorkDir(workdir)
    done = {_rerun_key(task) for tasks in stage_tasks(root).values() for task in tasks}
    layout.record_reruns({folder: stage for folder, stage in layout.reruns().items() if folder not in done})
    return root


def _rerun_key(task: StageTask) -> str:
    """What ``WorkDir.reruns`` calls a task's output: its folder (or the comparison plot) relative to the root."""
    output = Path(task.output().path) if isinstance(task, CompareModels) else task.stage_dir
    return output.relative_to(task.layout.root).as_posix()


def _record_run(root: Pipeline) -> None:
    """``latest-run.json``: the folders this run's settings name, which predict, query and serve then read."""
    layout = WorkDir(root.workdir)
    folders: dict[str, dict[str, str]] = {}
    for stage, tasks in stage_tasks(root).items():
        for task in tasks:
            if not isinstance(task, CompareModels):  # a finished run: every task of its DAG is complete
                relative = task.stage_dir.relative_to(layout.root).as_posix()
                folders.setdefault(stage, {})[_record_name(task, root)] = relative
    # a run of fewer stages keeps what the last longer run recorded for the others
    layout.record_run({**layout.read_run_record(), **folders})


def _record_name(task: StageTask, root: Pipeline) -> str:
    """A folder's name in ``latest-run.json``: its model, ``library`` for a library's dataset and features, else ""."""
    if getattr(task, "model", ""):
        return task.model
    of_library = isinstance(task, LibraryFeatures) or (bool(root.library) and task == library_dataset(root))
    return "library" if of_library else ""


def pipeline_status(
    *, workdir: str, audio_dir: str = "", archive: str = "", library: str = "",
    models: Sequence[str] = ("cifar10",),
) -> dict:
    """Per stage: whether its outputs for these settings exist, their paths and headline figures.

    Each output's ``state``: ``done``; ``missing`` (not finished); ``corrupt`` (a file it wrote is not as written,
    ``problem`` says which) or ``stale`` (built on a corrupt stage): a plain run writes those again.
    """
    root = Pipeline(workdir=workdir, audio_dir=audio_dir, archive=archive, library=library, stage="index",
                    models=list(models))
    status = {}
    for stage, tasks in stage_tasks(root).items():
        entries = []
        for task in tasks:
            done = task.complete()
            problem = "" if done else task.damage()  # complete() asked it already when done; ask once more, not twice
            entry = {"done": done, "state": _state(task, done, problem),
                     "output": task.layout.location(task.output().path if isinstance(task, CompareModels)
                                                    else task.artifact)}
            if problem:
                entry["problem"] = problem
            if getattr(task, "model", None):
                entry["model"] = task.model
            if done and not isinstance(task, CompareModels):
                entry["figures"] = task.figures()
            entries.append(entry)
        status[stage] = {"done": all(e["done"] for e in entries), "outputs": entries}
    return status


def _state(task: StageTask, done: bool, problem: str) -> str:
    """done, missing, or for an unfinished stage with a ``problem``: corrupt (its own files) or stale (upstream's)."""
    if done or not problem:
        return "done" if done else "missing"
    return "corrupt" if damaged_outputs(task.stage_dir) else "stale"


def recorded_status(workdir: str, models: Sequence[str] | None = None) -> dict | None:
    """:func:`pipeline_status` of the folders ``latest-run.json`` names (``models``: only theirs), for a ``status``
    given no source: the last run, whatever its settings were. None when no run was recorded."""
    layout = WorkDir(workdir)
    record = layout.read_run_record()
    if not record:
        return None
    status = {}
    for stage in STAGES:
        entries = []
        for name, folder in sorted(record.get(stage, {}).items()):
            if stage in PER_MODEL_STAGES and models and name not in models:
                continue
            path = layout.root / folder
            if layout.store is not None:
                layout.store.download(WorkDir.figures_path(path))
            figures = read_figures(path)
            damaged = damaged_outputs(path) if layout.store is None else {}
            # a library's features are its tracks file (tasks.library.LibraryFeatures.artifact)
            artifact = path / TRACKS_FILE if (stage, name) == ("features", "library") else WorkDir.artifact(stage, path)
            entry = {"done": bool(figures) and not damaged, "state": "corrupt" if damaged else "done" if figures
                     else "missing", "output": layout.location(artifact)}
            if damaged:
                entry["problem"] = next(iter(damaged.values()))
            if stage in PER_MODEL_STAGES:
                entry["model"] = name
            elif name:
                entry["of"] = name  # "library": a library's dataset or features
            if figures:
                entry["figures"] = figures
            entries.append(entry)
        status[stage] = {"done": bool(entries) and all(e["done"] for e in entries), "outputs": entries}
    return status
