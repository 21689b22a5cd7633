"""Features stage: manifest -> log-mel HDF5 shards (one task each, run in parallel) -> features.h5."""

from __future__ import annotations

import luigi

from pipeline.feature_shards import merge_feature_shards, shard_tracks, write_feature_shard
from pipeline.feature_store import feature_figures
from pipeline.io import params_key
from pipeline.manifest import read_manifest
from pipeline.mel import MelConfig
from pipeline.parallel import shutdown_shared_pool
from tasks.base import StageTask
from tasks.config import features, features_preset, mel_config
from tasks.dataset import Dataset


class FeaturesBase(StageTask):
    stage = "features"
    model_preset = luigi.Parameter(default="", description="a model's own features preset ('': [features] preset)")
    library = luigi.Parameter(default="", description="the library a run indexes ('': none); sets mel_config's")

    @property
    def mel_config(self) -> MelConfig:
        """This run's log-mel settings (whole songs when the run indexes a library)."""
        return mel_config(self.model_preset, library=bool(self.library))

    def requires(self) -> Dataset:
        return self.clone(Dataset)

    @property
    def key(self) -> str:
        return params_key([self.clone(Dataset).key, self.mel_config.key(), features().shard_size])

    def shards(self) -> list[list[tuple[str, str]]]:
        return shard_tracks(read_manifest(self.clone(Dataset).artifact, status="ok"), features().shard_size)


class FeatureShard(FeaturesBase):
    """``<workdir>/features/<key>/shards/shard-NNNNN.h5``: the log-mels of one slice of the manifest."""

    shard = luigi.IntParameter()
    progress_unit = "tracks"

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(self.stage_dir / "shards" / f"shard-{self.shard:05d}.h5"))

    def run(self) -> None:
        tracks = self.shards()[self.shard]
        write_feature_shard(tracks, self.output().path, self.mel_config,
                            workers=features().processes or None, progress=self.report)


class Features(FeaturesBase):
    """``<workdir>/features/<key>/features.h5``: one logical dataset over every shard (HDF5 virtual datasets)."""

    def run(self):
        # the shard count is known only once the manifest exists: dynamic dependencies
        shard_tasks = [self.clone(FeatureShard, shard=i) for i in range(len(self.shards()))]
        yield shard_tasks
        shutdown_shared_pool()  # every shard is written: free the workers' memory for the stages after
        merge_feature_shards([t.output().path for t in shard_tasks], self.artifact)
        self.finish(feature_figures(self.artifact))


def features_for(task: luigi.Task, model: str) -> Features:
    """The features stage that feeds ``model`` (its own preset for a pretrained model) in ``task``'s run."""
    return task.clone(Features, model_preset=features_preset(model))
