"""Embeddings and index stages: a vector per track (Parquet), then an Annoy index over them."""

from __future__ import annotations

import functools
from pathlib import Path

import luigi

from pipeline.added import AddedSongs
from pipeline.embeddings import write_embeddings
from pipeline.index import build_annoy_index
from pipeline.io import file_sha256, params_key
from pipeline.library import read_library_tracks, vectors_to_compute, write_library_embeddings
from pipeline.parallel import shutdown_shared_pool
from tasks.base import ModelStageTask
from tasks.config import features, index_config, train
from tasks.dataset import Dataset
from tasks.features import features_for
from tasks.library import BATCHES, library_dataset, library_features_for, read_records, vector_batches
from tasks.train import model_task


class Embeddings(ModelStageTask):
    """``<workdir>/embeddings/<model>-<key>/embeddings.parquet``: one L2-normalised vector per ``ok`` track.

    The tracks are the source's, or with ``library`` the library's (by the model trained on the source, or a
    pretrained one untrained), reusing the vectors this model made before for unchanged files.
    """

    stage = "embeddings"
    progress_unit = "tracks"
    library = luigi.Parameter(default="", description="a folder to embed instead of the source ('': the source)")

    def requires(self) -> dict[str, luigi.Task]:
        if self.library:
            return {"dataset": library_dataset(self), "features": library_features_for(self, self.model),
                    "model": model_task(self)}
        return {"dataset": self.clone(Dataset), "features": features_for(self, self.model), "model": model_task(self)}

    @property
    def key(self) -> str:
        if self.library:  # the library's identity: its features key holds its folder listing
            return params_key([model_task(self).key, library_features_for(self, self.model).key])
        return params_key([model_task(self).key])

    @property
    def vector_cache(self) -> Path:
        """The library's vectors by file for this model's weights (library runs)."""
        model_dir = model_task(self).stage_dir
        return self.layout.embedding_cache(model_dir.name, file_sha256(model_dir / "model.pt"))

    def pull_inputs(self) -> None:
        super().pull_inputs()
        if self.library and self.layout.store is not None:
            self.layout.store.download(self.vector_cache)

    def push_outputs(self) -> None:
        if self.library and self.layout.store is not None and self.vector_cache.is_file():
            self.layout.store.upload(self.vector_cache)
            for path in getattr(self, "_folded", []):
                self.layout.store.delete(path)
        super().push_outputs()

    def run(self):
        inputs, model_dir = self.requires(), model_task(self).stage_dir
        if not self.library:
            self.finish(write_embeddings(inputs["dataset"].artifact, inputs["features"].artifact, model_dir,
                                         self.artifact, device=train().device, progress=self.report))
            return
        dataset, tracks = inputs["dataset"].artifact, inputs["features"].artifact
        _, mel, cache_dir = read_library_tracks(tracks)
        # dynamic dependencies, which any worker of the scheduler may run (Luigi calls run() anew once they are
        # done; the cache has not changed meanwhile, so the same batches are listed, and found done)
        batches = vector_batches(self, vectors_to_compute(dataset, tracks, model_dir, self.vector_cache),
                                 model_dir=model_dir, cache_dir=cache_dir, mel=mel, vector_cache=self.vector_cache)
        yield batches
        computed = [Path(batch.output()[0].path) for batch in batches]
        if self.layout.store is not None:  # made on other machines
            for batch in batches:
                batch.pull()
        figures = write_library_embeddings(dataset, tracks, model_dir, self.artifact, self.vector_cache,
                                           computed=computed, device=train().device,
                                           workers=features().processes or None, progress=self.report)
        shutdown_shared_pool()  # the workers hold the model: free their memory for the stages after
        for path in computed:  # in the vector cache now: not kept twice (from a bucket once the cache is uploaded)
            path.unlink(missing_ok=True)
        self._folded = computed
        self.finish({**figures, "batches": read_records(self.stage_dir / BATCHES)})


class Index(ModelStageTask):
    """``<workdir>/index/<model>-<key>/``: ``index.ann``, ``ids.parquet``, ``meta.json``, a 2-D map, figures.

    Songs added with ``MusicSearch.index_audio`` (the side table) are folded in, and their bytes are part of
    the key: adding a song makes the next run build a new index.
    """

    stage = "index"
    library = luigi.Parameter(default="", description="index this folder instead of the source ('': the source)")

    def requires(self) -> Embeddings:
        return self.clone(Embeddings)

    @property
    def added_table(self) -> Path:
        return self.layout.added_table(model_task(self).stage_dir.name)

    @functools.cached_property
    def _added_digest(self) -> str | None:
        """The side table's sha256, read once per task: ``key`` is asked for on every path of the task."""
        return AddedSongs(self.added_table).digest()

    @property
    def key(self) -> str:
        return params_key([self.clone(Embeddings).key, index_config().key(), self._added_digest])

    def run(self) -> None:
        cfg = index_config()
        figures = build_annoy_index(self.clone(Embeddings).artifact, self.stage_dir, n_trees=cfg.n_trees,
                                    search_k=cfg.search_k, seed=cfg.seed, added=self.added_table)
        self.finish(figures)
