"""A library's own stages: its manifest is a Dataset of its folder; its features are cached per file.

The files the cache lacks are decoded by :class:`LibraryPart` tasks of ``FILES_PER_TASK`` files, and the vectors
the vector cache lacks are computed by :class:`VectorBatch` tasks of as many files: any worker of a luigid may run
them (``melsearch worker``), as their parameters say everything.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import luigi

from pipeline.io import params_key, write_json_atomic
from pipeline.library import (
    PART_SIZE,
    TRACKS_FILE,
    cache_part_name,
    extract_to_cache,
    files_to_decode,
    read_library_tracks,
    write_library_features,
    write_vector_batch,
)
from pipeline.manifest import read_manifest
from pipeline.mel import MelConfig
from pipeline.parallel import shutdown_shared_pool
from tasks.base import PROCESS, StageTask
from tasks.config import features, features_preset, train
from tasks.dataset import Dataset
from tasks.features import FeaturesBase

# Files decoded per task: 8 cache parts, enough that Luigi's cost per task (well under 0.1 s) is lost in their
# seconds of decoding and a machine's pool has parts to share; few enough that many machines share a library.
FILES_PER_TASK = 8 * PART_SIZE
PARTS = "parts"  # the features folder's records of its LibraryPart tasks
BATCHES = "batches"  # the embeddings folder's records of its VectorBatch tasks


def library_dataset(task: luigi.Task) -> Dataset:
    """The dataset stage of ``task``'s library: the folder as a source of its own (its own key and manifest)."""
    return Dataset(workdir=task.workdir, audio_dir=task.library)


class PortableTask(StageTask):
    """A task any worker of a luigid may run, as its parameters say everything: the library's cache folder and
    log-mel settings, and ``<records>``, the folder of the record that marks it done (``files``, the ``worker``
    ``host:pid`` that ran it and its ``seconds``), written last by :meth:`write_record`."""

    cache = luigi.Parameter(description="the feature cache folder, relative to the work directory")
    mel = luigi.DictParameter(description="the MelConfig's fields")
    records = luigi.Parameter(description="the folder of the task records, relative to the work directory")

    @property
    def stage_dir(self) -> Path:
        return self.layout.root / self.records

    @property
    def mel_config(self) -> MelConfig:
        return MelConfig.from_dict(dict(self.mel))

    def requires(self) -> list[luigi.Task]:
        return []

    def write_record(self, files: int, started: float) -> None:
        """The task's record, its last output: ``files`` done since ``started`` (``time.monotonic()``)."""
        write_json_atomic(self.output()[-1].path, {"files": files, "worker": PROCESS,
                                                   "seconds": round(time.monotonic() - started, 3)})


class LibraryPart(PortableTask):
    """Cache parts of a library's files (``<workdir>/<cache>/part-<hash>.h5``, :data:`PART_SIZE` files each).

    Beside the features folder's other records, ``<records>/<first part>.json`` says which process decoded them
    (``host:pid``) and in how many seconds; written last, it marks the task done. Its parameters say everything
    (no setting read from luigi.cfg but ``features.processes``), so any worker of a luigid may run it.
    """

    stage = "features"
    files = luigi.ListParameter(description="[identity, path] of each file to decode")
    progress_unit = "parts"

    @property
    def _parts(self) -> list[list[tuple[str, str]]]:
        files = [(str(identity), str(path)) for identity, path in self.files]
        return [files[start : start + PART_SIZE] for start in range(0, len(files), PART_SIZE)]

    def output(self) -> list[luigi.LocalTarget]:
        names = [cache_part_name(part) for part in self._parts]
        return [*(luigi.LocalTarget(str(self.layout.root / self.cache / name)) for name in names),
                luigi.LocalTarget(str(self.stage_dir / names[0].replace(".h5", ".json")))]

    def run(self) -> None:
        started = time.monotonic()
        files = [file for part in self._parts for file in part]
        extract_to_cache(files, self.layout.root / self.cache, self.mel_config, workers=features().processes or None,
                         progress=self.report)
        self.write_record(len(files), started)


