"""Tests for pipeline.features: the log-mel against librosa, the HDF5 shard writer, merge and store."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import shutil
from pathlib import Path

import h5py
import librosa
import numpy as np
import pytest
import soundfile as sf

from pipeline import features
from pipeline.errors import MelsearchError
from pipeline.features import (
    FeatureStore,
    MelConfig,
    extract_log_mel,
    log_mel_for_file,
    merge_feature_shards,
    shard_tracks,
    write_feature_shard,
)
from pipeline.synth import write_synthetic_dataset

SR = 22050
TOLERANCE_DB = 1e-3
SHORT = MelConfig(duration_s=3.0, dtype="float32")  # keeps the tests fast


def librosa_log_mel(samples: np.ndarray, cfg: MelConfig) -> np.ndarray:
    """The reference: librosa's melspectrogram (power 2, centred) then power_to_db with its defaults."""
    mel = librosa.feature.melspectrogram(
        y=samples,
        sr=cfg.sr,
        n_fft=cfg.n_fft,
        hop_length=cfg.hop_length,
        n_mels=cfg.n_mels,
        fmin=cfg.fmin,
        fmax=cfg.fmax,
    )
    return librosa.power_to_db(mel)


def librosa_log_mel_for_file(path: Path, cfg: MelConfig) -> np.ndarray:
    samples, _ = librosa.load(path, sr=cfg.sr, duration=cfg.duration_s)
    return librosa_log_mel(librosa.util.fix_length(samples, size=cfg.n_samples), cfg)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str]]:
    """Six labelled synthetic clips of 3 s, then a 1 s tone (shorter than SHORT.duration_s), as (track_id, path)."""
    root = tmp_path_factory.mktemp("audio")
    paths = write_synthetic_dataset(root, n_per_class=2, seconds=3.0, sr=SR, n_classes=3, seed=0)
    sf.write(root / "short.wav", sine(440.0, 1.0), SR)
    return [(path.stem, str(path)) for path in paths] + [("short", str(root / "short.wav"))]


def sine(freq: float, seconds: float, sr: int = SR) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


# --- the log-mel --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [MelConfig(), MelConfig.preset("choi")], ids=["default", "choi"])
@pytest.mark.parametrize("band", [5, 30, 60, 90])
def test_sine_lands_in_its_mel_band(cfg: MelConfig, band: int) -> None:
    centres = librosa.mel_frequencies(cfg.n_mels + 2, fmin=cfg.fmin, fmax=cfg.sr / 2)[1:-1]
    mel = extract_log_mel(sine(centres[band], 1.0, cfg.sr), cfg)
    energy = mel[:, 4:-4].mean(axis=1)  # frames away from the zero-padded edges
    assert energy.argmax() == band
    assert energy[band] - np.delete(energy, range(band - 3, band + 4)).max() > 40  # far bands are 40 dB down


@pytest.mark.parametrize("n_samples", [1, 511, 512, 513, 22050])
@pytest.mark.parametrize("hop_length", [256, 512])
def test_frame_count_is_one_plus_samples_over_hop(rng: np.random.Generator, n_samples: int, hop_length: int) -> None:
    cfg = MelConfig(hop_length=hop_length, n_mels=40)
    mel = extract_log_mel(rng.standard_normal(n_samples).astype(np.float32), cfg)
    assert mel.shape == (40, 1 + n_samples // hop_length)
    assert mel.dtype == np.float32


@pytest.mark.parametrize(
    "cfg",
    [
        MelConfig(),
        MelConfig.preset("choi"),
        MelConfig(n_mels=64, fmin=30.0, fmax=8000.0),
        MelConfig(n_fft=1024, hop_length=256),
    ],
    ids=["default", "choi", "band-limited", "small-fft"],
)
@pytest.mark.parametrize("signal", ["noise", "tone-then-silence", "low-sine", "synthetic-clip"])
def test_matches_librosa_on_synthetic_audio(
    rng: np.random.Generator, clips: list[tuple[str, str]], cfg: MelConfig, signal: str
) -> None:
    samples = {
        "noise": lambda: 0.1 * rng.standard_normal(2 * cfg.sr),
        "tone-then-silence": lambda: np.concatenate([sine(440.0, 1.0, cfg.sr), np.zeros(cfg.sr)]),
        "low-sine": lambda: sine(100.0, 2.0, cfg.sr),  # energy far below the peak: where float32 FFTs drift
        "synthetic-clip": lambda: librosa.load(clips[2][1], sr=cfg.sr)[0],
    }[signal]().astype(np.float32)
    ours = extract_log_mel(samples, cfg)
    reference = librosa_log_mel(samples, cfg)
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, rtol=0, atol=TOLERANCE_DB)
    assert ours.max() - ours.min() > 10  # a real spectrogram, not a flat floor


