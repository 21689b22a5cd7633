"""Tests for pipeline.train and pipeline.evaluate: accuracy on synthetic classes, artifacts, resumption after
a clean stop and after SIGKILL, corrupt and foreign checkpoints, train-only normalisation, metrics and plots.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from trained_models import FAST, MEL, trained_cifar10

from models import build_model
from pipeline.errors import MelsearchError
from pipeline.evaluate import classification_metrics, plot_model_comparison, read_history
from pipeline.feature_store import FeatureStore
from pipeline.inference import _crop_plan, crop_frames, load_checkpoint, standardise
from pipeline.manifest import write_manifest
from pipeline.mel import MelConfig
from pipeline.train import TrainConfig, train_model

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = ("model.pt", "config.json", "history.csv", "curves.png", "confusion.png", "metrics.json",
             "checkpoints/last.pt", "checkpoints/best.pt")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict, TrainConfig]:
    """cifar10 trained 8 epochs: (out_dir, metrics, cfg); the classifier tests load the same model."""
    return trained_cifar10(tmp_path_factory)[:3]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """The synthetic run (features, manifest, audio) that ``trained`` learnt from."""
    return trained_cifar10(tmp_path_factory)[3]


def history_rows(out: Path) -> list[dict]:
    return read_history(out / "history.csv")


def test_reaches_high_test_accuracy_with_every_artifact(trained) -> None:
    out, metrics, cfg = trained
    assert metrics["test_accuracy"] >= 0.9  # chance is 0.25
    assert metrics == json.loads((out / "metrics.json").read_text())
    assert metrics["tracks"] == {"train": 22, "valid": 8, "test": 8}  # 2 of the 24 train clips are not trainable
    assert metrics["device"] == "cpu" and metrics["epochs_run"] == 8 and 1 <= metrics["best_epoch"] <= 8
    test = metrics["test"]
    assert np.sum(test["confusion"]) == 8 and np.trace(test["confusion"]) == round(8 * metrics["test_accuracy"])
    assert set(test["per_class"]) == {"buzz", "chime", "drone", "whistle"}
    assert all({"precision", "recall", "f1", "support"} <= set(v) for v in test["per_class"].values())
    for name in ARTIFACTS:
        assert (out / name).is_file(), name
    for name in ("curves.png", "confusion.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.rglob("*.tmp")), "atomic writes left temporaries"


def test_history_and_config(trained, data) -> None:
    out, metrics, cfg = trained
    rows = history_rows(out)
    assert [row["epoch"] for row in rows] == list(range(1, 9))
    assert all(0 <= row["train_acc"] <= 1 and row["train_loss"] > 0 and row["seconds"] > 0 for row in rows)
    assert rows[0]["lr"] == pytest.approx(cfg.lr) and rows[-1]["lr"] < rows[0]["lr"]  # cosine decay
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    best = rows[metrics["best_epoch"] - 1]
    assert best["valid_loss"] == min(row["valid_loss"] for row in rows)
    config = json.loads((out / "config.json").read_text())
    crop = crop_frames(MEL, cfg.crop_s)
    assert crop == 43
    assert config["model"] == "cifar10" and config["labels"] == ["buzz", "chime", "drone", "whistle"]
    assert config["input_shape"] == [1, 32, crop] and config["crop_frames"] == crop
    assert config["feature_key"] == MEL.key() and MelConfig.from_dict(config["mel_config"]) == MEL
    assert config["train_config"] == cfg.to_dict() and config["embedding_dim"] == 512


def test_normalisation_uses_train_split_only(trained, data) -> None:
    out, _, _ = trained
    config = json.loads((out / "config.json").read_text())
    with FeatureStore.open(data["features"]) as store:
        train_ids = [tid for tid in store.track_ids if int(tid.split(".")[1]) < 6][2:]  # minus excluded, unlabelled
        positions = store.index_of(train_ids)
        mels, n_true = store.read(positions), store.n_frames[positions]
        every = store.read(np.arange(len(store)))
    frames = np.concatenate([mel[:, :n] for mel, n in zip(mels, n_true, strict=True)], axis=1)  # (32, total)
    np.testing.assert_allclose(config["norm_mean"], frames.mean(axis=1), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(config["norm_std"], frames.std(axis=1), rtol=1e-4, atol=1e-4)
    # statistics over all tracks differ: the valid and test clips really were left out
    assert not np.allclose(config["norm_mean"], every.mean(axis=(0, 2)), atol=1e-2)


def test_embedding_center_is_the_mean_train_embedding(trained, data) -> None:
    """config.json's embedding_center: the best weights' embed() averaged over each train track's crops, then
    over the train tracks (valid, test, excluded and unlabelled clips left out)."""
    out, _, _ = trained
    config = json.loads((out / "config.json").read_text())
    model = build_model("cifar10", n_classes=4, n_mels=32)
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    model.eval()
    with FeatureStore.open(data["features"]) as store:
        train_ids = [tid for tid in store.track_ids if int(tid.split(".")[1]) < 6][2:]  # minus excluded, unlabelled
        positions = store.index_of(train_ids)
        mels, n_true = store.read(positions), store.n_frames[positions]
    mels = standardise(mels, np.asarray(config["norm_mean"]), np.asarray(config["norm_std"]))
    crop = config["crop_frames"]
    with torch.no_grad():
        per_track = [model.embed(torch.from_numpy(np.stack([mel[:, i * crop : (i + 1) * crop]
                                                            for i in range(n // crop)]))[:, None]).mean(dim=0)
                     for mel, n in zip(mels, n_true, strict=True)]  # 3 crops of 43 in 130 frames
    expected = torch.stack(per_track).mean(dim=0).numpy()
    assert len(train_ids) == 22 and len(config["embedding_center"]) == config["embedding_dim"] == 512
    np.testing.assert_allclose(config["embedding_center"], expected, rtol=1e-4, atol=1e-5)


def test_saved_weights_are_plain_tensors_that_rebuild_the_model(trained) -> None:
    out, _, _ = trained
    state = torch.load(out / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    build_model("cifar10", n_classes=4, n_mels=32).load_state_dict(state)
    best = load_checkpoint(out / "checkpoints" / "best.pt", required=("model", "epoch"))
    last = load_checkpoint(out / "checkpoints" / "last.pt", required=("model", "optimizer", "epoch", "best_model"))
    assert last["epoch"] == 8 and best["epoch"] == last["best_epoch"]
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, best["model"][name], rtol=0, atol=0)


def test_resume_continues_the_epoch_count(data, tmp_path) -> None:
    out = tmp_path / "run"
    train_model(data["features"], data["manifest"], out, TrainConfig(model="resnet_v2", epochs=2, **FAST), device="cpu")
    assert [row["epoch"] for row in history_rows(out)] == [1, 2]
    first_two = history_rows(out)
    seen = []
    metrics = train_model(data["features"], data["manifest"], out, TrainConfig(model="resnet_v2", epochs=4, **FAST),
                          device="cpu", progress=lambda epoch, total: seen.append((epoch, total)))
    rows = history_rows(out)
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4] and seen == [(3, 4), (4, 4)]
    assert rows[:2] == first_two
    assert metrics["epochs_run"] == 4
    assert load_checkpoint(out / "checkpoints" / "last.pt", required=("epoch",))["epoch"] == 4


_KILLED_RUN = """
import sys
from pipeline.train import TrainConfig, train_model
cfg = TrainConfig(model="cifar10", epochs=8, crop_s=1.0, batch_size=8)
def report(epoch, total):
    print("epoch", epoch, flush=True)
