"""Embeddings stage: one unit vector per ok track of a tiny trained model, Parquet layout, checks, reruns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipeline.classifier import GenreClassifier
from pipeline.dataset import build_manifest
from pipeline.embeddings import embeddings_metadata, read_embeddings, write_embeddings
from pipeline.errors import MelsearchError
from pipeline.features import FeatureStore, MelConfig, write_feature_shard
from pipeline.manifest import read_manifest, write_manifest
from pipeline.synth import write_synthetic_dataset
from pipeline.train import TrainConfig, train_model

# Small settings: 2-s clips, 32 mels, a narrow cifar10 (16-d embedding) without dropout, which learns the
# synthetic genres in 4 epochs (with dropout it stays at chance and maps every clip to one direction).
TINY_MELS = MelConfig(sr=16000, n_fft=512, hop_length=256, n_mels=32, duration_s=2.0)
TINY_MODEL = {"channels": (8, 8, 16, 16, 16), "dense": 16, "conv_dropout": 0.0, "dense_dropout": 0.0}
TINY_TRAIN = TrainConfig(model="cifar10", epochs=4, batch_size=8, lr=3e-3, crop_s=1.0, model_kwargs=TINY_MODEL)


def tiny_workdir(root: Path) -> Path:
    """``root`` as a work directory with a manifest, features and a tiny trained model; built once per root.

    4 synthetic genres x 8 clips (random 80/10/10 split) plus 2 unlabelled clips at the audio root.
    Layout as the pipeline writes it: dataset/s/manifest.parquet, features/<key>/features.h5,
    models/cifar10-tiny/. The audio lies in ``root/audio``.
    """
    model_dir = root / "models" / "cifar10-tiny"
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
            root / "models" / "cifar10-tiny")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    return tiny_workdir(tmp_path_factory.getbasetemp() / "tiny-work")


def test_one_unit_vector_per_ok_track_with_features(tiny, tmp_path):
    manifest, features, model_dir = tiny_paths(tiny)
    out = tmp_path / "embeddings" / "embeddings.parquet"
    result = write_embeddings(manifest, features, model_dir, out, batch_size=5, row_group_size=8)
    classifier = GenreClassifier.load(model_dir)

    ok = read_manifest(manifest, status="ok")
    rows, vectors = read_embeddings(out)
    assert result == {"tracks": len(ok), "dim": classifier.embedding_dim} == {"tracks": 34, "dim": 16}
    assert [r["track_id"] for r in rows] == [r["track_id"] for r in ok]  # every split, unlabelled too
    assert {r["split"] for r in rows} == {"train", "valid", "test", ""}
    assert [(r["path"], r["label"], r["split"]) for r in rows] == [(r["path"], r["label"], r["split"]) for r in ok]
    assert vectors.shape == (34, 16) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.isfinite(vectors).all() and len(np.unique(vectors.round(5), axis=0)) == 34

    # the stored vector is the classifier's crop-mean embedding (of the stored features), normalised
    store = FeatureStore.open(features)
    where = store.index_of([r["track_id"] for r in rows])
    reference = classifier.embed_mels(store.read(where), n_frames=store.n_frames[where])
    np.testing.assert_allclose(vectors, reference / np.linalg.norm(reference, axis=1, keepdims=True), atol=1e-5)
    probabilities = classifier.predict_mels(store.read(where), n_frames=store.n_frames[where])
    assert [r["predicted_label"] for r in rows] == [classifier.labels[i] for i in probabilities.argmax(axis=1)]

    # the audio file's own embedding (float32 log-mel, not the stored float16) is its stored vector's nearest
    direct = classifier.encode(rows[3]["path"])
    assert int(np.argmax(vectors @ direct)) == 3

    column = pq.read_schema(out).field("embedding").type
    assert pa.types.is_fixed_size_list(column) and column.list_size == 16 and column.value_type == pa.float32()
    assert embeddings_metadata(out) == {"model": "cifar10", "model_key": "cifar10-tiny",
                                        "feature_key": TINY_MELS.key(), "dim": "16"}
    # streamed: row groups of row_group_size, the last one shorter
    meta = pq.read_metadata(out)
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [8, 8, 8, 8, 2]


def test_rerun_is_byte_identical(tiny, tmp_path):
    manifest, features, model_dir = tiny_paths(tiny)
    write_embeddings(manifest, features, model_dir, tmp_path / "a.parquet")
    write_embeddings(manifest, features, model_dir, tmp_path / "b.parquet", batch_size=7)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def test_tracks_without_features_or_not_ok_are_left_out(tiny, tmp_path):
    manifest, features, model_dir = tiny_paths(tiny)
    rows = read_manifest(manifest)
    rows[0] = {**rows[0], "status": "rejected", "reason": "broken"}
    extra = {**rows[1], "track_id": "ghost.00001", "path": "/nowhere/ghost.wav"}  # ok, but no features
    write_manifest([*rows, extra], tmp_path / "manifest.parquet")
    result = write_embeddings(tmp_path / "manifest.parquet", features, model_dir, tmp_path / "e.parquet")
    ids = [r["track_id"] for r in read_embeddings(tmp_path / "e.parquet")[0]]
    assert result["tracks"] == 33 and rows[0]["track_id"] not in ids and "ghost.00001" not in ids


def test_features_of_another_configuration_are_refused(tiny, tmp_path):
    manifest, _, model_dir = tiny_paths(tiny)
    other = MelConfig(sr=16000, n_fft=512, hop_length=256, n_mels=40, duration_s=2.0)
    rows = read_manifest(manifest, status="ok")[:3]
    write_feature_shard([(r["track_id"], r["path"]) for r in rows], tmp_path / "other.h5", other, workers=1)
    with pytest.raises(MelsearchError, match="differ from") as exc:
        write_embeddings(manifest, tmp_path / "other.h5", model_dir, tmp_path / "e.parquet")
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "e.parquet").exists()


def test_failure_midway_leaves_no_file(tiny, tmp_path, monkeypatch):
    manifest, features, model_dir = tiny_paths(tiny)
    calls = []

    def flaky(self, mels, *, n_frames=None):
        calls.append(len(mels))
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(self, mels, n_frames=n_frames)

    real = GenreClassifier.embed_mels
    monkeypatch.setattr(GenreClassifier, "embed_mels", flaky)
    with pytest.raises(RuntimeError, match="out of memory"):
        write_embeddings(manifest, features, model_dir, tmp_path / "e.parquet", batch_size=4, row_group_size=4)
    assert list(tmp_path.iterdir()) == []


def test_missing_inputs_are_one_line_errors(tiny, tmp_path):
    manifest, features, model_dir = tiny_paths(tiny)
    with pytest.raises(MelsearchError, match="no manifest"):
        write_embeddings(tmp_path / "none.parquet", features, model_dir, tmp_path / "e.parquet")
    with pytest.raises(MelsearchError, match="config.json"):
        write_embeddings(manifest, features, tmp_path, tmp_path / "e.parquet")
    with pytest.raises(MelsearchError, match="no embeddings here"):
        read_embeddings(tmp_path / "e.parquet")
    assert json.loads((model_dir / "config.json").read_text())["model"] == "cifar10"
