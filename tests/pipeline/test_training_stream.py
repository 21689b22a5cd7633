"""Tests for streamed training (pipeline.training_data): features read from the HDF5 batch by batch train and
evaluate exactly as features in memory (same batches, weights, history and figures, bit for bit), the reader
thread stays a bounded number of batches ahead, and its failures reach the training loop as one clear error.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from trained_models import FAST, MEL, make_synthetic_run

from models import build_model
from pipeline.errors import MelsearchError
from pipeline.feature_shards import write_feature_shard
from pipeline.feature_store import FeatureStore
from pipeline.inference import TensorCrops
from pipeline.manifest import read_manifest
from pipeline.mel import MelConfig
from pipeline.train import TrainConfig, train_model
from pipeline.training_data import StoreCrops, TrainingData, feature_memory_limit, prefetch

CPU = torch.device("cpu")
# A narrow cifar10 with its default dropout, augmentation and mixup on: every random draw of training is used.
SMALL = TrainConfig(model="cifar10", epochs=2, augment=True, mixup=0.4,
                    model_kwargs={"channels": (8, 8, 16, 16, 16), "dense": 16}, **FAST)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """The synthetic run of the train tests, plus its features stored as float16 (as the features stage does)."""
    root = tmp_path_factory.getbasetemp() / "synthetic-cifar10"
    found = make_synthetic_run(root / "data")
    half = root / "features16.h5"
    if not half.is_file():
        rows = read_manifest(found["manifest"])
        write_feature_shard([(row["track_id"], row["path"]) for row in rows], half,
                            dataclasses.replace(MEL, dtype="float16"), workers=1)
    return {**found, "features16": half}


def load(run: dict[str, Path], memory_gb: float, *, standardised: bool = True) -> TrainingData:
    return TrainingData.load(run["features16"], run["manifest"], crop_s=FAST["crop_s"], batch_size=8,
                             standardised=standardised, dev=CPU, memory_gb=memory_gb)


def epoch_plan(data: TrainingData, seed: int) -> tuple[np.random.Generator, list[tuple[np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    tracks, starts = data.draw_epoch(rng)
    return rng, [(tracks[b : b + 8], starts[b : b + 8]) for b in range(0, len(tracks), 8)]


def prefetch_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("prefetch ")]


def test_memory_setting_chooses_where_the_features_are(run) -> None:
    with load(run, 100) as memory, load(run, 0) as streamed, load(run, "auto") as auto:
        assert isinstance(memory.crops, TensorCrops) and isinstance(auto.crops, TensorCrops)  # 0.1 MB fits
        assert isinstance(streamed.crops, StoreCrops)
    assert feature_memory_limit("0") == 0 and feature_memory_limit(1.5) == 1.5e9
    assert 0 < feature_memory_limit("auto")
    for bad in ("lots", -1, "nan", None):
        with pytest.raises(MelsearchError, match="memory_gb must be 'auto' or a number of GB >= 0"):
            feature_memory_limit(bad)
    assert "feature_memory_gb" not in {field.name for field in dataclasses.fields(TrainConfig)}  # shapes no output


@pytest.mark.parametrize("standardised", [True, False])
def test_streamed_batches_and_figures_are_the_in_memory_ones_bit_for_bit(run, standardised) -> None:
    model = build_model("cifar10", n_classes=4, n_mels=MEL.n_mels, **SMALL.model_kwargs).eval()
    with load(run, 100, standardised=standardised) as memory, load(run, 0, standardised=standardised) as streamed:
        assert np.array_equal(memory.mean, streamed.mean) and np.array_equal(memory.std, streamed.std)
        for seed in (1, 2):  # two epochs' plans, augmentation and mixup drawn from the same generators
            rng_memory, plan = epoch_plan(memory, seed)
            rng_streamed, plan_streamed = epoch_plan(streamed, seed)
            assert all(np.array_equal(a[1], b[1]) for a, b in zip(plan, plan_streamed, strict=True))
            pairs = zip(memory.batches(plan, CPU, rng_memory, augment=True, mixup=0.4),
                        streamed.batches(plan, CPU, rng_streamed, augment=True, mixup=0.4), strict=True)
            for (x_memory, y_memory), (x_streamed, y_streamed) in pairs:
                assert torch.equal(x_memory, x_streamed) and torch.equal(y_memory, y_streamed)
                assert x_memory.stride() == x_streamed.stride()
        for name in ("valid", "test"):
            loss, accuracy, predicted = memory.evaluate(model, name, CPU)
            figures = streamed.evaluate(model, name, CPU)
            assert figures[:2] == (loss, accuracy) and np.array_equal(figures[2], predicted)
        train = memory.subsets["train"]
        assert torch.equal(memory.track_means(model, train, CPU, embed=True),
                           streamed.track_means(model, train, CPU, embed=True))


def test_streaming_standardises_after_cropping_with_the_same_bits(run) -> None:
    with FeatureStore.open(run["features16"]) as store:
        every = store.read(np.arange(len(store)))  # (N, n_mels, n_frames) float32
        starts = np.arange(len(store)) % (MEL.n_frames - 43)
        crops = store.read_crops(np.arange(len(store)), starts, 43)
        with h5py.File(run["features16"]) as h5:  # HDF5's own float16 -> float32 conversion agrees with numpy's
            converted = np.empty(every.shape, np.float32)
            h5["mel"].read_direct(converted)
    assert every.dtype == crops.dtype == np.float32 and np.array_equal(every, converted)
    assert np.array_equal(crops, np.stack([mel[:, s : s + 43] for mel, s in zip(every, starts, strict=True)]))
    mean, std = every.mean(axis=(0, 2)).astype(np.float32), every.std(axis=(0, 2)).astype(np.float32)
    whole = ((every - mean[:, None]) / std[:, None]).astype(np.float32)
    cropped = ((crops - mean[:, None]) / std[:, None]).astype(np.float32)
    assert np.array_equal(cropped, np.stack([mel[:, s : s + 43] for mel, s in zip(whole, starts, strict=True)]))


def test_read_crops_refuses_windows_outside_the_clip(run) -> None:
    with FeatureStore.open(run["features16"]) as store:
        with pytest.raises(MelsearchError, match="one start per position, in 0..87 for crops of 43 frames"):
            store.read_crops([0, 1], [0, MEL.n_frames - 42], 43)
        with pytest.raises(MelsearchError, match="positions out of range"):
            store.read_crops([len(store)], [0], 43)


def test_streamed_training_gives_the_same_weights_and_files(run, tmp_path, caplog) -> None:
    caplog.set_level("INFO", logger="pipeline.training_data")
    folders = {}
    for memory_gb in (100, 0):
        folders[memory_gb] = tmp_path / f"memory-{memory_gb}"
        train_model(run["features16"], run["manifest"], folders[memory_gb], SMALL, device="cpu",
                    feature_memory_gb=memory_gb)
    assert "in memory" in caplog.text and "streamed from" in caplog.text
    _assert_same_run(folders[100], folders[0])


def _assert_same_run(a: Path, b: Path) -> None:
    weights_a, weights_b = (torch.load(folder / "model.pt", weights_only=True) for folder in (a, b))
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[name], weights_b[name]) for name in weights_a)
    for name in ("metrics.json", "config.json"):
        assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name
    history_a, history_b = ([line.rsplit(",", 1)[0] for line in (folder / "history.csv").read_text().splitlines()]
                            for folder in (a, b))  # the last column, seconds, differs
    assert history_a == history_b and len(history_a) == 3


def test_streamed_frozen_backbone_cache_and_head_are_the_in_memory_ones(run, tmp_path) -> None:
    cfg = MelConfig.preset("musicnn", duration_s=3.0)  # float16, as stored by default
    rows = read_manifest(run["manifest"])
    write_feature_shard([(row["track_id"], row["path"]) for row in rows], tmp_path / "f.h5", cfg, workers=1)
    train = TrainConfig(model="musicnn", epochs=2, batch_size=8, lr=1e-2)
    for memory_gb in (100, 0):
        train_model(tmp_path / "f.h5", run["manifest"], tmp_path / f"m{memory_gb}", train, device="cpu",
                    feature_memory_gb=memory_gb)
    _assert_same_run(tmp_path / "m100", tmp_path / "m0")


def test_the_reader_stays_a_bounded_number_of_batches_ahead(run, monkeypatch) -> None:
    with load(run, 0) as data:
        data.crops.depth = 2
        reads = []
        real = data.crops.store.read_crops
        monkeypatch.setattr(data.crops.store, "read_crops", lambda *a: reads.append(1) or real(*a))
        _, plan = epoch_plan(data, 0)
        ahead = []
        for taken, _ in enumerate(data.crops.batches(plan, data.crop, CPU), start=1):
            expected = min(len(plan), taken + 2 + 1)  # 2 queued, one more read and waiting to be queued
            deadline = time.monotonic() + 10
            while len(reads) < expected and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(0.02)  # room to overshoot, if it could
            ahead.append(len(reads) - taken)
        assert len(plan) > 5 and len(reads) == len(plan)
        assert max(ahead) == 3 and ahead[0] == 3
    assert not prefetch_threads()


def test_a_failing_reader_raises_in_the_training_loop_and_stops(run, monkeypatch) -> None:
    with load(run, 0) as data:
        calls = []
        real = data.crops.store.read_crops

        def flaky(*args):
            calls.append(1)
            if len(calls) == 3:
                raise OSError("disk gone")
            return real(*args)

        monkeypatch.setattr(data.crops.store, "read_crops", flaky)
        rng, plan = epoch_plan(data, 0)
        taken = []
        failed = r"features16.h5: reading log-mels failed \(OSError: disk gone\)"
        with pytest.raises(MelsearchError, match=failed) as err:
            for batch in data.batches(plan, CPU, rng, augment=True, mixup=0.4):
                taken.append(batch)
        assert len(taken) == 2 and isinstance(err.value.__cause__, OSError)
    assert not prefetch_threads()


def test_train_model_surfaces_a_reader_failure(run, tmp_path, monkeypatch) -> None:
    calls = []
    real = FeatureStore.read_crops

    def flaky(self, *args):
        calls.append(1)
        if len(calls) == 12:  # in the second epoch (one read for the statistics, ten per epoch)
            raise RuntimeError("HDF5 read error")
        return real(self, *args)

    monkeypatch.setattr(FeatureStore, "read_crops", flaky)
    with pytest.raises(MelsearchError, match=r"reading log-mels failed \(RuntimeError: HDF5 read error\)"):
        train_model(run["features16"], run["manifest"], tmp_path / "m", SMALL, device="cpu", feature_memory_gb=0)
    assert not prefetch_threads()


def test_prefetch_keeps_order_passes_project_errors_and_stops_when_closed() -> None:
    assert list(prefetch(lambda i: i * i, range(10), depth=3, source="squares")) == [i * i for i in range(10)]

    def bad(i: int) -> int:
        if i == 2:
            raise MelsearchError("track.h5: no such track")
        return i

    with pytest.raises(MelsearchError, match=r"^track.h5: no such track$"):
        list(prefetch(bad, range(5), depth=1, source="x"))
    started = []
    batches = prefetch(lambda i: started.append(i) or i, range(1000), depth=2, source="many")
    assert next(batches) == 0
    batches.close()  # the training loop stopped early: the thread is joined
    assert not prefetch_threads() and len(started) <= 4
