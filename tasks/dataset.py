"""Dataset stage: source (GTZAN mirrors, an archive, a folder) -> manifest.parquet."""

from __future__ import annotations

from pathlib import Path

import luigi

from pipeline.dataset import build_manifest
from pipeline.io import params_key
from pipeline.layout import WorkDir
from pipeline.sources import audio_root, extract_archive, fetch_gtzan
from tasks.base import StageTask
from tasks.config import dataset


class DownloadGTZAN(luigi.Task):
    """``<workdir>/downloads/genres.tar.gz``, verified against the accepted checksums."""

    workdir = luigi.Parameter(default="data/work")

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(WorkDir(self.workdir).gtzan_archive))

    def run(self) -> None:
        cfg = dataset()
        fetch_gtzan(self.output().path, urls=cfg.gtzan_urls, sha256=cfg.gtzan_sha256, md5=cfg.gtzan_md5)


class Dataset(StageTask):
    """``<workdir>/dataset/<key>/manifest.parquet`` (and ``audio/`` when the source was an archive)."""

    stage = "dataset"

    @property
    def key(self) -> str:
        cfg = dataset()
        return params_key([self.source_key, cfg.split, cfg.split_seed])

    def requires(self) -> list[luigi.Task]:
        return [] if self.audio_dir or self.archive else [DownloadGTZAN(workdir=self.workdir)]

    def run(self) -> None:
        cfg = dataset()
        folder = Path(self.audio_dir) if self.audio_dir else None
        if folder is None:
            archive = self.archive or self.input()[0].path
            extracted = self.stage_dir / "audio"
            if not extracted.is_dir():
                extract_archive(archive, extracted, max_ratio=cfg.extract_max_ratio,
                                min_free_gb=cfg.extract_min_free_gb)
            folder = audio_root(extracted)
        figures = build_manifest(folder, self.artifact, split=cfg.split, seed=cfg.split_seed,
                                 probe_cache=self.layout.probe_cache)
        self.set_status_message(f"{figures['ok']} ok, {figures['rejected']} rejected")
        self.finish(figures)
