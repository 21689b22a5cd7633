"""Tests for pipeline.classifier: loading a trained model, predict/encode on files and on log-mels, bad folders,
and (with MELSEARCH_REAL_AUDIO) predicting real GTZAN clips never seen in training.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from test_train import FAST, MEL, make_synthetic_run  # the same synthetic run as the training tests

from models import build_model
from pipeline.classifier import GenreClassifier
from pipeline.errors import MelsearchError
from pipeline.features import FeatureStore, MelConfig, write_feature_shard
from pipeline.manifest import write_manifest
from pipeline.train import TrainConfig, train_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("classifier")
    data = make_synthetic_run(root, seed=5)
    out = root / "cifar10"
    train_model(data["features"], data["manifest"], out, TrainConfig(model="cifar10", epochs=8, **FAST),
                device="cpu")
    return out, data


@pytest.fixture(scope="module")
def classifier(model_dir) -> GenreClassifier:
    return GenreClassifier.load(model_dir[0])


def test_load_exposes_the_training_settings(classifier, model_dir) -> None:
    assert classifier.labels == ["buzz", "chime", "drone", "whistle"]
    assert classifier.model_name == "cifar10" and classifier.embedding_dim == 512
    assert classifier.mel_config == MEL and classifier.feature_key == MEL.key()
    assert not classifier.model.training


def test_predict_held_out_files(classifier, model_dir) -> None:
    test_files = sorted(model_dir[1]["audio"].glob("*/*.0000[89].wav"))
    assert len(test_files) == 8
    predictions = [classifier.predict(path) for path in test_files]
    for path, prediction in zip(test_files, predictions, strict=True):
        assert prediction["path"] == str(path)
        assert list(prediction["probabilities"]) == classifier.labels
        assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert prediction["label"] == max(prediction["probabilities"], key=prediction["probabilities"].get)
    right = sum(p["label"] == path.parent.name for path, p in zip(test_files, predictions, strict=True))
    assert right >= 7  # of 8; chance is 2


def test_file_and_feature_paths_agree(classifier, model_dir) -> None:
    """predict/encode on a file equal predict_mels/embed_mels on the stored features of that file."""
    path = next(model_dir[1]["audio"].glob("chime/*.00008.wav"))
    with FeatureStore.open(model_dir[1]["features"]) as store:
        position = store.index_of([path.stem])
        mels, n_frames = store.read(position), store.n_frames[position]
    np.testing.assert_allclose(classifier.predict_mels(mels, n_frames=n_frames)[0],
                               list(classifier.predict(path)["probabilities"].values()), rtol=1e-5, atol=1e-6)
    vector = classifier.encode(path)
    assert vector.shape == (512,) and vector.dtype == np.float32 and np.isfinite(vector).all()
    np.testing.assert_allclose(classifier.embed_mels(mels, n_frames=n_frames)[0], vector, rtol=1e-5, atol=1e-6)


def test_embed_mels_is_the_mean_over_crops(classifier) -> None:
    rng = np.random.default_rng(0)
    crop = classifier.crop_frames
    mels = rng.normal(-40, 10, size=(2, MEL.n_mels, 3 * crop)).astype(np.float32)
    expected = np.mean([classifier.embed_mels(mels[:, :, i * crop : (i + 1) * crop]) for i in range(3)], axis=0)
    np.testing.assert_allclose(classifier.embed_mels(mels), expected, rtol=1e-5, atol=1e-5)
    probabilities = classifier.predict_mels(mels)
    assert probabilities.shape == (2, 4) and np.allclose(probabilities.sum(axis=1), 1.0)
    with pytest.raises(MelsearchError, match=r"shape \(N, 32, frames\)"):
        classifier.embed_mels(mels[:, :20])


def test_embeddings_group_by_class(classifier, model_dir) -> None:
    files = sorted(model_dir[1]["audio"].glob("*/*.0000[789].wav"))
    vectors = np.stack([classifier.encode(path) for path in files])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    classes = np.array([path.parent.name for path in files])
    cosine = vectors @ vectors.T
    same = classes[:, None] == classes[None, :]
    off_diagonal = ~np.eye(len(files), dtype=bool)
    assert cosine[same & off_diagonal].mean() > cosine[~same].mean() + 0.1


def test_other_formats_decode_to_the_same_prediction(classifier, model_dir, tmp_path) -> None:
    wav = next(model_dir[1]["audio"].glob("drone/*.00009.wav"))
    samples, sr = sf.read(wav, dtype="float32")
    flac = tmp_path / "drone.flac"
    sf.write(flac, np.stack([samples, samples], axis=1), sr)  # stereo flac: decoded to mono
    np.testing.assert_allclose(list(classifier.predict(flac)["probabilities"].values()),
                               list(classifier.predict(wav)["probabilities"].values()), atol=1e-3)


def test_missing_and_broken_model_folders(model_dir, tmp_path) -> None:
    with pytest.raises(MelsearchError, match="not a trained model folder"):
        GenreClassifier.load(tmp_path / "nothing")
    broken = Path(shutil.copytree(model_dir[0], tmp_path / "broken"))
    (broken / "model.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(MelsearchError, match="model.pt: corrupt or unsafe checkpoint") as err:
        GenreClassifier.load(broken)
    assert "\n" not in str(err.value)
    # weights of another architecture
    torch.save(build_model("resnet_v2", n_classes=4, n_mels=32).state_dict(), broken / "model.pt")
    with pytest.raises(MelsearchError, match="weights do not fit the cifar10 model"):
        GenreClassifier.load(broken)
    (broken / "model.pt").unlink()
    with pytest.raises(MelsearchError, match="model.pt: no such checkpoint"):
        GenreClassifier.load(broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(MelsearchError, match="config.json: unreadable model config"):
        GenreClassifier.load(broken)
    (broken / "config.json").write_text(json.dumps({"model": "resnet_v2"}))
    with pytest.raises(MelsearchError, match="not a model config"):
        GenreClassifier.load(broken)


def test_predict_on_undecodable_file(classifier, tmp_path) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    with pytest.raises(MelsearchError, match="bad.wav"):
        classifier.predict(bad)


def test_real_clips_never_seen_are_predicted_better_than_chance(real_audio_dir, tmp_path) -> None:
    """Train on 2 real clips per genre, predict the third: right more often than chance (1 in 10)."""
    rows = []
    for folder in sorted(p for p in real_audio_dir.iterdir() if p.is_dir()):
        for i, path in enumerate(sorted(folder.glob("*.wav"))[:3]):
            rows.append({"track_id": path.stem, "path": str(path), "label": folder.name,
                         "split": "train" if i < 2 else "test", "duration_s": 30.0, "sample_rate": 22050,
                         "channels": 1, "status": "ok", "reason": ""})
    assert len(rows) == 30
    write_manifest(rows, tmp_path / "manifest.parquet")
    mel = MelConfig(n_mels=64)
    write_feature_shard([(row["track_id"], row["path"]) for row in rows], tmp_path / "features.h5", mel, workers=2)
    cfg = TrainConfig(model="resnet_v2", epochs=10, crop_s=1.5, batch_size=16)
    metrics = train_model(tmp_path / "features.h5", tmp_path / "manifest.parquet", tmp_path / "model", cfg,
                          device="cpu")
    classifier = GenreClassifier.load(tmp_path / "model")
    held_out = [row for row in rows if row["split"] == "test"]
    right = sum(classifier.predict(row["path"])["label"] == row["label"] for row in held_out)
    assert right == round(10 * metrics["test_accuracy"])
    assert right >= 3  # chance gets 1 of 10; 3 or more happens by chance 7% of the time
