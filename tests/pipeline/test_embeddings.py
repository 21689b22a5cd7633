"""Embeddings stage: one unit vector per ok track of a tiny trained model, Parquet layout, checks, reruns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from trained_models import TINY_MELS, tiny_paths, tiny_workdir  # the tiny model the query tests use too

from models.cifar10 import Cifar10Net
from pipeline.classifier import GenreClassifier
from pipeline.embeddings import embeddings_metadata, read_embeddings, write_embeddings
from pipeline.errors import MelsearchError
from pipeline.feature_shards import write_feature_shard
from pipeline.feature_store import FeatureStore
from pipeline.manifest import read_manifest, write_manifest
from pipeline.mel import MelConfig


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    return tiny_workdir(tmp_path_factory)


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

    # the stored vector and label are the classifier's (of the stored features)
    store = FeatureStore.open(features)
    where = store.index_of([r["track_id"] for r in rows])
    reference, probabilities = classifier.embed_and_predict(store.read(where), n_frames=store.n_frames[where])
    np.testing.assert_allclose(vectors, reference, atol=1e-6)
    assert [r["predicted_label"] for r in rows] == [classifier.labels[i] for i in probabilities.argmax(axis=1)]

    # encode() of the audio file (float32 log-mel, not the stored float16) is its Parquet row, to that rounding,
    # and its nearest stored vector
    for i in (3, 17):
        direct = classifier.encode(rows[i]["path"])
        np.testing.assert_allclose(direct, vectors[i], atol=2e-3)
        assert int(np.argmax(vectors @ direct)) == i

    # centred vectors of different genres point apart; uncentred ones would all sit within a few degrees
    labels = np.array([r["label"] for r in rows])
    labelled = labels != ""
    cosine = vectors[labelled] @ vectors[labelled].T
    same = labels[labelled][:, None] == labels[labelled][None, :]
    assert cosine[~same].mean() < 0.5 and cosine[same].mean() > cosine[~same].mean() + 0.3

    column = pq.read_schema(out).field("embedding").type
    assert pa.types.is_fixed_size_list(column) and column.list_size == 16 and column.value_type == pa.float32()
    assert embeddings_metadata(out) == {"model": "cifar10", "model_key": "cifar10-tiny",
                                        "feature_key": TINY_MELS.key(), "dim": "16"}
    # streamed: row groups of row_group_size, the last one shorter
    meta = pq.read_metadata(out)
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [8, 8, 8, 8, 2]


def test_one_forward_pass_per_batch(tiny, tmp_path, monkeypatch):
    """Vectors and predicted labels come from one pass of each crop through the network, not one each."""
    manifest, features, model_dir = tiny_paths(tiny)
    passes = []  # crops per call of the network's body; every forward() runs embed() once

    def counted(self, x):
        passes.append(len(x))
        return real(self, x)

    real = Cifar10Net.embed
    monkeypatch.setattr(Cifar10Net, "embed", counted)
    write_embeddings(manifest, features, model_dir, tmp_path / "e.parquet", batch_size=5)
    with FeatureStore.open(features) as store:
        crops = int(np.maximum(1, store.n_frames // GenreClassifier.load(model_dir).crop_frames).sum())
    # a trial pass of one zero crop sizes the passes (crops_per_pass); then 34 tracks in batches of 5 -> 7
    # batches of 2-crop tracks: one pass each, and every crop once
    assert passes[0] == 1 and len(passes[1:]) == 7 and sum(passes[1:]) == crops == 68


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

    def flaky(self, mels, **kwargs):
        calls.append(len(mels))
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(self, mels, **kwargs)

    real = GenreClassifier.embed_predict_and_tag
    monkeypatch.setattr(GenreClassifier, "embed_predict_and_tag", flaky)
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
