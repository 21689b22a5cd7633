import logging
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import add_broken_files

from pipeline.audio import load_audio, probe_audio
from pipeline.dataset import build_manifest, folder_fingerprint, hash_split, load_gtzan_split, random_split
from pipeline.errors import MelsearchError
from pipeline.manifest import path_from_text, path_to_text, read_manifest, readable_name


def test_manifest_records_good_and_bad_files(synth_dir, copy_tree, tmp_path):
    folder = copy_tree(synth_dir)
    broken = add_broken_files(folder)
    figures = build_manifest(folder, tmp_path / "manifest.parquet")
    rows = {Path(r["path"]).name: r for r in read_manifest(tmp_path / "manifest.parquet")}
    assert figures["tracks"] == 24 + 3 and figures["rejected"] == 3 and figures["ok"] == 24
    for path in broken.values():
        row = rows[path.name]
        assert row["status"] == "rejected" and row["reason"], row
    assert "empty" in rows["empty.wav"]["reason"]
    assert "truncated" in rows["cut.au"]["reason"]
    good = [r for r in rows.values() if r["status"] == "ok"]
    assert all(r["label"] == Path(r["path"]).parent.name and r["reason"] == "" for r in good)
    assert all(r["sample_rate"] == 22050 and r["channels"] == 1 and abs(r["duration_s"] - 4.0) < 1e-3 for r in good)
    # outside GTZAN's genres the track id is the relative path
    assert rows["drone.00003.wav"]["track_id"] == "drone/drone.00003.wav"


@pytest.mark.parametrize("fmt,subtype", [("flac", "PCM_16"), ("ogg", "VORBIS"), ("mp3", "MPEG_LAYER_III"),
                                         ("au", "PCM_16"), ("wav", "FLOAT")])
def test_every_format_any_rate_and_channels(tmp_path, fmt, subtype, rng):
    path = tmp_path / f"clip.{fmt}"
    stereo = (0.1 * rng.standard_normal((44100 * 2, 2))).astype(np.float32)
    sf.write(path, stereo, 44100, format=fmt.upper() if fmt != "mp3" else "MP3", subtype=subtype)
    info = probe_audio(path)
    assert info.sample_rate == 44100 and info.channels == 2 and abs(info.duration_s - 2.0) < 0.1
    samples, duration = load_audio(path, sr=22050)
    assert samples.dtype == np.float32 and samples.ndim == 1 and abs(len(samples) - 44100) < 2300
    assert abs(duration - 2.0) < 0.1


def test_gtzan_layout_uses_artist_filtered_split(tmp_path):
    split = load_gtzan_split()
    assert sum(1 for s in split.values() if s == "train") == 443
    assert sum(1 for s in split.values() if s == "valid") == 197
    assert sum(1 for s in split.values() if s == "test") == 290
    for name in ("blues.00012", "blues.00029", "blues.00000", "country.00008"):  # test, train, valid, excluded
        (tmp_path / "g" / name.split(".")[0]).mkdir(parents=True, exist_ok=True)
        sf.write(tmp_path / "g" / name.split(".")[0] / f"{name}.au", np.zeros(2205, np.float32), 22050, format="AU")
    build_manifest(tmp_path / "g", tmp_path / "m.parquet", split="gtzan")  # asked for: kept, country untrained
    got = {r["track_id"]: r["split"] for r in read_manifest(tmp_path / "m.parquet")}
    assert got == {"blues.00012": "test", "blues.00029": "train", "blues.00000": "valid", "country.00008": "excluded"}


def test_auto_split_falls_back_to_hash_when_gtzan_lists_leave_a_label_untrained(tmp_path, caplog):
    """3 clips a genre (as in ../shared/sample-audio): the artist-filtered lists put no blues clip in train."""
    for name in ("blues.00000", "blues.00012", "blues.00001", "jazz.00001", "jazz.00002", "jazz.00003"):
        (tmp_path / "g" / name.split(".")[0]).mkdir(parents=True, exist_ok=True)
        sf.write(tmp_path / "g" / name.split(".")[0] / f"{name}.au", np.zeros(2205, np.float32), 22050, format="AU")
    gtzan = load_gtzan_split()
    assert "train" not in {gtzan.get(f"blues.{n}", "excluded") for n in ("00000", "00012", "00001")}
    caplog.set_level("WARNING", logger="pipeline.dataset")
    figures = build_manifest(tmp_path / "g", tmp_path / "m.parquet")
    assert figures["split_method"] == "hash"
    assert any("gives blues" in r.getMessage() and "no train track" in r.getMessage() for r in caplog.records)
    rows = read_manifest(tmp_path / "m.parquet")
    assert {r["label"] for r in rows if r["split"] == "train"} == {"blues", "jazz"}


