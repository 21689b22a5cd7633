"""The page in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven by selenium.

A real uvicorn serves the tiny index on 127.0.0.1; the browser searches, uploads a file, plays a result (its
``currentTime`` advances), follows "more like this", asks for recommendations and shows an upload error.
Skipped only where /usr/bin/chromium is absent outside CI; in CI (``CI=true``) .ci/run installs it.
Set ``MELSEARCH_SCREENSHOT=/tmp/melsearch-page.png`` to keep a screenshot of the page with results.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import soundfile as sf
import uvicorn
from test_query import new_song, workdir  # noqa: F401 (fixtures: the tiny index, a drone clip not in it)
from test_server import free_port

from pipeline.query import MusicSearch
from pipeline.server import create_app

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

if not CHROMIUM.exists() and not IN_CI:
    pytest.skip("no /usr/bin/chromium (apt-get install chromium chromium-driver)", allow_module_level=True)

from selenium import webdriver  # noqa: E402 (after the skip: only where a browser can run)
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT_S = 60  # the first upload embeds with torch on a shared 2-core machine


def served(search: MusicSearch, top_k: int) -> Iterator[str]:
    """A real uvicorn on 127.0.0.1 serving ``search`` in a thread: its URL, then the server stopped."""
    server = uvicorn.Server(uvicorn.Config(create_app(search, top_k=top_k), host="127.0.0.1", port=free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def base_url(workdir):  # noqa: F811 (the imported fixture)
    """The tiny index served (:func:`served`) for the module."""
    search = MusicSearch.load(workdir / "index" / "cifar10-tiny")
    search.classifier  # noqa: B018 (load the model before the browser's first upload)
    yield from served(search, top_k=6)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium with a fresh profile, the system chromedriver (never a download), no network chatter."""
    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), "CI needs chromium and chromium-driver (see .ci/run)"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required", "--mute-audio",
                 "--window-size=1400,1000", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def wait(driver, condition, message: str):
    # the page re-renders its results: an element found a moment ago may be gone by the time it is read
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1,
                         ignored_exceptions=(StaleElementReferenceException,)).until(condition, message)


def result_ids(driver) -> list[str]:
    """The track ids of the results shown, read in one script (no element can go stale between reads)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#results .result')].map((r) => r.getAttribute('data-track-id'));")


def title(driver) -> str:
    return driver.find_element(By.ID, "query-title").text


def test_search_upload_play_more_like_this_and_recommend(browser, base_url, new_song, tmp_path):  # noqa: F811
    browser.get(base_url + "/")
    wait(browser, lambda d: "songs" in d.find_element(By.ID, "model-line").text, "the model line never loaded")
    assert browser.find_elements(By.CSS_SELECTOR, "#figures tr"), "no model figures"
    wait(browser, lambda d: d.execute_script(
        "const i = document.getElementById('img-embedding_map'); return i && i.complete && i.naturalWidth > 0"),
        "the embedding map did not load")

    # search: a file name fragment suggests ids, a unique fragment is searched
    box = browser.find_element(By.ID, "q")
    box.send_keys("drone.0000")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#suggestions option")) >= 2, "no suggestions")
    box.clear()
    box.send_keys("drone.00002\n")
    wait(browser, lambda d: len(result_ids(d)) == 6, "no results for the search")
    assert "drone/drone.00002.wav" in title(browser) and "drone/drone.00002.wav" not in result_ids(browser)

    # upload: a new drone clip, as wav, through the file input
    samples, sr = sf.read(new_song["flac"])
    sf.write(tmp_path / "my song.wav", samples, sr)
    browser.find_element(By.ID, "file").send_keys(str(tmp_path / "my song.wav"))
    wait(browser, lambda d: "my song.wav" in title(d) and len(result_ids(d)) == 6, "no results for the upload")
    labels = [label.text for label in browser.find_elements(By.CSS_SELECTOR, "#results .label")]
    assert labels.count("drone") >= 3, labels

    # play the first result: its currentTime advances (the server answers the player's Range requests)
    played = result_ids(browser)[0]
    state = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const audio = document.querySelector('#results .result audio');
        audio.play().then(() => setTimeout(() => done({t: audio.currentTime, error: null}), 1500),
                          (err) => done({t: -1, error: String(err)}));
    """)
    assert state["error"] is None and state["t"] > 0.3, state
    wait(browser, lambda d: played in d.find_element(By.ID, "history-chips").text, "the played song is not in history")

    # more like this, on the second result
    second = result_ids(browser)[1]
    browser.find_elements(By.CSS_SELECTOR, "#results .more-like-this")[1].click()
    wait(browser, lambda d: second in title(d) and second not in result_ids(d) and result_ids(d), "more like this")
    assert browser.current_url.endswith("?track=" + second.replace("/", "%2F"))

    # recommend from the history (the played song)
    browser.find_element(By.ID, "recommend-btn").click()
    wait(browser, lambda d: "Recommended" in title(d) and len(result_ids(d)) == 6, "no recommendations")
    assert played not in result_ids(browser)
    keep = os.environ.get("MELSEARCH_SCREENSHOT")
    if keep:
        browser.find_element(By.ID, "q").clear()
        browser.find_element(By.ID, "q").send_keys("drone.00002\n")
        wait(browser, lambda d: "drone/drone.00002.wav" in title(d), "no results for the screenshot")
        browser.save_screenshot(keep)

    # a bad upload shows its one-line error, and the results stay
    (tmp_path / "notes.wav").write_text("not audio " * 100)
    before = result_ids(browser)
    browser.find_element(By.ID, "file").send_keys(str(tmp_path / "notes.wav"))
    refused = "notes.wav: not an audio file this server can decode"
    wait(browser, lambda d: d.find_element(By.ID, "error").text == refused, "no error for a bad upload")
    assert result_ids(browser) == before

    # the bad upload's 400 is logged as a failed load: expected
    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"
              and "favicon" not in entry["message"] and "/api/query" not in entry["message"]]
    assert not severe, severe