def test_log_mel_for_file_pads_short_clips_and_counts_true_frames(clips: list[tuple[str, str]]) -> None:
    _, short = clips[-1]  # 1 s of audio in a 3 s window
    mel, n_true = log_mel_for_file(short, SHORT)
    assert mel.shape == (SHORT.n_mels, SHORT.n_frames)
    assert n_true == 1 + SR // SHORT.hop_length
    np.testing.assert_allclose(mel, librosa_log_mel_for_file(Path(short), SHORT), rtol=0, atol=TOLERANCE_DB)
    assert np.all(mel[:, n_true + 4 :] == mel.max() - 80)  # padding is silence: the -80 dB floor


def test_log_mel_for_file_crops_and_resamples(clips: list[tuple[str, str]]) -> None:
    cfg = MelConfig(sr=16000, duration_s=2.0)
    mel, n_true = log_mel_for_file(clips[0][1], cfg)
    assert mel.shape == (cfg.n_mels, 1 + 32000 // cfg.hop_length)
    assert n_true == cfg.n_frames
    np.testing.assert_allclose(mel, librosa_log_mel_for_file(Path(clips[0][1]), cfg), rtol=0, atol=TOLERANCE_DB)


@pytest.mark.parametrize("samples", [np.zeros((2, 100), np.float32), np.zeros(0, np.float32)], ids=["2-D", "empty"])
def test_extract_rejects_bad_shapes(samples: np.ndarray) -> None:
    with pytest.raises(MelsearchError, match="1-D"):
        extract_log_mel(samples, MelConfig())


def test_non_finite_samples_are_an_error(tmp_path: Path) -> None:
    samples = sine(440.0, 1.0)
    samples[100] = np.nan
    path = tmp_path / "nan.wav"
    sf.write(path, samples, SR, subtype="FLOAT")
    with pytest.raises(MelsearchError, match=rf"{path}: samples contain NaN"):
        log_mel_for_file(path, SHORT)


@pytest.mark.skipif(not os.environ.get("MELSEARCH_REAL_AUDIO"), reason="set MELSEARCH_REAL_AUDIO to a GTZAN folder")
@pytest.mark.parametrize("preset", ["default", "choi"])
def test_real_clips_match_librosa_through_the_store(tmp_path: Path, preset: str) -> None:
    root = Path(os.environ["MELSEARCH_REAL_AUDIO"])
    paths = sorted(root.glob("*/*.wav"))
    assert paths, f"no clips under {root}"
    cfg = MelConfig.preset(preset, dtype="float32")
    report = write_feature_shard([(path.stem, str(path)) for path in paths], tmp_path / "real.h5", cfg, workers=2)
    assert report == {"written": len(paths), "failed": []}
    with FeatureStore.open(tmp_path / "real.h5", expect=cfg) as store:
        assert store.track_ids == [path.stem for path in paths]
        for position, path in enumerate(paths):
            np.testing.assert_allclose(
                store.read([position])[0],
                librosa_log_mel_for_file(path, cfg),
                rtol=0,
                atol=TOLERANCE_DB,
                err_msg=str(path),
            )


# --- MelConfig ----------------------------------------------------------------------------------------------


def test_config_key_follows_every_parameter() -> None:
    base = MelConfig()
    assert base.key() == MelConfig(duration_s=30, fmin=0).key()  # ints and floats give one key
    assert base.key() != MelConfig(n_mels=96).key()
    assert base.key() != MelConfig(dtype="float32").key()
    assert MelConfig.from_dict(json.loads(json.dumps(base.to_dict()))) == base


def test_choi_preset() -> None:
    choi = MelConfig.preset("choi")
    assert (choi.sr, choi.n_fft, choi.hop_length, choi.n_mels, choi.duration_s) == (12000, 512, 256, 96, 29.12)
    assert (choi.n_samples, choi.n_frames) == (349440, 1366)  # Choi et al.'s 96 x 1366 input
    assert MelConfig.preset("default").n_frames == 1292
    assert MelConfig.preset("choi", dtype="float32").dtype == "float32"
    with pytest.raises(MelsearchError, match="unknown mel preset 'nope'"):
        MelConfig.preset("nope")


@pytest.mark.parametrize(
    "bad",
    [
        {"n_mels": 0},
        {"hop_length": 1.5},
        {"duration_s": 0},
        {"fmin": 9000.0, "fmax": 8000.0},
        {"fmax": 20000.0},
        {"dtype": "int8"},
        {"colour": "red"},
    ],
)
def test_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(MelsearchError):
        MelConfig.from_dict(bad)


# --- shards, merge and the store ----------------------------------------------------------------------------


def test_shard_tracks_keeps_ok_rows_sorted_and_cut() -> None:
    rows = [{"track_id": f"t{i:02d}", "path": f"/a/{i}.wav", "status": "ok"} for i in range(7)]
    rows.append({"track_id": "t99", "path": "/a/bad.wav", "status": "rejected"})
    shards = shard_tracks(rows[::-1], 3)
    assert shards == shard_tracks(rows, 3)
    assert [len(shard) for shard in shards] == [3, 3, 1]
    assert [track_id for shard in shards for track_id, _ in shard] == [f"t{i:02d}" for i in range(7)]
    assert shards[0][0] == ("t00", "/a/0.wav")
    with pytest.raises(MelsearchError, match="shard_size"):
        shard_tracks(rows, 0)


def test_write_merge_and_read_roundtrip_float32(tmp_path: Path, clips: list[tuple[str, str]]) -> None:
    calls = []
    first = write_feature_shard(
        clips[:4], tmp_path / "feat" / "s0.h5", SHORT, workers=1, progress=lambda *a: calls.append(a)
    )
    second = write_feature_shard(clips[4:], tmp_path / "feat" / "s1.h5", SHORT, workers=1)
    assert (first, second) == ({"written": 4, "failed": []}, {"written": len(clips) - 4, "failed": []})
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    with h5py.File(tmp_path / "feat" / "s0.h5") as h5:
        assert h5["mel"].chunks == (1, SHORT.n_mels, SHORT.n_frames)
        assert h5["mel"].dtype == np.float32 and h5["n_frames"].dtype == np.int32
        assert json.loads(h5.attrs["mel_config"]) == SHORT.to_dict()
        assert {"librosa", "numpy", "soundfile", "soxr", "h5py", "melsearch"} <= set(json.loads(h5.attrs["versions"]))

    assert merge_feature_shards(
        [tmp_path / "feat" / "s0.h5", tmp_path / "feat" / "s1.h5"], tmp_path / "feat" / "all.h5"
    ) == {"tracks": len(clips)}
    shutil.move(tmp_path / "feat", tmp_path / "moved")  # relative links: the folder can move
    with FeatureStore.open(tmp_path / "moved" / "all.h5", expect=SHORT) as store:
        assert store.config == SHORT
        assert store.track_ids == [track_id for track_id, _ in clips]
        assert store.n_frames.tolist() == [SHORT.n_frames] * (len(clips) - 1) + [1 + SR // SHORT.hop_length]
        positions = store.index_of([clips[5][0], clips[0][0]])
        assert positions.tolist() == [5, 0]
        batch = store.read(positions)
        assert batch.shape == (2, SHORT.n_mels, SHORT.n_frames) and batch.dtype == np.float32
        np.testing.assert_array_equal(batch[0], log_mel_for_file(clips[5][1], SHORT)[0])
        np.testing.assert_array_equal(batch[1], log_mel_for_file(clips[0][1], SHORT)[0])
        # An unpickled copy (a DataLoader worker) reopens the file itself.
        np.testing.assert_array_equal(pickle.loads(pickle.dumps(store)).read([5])[0], batch[0])


def test_float16_storage_is_close(tmp_path: Path, clips: list[tuple[str, str]]) -> None:
    cfg = MelConfig(duration_s=3.0, dtype="float16")
    write_feature_shard(clips[:2], tmp_path / "half.h5", cfg, workers=1)
    with FeatureStore.open(tmp_path / "half.h5") as store:
        stored = store.read([0, 1])
    exact = np.stack([log_mel_for_file(path, cfg)[0] for _, path in clips[:2]])
    np.testing.assert_array_equal(stored, exact.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(stored, exact, rtol=0, atol=0.05)  # float16 keeps 11 bits: 0.03 dB at 60 dB


def test_undecodable_track_is_reported_and_shard_still_written(tmp_path: Path, clips: list[tuple[str, str]]) -> None:
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(range(256)))
    tracks = [clips[0], ("corrupt", str(corrupt)), clips[1], ("gone", str(tmp_path / "missing.wav"))]
    report = write_feature_shard(tracks, tmp_path / "shard.h5", SHORT, workers=2)
    assert report["written"] == 2
    assert [(f["track_id"], f["path"]) for f in report["failed"]] == [("corrupt", str(corrupt)), ("gone", tracks[3][1])]
    assert all(f["reason"].startswith(f["path"]) for f in report["failed"])
    with h5py.File(tmp_path / "shard.h5", "r") as h5:  # the shard itself records what it left out
        assert json.loads(h5.attrs["failed"]) == report["failed"]
    with FeatureStore.open(tmp_path / "shard.h5") as store:
        assert store.track_ids == [clips[0][0], clips[1][0]]
        assert store.read([0, 1]).shape[0] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.wav", "shard.h5"]  # no temporary left behind


def test_process_pool_writes_the_same_bytes(tmp_path: Path, clips: list[tuple[str, str]]) -> None:
    cfg = MelConfig(duration_s=3.0)
    write_feature_shard(clips, tmp_path / "one.h5", cfg, workers=1)
    write_feature_shard(clips, tmp_path / "two.h5", cfg, workers=2)
    with h5py.File(tmp_path / "one.h5") as one, h5py.File(tmp_path / "two.h5") as two:
        assert one["mel"][...].tobytes() == two["mel"][...].tobytes()
        assert one["track_id"].asstr()[...].tolist() == two["track_id"].asstr()[...].tolist()
        assert one["n_frames"][...].tobytes() == two["n_frames"][...].tobytes()


def test_empty_shard_merges(tmp_path: Path, clips: list[tuple[str, str]]) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")
    assert write_feature_shard([("bad", str(bad))], tmp_path / "s0.h5", SHORT)["written"] == 0
    write_feature_shard(clips[:1], tmp_path / "s1.h5", SHORT, workers=1)
    assert merge_feature_shards([tmp_path / "s0.h5", tmp_path / "s1.h5"], tmp_path / "all.h5") == {"tracks": 1}
    with FeatureStore.open(tmp_path / "all.h5") as store:
        assert store.track_ids == [clips[0][0]]
        assert np.isfinite(store.read([0])).all()


def test_merge_refuses_mixed_configs_and_duplicates(tmp_path: Path, clips: list[tuple[str, str]]) -> None:
    write_feature_shard(clips[:1], tmp_path / "a.h5", SHORT, workers=1)
    write_feature_shard(clips[:1], tmp_path / "b.h5", MelConfig(duration_s=3.0, dtype="float32", n_mels=64), workers=1)
    with pytest.raises(MelsearchError, match="b.h5: mel_config"):
        merge_feature_shards([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "all.h5")
    with pytest.raises(MelsearchError, match="duplicate track ids"):
        merge_feature_shards([tmp_path / "a.h5", tmp_path / "a.h5"], tmp_path / "all.h5")
    with pytest.raises(MelsearchError, match="duplicate track ids"):
        write_feature_shard([clips[0], clips[0]], tmp_path / "c.h5", SHORT)
    assert not (tmp_path / "all.h5").exists()


def test_store_errors_name_the_file(tmp_path: Path, clips: list[tuple[str, str]]) -> None:
    with pytest.raises(MelsearchError, match="nowhere.h5: no features file"):
        FeatureStore.open(tmp_path / "nowhere.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(MelsearchError, match="text.h5: unreadable"):
        FeatureStore.open(tmp_path / "text.h5")
    write_feature_shard(clips[:2], tmp_path / "s.h5", SHORT, workers=1)
    merge_feature_shards([tmp_path / "s.h5"], tmp_path / "all.h5")
    with pytest.raises(MelsearchError, match="features made with"):
        FeatureStore.open(tmp_path / "all.h5", expect=MelConfig())
    with FeatureStore.open(tmp_path / "all.h5") as store:
        with pytest.raises(MelsearchError, match="no features for track.*nope"):
            store.index_of(["nope"])
        with pytest.raises(MelsearchError, match="out of range"):
            store.read([2])
    (tmp_path / "s.h5").unlink()  # a virtual dataset would read zeros: the store must refuse
    with pytest.raises(MelsearchError, match="all.h5: its shard s.h5 is missing"):
        FeatureStore.open(tmp_path / "all.h5")


_extract_track = features._extract_track


def _die_on_second_clip(path: str, cfg: MelConfig) -> tuple[np.ndarray, int] | str:
    if path.endswith(".00001.wav"):
        os._exit(1)  # what the OOM killer does to a worker
    return _extract_track(path, cfg)


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork", reason="the patch reaches forked workers only")
def test_a_dying_worker_fails_the_shard_naming_it(
    tmp_path: Path, clips: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(features, "_extract_track", _die_on_second_clip)  # the forked workers inherit the patch
    with pytest.raises(MelsearchError, match=r"shard\.h5: a feature worker process died"):
        write_feature_shard(clips, tmp_path / "shard.h5", SHORT, workers=2)
    assert list(tmp_path.iterdir()) == []
