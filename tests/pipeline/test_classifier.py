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
from trained_models import MEL, trained_cifar10  # the model of the training tests, trained once per session

from models import build_model
from pipeline.classifier import GenreClassifier
from pipeline.errors import MelsearchError
from pipeline.feature_shards import write_feature_shard
from pipeline.feature_store import FeatureStore
from pipeline.inference import standardise
from pipeline.manifest import write_manifest
from pipeline.mel import MelConfig
from pipeline.train import TrainConfig, train_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """(the trained cifar10 folder, its synthetic run: features, manifest, audio)."""
    out, _, _, data = trained_cifar10(tmp_path_factory)
    return out, data


@pytest.fixture(scope="module")
def classifier(model_dir) -> GenreClassifier:
    return GenreClassifier.load(model_dir[0])


def crop_means(classifier: GenreClassifier, mels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference: the model's embed() and forward() on each whole crop of ``mels`` (N, n_mels, k * crop),
    averaged per track: (N, D) embeddings, (N, n_classes) logits."""
    config = json.loads((classifier.model_dir / "config.json").read_text())
    x = standardise(mels, np.asarray(config["norm_mean"]), np.asarray(config["norm_std"]))
    crop = classifier.crop_frames
    crops = torch.from_numpy(np.stack([x[:, :, i * crop : (i + 1) * crop] for i in range(x.shape[2] // crop)], 1))
    crops = crops.reshape(-1, 1, x.shape[1], crop)  # (N * k, 1, n_mels, crop), track by track
    with torch.no_grad():
        embedding, logits = classifier.model.embed(crops), classifier.model(crops)
    return (embedding.reshape(len(mels), -1, embedding.shape[1]).mean(1).numpy(),
            logits.reshape(len(mels), -1, logits.shape[1]).mean(1).numpy())


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
    """predict/encode on a file equal embed_and_predict on the stored (float32) features of that file."""
    path = next(model_dir[1]["audio"].glob("chime/*.00008.wav"))
    with FeatureStore.open(model_dir[1]["features"]) as store:
        position = store.index_of([path.stem])
        mels, n_frames = store.read(position), store.n_frames[position]
    vectors, probabilities = classifier.embed_and_predict(mels, n_frames=n_frames)
    np.testing.assert_allclose(probabilities[0], list(classifier.predict(path)["probabilities"].values()),
                               rtol=1e-5, atol=1e-6)
    vector = classifier.encode(path)
    assert vector.shape == (512,) and vector.dtype == np.float32 and np.isfinite(vector).all()
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(vectors[0], vector, rtol=1e-5, atol=1e-6)


def test_embed_and_predict_is_the_centred_mean_over_crops(classifier) -> None:
    """Vectors: l2_normalise(mean embed() over crops - center); probabilities: softmax of the mean forward()."""
    rng = np.random.default_rng(0)
    mels = rng.normal(-40, 10, size=(2, MEL.n_mels, 3 * classifier.crop_frames)).astype(np.float32)
    embedding, logits = crop_means(classifier, mels)
    centred = embedding - classifier.embedding_center
    vectors, probabilities = classifier.embed_and_predict(mels)
    assert vectors.shape == (2, 512) and vectors.dtype == np.float32
    assert probabilities.shape == (2, 4) and probabilities.dtype == np.float32
    np.testing.assert_allclose(vectors, centred / np.linalg.norm(centred, axis=1, keepdims=True), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(probabilities, torch.softmax(torch.from_numpy(logits), dim=1).numpy(), atol=1e-5)
    # the center is the train tracks' mean embedding: far from zero for all-positive softplus features
    assert classifier.embedding_center.shape == (512,) and (classifier.embedding_center > 0).all()
    with pytest.raises(MelsearchError, match=r"shape \(N, 32, frames\)"):
        classifier.embed_and_predict(mels[:, :20])


def test_embeddings_group_by_class(classifier, model_dir) -> None:
    files = sorted(model_dir[1]["audio"].glob("*/*.0000[789].wav"))
    vectors = np.stack([classifier.encode(path) for path in files])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    classes = np.array([path.parent.name for path in files])
    cosine = vectors @ vectors.T
    same = classes[:, None] == classes[None, :]
    off_diagonal = ~np.eye(len(files), dtype=bool)
    # centred, tracks of different genres point apart (uncentred, their cosines average about 0.9 here)
    assert cosine[same & off_diagonal].mean() > cosine[~same].mean() + 0.1
    assert cosine[~same].mean() < 0.5


def test_model_folder_without_center_loads_uncentred(classifier, model_dir, tmp_path, caplog) -> None:
    """A model folder written before embedding_center existed: the center is zeros, with a warning."""
    old = Path(shutil.copytree(model_dir[0], tmp_path / "old"))
    config = json.loads((old / "config.json").read_text())
    del config["embedding_center"]
    (old / "config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING", logger="pipeline.classifier"):
        uncentred = GenreClassifier.load(old)
    assert "predates embedding centring" in caplog.text
    assert uncentred.embedding_center.shape == (512,) and not uncentred.embedding_center.any()
    mels = np.random.default_rng(1).normal(-40, 10, size=(2, MEL.n_mels, classifier.crop_frames)).astype(np.float32)
    embedding, _ = crop_means(classifier, mels)
    np.testing.assert_allclose(uncentred.embed_and_predict(mels)[0],
                               embedding / np.linalg.norm(embedding, axis=1, keepdims=True), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(uncentred.embed_and_predict(mels)[1], classifier.embed_and_predict(mels)[1])
    (old / "config.json").write_text(json.dumps({**config, "embedding_center": [0.0] * 3}))
    with pytest.raises(MelsearchError, match=r"config.json: embedding_center has shape \(3,\)"):
        GenreClassifier.load(old)


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


@pytest.mark.parametrize("out", ["folder", "missing/parent/x.npy"])
def test_encode_out_writes_into_a_folder_or_makes_missing_parents(model_dir, tmp_path, capsys, out) -> None:
    from tasks.cli import main

    song = sorted(model_dir[1]["audio"].rglob("*.wav"))[0]
    (tmp_path / "folder").mkdir()
    assert main(["encode", str(song), "--model-dir", str(model_dir[0]), "--out", str(tmp_path / out)]) == 0
    written = tmp_path / "folder" / f"{song.stem}.npy" if out == "folder" else tmp_path / out
    vector = np.load(written)
    np.testing.assert_allclose(vector, GenreClassifier.load(model_dir[0]).encode(song), rtol=1e-5, atol=1e-6)
    assert str(written) in capsys.readouterr().out


def test_encode_out_that_cannot_be_written_is_one_line(model_dir, tmp_path, capsys) -> None:
    from tasks.cli import main

    song = sorted(model_dir[1]["audio"].rglob("*.wav"))[0]
    (tmp_path / "afile").write_text("not a folder")
    out = tmp_path / "afile" / "x.npy"
    assert main(["encode", str(song), "--model-dir", str(model_dir[0]), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"melsearch: {out}: cannot write the vector") and "\n" not in err
