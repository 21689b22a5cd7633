"""Tests for pipeline.feature_shards and pipeline.feature_store: the HDF5 shard writer, merge and store."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import signal
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from mel_reference import SHORT, SR

from pipeline import parallel
from pipeline.errors import MelsearchError
from pipeline.feature_shards import merge_feature_shards, shard_tracks, write_feature_shard
from pipeline.feature_store import FeatureStore
from pipeline.mel import MelConfig, log_mel_for_file

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
        clips[:4], tmp_path / "feat" / "s0.h5", SHORT, workers=1, progress=lambda *a: calls.append(a), part_size=3
    )
    second = write_feature_shard(clips[4:], tmp_path / "feat" / "s1.h5", SHORT, workers=2, part_size=1)
    assert (first, second) == ({"written": 4, "failed": []}, {"written": len(clips) - 4, "failed": []})
    assert calls == [(3, 4), (4, 4)]  # after each part
    parts = sorted(p.name for p in (tmp_path / "feat" / "s0.h5.parts").iterdir())
    assert parts == ["part-00000.h5", "part-00001.h5"]
    with h5py.File(tmp_path / "feat" / "s0.h5.parts" / parts[0]) as h5:
        assert h5["mel"].shape == (3, SHORT.n_mels, SHORT.n_frames)
        assert h5["mel"].chunks == (1, SHORT.n_mels, SHORT.n_frames)  # one track per chunk
    with h5py.File(tmp_path / "feat" / "s0.h5") as h5:
        assert h5["mel"].is_virtual and h5["mel"].shape == (4, SHORT.n_mels, SHORT.n_frames)
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
    # no temporary left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.wav", "shard.h5", "shard.h5.parts"]


def _file_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_bytes_on_rerun_and_whatever_the_worker_count(tmp_path: Path, clips: list[tuple[str, str]]) -> None:
    cfg = MelConfig(duration_s=3.0)
    for run, workers in (("one", 1), ("two", 2), ("again", 2)):
        write_feature_shard(clips, tmp_path / run / "shard.h5", cfg, workers=workers, part_size=2)
    one = _file_bytes(tmp_path / "one")
    assert len(one) == 1 + 4  # the shard and its four parts
    assert _file_bytes(tmp_path / "two") == one
    assert _file_bytes(tmp_path / "again") == one
    write_feature_shard(clips[:3], tmp_path / "one" / "shard.h5", cfg, part_size=2)  # rewriting drops stale parts
    assert sorted(_file_bytes(tmp_path / "one")) == ["shard.h5", "shard.h5.parts/part-00000.h5",
                                                     "shard.h5.parts/part-00001.h5"]


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
    with h5py.File(tmp_path / "all.h5") as h5:  # the merged file maps the shard's parts directly
        assert [source.file_name for source in h5["mel"].virtual_sources()] == ["s.h5.parts/part-00000.h5"]
    shutil.rmtree(tmp_path / "s.h5.parts")  # a virtual dataset would read zeros: the store must refuse
    with pytest.raises(MelsearchError, match="all.h5: its shard s.h5.parts/part-00000.h5 is missing"):
        FeatureStore.open(tmp_path / "all.h5")


def test_a_dying_worker_fails_the_shard_naming_it(tmp_path: Path, clips: list[tuple[str, str]]) -> None:
    stuck = tmp_path / "audio" / "stuck.wav"
    stuck.parent.mkdir()
    os.mkfifo(stuck)  # opening it blocks until a writer comes: a worker busy for as long as the test needs
    tracks = [clips[0], ("stuck", str(stuck)), *clips[1:]]

    def kill_the_workers(done: int, total: int) -> None:  # what the OOM killer does, once a part is written
        for pid in list(parallel._pool._processes):
            with contextlib.suppress(ProcessLookupError):  # killed at an earlier call, not yet reaped
                os.kill(pid, signal.SIGKILL)

    out = tmp_path / "out"
    with pytest.raises(MelsearchError, match=r"shard\.h5: a feature worker process died"):
        write_feature_shard(tracks, out / "shard.h5", SHORT, workers=2, part_size=1, progress=kill_the_workers)
    assert list(out.iterdir()) == []
    # the next shard gets a fresh pool
    assert write_feature_shard(clips[:2], out / "next.h5", SHORT, workers=2, part_size=1)["written"] == 2


def test_a_started_pool_starts_its_workers_before_any_work_and_they_do_it(tmp_path: Path,
                                                                          clips: list[tuple[str, str]]) -> None:
    parallel.shutdown_shared_pool()
    parallel.start_shared_pool(2, preload=("pipeline.feature_shards",))  # returns at once: workers start behind
    pool = parallel._pool
    deadline = time.monotonic() + 120
    while len(pool._processes) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    started = set(pool._processes)
    assert len(started) == 2
    assert write_feature_shard(clips[:4], tmp_path / "s.h5", SHORT, workers=2, part_size=1)["written"] == 4
    assert parallel._pool is pool and set(pool._processes) == started  # the same workers, none started since
    parallel.shutdown_shared_pool()
