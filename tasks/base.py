"""What every stage task shares: the work directory and the music source that identifies a run."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import luigi

from pipeline.dataset import folder_fingerprint
from pipeline.io import params_key


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
    """Base of every stage: ``workdir`` and the source (``audio_dir``, ``archive``, or neither for GTZAN)."""

    workdir = luigi.Parameter(default="data/work")
    audio_dir = luigi.Parameter(default="")
    archive = luigi.Parameter(default="")

    @property
    def source_key(self) -> str:
        return params_key(_source_fingerprint(self.audio_dir, self.archive))

    @property
    def stage_dir(self) -> Path:
        """``<workdir>/<stage>/<key>``: the folder this task's outputs live in (subclasses define both)."""
        return Path(self.workdir) / self.stage / self.key

    def report(self, done: int, total: int) -> None:
        """Forward a stage's progress to the scheduler's page."""
        self.set_progress_percentage(round(100 * done / max(total, 1)))
        self.set_status_message(f"{done}/{total}")


class ModelStageTask(StageTask):
    """A stage with one output per model: ``<workdir>/<stage>/<model>-<key>``."""

    model = luigi.Parameter(default="cifar10")

    @property
    def stage_dir(self) -> Path:
        return Path(self.workdir) / self.stage / f"{self.model}-{self.key}"
