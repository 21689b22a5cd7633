"""Synthetic runs and small trained models shared by the train, classifier, embeddings and query tests.

Each builder fills a folder once and returns what is there on later calls, so tests of several modules that
use the same folder of the session's base temporary directory train each model once per session.
(A ``tests/pipeline/conftest.py`` would shadow ``tests/conftest.py`` for the ``from conftest import ...`` of
other test modules here, hence a plain helper module.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf

from pipeline.dataset import build_manifest
from pipeline.feature_shards import write_feature_shard
from pipeline.manifest import read_manifest, write_manifest
from pipeline.mel import MelConfig
from pipeline.synth import write_synthetic_dataset
from pipeline.train import TrainConfig, train_model

# Small log-mels (32 bands, 3 s at 11025 Hz: 130 frames) and 1 s crops keep every run to seconds on 2 cores.
MEL = MelConfig(sr=11025, n_fft=512, hop_length=256, n_mels=32, duration_s=3.0, dtype="float32")
FAST = {"crop_s": 1.0, "batch_size": 8}
# The default cifar10 (512-d softplus embedding, dropout) for 8 epochs: the model the classifier tests use.
CIFAR10 = TrainConfig(model="cifar10", epochs=8, **FAST)

# Smaller still for the embeddings and query tests: 2-s clips, 32 mels, a narrow cifar10 (16-d embedding)
# without dropout or augmentation, which learns the synthetic genres in 4 epochs (with dropout it stays at chance).
TINY_MELS = MelConfig(sr=16000, n_fft=512, hop_length=256, n_mels=32, duration_s=2.0)
TINY_MODEL = {"channels": (8, 8, 16, 16, 16), "dense": 16, "conv_dropout": 0.0, "dense_dropout": 0.0}
TINY_TRAIN = TrainConfig(model="cifar10", epochs=4, batch_size=8, lr=3e-3, crop_s=1.0, augment=False, mixup=0.0,
                         model_kwargs=TINY_MODEL)


def make_synthetic_run(root: Path, *, n_classes: int = 4, n_per_class: int = 10, seed: int = 3) -> dict[str, Path]:
    """Synthetic clips, their features (``MEL``) and a manifest: per class 6 train, 2 valid, the rest test.

    One extra clip per run is ``excluded`` and one unlabelled: training must ignore both. Built once per ``root``.
    """
    run = {"features": root / "features.h5", "manifest": root / "manifest.parquet", "audio": root / "audio"}
    if run["features"].is_file():
        return run
    paths = write_synthetic_dataset(run["audio"], n_per_class=n_per_class, seconds=MEL.duration_s, sr=MEL.sr,
                                    n_classes=n_classes, seed=seed)
    rows = []
    for path in sorted(paths):
        i = int(path.stem.split(".")[1])
        split = "train" if i < 6 else "valid" if i < 8 else "test"
        rows.append({"track_id": path.stem, "path": str(path), "label": path.parent.name, "split": split,
                     "duration_s": MEL.duration_s, "sample_rate": MEL.sr, "channels": 1, "status": "ok", "reason": ""})
    rows[0] = {**rows[0], "split": "excluded"}
    rows[1] = {**rows[1], "label": ""}
    write_manifest(rows, run["manifest"])
    write_feature_shard([(row["track_id"], row["path"]) for row in rows], run["features"], MEL, workers=1)
    return run


def trained_cifar10(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, TrainConfig, dict[str, Path]]:
    """``CIFAR10`` trained on a :func:`make_synthetic_run`: (out_dir, metrics, cfg, run); once per session."""
    root = tmp_path_factory.getbasetemp() / "synthetic-cifar10"
    run = make_synthetic_run(root / "data")
    out = root / "cifar10"
    if (out / "metrics.json").is_file():
        return out, json.loads((out / "metrics.json").read_text()), CIFAR10, run
    return out, train_model(run["features"], run["manifest"], out, CIFAR10, device="cpu"), CIFAR10, run


def tiny_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A work directory with a manifest, features and a tiny trained model; built once per session.

    4 synthetic genres x 8 clips (random 80/10/10 split) plus 2 unlabelled clips at the audio root.
    Layout as the pipeline writes it: dataset/s/manifest.parquet, features/<key>/features.h5,
    train/cifar10-tiny/. The audio lies in ``root/audio``.
    """
    root = tmp_path_factory.getbasetemp() / "tiny-work"
    model_dir = root / "train" / "cifar10-tiny"
    if (model_dir / "metrics.json").is_file():
        return root
    audio = root / "audio"
    paths = write_synthetic_dataset(audio, n_per_class=8, seconds=2.0, sr=16000, n_classes=4, seed=3)
    for i, path in enumerate(paths[:2]):  # unlabelled: copies at the root, in another format
        samples, sr = sf.read(path)
        sf.write(audio / f"loose{i}.flac", samples[::-1], sr)
    manifest = root / "dataset" / "s" / "manifest.parquet"
    build_manifest(audio, manifest, split="random", workers=1)
    rows = read_manifest(manifest, status="ok")
    features = root / "features" / TINY_MELS.key() / "features.h5"
    write_feature_shard([(r["track_id"], r["path"]) for r in rows], features, TINY_MELS, workers=1)
    train_model(features, manifest, model_dir, TINY_TRAIN, device="cpu")
    return root


def tiny_paths(root: Path) -> tuple[Path, Path, Path]:
    """(manifest, features, model_dir) of :func:`tiny_workdir`."""
    return (root / "dataset" / "s" / "manifest.parquet", root / "features" / TINY_MELS.key() / "features.h5",
            root / "train" / "cifar10-tiny")
