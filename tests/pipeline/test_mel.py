"""Tests for pipeline.mel: the log-mel against librosa, a file's log-mel, MelConfig."""

from __future__ import annotations

import json
import os
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile as sf
from mel_reference import SHORT, SR, TOLERANCE_DB, librosa_log_mel, librosa_log_mel_for_file, sine

from pipeline.errors import MelsearchError
from pipeline.feature_shards import write_feature_shard
from pipeline.feature_store import FeatureStore
from pipeline.mel import (
    PRESETS,
    MelConfig,
    _power_to_db,
    extract_log_mel,
    log_mel_for_file,
    mel_plan,
    slaney_mel_filters,
)

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
        *(MelConfig.preset(name) for name in sorted(PRESETS)),
        MelConfig(n_mels=64, fmin=30.0, fmax=8000.0),
        MelConfig(n_fft=1024, hop_length=256),
    ],
    ids=[*sorted(PRESETS), "band-limited", "small-fft"],
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
    assert ours.max() - ours.min() > (10 if cfg.compression == "db" else 1)  # a real spectrogram, not a flat floor


@pytest.mark.parametrize(
    "cfg",
    [*(MelConfig.preset(name) for name in sorted(PRESETS)), MelConfig(n_mels=64, fmin=30.0, fmax=8000.0),
     MelConfig(sr=16000, n_fft=1024, hop_length=256, n_mels=40, fmin=500.0)],
    ids=[*sorted(PRESETS), "band-limited", "16k"],
)
def test_filterbank_window_and_db_are_librosas_bit_for_bit(rng: np.random.Generator, cfg: MelConfig) -> None:
    reference = librosa.filters.mel(
        sr=cfg.sr, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax, dtype=np.float32
    )
    np.testing.assert_array_equal(slaney_mel_filters(cfg), reference)
    window = librosa.filters.get_window("hann", cfg.n_fft, fftbins=True).astype(np.float32)
    np.testing.assert_array_equal(mel_plan(cfg).window, window)
    power = rng.random((cfg.n_mels, 50), dtype=np.float32) ** 12  # down to far below the 80 dB floor
    np.testing.assert_array_equal(_power_to_db(power), librosa.power_to_db(power))


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
@pytest.mark.parametrize("preset", sorted(PRESETS))  # every preset, those added later included
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
