"""Embeddings and index stages: a vector per track (Parquet), then an Annoy index over them."""

from __future__ import annotations

from pathlib import Path

import luigi

from pipeline.embeddings import write_embeddings
from pipeline.index import build_annoy_index
from pipeline.io import params_key
from tasks.base import ModelStageTask
from tasks.config import index, train
from tasks.dataset import Dataset
from tasks.features import Features
from tasks.train import Train


class Embeddings(ModelStageTask):
    """``<workdir>/embeddings/<model>-<key>/embeddings.parquet``: one L2-normalised vector per ``ok`` track."""

    stage = "embeddings"

    def requires(self) -> dict[str, luigi.Task]:
        return {"dataset": self.clone(Dataset), "features": self.clone(Features), "model": self.clone(Train)}

    @property
    def key(self) -> str:
        return params_key([self.clone(Train).key])

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(self.stage_dir / "embeddings.parquet"))

    def run(self) -> None:
        inputs = self.input()
        model_dir = Path(inputs["model"].path).parent
        write_embeddings(inputs["dataset"].path, inputs["features"].path, model_dir, self.output().path,
                         device=train().device)


class Index(ModelStageTask):
    """``<workdir>/index/<model>-<key>/``: ``index.ann``, ``ids.parquet``, ``meta.json`` (with figures), a 2-D map."""

    stage = "index"

    def requires(self) -> Embeddings:
        return self.clone(Embeddings)

    @property
    def key(self) -> str:
        cfg = index()
        return params_key([self.clone(Embeddings).key, cfg.n_trees, cfg.search_k])

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(self.stage_dir / "meta.json"))

    def run(self) -> None:
        cfg = index()
        build_annoy_index(self.input().path, self.stage_dir, n_trees=cfg.n_trees, search_k=cfg.search_k)