class VectorBatch(PortableTask):
    """The vectors of a batch of library files, ``<workdir>/<vectors>/batch-<hash>.parquet`` (the vector cache's
    format), for the embeddings stage to fold into its cache.

    ``<records>/batch-<hash>.json`` says which process computed them (``host:pid``) and in how many seconds;
    written last, it marks the task done. Its parameters say everything (the model folder, the feature cache
    and its log-mel settings, each file's place in it; no setting read from luigi.cfg but ``features.processes``
    and ``train.device``), so any worker of a luigid may run it.
    """

    stage = "embeddings"
    model_dir = luigi.Parameter(description="the model folder, relative to the work directory")
    vectors = luigi.Parameter(description="the folder of the batch files, relative to the work directory")
    rows = luigi.ListParameter(description="[identity, cache part, row, n_frames, track id] of each file")
    progress_unit = "tracks"

    @property
    def _name(self) -> str:
        return "batch-" + params_key([identity for identity, *_ in self.rows])

    def output(self) -> list[luigi.LocalTarget]:
        return [luigi.LocalTarget(str(self.layout.root / self.vectors / f"{self._name}.parquet")),
                luigi.LocalTarget(str(self.stage_dir / f"{self._name}.json"))]

    def pull_inputs(self) -> None:
        """In a bucket: the model folder and the cache parts these files' log-mels are in."""
        super().pull_inputs()
        store = self.layout.store
        if store is not None:
            store.download_folder(self.layout.root / self.model_dir)
            for part in sorted({part for _, part, *_ in self.rows}):
                store.download(self.layout.root / self.cache / part)

    def run(self) -> None:
        started = time.monotonic()
        rows = [{"identity": identity, "part": part, "row": row, "n_frames": n_frames, "track_id": track_id}
                for identity, part, row, n_frames, track_id in self.rows]
        write_vector_batch(rows, self.layout.root / self.cache, self.mel_config, self.layout.root / self.model_dir,
                           self.output()[0].path, device=train().device, workers=features().processes or None,
                           progress=self.report)
        self.write_record(len(rows), started)


def read_records(folder: Path) -> list[dict]:
    """The records of a stage's :class:`PortableTask` tasks in ``folder``, by name: the figures' ``parts`` or
    ``batches``."""
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]


def vector_batches(task: StageTask, todo: list[dict], *, model_dir: Path, cache_dir: Path, mel: MelConfig,
                   vector_cache: Path) -> list[VectorBatch]:
    """The :class:`VectorBatch` tasks of ``todo`` rows (:func:`pipeline.library.vectors_to_compute`), records in the
    embeddings folder of ``task``, batch files beside the vector cache."""
    root = task.layout.root
    common = {"workdir": task.workdir, "model_dir": model_dir.relative_to(root).as_posix(),
              "cache": Path(os.path.normpath(cache_dir)).relative_to(root).as_posix(), "mel": mel.to_dict(),
              "vectors": vector_cache.with_suffix(".batches").relative_to(root).as_posix(),
              "records": (task.stage_dir / BATCHES).relative_to(root).as_posix()}
    return [VectorBatch(**common, rows=[[row["identity"], row["part"], row["row"], row["n_frames"], row["track_id"]]
                                        for row in todo[start : start + FILES_PER_TASK]])
            for start in range(0, len(todo), FILES_PER_TASK)]


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

    def run(self):
        rows = read_manifest(library_dataset(self).artifact, status="ok")
        tracks = [(row["track_id"], row["path"]) for row in rows]
        todo = files_to_decode(tracks, self.cache_dir)
        # dynamic dependencies, which any worker of the scheduler may run (Luigi calls run() anew once they are
        # done: this time the cache knows every file, and nothing is yielded)
        yield [LibraryPart(workdir=self.workdir, cache=self._relative(self.cache_dir),
                           records=self._relative(self.stage_dir / PARTS), files=todo[start : start + FILES_PER_TASK],
                           mel=self.mel_config.to_dict())
               for start in range(0, len(todo), FILES_PER_TASK)]
        figures = write_library_features(tracks, self.artifact, self.mel_config, self.cache_dir,
                                         workers=features().processes or None, progress=self.report)
        shutdown_shared_pool()  # free the workers' memory for the stages after
        records = read_records(self.stage_dir / PARTS)
        extracted = sum(record["files"] for record in records)  # by this stage's tasks, on whichever machine
        self.finish({**figures, "extracted": figures["extracted"] + extracted,
                     "reused": figures["reused"] - extracted, "parts": records})

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.layout.root).as_posix()


def library_features_for(task: luigi.Task, model: str) -> LibraryFeatures:
    """The library features that feed ``model`` (its own preset for a pretrained model) in ``task``'s run."""
    return task.clone(LibraryFeatures, model_preset=features_preset(model))