def test_opening_a_track_url_shows_its_neighbours(browser, base_url):
    browser.get(base_url + "/?track=chime%2Fchime.00003.wav")
    wait(browser, lambda d: "chime/chime.00003.wav" in title(d) and len(result_ids(d)) == 6, "no results")
    assert "chime/chime.00003.wav" not in result_ids(browser)


def test_the_page_fits_a_phone(browser, base_url, workdir):  # noqa: F811 (the imported fixture)
    """390x844, as an iPhone 12-15: no sideways scroll, names readable, players and every button on screen."""
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
    try:
        browser.get(base_url + "/?track=chime%2Fchime.00003.wav")
        wait(browser, lambda d: len(result_ids(d)) == 6, "no results on the phone")
        wait(browser, lambda d: "e.g. " in d.find_element(By.ID, "q").get_attribute("placeholder"), "no example id")
        example = browser.find_element(By.ID, "q").get_attribute("placeholder").split("e.g. ")[1]
        layout = browser.execute_script("""
            const box = (e) => e.getBoundingClientRect();
            return {
              scroll: document.documentElement.scrollWidth, inner: window.innerWidth,
              players: document.querySelectorAll('#results audio').length,
              names: [...document.querySelectorAll('#results .track')].map((e) => [box(e).width, box(e).height]),
              lineHeight: parseFloat(getComputedStyle(document.querySelector('#results .track')).lineHeight) || 20,
              buttons: [...document.querySelectorAll('button')].filter((b) => b.offsetParent !== null)
                .map((b) => [b.textContent, box(b).left, box(b).right]),
              similarity: document.querySelector('#results .similarity').textContent,
            };""")
        keep = os.environ.get("MELSEARCH_PHONE_SCREENSHOT")
        if keep:
            browser.save_screenshot(keep)
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert layout["inner"] == 390 and layout["scroll"] <= 390, layout
    assert layout["players"] == 6
    # a name is at least a third of the screen wide and at most two lines tall: never one letter per line
    assert all(width > 130 and height <= 2.5 * layout["lineHeight"] for width, height in layout["names"]), layout
    assert all(0 <= left and right <= 390 for _, left, right in layout["buttons"]), layout["buttons"]
    assert {"Search", "More like this", "Recommend", "Clear"} <= {text for text, _, _ in layout["buttons"]}
    assert layout["similarity"].endswith("% alike")
    assert example in {row["track_id"] for row in MusicSearch.load(workdir / "index" / "cifar10-tiny").tracks()}


def test_picking_a_suggestion_searches_it(browser, base_url):
    browser.get(base_url + "/")
    box = browser.find_element(By.ID, "q")
    box.send_keys("chime.0000")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#suggestions option")) >= 2, "no suggestions")
    # what the browser does when a datalist option is picked: the value replaced, an input event not of typing
    browser.execute_script("""
        const q = document.getElementById('q');
        q.value = document.querySelector('#suggestions option').value;
        q.dispatchEvent(new InputEvent('input', {inputType: 'insertReplacementText', bubbles: true}));""")
    picked = browser.find_element(By.CSS_SELECTOR, "#suggestions option").get_attribute("value")
    wait(browser, lambda d: picked in title(d) and len(result_ids(d)) == 6, "picking a suggestion did not search")


def test_save_as_playlist_downloads_the_songs_shown(browser, base_url):
    browser.get(base_url + "/?track=chime%2Fchime.00003.wav")
    wait(browser, lambda d: "chime/chime.00003.wav" in title(d) and len(result_ids(d)) == 6, "no results")
    link = browser.find_element(By.ID, "save-playlist")
    assert link.is_displayed() and link.get_attribute("download") == "melsearch.m3u"
    text = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(document.getElementById('save-playlist').href).then((r) => r.text()).then(done, (e) => done(String(e)));
    """)
    lines = text.splitlines()
    assert lines[0] == "#EXTM3U" and len(lines) == 1 + 2 * 7  # the song searched, then its 6 results
    assert lines[2].endswith("chime/chime.00003.wav")
    assert [Path(line).name for line in lines[4::2]] == [Path(track).name for track in result_ids(browser)]
