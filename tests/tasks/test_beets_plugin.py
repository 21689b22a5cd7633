"""The beets plugin against a real beets library in a temporary BEETSDIR: ``beet import -A`` of ID3-tagged MP3s that
live outside beets' directory, ``beet melsearch`` (musicnn), ``beet similar QUERY`` in beets' own format, never the
seed; a removed item is never listed after the next ``beet melsearch``; errors are beets' one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.synth import write_synthetic_dataset

pytest.importorskip("beets")
BEET = Path(sys.executable).with_name("beet")


@pytest.fixture(scope="module")
def beets(tmp_path_factory) -> dict:
    """A beets library of 10 ID3-tagged 4-s MP3s ("Song 0".."Song 9", artist "Artist <sound>"), imported as
    they are (-A: no autotagging, no network), with melsearch configured; its environment and files."""
    from mutagen.easyid3 import EasyID3

    if not BEET.is_file():
        pytest.skip(f"no beet command beside {sys.executable}")
    root = tmp_path_factory.mktemp("beets")
    paths = write_synthetic_dataset(root / "music", n_per_class=2, seconds=4.0, n_classes=5, seed=4, fmt="mp3")
    for i, path in enumerate(sorted(paths)):
        tags = EasyID3()
        tags["title"], tags["artist"], tags["album"] = f"Song {i}", f"Artist {path.parent.name}", "Synth"
        tags.save(path)
    env = beets_env(root)
    found = beet(env, "import", "-A", "-q", str(root / "music"))
    assert found.returncode == 0, found.stderr
    return {"env": env, "root": root}


def beets_env(root: Path) -> dict[str, str]:
    """The environment of a beets whose config (``root/beetsdir``) imports in place, without tagging or the
    network, and loads the melsearch plugin on ``root/work`` with musicnn."""
    config = root / "beetsdir"
    config.mkdir()
    (config / "config.yaml").write_text(f"""\
directory: {root / "library"}
library: {config / "library.db"}
import: {{copy: no, write: no, autotag: no}}
plugins: melsearch
melsearch: {{workdir: {root / "work"}, model: musicnn}}
""")
    return {**os.environ, "BEETSDIR": str(config), "HOME": str(root), "TQDM_DISABLE": "1"}


def beet(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BEET), *args], env=env, capture_output=True, text=True, timeout=600)


def lines(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_similar_lists_the_items_most_like_the_first_match_never_itself(beets):
    env = beets["env"]
    items = lines(beet(env, "ls"))
    assert len(items) == 10
    indexed = lines(beet(env, "melsearch"))
    assert indexed[-1].startswith("melsearch: 10 items indexed")
    similar = lines(beet(env, "similar", "title:Song 3"))
    seed = next(item for item in items if item.endswith(" - Song 3"))
    assert len(similar) == 9 and len(set(similar)) == 9  # the default 10, and the library has 9 others
    assert seed not in similar and set(similar) <= set(items)  # beets' own format: `beet ls` lines
    assert lines(beet(env, "similar", "-n", "5", "title:Song 3")) == similar[:5]
    paths = lines(beet(env, "similar", "-n", "5", "-p", "title:Song 3"))  # -p and -f as `beet ls` has them
    assert len(set(paths)) == 5 and all(Path(path).is_file() for path in paths)
    assert lines(beet(env, "similar", "-n", "5", "-f", "$title", "title:Song 3")) == [
        line.rsplit(" - ", 1)[1] for line in similar[:5]]


def test_a_removed_item_is_never_listed(beets):
    env = beets["env"]
    lines(beet(env, "melsearch"))
    nearest = lines(beet(env, "similar", "-n", "1", "title:Song 6"))[0]
    title = nearest.rsplit(" - ", 1)[1]
    lines(beet(env, "remove", "-f", f"title:{title}"))
    assert nearest not in lines(beet(env, "similar", "title:Song 6"))  # before re-indexing: skipped
    lines(beet(env, "melsearch"))
    assert len(list((beets["root"] / "work" / "beets-items").iterdir())) == 9
    after = lines(beet(env, "similar", "title:Song 6"))
    assert nearest not in after and len(after) == 8


@pytest.mark.parametrize(("args", "message"), [
    (["similar", "title:Nothing like it"], "no item matches"),
    (["similar", "-n", "0", "title:Song 1"], "-n must be at least 1"),
])
def test_errors_are_one_line(beets, args, message):
    result = beet(beets["env"], *args)
    errors = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(errors) == 1
    assert errors[0].startswith("error: melsearch: ") and message in errors[0]


def with_workdir(beets: dict, folder: Path, workdir: Path) -> dict:
    """The environment of the same beets library with melsearch's work directory ``workdir`` (config in folder)."""
    folder.mkdir()
    text = (Path(beets["env"]["BEETSDIR"]) / "config.yaml").read_text()
    (folder / "config.yaml").write_text(text.replace(str(beets["root"] / "work"), str(workdir)))
    return {**beets["env"], "BEETSDIR": str(folder)}


def test_similar_before_indexing_says_to_index(beets, tmp_path):
    result = beet(with_workdir(beets, tmp_path / "beetsdir", tmp_path / "work"), "similar", "title:Song 1")
    assert result.returncode != 0
    assert result.stderr.strip() == (f"error: melsearch: nothing indexed in {tmp_path / 'work'} yet: "
                                     "run 'beet melsearch' first")


def test_a_work_directory_that_cannot_be_made_is_one_line(beets, tmp_path):
    (tmp_path / "work").write_text("a file, not a folder\n")
    result = beet(with_workdir(beets, tmp_path / "beetsdir", tmp_path / "work"), "melsearch")
    assert result.returncode != 0 and result.stderr.strip() == (
        f"error: melsearch: {tmp_path / 'work' / 'beets-items'}: cannot link the library's songs there "
        "(Not a directory)")


def test_links_name_their_items_and_follow_the_library(tmp_path):
    from beetsplug.melsearch import item_id_of, sync_links

    long_name = "x" * 252 + ".mp3"  # with its id, longer than a file name may be
    links = sync_links(tmp_path / "links", [(1, "/music/a.mp3"), (2, f"/music/{long_name}"), (3, "/music/c.flac")])
    assert {link.name: os.readlink(link) for link in links.iterdir()} == {
        "1-a.mp3": "/music/a.mp3", "2.mp3": f"/music/{long_name}", "3-c.flac": "/music/c.flac"}
    assert sorted(item_id_of(link.name) for link in links.iterdir()) == [1, 2, 3]
    # item 1 removed, item 3 moved: their links follow, item 2's stays as it was
    before = (links / "2.mp3").lstat().st_ino
    sync_links(links, [(2, f"/music/{long_name}"), (3, "/elsewhere/c.flac")])
    assert {link.name: os.readlink(link) for link in links.iterdir()} == {
        "2.mp3": f"/music/{long_name}", "3-c.flac": "/elsewhere/c.flac"}
    assert (links / "2.mp3").lstat().st_ino == before
