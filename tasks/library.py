"""A library's own stages: its manifest is a Dataset of its folder; its features are cached per file."""

from __future__ import annotations

from pathlib import Path

import luigi

from pipeline.io import params_key
from pipeline.library import TRACKS_FILE, read_library_tracks, write_library_features
from pipeline.manifest import read_manifest
from pipeline.parallel import shutdown_shared_pool
from tasks.config import features, features_preset
from tasks.dataset import Dataset
from tasks.features import FeaturesBase


def library_dataset(task: luigi.Task) -> Dataset:
    """The dataset stage of ``task``'s library: the folder as a source of its own (its own key and manifest)."""
    return Dataset(workdir=task.workdir, audio_dir=task.library)


class LibraryFeatures(FeaturesBase):
    """``<workdir>/features/<key>/tracks.parquet``: where each library track's log-mel is in the per-file cache.

    Only files the cache (``<workdir>/cache/features-<mel key>/``) does not know are decoded; the figures
    say how many (``extracted``) and how many came from it (``reused``).
    """

    def requires(self) -> Dataset:
        return library_dataset(self)

    @property
    def key(self) -> str:
        return params_key([library_dataset(self).key, self.mel_config.key(), "by-file"])

    @property
    def artifact(self) -> Path:
        return self.stage_dir / TRACKS_FILE

    @property
    def cache_dir(self) -> Path:
        return self.layout.feature_cache(self.mel_config.key())

    def _pull_cache(self) -> None:
        """In a bucket: every cache part, so what any machine extracted before is decoded by none again."""
        if self.layout.store is not None:
            self.layout.store.download_folder(self.cache_dir)

    def pull(self) -> None:
        """In a bucket: the tracks file, and the cache parts it points to."""
        super().pull()
        self._pull_cache()

    def pull_inputs(self) -> None:
        super().pull_inputs()
        self._pull_cache()

    def push_outputs(self) -> None:
        if self.layout.store is not None:  # the new parts before the tracks file that points to them
            self.layout.store.upload_folder(self.cache_dir)
        super().push_outputs()

    def written_elsewhere(self) -> list[Path]:
        """The cache parts tracks.parquet points to: a damaged one is dropped, and its files decoded again."""
        rows, _, cache = read_library_tracks(self.artifact)
        return sorted({cache / row["part"] for row in rows})

    def run(self) -> None:
        rows = read_manifest(library_dataset(self).artifact, status="ok")
        figures = write_library_features([(row["track_id"], row["path"]) for row in rows], self.artifact,
                                         self.mel_config, self.cache_dir, workers=features().processes or None,
                                         progress=self.report)
        shutdown_shared_pool()  # free the workers' memory for the stages after
        self.finish(figures)


def library_features_for(task: luigi.Task, model: str) -> LibraryFeatures:
    """The library features that feed ``model`` (its own preset for a pretrained model) in ``task``'s run."""
    return task.clone(LibraryFeatures, model_preset=features_preset(model))
