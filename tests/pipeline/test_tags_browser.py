"""The page's names and tag chips in headless Chromium, over a musicnn index of six clips, four tagged with mutagen:
results read "artist - title" (album and id on hover), each shows its top tags as chips, and a chip keeps only
the songs carrying its tag until it, or the filter's x, is clicked again.

Set ``MELSEARCH_TAGS_SCREENSHOT=/tmp/page-tags.png`` to keep a screenshot of the filtered results.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_tags
from test_server_browser import browser, result_ids, served, title, wait  # noqa: F401 (the browser fixture)

from pipeline.query import MusicSearch
from pipeline.synth import write_synthetic_dataset

ROOT = Path(__file__).resolve().parents[2]
NAMES = {"chime.00000": ("Bells at Dawn", "The Chimes", "Morning"),
         "chime.00001": ("Noon Bells", "The Chimes", "Morning"),
         "drone.00000": ("Low Hum", "Drone Choir", "Deep"),
         "drone.00001": ("Lower Hum", "Drone Choir", "Deeper")}


@pytest.fixture(scope="module")
def tagged_index(tmp_path_factory) -> MusicSearch:
    """A musicnn index of six 4-s FLAC clips, four tagged, built by ``melsearch run --library`` in a subprocess."""
    root = tmp_path_factory.mktemp("tagged")
    for path in write_synthetic_dataset(root / "music", n_per_class=3, seconds=4.0, n_classes=2, seed=3, fmt="flac"):
        if path.stem in NAMES:
            song, artist, album = NAMES[path.stem]
            write_tags(path, title=song, artist=artist, album=album)
    subprocess.run([sys.executable, "-m", "pipeline", "run", "--library", str(root / "music"), "--model", "musicnn",
                    "--set", "features.duration_s=4", "--workdir", str(root / "work"), "-q"], cwd=ROOT, check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}, capture_output=True)
    return MusicSearch.load(root / "work")


@pytest.fixture(scope="module")
def tagged_url(tagged_index):
    """The tagged index served (:func:`test_server_browser.served`) for the module."""
    yield from served(tagged_index, top_k=5)


def songs(driver) -> list[tuple[str, str, list[str]]]:
    """Each result's shown name, its hover text and its tag chips."""
    return driver.execute_script("""
        return [...document.querySelectorAll('#results .result')].map((r) => [
          r.querySelector('.song').textContent, r.querySelector('.song').title,
          [...r.querySelectorAll('button.tag')].map((b) => b.textContent)]);""")


def test_results_are_named_and_tag_chips_filter(browser, tagged_url, tagged_index):  # noqa: F811
    seed = "chime/chime.00000.flac"
    browser.get(f"{tagged_url}/?track={seed.replace('/', '%2F')}")
    wait(browser, lambda d: len(result_ids(d)) == 5, "no results")
    shown = {track: tuple(song) for track, song in zip(result_ids(browser), songs(browser), strict=True)}
    assert shown["chime/chime.00001.flac"][:2] == ("The Chimes - Noon Bells", "album: Morning\nchime/chime.00001.flac")
    assert shown["chime/chime.00002.flac"][:2] == ("chime.00002", "chime/chime.00002.flac")  # untagged: its file name
    assert all(tags == tagged_index.track_info(track)["tags"] and len(tags) >= 3
               for track, (_, _, tags) in shown.items())

    # a tag some results carry and others not, clicked on the first result carrying it
    counts = {tag: sum(tag in tags for _, _, tags in shown.values()) for _, _, tags in shown.values() for tag in tags}
    tag = min(counts, key=lambda t: (counts[t], t))
    if counts[tag] == len(shown):
        pytest.skip(f"every result carries every tag: {counts}")
    carrying = {song["track_id"] for song in tagged_index.find_tracks(tag=tag)} - {seed}
    chip = next(b for b in browser.find_elements("css selector", "#results button.tag") if b.text == tag)
    chip.click()
    wait(browser, lambda d: d.find_elements("id", "tag-filter") and set(result_ids(d)) == carrying,
         "the chip did not filter the results")
    assert all(tag in tags for _, _, tags in songs(browser)) and "only songs tagged" in title(browser)
    keep = os.environ.get("MELSEARCH_TAGS_SCREENSHOT")
    if keep:
        browser.save_screenshot(keep)

    browser.find_element("id", "tag-filter").click()  # the x: every song again
    wait(browser, lambda d: len(result_ids(d)) == 5 and not d.find_elements("id", "tag-filter"), "filter not cleared")