def test_hash_split_gives_every_label_a_train_track(tmp_path, caplog):
    # ids picked so that the plain hash split puts neither of label b's tracks in train
    names = [f"t{i}" for i in range(400) if hash_split(f"b/t{i}.wav") != "train"][:2]
    for label, stems in (("a", ["x0", "x1", "x2"]), ("b", names)):
        (tmp_path / "d" / label).mkdir(parents=True)
        for stem in stems:
            sf.write(tmp_path / "d" / label / f"{stem}.wav", np.zeros(2205, np.float32), 22050)
    caplog.set_level("WARNING", logger="pipeline.dataset")
    build_manifest(tmp_path / "d", tmp_path / "m.parquet", split="hash")
    rows = read_manifest(tmp_path / "m.parquet")
    assert sum(r["split"] == "train" for r in rows if r["label"] == "b") == 1
    assert any("label b has no train track" in r.getMessage() for r in caplog.records)


def test_hash_split_is_stable_when_files_are_added(synth_dir, copy_tree, tmp_path):
    folder = copy_tree(synth_dir)
    build_manifest(folder, tmp_path / "a.parquet", split="hash")
    before = {r["track_id"]: r["split"] for r in read_manifest(tmp_path / "a.parquet")}
    extra = folder / "drone" / "new.wav"
    sf.write(extra, np.zeros(22050, np.float32), 22050)
    build_manifest(folder, tmp_path / "b.parquet", split="hash")
    after = {r["track_id"]: r["split"] for r in read_manifest(tmp_path / "b.parquet")}
    assert len(after) == len(before) + 1
    assert all(after[k] == v for k, v in before.items())
    ids = [f"x/{i}.wav" for i in range(5000)]
    share = np.mean([hash_split(i) == "train" for i in ids])
    assert 0.77 < share < 0.83


def test_random_split_is_stratified_and_seeded():
    ids = {"a": [f"a{i}" for i in range(50)], "b": [f"b{i}" for i in range(30)], "c": ["c0", "c1", "c2", "c3"]}
    one, two, other = random_split(ids, seed=3), random_split(ids, seed=3), random_split(ids, seed=4)
    assert one == two and one != other
    for label, members in ids.items():
        counts = {s: sum(one[m] == s for m in members) for s in ("train", "valid", "test")}
        expected = {"a": (40, 5, 5), "b": (24, 3, 3), "c": (2, 1, 1)}[label]  # small classes keep valid and test
        assert (counts["train"], counts["valid"], counts["test"]) == expected, label


def test_unlabelled_files_and_errors(tmp_path):
    (tmp_path / "lib" / "rock").mkdir(parents=True)
    sf.write(tmp_path / "lib" / "loose.flac", np.zeros(4410, np.float32), 22050)
    sf.write(tmp_path / "lib" / "rock" / "song.wav", np.zeros(4410, np.float32), 22050)
    figures = build_manifest(tmp_path / "lib", tmp_path / "m.parquet")
    rows = {r["track_id"]: r for r in read_manifest(tmp_path / "m.parquet")}
    assert rows["loose.flac"]["label"] == "" and rows["loose.flac"]["split"] == ""
    assert rows["rock/song.wav"]["label"] == "rock" and figures["splits"]["unlabelled"] == 1
    with pytest.raises(MelsearchError, match="unknown split method 'bogus'"):
        build_manifest(tmp_path / "lib", tmp_path / "x.parquet", split="bogus")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MelsearchError, match="no audio files"):
        build_manifest(tmp_path / "empty", tmp_path / "x.parquet")


def test_real_clips_are_all_ok(real_audio_dir, tmp_path):
    figures = build_manifest(real_audio_dir, tmp_path / "m.parquet")
    rows = read_manifest(tmp_path / "m.parquet")
    assert figures["layout"] == "gtzan" and figures["rejected"] == 0 and len(rows) == 30
    assert {r["label"] for r in rows} == {r["track_id"].split(".")[0] for r in rows}
    assert all(r["split"] in ("train", "valid", "test") for r in rows)


def _song(path: Path, seconds: float = 0.5) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, 0.1 * np.sin(np.arange(int(22050 * seconds), dtype=np.float32) / 5), 22050)
    return path


def _manifest_rows(folder: Path, out: Path) -> dict[str, dict]:
    build_manifest(folder, out)
    return {row["track_id"]: row for row in read_manifest(out)}


