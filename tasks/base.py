"""What every stage task shares: the work directory, the music source, its folder and its figures."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import luigi

from pipeline.dataset import folder_fingerprint
from pipeline.io import params_key
from pipeline.layout import WorkDir, write_figures


@lru_cache(maxsize=16)
def _source_fingerprint(audio_dir: str, archive: str) -> dict:
    """Identity of the input: a folder's listing (paths, sizes, mtimes), an archive's size and mtime."""
    if audio_dir:
        return {"audio_dir": str(Path(audio_dir).resolve()), "listing": folder_fingerprint(audio_dir)}
    if archive:
        stat = Path(archive).stat()
        return {"archive": str(Path(archive).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return {"gtzan": "genres.tar.gz"}


class StageTask(luigi.Task):
    """Base of every stage: ``workdir`` and the source (``audio_dir``, ``archive``, or neither for GTZAN).

    A subclass names its ``stage`` and its ``key``; its folder is the layout's, and its output is the
    ``figures.json`` that :meth:`finish` writes there last.
    """

    workdir = luigi.Parameter(default="data/work")
    audio_dir = luigi.Parameter(default="")
    archive = luigi.Parameter(default="")
    stage: str = ""

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

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(WorkDir.figures_path(self.stage_dir)))

    def finish(self, figures: dict[str, Any]) -> None:
        """Record the stage's headline figures: the last write, which marks the folder finished."""
        write_figures(self.stage_dir, figures)

    def report(self, done: int, total: int) -> None:
        """Forward a stage's progress to the scheduler's page."""
        self.set_progress_percentage(round(100 * done / max(total, 1)))
        self.set_status_message(f"{done}/{total}")


class ModelStageTask(StageTask):
    """A stage with one output folder per model: ``<workdir>/<stage>/<model>-<key>``."""

    model = luigi.Parameter(default="cifar10")