train_model(sys.argv[1], sys.argv[2], sys.argv[3], cfg, device="cpu", progress=report)
"""


def test_sigkill_mid_training_then_rerun_resumes_and_finishes(data, trained, tmp_path, caplog) -> None:
    out = tmp_path / "killed"
    features, manifest = data["features"], data["manifest"]
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(features), str(manifest), str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        for line in proc.stdout:
            if line.strip() == "epoch 3":
                break
        os.kill(proc.pid, signal.SIGKILL)  # in epoch 4, or just after it
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "metrics.json").exists()
    killed_at = load_checkpoint(out / "checkpoints" / "last.pt", required=("epoch",))["epoch"]
    assert 3 <= killed_at < 8

    caplog.set_level("INFO", logger="pipeline.train")
    metrics = train_model(features, manifest, out, TrainConfig(model="cifar10", epochs=8, **FAST), device="cpu")
    assert f"at epoch {killed_at}" in caplog.text
    rows = history_rows(out)
    assert [row["epoch"] for row in rows] == list(range(1, 9))
    # every artifact loads, and no temporary of the killed writer is left
    from pipeline.classifier import GenreClassifier

    assert GenreClassifier.load(out).labels == metrics["labels"]
    load_checkpoint(out / "checkpoints" / "best.pt", required=("model",))
    json.loads((out / "config.json").read_text())
    assert not list(out.rglob("*.tmp"))
    # epochs are seeded one by one, so the resumed run is the uninterrupted one, to rounding
    reference = history_rows(trained[0])
    for name in ("train_loss", "valid_loss", "valid_acc", "lr"):
        np.testing.assert_allclose([r[name] for r in rows], [r[name] for r in reference], rtol=1e-4, atol=1e-5)
    assert metrics["test_accuracy"] == trained[1]["test_accuracy"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "pickle"])
def test_corrupt_checkpoint_is_a_one_line_error(trained, data, tmp_path, damage) -> None:
    out = Path(shutil.copytree(trained[0], tmp_path / "run"))
    last = out / "checkpoints" / "last.pt"
    if damage == "truncate":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif damage == "garbage":
        last.write_bytes(os.urandom(4096))
    else:  # a pickled object that is not weights: refused by weights_only, never executed
        torch.save({"epoch": 1, "model": np.random.default_rng(0)}, last)
    with pytest.raises(MelsearchError) as err:
        train_model(data["features"], data["manifest"], out, trained[2], device="cpu")
    message = str(err.value)
    assert message.startswith(f"{last}: ") and "\n" not in message
    assert err.value.__cause__ is None  # nothing chained that a handler could print as a traceback


@pytest.mark.parametrize(("change", "differs"), [({"model": "resnet_v2"}, "train"), ({"lr": 0.01}, "train")])
def test_checkpoint_of_another_run_is_refused(trained, data, tmp_path, change, differs) -> None:
    out = Path(shutil.copytree(trained[0], tmp_path / "run"))
    cfg = TrainConfig(**{**trained[2].to_dict(), **change})
    with pytest.raises(MelsearchError, match=f"last.pt: checkpoint of another run \\(differs in {differs}\\)"):
        train_model(data["features"], data["manifest"], out, cfg, device="cpu")


def test_checkpoint_with_missing_keys_is_refused(trained, data, tmp_path) -> None:
    out = Path(shutil.copytree(trained[0], tmp_path / "run"))
    torch.save({"epoch": 3}, out / "checkpoints" / "last.pt")
    with pytest.raises(MelsearchError, match="not a melsearch checkpoint"):
        train_model(data["features"], data["manifest"], out, trained[2], device="cpu")


def test_without_valid_split_the_last_epoch_is_kept(data, tmp_path) -> None:
    rows = [{"track_id": p.stem, "path": str(p), "label": p.parent.name, "split": "test" if p.stem.endswith("9")
             else "train", "duration_s": 3.0, "sample_rate": MEL.sr, "channels": 1, "status": "ok", "reason": ""}
            for p in sorted(data["audio"].rglob("*.wav"))]
    write_manifest(rows, tmp_path / "manifest.parquet")
    metrics = train_model(data["features"], tmp_path / "manifest.parquet", tmp_path / "run",
                          TrainConfig(model="cifar10", epochs=2, patience=1, **FAST), device="cpu")
    assert metrics["best_epoch"] == 2 and metrics["tracks"] == {"train": 36, "valid": 0, "test": 4}
    assert metrics["valid_accuracy"] is None
    assert all(math.isnan(row["valid_loss"]) for row in history_rows(tmp_path / "run"))


def test_no_train_rows_is_an_error(data, tmp_path) -> None:
    rows = [{"track_id": "buzz.00009", "path": "x.wav", "label": "buzz", "split": "test", "duration_s": 3.0,
             "sample_rate": MEL.sr, "channels": 1, "status": "ok", "reason": ""}]
    write_manifest(rows, tmp_path / "manifest.parquet")
    with pytest.raises(MelsearchError, match="no labelled train tracks"):
        train_model(data["features"], tmp_path / "manifest.parquet", tmp_path / "run",
                    TrainConfig(model="cifar10", epochs=1), device="cpu")


def test_train_config() -> None:
    cfg = TrainConfig(model="cifar10")
    assert cfg.to_dict() == {"model": "cifar10", "epochs": 30, "batch_size": 32, "lr": 1e-3, "weight_decay": 1e-4,
                             "crop_s": 3.0, "patience": 8, "seed": 0, "checkpoint_interval": 1, "augment": True,
                             "mixup": 0.2, "finetune": False, "model_kwargs": {}}
    assert TrainConfig(**cfg.to_dict()) == cfg and TrainConfig(**cfg.to_dict()).key() == cfg.key()
    assert TrainConfig(model="cifar10", lr=2e-3).key() != cfg.key()
    for bad in ({"model": "vgg"}, {"model": "cifar10", "epochs": 0}, {"model": "cifar10", "crop_s": 0},
                {"model": "cifar10", "lr": -1.0}, {"model": "cifar10", "checkpoint_interval": 0},
                {"model": "cifar10", "mixup": -0.1}):
        with pytest.raises(MelsearchError):
            TrainConfig(**bad)


def test_crop_plan_covers_each_track_without_overlap() -> None:
    tracks, starts = _crop_plan(np.array([10, 3, 25]), 5, 30)
    assert tracks.tolist() == [0, 0, 1, 2, 2, 2, 2, 2]
    assert starts.tolist() == [0, 5, 0, 0, 5, 10, 15, 20]
    assert crop_frames(MelConfig(), 3.0) == 129 and crop_frames(MEL, 100.0) == MEL.n_frames


def test_classification_metrics_against_hand_computed_values() -> None:
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 2, 2])
    m = classification_metrics(y_true, y_pred, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": pytest.approx(2 / 3), "f1": pytest.approx(0.8),
                                   "support": 3}
    assert m["per_class"]["b"]["precision"] == 0.5 and m["per_class"]["c"]["precision"] == 0.5
    # f1: a 0.8, b 0.5, c 2/3 (sklearn.metrics.f1_score(average="macro") gives the same)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_model_comparison_plot(trained, tmp_path) -> None:
    other = Path(shutil.copytree(trained[0], tmp_path / "resnet_v2-abc"))
    with open(other / "history.csv") as handle:
        assert next(csv.reader(handle))[:3] == ["epoch", "train_loss", "train_acc"]
    out = tmp_path / "comparison.png"
    plot_model_comparison([trained[0], other], out)
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(MelsearchError, match="no training history"):
        plot_model_comparison([tmp_path / "nothing-here"], tmp_path / "x.png")


# --- small data: augmentation, model selection, a head on the frozen pretrained musicnn -------------------------


def test_augmented_batches_keep_shapes_and_mix_labels(data) -> None:
    from pipeline.training_data import TrainingData

    d = TrainingData.load(data["features"], data["manifest"], crop_s=1.0, batch_size=8, standardised=True,
                          dev=torch.device("cpu"))
    rng = np.random.default_rng(0)
    tracks, starts = d.draw_epoch(rng)
    plain, y = d.batch(tracks[:8], starts[:8], torch.device("cpu"), rng, augment=False, mixup=0.0)
    rng = np.random.default_rng(0)
    d.draw_epoch(rng)
    augmented, soft = d.batch(tracks[:8], starts[:8], torch.device("cpu"), rng, augment=True, mixup=0.4)
    assert plain.shape == augmented.shape == (8, 1, MEL.n_mels, d.crop) and y.dtype == torch.int64
    assert soft.shape == (8, 4) and torch.allclose(soft.sum(dim=1), torch.ones(8))
    assert not torch.allclose(plain, augmented)


def test_a_tiny_validation_split_keeps_the_last_epoch(tmp_path, data, caplog) -> None:
    """2 validation tracks for 4 labels: their loss says nothing, so training runs on and keeps the last epoch."""
    from pipeline.manifest import read_manifest

    rows = read_manifest(data["manifest"])
    valid = [row for row in rows if row["split"] == "valid"]
    for row in valid[2:]:
        row["split"] = "train"
    write_manifest(rows, tmp_path / "manifest.parquet")
    caplog.set_level("INFO", logger="pipeline.train")
    metrics = train_model(data["features"], tmp_path / "manifest.parquet", tmp_path / "m",
                          TrainConfig(model="cifar10", epochs=3, patience=1, **FAST), device="cpu")
    assert metrics["best_epoch"] == metrics["epochs_run"] == 3 and metrics["tracks"]["valid"] == 2
    assert "keeping the last epoch" in caplog.text


def test_musicnn_head_trains_on_cached_backbone_outputs(tmp_path) -> None:
    from models.musicnn import load_pretrained_musicnn
    from pipeline.classifier import GenreClassifier
    from pipeline.feature_shards import write_feature_shard
    from pipeline.synth import write_synthetic_dataset

    cfg = MelConfig.preset("musicnn", duration_s=3.0, dtype="float32")
    paths = write_synthetic_dataset(tmp_path / "audio", n_per_class=8, seconds=3.0, sr=16000, n_classes=3, seed=2)
    rows = [{"track_id": p.stem, "path": str(p), "label": p.parent.name,
             "split": "train" if int(p.stem.split(".")[1]) < 6 else "test", "duration_s": 3.0, "sample_rate": 16000,
             "channels": 1, "status": "ok", "reason": ""} for p in sorted(paths)]
    write_manifest(rows, tmp_path / "manifest.parquet")
    write_feature_shard([(r["track_id"], r["path"]) for r in rows], tmp_path / "f.h5", cfg, workers=1)
    metrics = train_model(tmp_path / "f.h5", tmp_path / "manifest.parquet", tmp_path / "musicnn",
                          TrainConfig(model="musicnn", epochs=15, batch_size=8, lr=1e-2), device="cpu")
    assert metrics["test_accuracy"] >= 2 / 3  # chance is 1/3
    config = json.loads((tmp_path / "musicnn" / "config.json").read_text())
    assert config["norm_mean"] == [0.0] * 96 and config["norm_std"] == [1.0] * 96  # musicnn reads raw log-mels
    trained = torch.load(tmp_path / "musicnn" / "model.pt", weights_only=True)
    for name, tensor in load_pretrained_musicnn().state_dict().items():
        torch.testing.assert_close(trained[f"backbone.{name}"], tensor, rtol=0, atol=0)  # frozen: untouched
    classifier = GenreClassifier.load(tmp_path / "musicnn")
    assert classifier.predict(rows[-1]["path"])["label"] in classifier.labels and classifier.embedding_dim == 200
