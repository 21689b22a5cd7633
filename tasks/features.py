"""Features stage: manifest -> log-mel HDF5 shards (one task each, any worker's) -> features.h5."""

from __future__ import annotations

import json
import time
from pathlib import Path

import luigi

from pipeline.feature_shards import merge_feature_shards, shard_tracks, write_feature_shard
from pipeline.feature_store import feature_figures
from pipeline.io import params_key, write_json_atomic
from pipeline.manifest import read_manifest
from pipeline.mel import MelConfig
from pipeline.parallel import shutdown_shared_pool
from tasks.base import PROCESS, StageTask
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


class FeatureShard(StageTask):
    """``<workdir>/features/<key>/shards/shard-NNNNN.h5``: the log-mels of one slice of the manifest.

    Its parameters say everything that shapes it (no setting is read from luigi.cfg but ``features.processes``),
    so any worker of the same luigid makes the same file, whichever machine listed the shard. Beside it
    ``shard-NNNNN.json`` says which process made it and in how many seconds; written last, it marks the shard done.
    """

    stage = "features"
    folder = luigi.Parameter(description="the features stage's folder, relative to the work directory")
    manifest = luigi.Parameter(description="the dataset's manifest, relative to the work directory")
    shard = luigi.IntParameter()
    shard_size = luigi.IntParameter()
    mel = luigi.DictParameter(description="the MelConfig's fields")
    progress_unit = "tracks"

    @property
    def stage_dir(self) -> Path:
        return self.layout.root / self.folder

    def requires(self) -> list[luigi.Task]:
        return []  # the manifest exists: Features lists its shards from it

    def output(self) -> list[luigi.LocalTarget]:
        path = self.stage_dir / "shards" / f"shard-{self.shard:05d}"
        return [luigi.LocalTarget(f"{path}.h5"), luigi.LocalTarget(f"{path}.json")]

    def run(self) -> None:
        started = time.monotonic()
        manifest = self.layout.root / self.manifest
        if self.layout.store is not None:
            self.layout.store.download(manifest)
        tracks = shard_tracks(read_manifest(manifest, status="ok"), self.shard_size)[self.shard]
        shard, record = (target.path for target in self.output())
        write_feature_shard(tracks, shard, MelConfig.from_dict(dict(self.mel)),
                            workers=features().processes or None, progress=self.report)
        write_json_atomic(record, {"shard": self.shard, "tracks": len(tracks), "worker": PROCESS,
                                   "seconds": round(time.monotonic() - started, 3)})


class Features(FeaturesBase):
    """``<workdir>/features/<key>/features.h5``: one logical dataset over every shard (HDF5 virtual datasets).

    Its figures list the ``shards``: each one's tracks, the ``worker`` (``host:pid``) that made it and its seconds.
    """

    def run(self):
        # the shard count is known only once the manifest exists: dynamic dependencies, which any worker of the
        # scheduler may run (their parameters say everything)
        manifest, cfg, size = self.clone(Dataset).artifact, self.mel_config, features().shard_size
        count = len(shard_tracks(read_manifest(manifest, status="ok"), size))
        shard_tasks = [FeatureShard(workdir=self.workdir, folder=self._relative(self.stage_dir),
                                    manifest=self._relative(manifest), shard=i, shard_size=size, mel=cfg.to_dict())
                       for i in range(count)]
        yield shard_tasks
        shutdown_shared_pool()  # every shard is written: free the workers' memory for the stages after
        merge_feature_shards([t.output()[0].path for t in shard_tasks], self.artifact)
        records = [json.loads(Path(t.output()[1].path).read_text()) for t in shard_tasks]
        self.finish({**feature_figures(self.artifact), "shards": records})

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.layout.root).as_posix()


def features_for(task: luigi.Task, model: str) -> Features:
    """The features stage that feeds ``model`` (its own preset for a pretrained model) in ``task``'s run."""
    return task.clone(Features, model_preset=features_preset(model))
