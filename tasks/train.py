"""Train stage: features.h5 + manifest -> a trained model folder per model name."""

from __future__ import annotations

import luigi

from pipeline.io import params_key
from tasks.base import ModelStageTask, StageTask
from tasks.config import train, train_config
from tasks.dataset import Dataset
from tasks.features import features_for


class Train(ModelStageTask):
    """``<workdir>/train/<model>-<key>/``: weights, config.json, history, plots, metrics.json, then figures.json.

    Checkpoints persist in the folder, so a killed run resumes from the last one. Needs the ``gpu`` resource.
    """

    stage = "train"
    resources = {"gpu": 1}
    library = luigi.Parameter(default="", description="the library the run indexes: its features rule is the model's")

    def requires(self) -> dict[str, luigi.Task]:
        return {"features": features_for(self, self.model), "dataset": self.clone(Dataset)}

    @property
    def key(self) -> str:
        return params_key([features_for(self, self.model).key, train_config(self.model).to_dict()])

    def run(self) -> None:
        from pipeline.train import train_model  # torch: imported by the stage that trains, not by every run

        metrics = train_model(features_for(self, self.model).artifact, self.clone(Dataset).artifact, self.stage_dir,
                              train_config(self.model), device=train().device, progress=self.report)
        self.finish(metrics)


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
