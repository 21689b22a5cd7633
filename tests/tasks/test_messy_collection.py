"""A real collection's odd entries never stop a run (issue 18, rows 1-5: the must-show folder), as a user runs it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from fastapi.testclient import TestClient
from helpers import AS_USER, melsearch
from test_dataset_stage import dataset_as_user, needs_a_user

from pipeline.manifest import path_from_text
from pipeline.query import MusicSearch
from pipeline.server import create_app
from pipeline.synth import write_synthetic_dataset


def messy_collection(root: Path) -> tuple[Path, dict[str, str], list[str]]:
    """Three labels of synthetic 4 s clips in ``root/music``, with what real collections hold besides songs.

    Returns the folder, the bad entries (track id -> the reason its manifest row gives) and the good songs' track
    ids: one named in Latin-1 bytes (``caf\\xe9.wav``), and a label folder that is a link to a folder elsewhere.
    """
    folder = root / "music"
    write_synthetic_dataset(folder, n_per_class=3, seconds=4.0, n_classes=3, seed=7)
    first, second, third = sorted(p.name for p in folder.iterdir())
    shutil.move(folder / third, root / "elsewhere")
    (folder / third).symlink_to(root / "elsewhere")
    songs = {label: sorted((folder / label).glob("*.wav")) for label in (first, second, third)}
    os.rename(songs[second][0], os.fsencode(folder / second) + b"/caf\xe9.wav")
    songs[second][1].rename(folder / second / "locked.wav")
    (folder / second / "locked.wav").chmod(0)
    (folder / "private").mkdir()
    songs[first][0].rename(folder / "private" / songs[first][0].name)
    (folder / "private").chmod(0)
    (folder / first / "gone.wav").symlink_to(root / "nowhere.wav")
    (folder / first / "self.wav").symlink_to("self.wav")
    (folder / second / "up").symlink_to("..")
    bad = {f"{first}/gone.wav": "broken symbolic link (its target does not exist)",
           f"{first}/self.wav": "symbolic link loop",
           f"{second}/up": "symbolic link loop (a link back to the top folder)",
           f"{second}/locked.wav": "cannot be read (Permission denied)",
           "private": "folder cannot be listed (Permission denied)"}
    good = [f"{first}/{p.name}" for p in songs[first][1:]] + [f"{second}/café.wav", f"{second}/{songs[second][2].name}"]
    good += [f"{third}/{p.name}" for p in songs[third]]
    return folder, bad, good


@needs_a_user
def test_a_messy_collection_never_stops_a_run(tmp_path):
    folder, bad, good = messy_collection(tmp_path)
    rows, stderr = dataset_as_user(folder, tmp_path / "work")
    assert {track_id: row["reason"] for track_id, row in rows.items() if row["status"] == "rejected"} == bad
    assert sorted(track_id for track_id, row in rows.items() if row["status"] == "ok") == sorted(good)
    for track_id in bad:
        assert stderr.count(f"rejected {folder / track_id}: ") == 1, stderr

    # the same folder as a library, alone, with the pretrained model
    settings = ["--library", str(folder), "--model", "musicnn", "--set", "features.duration_s=4", "--workdir",
                str(tmp_path / "w2")]
    run = melsearch("run", *settings, prefix=AS_USER)
    assert "Traceback" not in run.stderr, run.stderr
    report = json.loads(melsearch("status", "--json", *settings, prefix=AS_USER).stdout)
    assert all(stage["done"] for stage in report.values()), report
    assert report["index"]["outputs"][0]["figures"]["count"] == len(good)

    latin1 = next(track_id for track_id in good if "café" in track_id)
    hits = json.loads(melsearch("query", "--workdir", str(tmp_path / "w2"), "--track", latin1, "--top-k", "5",
                                 "--json").stdout)
    assert len(hits) == 5 and latin1 not in {hit["track_id"] for hit in hits}
    by_file = json.loads(melsearch("query", "--workdir", str(tmp_path / "w2"), "--json",
                                   path_from_text(rows[latin1]["path"])).stdout)
    assert latin1 not in {hit["track_id"] for hit in by_file}  # the query's own file, recognised
    search = MusicSearch.load(tmp_path / "w2")
    served = TestClient(create_app(search)).get("/audio", params={"track": latin1})
    assert served.status_code == 200 and served.content == Path(path_from_text(rows[latin1]["path"])).read_bytes()
    # a song added later with such a name: the side table keeps it too
    new_song = os.fsencode(tmp_path) + b"/d\xe9j\xe0 vu.wav"
    shutil.copyfile(path_from_text(rows[good[0]]["path"]), new_song)
    assert search.index_audio(os.fsdecode(new_song)) == "added/déjà vu.wav"
    assert MusicSearch.load(tmp_path / "w2").query("added/déjà vu.wav", top_k=3)[0]["track_id"] == good[0]
