"""Train stage: features.h5 + manifest -> a trained model folder per model name."""

from __future__ import annotations

from pathlib import Path

import luigi

from pipeline.evaluate import plot_model_comparison
from pipeline.io import params_key
from pipeline.train import TrainConfig, train_model
from tasks.base import ModelStageTask, StageTask
from tasks.config import train
from tasks.dataset import Dataset
from tasks.features import Features


def train_config(model: str) -> TrainConfig:
    """The ``[train]`` settings of this run for one model."""
    cfg = train()
    return TrainConfig(model=model, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                       weight_decay=cfg.weight_decay, crop_s=cfg.crop_s, patience=cfg.patience, seed=cfg.seed,
                       checkpoint_interval=cfg.checkpoint_interval)


class Train(ModelStageTask):
    """``<workdir>/models/<model>-<key>/``: weights, config.json, history, plots; ``metrics.json`` marks it done.

    Checkpoints persist in the folder, so a killed run resumes from the last one. Needs the ``gpu`` resource.
    """

    stage = "models"
    resources = {"gpu": 1}

    def requires(self) -> dict[str, luigi.Task]:
        return {"features": self.clone(Features), "dataset": self.clone(Dataset)}

    @property
    def key(self) -> str:
        return params_key([self.clone(Features).key, train_config(self.model).to_dict()])

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(self.stage_dir / "metrics.json"))

    def run(self) -> None:
        inputs = self.input()
        train_model(inputs["features"].path, inputs["dataset"].path, self.stage_dir, train_config(self.model),
                    device=train().device, progress=self.report)


class CompareModels(StageTask):
    """``<workdir>/models/comparison-<key>.png``: validation curves of several trained models side by side."""

    stage = "models"
    models = luigi.ListParameter()

    def requires(self) -> list[Train]:
        return [self.clone(Train, model=name) for name in self.models]

    @property
    def key(self) -> str:
        return params_key([task.key for task in self.requires()])

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(Path(self.workdir) / self.stage / f"comparison-{self.key}.png"))

    def run(self) -> None:
        plot_model_comparison([Path(t.path).parent for t in self.input()], self.output().path)
