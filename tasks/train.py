"""Train stage: features.h5 + manifest -> a trained model folder per model name, or a pretrained one untrained."""

from __future__ import annotations

import luigi

from models import PRETRAINED_MODELS
from pipeline.io import params_key
from pipeline.mel import MelConfig
from tasks.base import ModelStageTask, StageTask
from tasks.config import train, train_config
from tasks.dataset import Dataset
from tasks.features import features_for
from tasks.library import library_features_for


class Train(ModelStageTask):
    """``<workdir>/train/<model>-<key>/``: weights, config.json, history, plots, metrics.json, then figures.json.

    Checkpoints persist in the folder, so a killed run resumes from the last one. Needs the ``gpu`` resource.
    """

    stage = "train"
    resources = {"gpu": 1}
    progress_unit = ""  # pipeline.train logs each epoch with its loss and accuracy
    library = luigi.Parameter(default="", description="the library the run indexes: its features rule is the model's")

    def requires(self) -> dict[str, luigi.Task]:
        return {"features": features_for(self, self.model), "dataset": self.clone(Dataset)}

    @property
    def key(self) -> str:
        return params_key([features_for(self, self.model).key, train_config(self.model).to_dict()])

    def run(self) -> None:
        from pipeline.train import train_model  # torch: imported by the stage that trains, not by every run

        metrics = train_model(features_for(self, self.model).artifact, self.clone(Dataset).artifact, self.stage_dir,
                              train_config(self.model), device=train().device,
                              feature_memory_gb=train().feature_memory_gb, progress=self.report)
        self.finish(metrics)


class Pretrained(ModelStageTask):
    """``<workdir>/train/<model>-<key>/``: a pretrained backbone's model folder, no labels, nothing trained.

    What a library run without a labelled source gets for a model with published weights (musicnn).
    """

    stage = "train"
    library = luigi.Parameter(default="", description="the library the run indexes: its features rule is the model's")

    @property
    def mel_config(self) -> MelConfig:
        """The input of the library features it embeds."""
        return library_features_for(self, self.model).mel_config

    @property
    def key(self) -> str:
        cfg = train_config(self.model)
        return params_key(["pretrained", self.mel_config.key(), cfg.crop_s, cfg.model_kwargs])

    def run(self) -> None:
        from pipeline.pretrained import write_pretrained_model  # torch

        cfg = train_config(self.model)
        self.finish(write_pretrained_model(self.stage_dir, self.model, self.mel_config, crop_s=cfg.crop_s,
                                           model_kwargs=cfg.model_kwargs))


def untrained(task: luigi.Task, model: str) -> bool:
    """Whether ``model`` goes untrained in ``task``'s run: a library run with no labelled source given
    (``audio_dir``, ``archive``) of a model whose backbone alone makes vectors. The others train on GTZAN."""
    return bool(task.library) and not task.audio_dir and not task.archive and model in PRETRAINED_MODELS


def model_task(task: luigi.Task, model: str | None = None) -> Train | Pretrained:
    """The task that makes ``model``'s folder (default: ``task.model``) in ``task``'s run."""
    model = model or task.model
    return task.clone(Pretrained if untrained(task, model) else Train, model=model)


class CompareModels(StageTask):
    """``<workdir>/train/comparison-<key>.png``: validation curves of several trained models side by side."""

    stage = "train"
    models = luigi.ListParameter()
    library = luigi.Parameter(default="")

    def requires(self) -> list[Train]:
        return [self.clone(Train, model=name) for name in self.models]

    @property
    def key(self) -> str:
        return params_key([task.key for task in self.requires()])

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(self.layout.comparison_plot(self.key)))

    def run(self) -> None:
        from pipeline.evaluate import plot_model_comparison  # matplotlib: only here

        plot_model_comparison([task.stage_dir for task in self.requires()], self.output().path)