def test_broken_and_looping_links_are_rejected_rows(tmp_path, caplog):
    """Issue 18 row 1: each is a rejected row with its reason, warned about once; the fingerprint is taken too."""
    folder = tmp_path / "music"
    _song(folder / "rock" / "song.wav")
    (folder / "rock" / "gone.wav").symlink_to(tmp_path / "nowhere.wav")
    (folder / "rock" / "self.mp3").symlink_to("self.mp3")
    (folder / "rock" / "up").symlink_to("..")  # a folder link back to the top
    (folder / "rock" / "cover.jpg").symlink_to(tmp_path / "nowhere.jpg")  # not audio: not a song, not a row
    fingerprint = folder_fingerprint(folder)
    with caplog.at_level(logging.WARNING, logger="pipeline.dataset"):
        rows = _manifest_rows(folder, tmp_path / "m.parquet")
    assert {track_id: (row["status"], row["reason"]) for track_id, row in rows.items()} == {
        "rock/song.wav": ("ok", ""),
        "rock/gone.wav": ("rejected", "broken symbolic link (its target does not exist)"),
        "rock/self.mp3": ("rejected", "symbolic link loop"),
        "rock/up": ("rejected", "symbolic link loop (a link back to the top folder)"),
    }
    for name in ("gone.wav", "self.mp3", "up"):
        assert sum(f"/rock/{name}: " in record.getMessage() for record in caplog.records) == 1, name
    _song(tmp_path / "nowhere.wav")  # the link's song arrives: the fingerprint sees it, the next manifest has it
    assert folder_fingerprint(folder) != fingerprint
    assert _manifest_rows(folder, tmp_path / "m2.parquet")["rock/gone.wav"]["status"] == "ok"


def test_a_linked_label_folder_is_followed_and_listed_once(tmp_path):
    """Issue 18 row 4: a label folder that links elsewhere is read under its link's name; a second way in is a row."""
    folder, elsewhere = tmp_path / "music", tmp_path / "elsewhere"
    _song(folder / "rock" / "a.wav")
    for name in ("x.wav", "y.flac", "live/z.wav"):
        _song(elsewhere / name)
    (folder / "jazz").symlink_to(elsewhere)
    (folder / "rock" / "jazz again").symlink_to(elsewhere)
    rows = _manifest_rows(folder, tmp_path / "m.parquet")
    assert {track_id: (row["status"], row["label"]) for track_id, row in rows.items()} == {
        "jazz/x.wav": ("ok", "jazz"), "jazz/y.flac": ("ok", "jazz"), "jazz/live/z.wav": ("ok", "jazz"),
        "rock/a.wav": ("ok", "rock"), "rock/jazz again": ("rejected", "rock"),
    }
    assert rows["rock/jazz again"]["reason"] == "the same folder as jazz, listed already"
    assert rows["jazz/x.wav"]["path"] == str(folder.resolve() / "jazz" / "x.wav")


def test_a_latin1_file_name_is_read_and_shown_readably(tmp_path):
    """Issue 18 row 5: the raw name goes through the manifest losslessly and opens; its track id reads as meant."""
    folder = tmp_path / "music"
    raw = os.fsencode(folder / "chanson") + b"/d\xe9j\xe0 vu.wav"
    os.rename(_song(folder / "chanson" / "x.wav"), raw)
    _song(folder / "chanson" / "café.wav")
    os.rename(_song(folder / "chanson" / "y.wav"), os.fsencode(folder / "chanson") + b"/caf\xe9.wav")
    rows = _manifest_rows(folder, tmp_path / "m.parquet")
    row = rows["chanson/déjà vu.wav"]
    assert row["status"] == "ok" and os.fsencode(path_from_text(row["path"])) == raw
    samples, _ = load_audio(path_from_text(row["path"]), sr=22050)
    assert samples.size == 11025
    # caf\xe9.wav reads as the UTF-8 café.wav beside it: that one keeps the id, this one shows its raw byte
    assert rows["chanson/café.wav"]["path"] == str(folder.resolve() / "chanson" / "café.wav")
    assert os.fsencode(path_from_text(rows["chanson/caf\\xe9.wav"]["path"])).endswith(b"/caf\xe9.wav")
    assert len(rows) == 3 and all(row["status"] == "ok" for row in rows.values())
    assert path_to_text("/music/café.wav") == "/music/café.wav"  # a UTF-8 path reads as it is
    assert readable_name(os.fsdecode(b"\x80 \x81 \xff")) == "€ \x81 ÿ"  # cp1252, Latin-1 where cp1252 has none
