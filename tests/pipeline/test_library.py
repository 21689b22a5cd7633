"""Whole songs (spread windows), the per-file caches of a library: probes, log-mels, and what a rerun decodes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf

import pipeline.dataset
import pipeline.feature_shards
import pipeline.manifest
from pipeline.audio import load_audio_spread, mono
from pipeline.dataset import build_manifest, file_identity
from pipeline.embeddings import read_embeddings
from pipeline.io import params_key
from pipeline.library import read_cached_mels, read_library_tracks, scan_feature_cache, write_library_features
from pipeline.mel import MelConfig, log_mel_for_file
from pipeline.synth import write_synthetic_dataset

SR = 8000


def _tone(path, seconds_and_hz, sr=SR):
    """A wav of consecutive sine sections: ``[(seconds, hz), ...]``."""
    parts = [0.5 * np.sin(2 * np.pi * hz * np.arange(int(seconds * sr)) / sr) for seconds, hz in seconds_and_hz]
    sf.write(path, np.concatenate(parts).astype(np.float32), sr, subtype="PCM_16")
    return path


def test_segments_one_keeps_the_old_key():
    cfg = MelConfig()
    assert cfg.key() == params_key({k: v for k, v in cfg.to_dict().items() if k != "segments"})
    assert MelConfig(segments=10).key() != cfg.key()
    with pytest.raises(Exception, match="segments"):
        MelConfig(segments=0)


def test_spread_windows_cover_the_whole_song(tmp_path):
    # 60 s: 500 Hz for the first 30 s, 3 kHz after; the first 4 s never hear the second half
    song = _tone(tmp_path / "song.wav", [(30, 500), (30, 3000)])
    first = MelConfig(sr=SR, n_fft=512, hop_length=256, n_mels=32, duration_s=4.0)
    spread = MelConfig(sr=SR, n_fft=512, hop_length=256, n_mels=32, duration_s=4.0, segments=4)
    mel_first, n_first = log_mel_for_file(song, first)
    mel_spread, n_spread = log_mel_for_file(song, spread)
    assert mel_first.shape == mel_spread.shape == (32, first.n_frames)
    assert n_first == n_spread == first.n_frames
    half = first.n_frames // 2
    low_band = int(np.median(mel_first.argmax(axis=0)))  # 500 Hz everywhere in the first 4 s
    assert set(mel_first[:, 5:-5].argmax(axis=0)) == {low_band}
    # windows 1-2 (0 s, 18.7 s) hear 500 Hz, windows 3-4 (37.3 s, 56 s) 3 kHz: a higher band
    assert set(mel_spread[:, 5 : half - 5].argmax(axis=0)) == {low_band}
    assert min(mel_spread[:, half + 5 : -5].argmax(axis=0)) > low_band + 10


def test_spread_windows_are_evenly_placed(tmp_path):
    # 4 sections of 10 s at distinct rates; 4 windows of 1 s land at 0, 13, 26 and 39 s
    song = _tone(tmp_path / "song.wav", [(10, 200), (10, 400), (10, 800), (10, 1600)])
    samples, duration = load_audio_spread(song, sr=SR, total_s=4.0, segments=4)
    assert duration == pytest.approx(40.0)
    assert samples.size == 4 * SR
    peaks = [np.argmax(np.abs(np.fft.rfft(samples[i * SR : (i + 1) * SR]))) for i in range(4)]
    assert peaks == [200, 400, 800, 1600]  # 1 Hz bins: one window in each section


@pytest.mark.parametrize("seconds", [2.0, 3.0])
def test_a_clip_shorter_than_the_input_is_read_whole(tmp_path, seconds):
    clip = _tone(tmp_path / "clip.wav", [(seconds, 440)])
    one = MelConfig(sr=SR, n_fft=512, hop_length=256, n_mels=32, duration_s=4.0)
    many = MelConfig(sr=SR, n_fft=512, hop_length=256, n_mels=32, duration_s=4.0, segments=4)
    (mel_one, n_one), (mel_many, n_many) = log_mel_for_file(clip, one), log_mel_for_file(clip, many)
    np.testing.assert_array_equal(mel_one, mel_many)
    assert n_one == n_many == 1 + int(seconds * SR) // 256


def test_a_long_file_is_read_window_by_window(tmp_path, monkeypatch):
    song = _tone(tmp_path / "long.wav", [(600, 300)])  # 10 minutes
    reads = []
    original = sf.SoundFile.read

    def read(self, frames=-1, **kwargs):
        reads.append(frames)
        return original(self, frames=frames, **kwargs)

    monkeypatch.setattr(sf.SoundFile, "read", read)
    samples, duration = load_audio_spread(song, sr=SR, total_s=30.0, segments=10)
    assert duration == pytest.approx(600.0)
    assert samples.size == 30 * SR
    assert reads == [3 * SR] * 10  # never more than one 3 s window at a time


@pytest.fixture
def library(tmp_path):
    """Six synthetic 3 s clips flattened into one folder through symlinks with spaces and non-ASCII names."""
    source = tmp_path / "source"
    write_synthetic_dataset(source, n_per_class=2, seconds=3.0, n_classes=3, seed=4, sr=SR)
    folder = tmp_path / "my music"
    folder.mkdir()
    for path in sorted(source.rglob("*.wav")):
        (folder / f"chanson née {path.name}").symlink_to(path)
    (folder / "broken.mp3").write_text("not audio\n" * 20)
    return folder


def _tracks(folder):
    return [(path.name, str(path)) for path in sorted(folder.iterdir())]


def test_library_features_decode_only_new_files(tmp_path, library, monkeypatch):
    cfg = MelConfig(sr=SR, n_fft=512, hop_length=256, n_mels=32, duration_s=2.0, segments=2)
    cache = tmp_path / "cache"
    first = write_library_features(_tracks(library), tmp_path / "a.parquet", cfg, cache, workers=1)
    assert (first["tracks"], first["extracted"], first["reused"], first["failed"]) == (6, 7, 0, 1)
    assert "broken.mp3" in first["failed_tracks"][0]["track_id"]

    for name in ("new one.wav", "neue ü.wav"):
        _tone(library / name, [(3.0, 700)])
    (library / sorted(library.glob("chanson*"))[0].name).unlink()
    decoded = []
    real = pipeline.feature_shards.log_mel_for_file  # the cache parts are the features stage's (write_mel_part)
    monkeypatch.setattr(pipeline.feature_shards, "log_mel_for_file",
                        lambda path, c: decoded.append(path) or real(path, c))
    second = write_library_features(_tracks(library), tmp_path / "b.parquet", cfg, cache, workers=1)
    assert (second["tracks"], second["extracted"], second["reused"], second["failed"]) == (7, 2, 6, 1)
    assert sorted(map(str, decoded)) == sorted(str(library / name) for name in ("neue ü.wav", "new one.wav"))

    rows, read_cfg, cache_dir = read_library_tracks(tmp_path / "b.parquet")
    assert read_cfg == cfg and cache_dir == cache
    assert len(rows) == 7 and not any(row["track_id"] == "broken.mp3" for row in rows)
    mels = read_cached_mels(rows, cache_dir, cfg)
    for row, mel in zip(rows, mels, strict=True):
        expected, n_true = log_mel_for_file(row["path"], cfg)
        np.testing.assert_allclose(mel, expected, atol=0.05)  # float16 storage
        assert row["n_frames"] == n_true
    assert len([v for v in scan_feature_cache(cache).values() if isinstance(v, tuple)]) == 8


def test_identity_follows_symlinks_and_changes_with_the_file(tmp_path):
    target = _tone(tmp_path / "a.wav", [(1.0, 440)])
    link = tmp_path / "link to a.wav"
    link.symlink_to(target)
    assert file_identity(link) == file_identity(target)
    before = file_identity(target)
    _tone(target, [(1.5, 440)])
    assert file_identity(target) != before
    # issue 18 row 14: replaced by other bytes of the same size, its mtime set back: still another version
    stat, before = target.stat(), file_identity(target)
    _tone(target, [(1.5, 660)])
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    assert file_identity(target) != before


def test_manifest_probes_only_new_files(tmp_path, library, monkeypatch):
    cache = tmp_path / "probes.parquet"
    first = build_manifest(library, tmp_path / "m1.parquet", probe_cache=cache, workers=1)
    assert (first["ok"], first["rejected"]) == (6, 1)
    _tone(library / "added.wav", [(2.0, 300)])
    probed = []
    real = pipeline.dataset._probe_row
    monkeypatch.setattr(pipeline.dataset, "_probe_row", lambda path: probed.append(path.name) or real(path))
    second = build_manifest(library, tmp_path / "m2.parquet", probe_cache=cache, workers=1)
    assert probed == ["added.wav"]
    assert (second["ok"], second["rejected"]) == (7, 1)
    assert second["labels"] == [] and second["splits"] == {"unlabelled": 7}


def test_vectors_from_the_pool_equal_those_computed_here(tmp_path, library):
    from pipeline.library import write_library_embeddings
    from pipeline.pretrained import write_pretrained_model

    cfg = MelConfig.preset("musicnn", duration_s=3.0)
    write_library_features(_tracks(library), tmp_path / "tracks.parquet", cfg, tmp_path / "cache", workers=1)
    manifest = tmp_path / "manifest.parquet"
    build_manifest(library, manifest)
    write_pretrained_model(tmp_path / "model", "musicnn", cfg, crop_s=3.0)
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"embeddings-{workers}.parquet"
        figures = write_library_embeddings(manifest, tmp_path / "tracks.parquet", tmp_path / "model", out,
                                           tmp_path / f"vectors-{workers}.parquet", workers=workers)
        assert (figures["tracks"], figures["computed"]) == (6, 6)
        outputs[workers] = read_embeddings(out)
    (rows_here, here), (rows_pool, pooled) = outputs[1], outputs[2]
    assert [row["track_id"] for row in rows_here] == [row["track_id"] for row in rows_pool]
    np.testing.assert_allclose(pooled, here, atol=1e-5)
    np.testing.assert_allclose([row["tag_probabilities"] for row in rows_pool],
                               [row["tag_probabilities"] for row in rows_here], atol=1e-5)


def test_an_mp3_damaged_past_its_start_is_probed_ok_and_left_out_by_the_features(tmp_path, rng):
    """The probe reads an MP3's length from its frame headers and decodes its first block only; damage further in
    is found by the features' decode, which records the file as failed (named, with its reason), never fatal."""
    folder = tmp_path / "mp3s"
    folder.mkdir()
    good = folder / "good.mp3"
    sf.write(good, (0.1 * rng.standard_normal((44100 * 20, 2))).astype(np.float32), 44100, format="MP3")
    with sf.SoundFile(good) as handle:
        decoded = sum(block.shape[0] for block in handle.blocks(blocksize=1 << 16))
    data = bytearray(good.read_bytes())
    data[len(data) // 3 : len(data) // 3 + len(data) // 4] = bytes(len(data) // 4)  # zeros across the middle
    (folder / "damaged.mp3").write_bytes(bytes(data))
    build_manifest(folder, tmp_path / "manifest.parquet")
    rows = {row["track_id"]: row for row in pipeline.manifest.read_manifest(tmp_path / "manifest.parquet")}
    assert rows["good.mp3"]["duration_s"] == decoded / 44100 and rows["good.mp3"]["channels"] == 2
    assert rows["damaged.mp3"]["status"] == "ok" and rows["damaged.mp3"]["duration_s"] == decoded / 44100

    cfg = MelConfig(sr=SR, n_fft=512, hop_length=256, n_mels=32, duration_s=20.0, segments=1)  # decodes it all
    figures = write_library_features(_tracks(folder), tmp_path / "tracks.parquet", cfg, tmp_path / "cache", workers=1)
    assert (figures["tracks"], figures["failed"]) == (1, 1)
    failed = figures["failed_tracks"][0]
    assert failed["track_id"] == "damaged.mp3" and "damaged.mp3" in failed["reason"]


@pytest.mark.parametrize("channels", [1, 2, 3, 6])
def test_mono_is_numpys_channel_mean_bit_for_bit(channels, rng):
    frames = rng.standard_normal((10_000, channels)).astype(np.float32)
    assert np.array_equal(mono(frames), frames.mean(axis=1, dtype=np.float32))
