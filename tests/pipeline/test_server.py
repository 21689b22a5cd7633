"""The web app's API without a browser (FastAPI's TestClient) on the tiny index, ``serve``'s socket, recommend.

Queries never return the query, uploads are searched or refused with one-line JSON, ``/audio`` serves only
the index's files (with Range) and refuses every path, the server listens on loopback unless told otherwise.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import uvicorn
from fastapi.testclient import TestClient
from test_query import new_song, workdir  # noqa: F401 (fixtures: the tiny index, a drone clip not in it)

from pipeline.errors import MelsearchError
from pipeline.index import read_ids
from pipeline.query import MusicSearch
from pipeline.server import HTTPError, _AudioFiles, create_app, server_config
from pipeline.tags import display_name
from tasks.cli import main

ROOT = Path(__file__).resolve().parents[2]
SONG_KEYS = {"track_id", "name", "title", "artist", "album", "track_number", "duration_s", "tags", "label"}
RESULT_KEYS = SONG_KEYS | {"rank", "distance"}


def public(result: dict) -> dict:
    """What the API answers of a MusicSearch result: its fields but the path, and the song's display name."""
    return {**{key: result[key] for key in RESULT_KEYS - {"name"}}, "name": display_name(result)}


@pytest.fixture(scope="module")
def search(workdir) -> MusicSearch:  # noqa: F811 (the imported fixture)
    # the model that built it, where the work directory keeps it
    search = MusicSearch.load(workdir / "index" / "cifar10-tiny")
    search.classifier  # noqa: B018 (loaded once here, not in the first upload test)
    return search


@pytest.fixture(scope="module")
def items(workdir) -> dict[str, dict]:  # noqa: F811
    return {row["track_id"]: row for row in read_ids(workdir / "index" / "cifar10-tiny")}


@pytest.fixture(scope="module")
def client(search) -> TestClient:
    # a 1 MB upload limit: the tiny clips are 64 KB, so "too big" is cheap to send
    return TestClient(create_app(search, top_k=5, max_upload_mb=1))


def one_line_error(response, status: int) -> str:
    """The ``{"error": message}`` of an error response, checked to be JSON, one line, no traceback."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and body["error"] and "\n" not in body["error"]
    assert "Traceback" not in response.text
    return body["error"]


def test_query_by_track_never_returns_itself(client, search, items):
    for track in items:
        response = client.get("/api/query", params={"track": track, "k": 10})
        assert response.status_code == 200
        results = response.json()
        assert [r["rank"] for r in results] == list(range(1, 11))
        assert all(set(r) == RESULT_KEYS for r in results)  # no server paths
        assert track not in [r["track_id"] for r in results]
        expected = search.query_track(track, top_k=10)
        assert results == [public(r) for r in expected]
    assert len(client.get("/api/query", params={"track": "drone/drone.00001.wav"}).json()) == 5  # the app's top_k


def test_query_errors(client):
    assert "unknown track id" in one_line_error(client.get("/api/query", params={"track": "jazz.00099"}), 404)
    assert "track id" in one_line_error(client.get("/api/query"), 400)
    for k in ("0", "101", "ten"):
        assert one_line_error(client.get("/api/query", params={"track": "drone/drone.00001.wav", "k": k}), 400)


def test_upload_of_a_wav_returns_neighbours(client, items, new_song, tmp_path):  # noqa: F811
    # a new drone clip, as wav: it sounds like the indexed drones
    samples, sr = sf.read(new_song["flac"])
    sf.write(tmp_path / "new drone.wav", samples, sr)
    with (tmp_path / "new drone.wav").open("rb") as f:
        response = client.post("/api/query", params={"k": 6}, files={"file": ("new drone.wav", f, "audio/wav")})
    assert response.status_code == 200, response.text
    results = response.json()
    assert len(results) == 6 and all(set(r) == RESULT_KEYS for r in results)
    assert [r["label"] for r in results].count("drone") >= 3
    # the bytes of an indexed song: its neighbours, never itself
    track = "chime/chime.00001.wav"
    body = Path(items[track]["path"]).read_bytes()
    response = client.post("/api/query", files={"file": ("mine.wav", body, "audio/wav")})
    assert response.status_code == 200, response.text
    assert track not in [r["track_id"] for r in response.json()] and len(response.json()) == 5
    # mp3 and a name without an audio suffix are decoded all the same
    for name, path in (("song.mp3", new_song["mp3"]), ("clip", new_song["flac"])):
        response = client.post("/api/query", files={"file": (name, path.read_bytes())})
        assert response.status_code == 200 and len(response.json()) == 5, response.text


def test_a_bad_upload_gets_a_one_line_json_error(client, tmp_path):
    garbage = client.post("/api/query", files={"file": ("notes.wav", b"this is not audio\n" * 200, "audio/wav")})
    message = one_line_error(garbage, 400)
    assert message == "notes.wav: not an audio file this server can decode"
    assert "empty" in one_line_error(client.post("/api/query", files={"file": ("e.wav", b"")}), 400)
    assert "multipart field 'file'" in one_line_error(client.post("/api/query", files={"other": ("a.wav", b"x")}), 400)
    assert one_line_error(client.post("/api/query", content=b"RIFF....", headers={"content-type": "audio/wav"}), 400)
    big = np.random.default_rng(0).integers(0, 255, 2 * 2**20, dtype=np.uint8).tobytes()
    assert "limit of 1 MB" in one_line_error(client.post("/api/query", files={"file": ("big.wav", big)}), 413)

    # no Content-Length (chunked): counted while it arrives
    def chunks():
        for _ in range(40):
            yield b"x" * 2**16

    chunked = client.post("/api/query", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert "limit" in one_line_error(chunked, 413)


def test_an_internal_error_is_json_without_traceback(search, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom\nwith a second line")

    monkeypatch.setattr(search, "query_track", broken)
    client = TestClient(create_app(search), raise_server_exceptions=False)
    message = one_line_error(client.get("/api/query", params={"track": "drone/drone.00001.wav"}), 500)
    assert "RuntimeError" in message and "boom" not in message


def test_recommend_never_returns_a_history_song(client, search, items):
    tracks = list(items)
    history = [tracks[0], tracks[9], tracks[18], tracks[27]]
    for rule in ("merge", "centroid"):
        response = client.get("/api/recommend", params={"history": ",".join(history), "k": 12, "rule": rule})
        assert response.status_code == 200, response.text
        results = response.json()
        assert len(results) == 12 and all(set(r) == RESULT_KEYS for r in results)
        assert not set(history) & {r["track_id"] for r in results}
        assert len({r["track_id"] for r in results}) == 12
        distances = [r["distance"] for r in results]
        assert distances == sorted(distances)
    # default rule: merge
    default = client.get("/api/recommend", params={"history": ",".join(history), "k": 12}).json()
    assert default == [public(r) for r in search.recommend(history, top_k=12)]
    assert "unknown track id" in one_line_error(client.get("/api/recommend", params={"history": "x.wav"}), 404)
    assert "history" in one_line_error(client.get("/api/recommend", params={"history": " , "}), 400)
    assert "rule" in one_line_error(client.get("/api/recommend", params={"history": tracks[0], "rule": "x"}), 400)


def test_recommend_merges_the_top5_of_each_song_or_searches_the_centroid(search, items):
    tracks = list(items)
    history = [tracks[3], tracks[20]]
    # merge: the 5 nearest non-history songs of each, by best distance, each once
    best: dict[str, float] = {}
    for track in history:
        hits = [h for h in search.query_track(track, top_k=5 + len(history)) if h["track_id"] not in history][:5]
        for hit in hits:
            best[hit["track_id"]] = min(best.get(hit["track_id"], 9.0), hit["distance"])
    expected = sorted(best, key=lambda t: (best[t], t))
    merged = search.recommend(history, top_k=10)
    assert [r["track_id"] for r in merged] == expected[:10] and [r["rank"] for r in merged] == list(range(1, 11))
    # asking for more than 5 per song takes more per song
    assert len(search.recommend(history, top_k=20)) == 20
    # a centroid of one song is that song
    centroid, alone = search.recommend([tracks[3]], top_k=5, rule="centroid"), search.query_track(tracks[3], top_k=5)
    assert [r["track_id"] for r in centroid] == [r["track_id"] for r in alone]
    assert [r["distance"] for r in centroid] == pytest.approx([r["distance"] for r in alone], abs=1e-5)
    # the last 10 distinct songs seed it, every song of the history stays out
    long = tracks[:14] + [tracks[0]]
    results = search.recommend(long, top_k=15, rule="merge")
    assert not set(long) & {r["track_id"] for r in results}
    with pytest.raises(MelsearchError, match="unknown track id"):
        search.recommend(["nope.wav"])
    with pytest.raises(MelsearchError, match="empty listening history"):
        search.recommend([])
    with pytest.raises(MelsearchError, match="unknown recommend rule"):
        search.recommend(history, rule="random")


def test_recommend_main_prints_a_table_or_json(workdir, capsys):  # noqa: F811
    history = "drone/drone.00001.wav,chime/chime.00002.wav"
    index = str(workdir / "index" / "cifar10-tiny")
    assert main(["recommend", "--history", history, "--index-dir", index, "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "song", "label", "distance", "tags", "track_id"] and len(lines) == 4
    assert main(["recommend", "--history", history, "--index-dir", index, "--json", "--rule", "centroid"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 10 and not set(history.split(",")) & {r["track_id"] for r in results}
    assert main(["recommend", "--history", "nope.wav", "--index-dir", index]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("melsearch: ") and len(captured.err.splitlines()) == 1


def test_audio_serves_the_indexed_file_with_range(client, items):
    track = "buzz/buzz.00002.wav"
    body = Path(items[track]["path"]).read_bytes()
    whole = client.get("/audio", params={"track": track})
    assert whole.status_code == 200 and whole.content == body
    assert whole.headers["content-type"] == "audio/wav" and whole.headers["accept-ranges"] == "bytes"
    part = client.get("/audio", params={"track": track}, headers={"Range": "bytes=100-1099"})
    assert part.status_code == 206 and part.content == body[100:1100]
    assert part.headers["content-range"] == f"bytes 100-1099/{len(body)}"
    tail = client.get("/audio", params={"track": track}, headers={"Range": "bytes=-500"})
    assert tail.status_code == 206 and tail.content == body[-500:]
    assert client.get("/audio", params={"track": track}, headers={"Range": f"bytes={len(body)}-"}).status_code == 416
    loose = next(t for t in items if t.endswith(".flac"))
    flac = client.get("/audio", params={"track": loose}, headers={"Range": "bytes=0-9"})
    assert flac.status_code == 206 and flac.headers["content-type"] == "audio/flac" and flac.content[:4] == b"fLaC"


def test_range_errors_are_json(client, items):
    track = "buzz/buzz.00002.wav"
    size = Path(items[track]["path"]).stat().st_size
    for header in ("bytes=5-2", "abc", "items=0-5", "bytes=x-9", "bytes=", "bytes=1-2,z"):
        assert "Range" in one_line_error(client.get("/audio", params={"track": track}, headers={"Range": header}), 400)
    for header in (f"bytes={size}-", f"bytes={size + 10}-{size + 20}", "bytes=-0", f"bytes=0-9,{size}-"):
        response = client.get("/audio", params={"track": track}, headers={"Range": header})
        assert "past the end" in one_line_error(response, 416)
        assert response.headers["content-range"] == f"bytes */{size}"
    two = client.get("/audio", params={"track": track}, headers={"Range": "bytes=0-9, 20-29"})
    assert two.status_code == 206 and two.headers["content-type"].startswith("multipart/byteranges")


def test_an_unknown_id_is_echoed_at_most_100_characters(client):
    long_id = "x" * 30_000  # under the test client's URL limit, for two of them in a history
    for response in (client.get("/api/query", params={"track": long_id}),
                     client.get("/api/recommend", params={"history": f"{long_id},{long_id}"}),
                     client.get(f"/figures/{long_id}"),
                     client.get("/audio", params={"track": long_id})):
        message = one_line_error(response, response.status_code)
        assert response.status_code in (400, 404) and len(message) < 300 and "x" * 101 not in message
    upload = client.post("/api/query", files={"file": (long_id + ".wav", b"")})
    assert "x" * 101 not in one_line_error(upload, 400)


def test_idle_connections_are_closed(search):
    server = uvicorn.Server(server_config(create_app(search), port=free_port(), log_level="warning", keep_alive_s=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        request = b"GET /api/model HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        # sends nothing; half a request head; a whole request, then nothing more on the kept-alive connection
        for sent in (b"", request[:30], request):
            with socket.create_connection(("127.0.0.1", port), timeout=20) as connection:
                connection.sendall(sent)
                received = b""
                while chunk := connection.recv(65536):  # b"": the server closed it (a timeout raises instead)
                    received += chunk
                assert received.startswith(b"HTTP/1.1 200") == (sent == request), received[:100]
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_formats_browsers_cannot_play_are_sent_as_wav(tmp_path):
    samples = np.sin(np.linspace(0, 800, 8000)).astype(np.float32) * 0.5
    sf.write(tmp_path / "song.au", samples, 8000, format="AU", subtype="PCM_16")
    files = _AudioFiles([{"track_id": "a/song.au", "label": "", "path": str(tmp_path / "song.au")}])
    path, media_type = files.path_of("a/song.au")
    assert media_type == "audio/wav" and path.suffix == ".wav" and path.parent != tmp_path
    decoded, sr = sf.read(path, dtype="float32")
    assert sr == 8000 and np.abs(decoded - samples).max() < 1e-3
    assert files.path_of("a/song.au")[0] == path  # converted once


def test_audio_refuses_every_path_and_unknown_ids(client, items, workdir):  # noqa: F811
    indexed = next(iter(items.values()))["path"]
    refused = {
        "/audio?track=../../../../etc/passwd": 400,
        "/audio?track=%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd": 400,
        "/audio?track=..%2F..%2Fetc%2Fpasswd": 400,
        "/audio?track=%2E%2E/%2E%2E/etc/passwd": 400,
        "/audio?track=drone/../../../etc/passwd": 400,
        "/audio?track=drone/..": 400,
        "/audio?track=..%5C..%5Cwindows%5Cwin.ini": 400,
        "/audio?track=C:/Windows/win.ini": 400,
        "/audio?track=/etc/passwd": 400,
        "/audio?track=%2Fetc%2Fpasswd": 400,
        f"/audio?track={indexed}": 400,  # the absolute path of an indexed file is not its id
        "/audio?track=file:///etc/passwd": 400,
        "/audio?track=drone%00.wav": 400,
        "/audio?track=%252e%252e%252fetc%252fpasswd": 404,  # decoded once: a literal '%2e...' id, unknown
        "/audio?track=drone/drone.99999.wav": 404,
        "/audio?track=index.ann": 404,
        "/audio?track=meta.json": 404,
        "/audio?track=": 400,
        "/audio": 400,
        "/audio/%2e%2e/%2e%2e/etc/passwd": 404,
        "/audio/..%2f..%2fetc%2fpasswd": 404,
        "/figures/..%2fmeta.json": 404,
        "/figures/%2e%2e%2f%2e%2e%2fmodels%2fcifar10-tiny%2fconfig.json": 404,
        "/figures/ids.parquet": 404,
        "/figures/meta.json": 404,
        "/static/../pipeline/server.py": 404,
    }
    for url, status in refused.items():
        response = client.get(url)
        assert response.status_code == status, (url, response.status_code, response.text[:200])
        one_line_error(response, status)
        assert b"root:" not in response.content


def test_tracks_matches_ids_and_file_names_case_insensitively(client, items):
    drones = client.get("/api/tracks", params={"q": "DRONE"}).json()
    assert drones and all("drone" in r["track_id"] for r in drones) and set(drones[0]) == SONG_KEYS
    assert len(drones) == sum("drone" in t for t in items)
    loose = client.get("/api/tracks", params={"q": "loose1"}).json()
    assert [r["track_id"] for r in loose] == [t for t in items if "loose1" in t]
    assert len(client.get("/api/tracks", params={"q": "", "limit": 3}).json()) == 3  # capped
    assert len(client.get("/api/tracks", params={"q": ".wav"}).json()) == 20  # default cap
    assert client.get("/api/tracks", params={"q": "no such song"}).json() == []
    assert one_line_error(client.get("/api/tracks", params={"q": "a", "limit": 10_000}), 400)


def test_page_model_and_figures(client, search):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for needle in ('id="q"', 'id="file"', "/api/query", "/api/recommend", "/api/tracks", "more-like-this", '"audio"'):
        assert needle in page.text
    model = client.get("/api/model").json()
    assert model["figures"] == search.meta["figures"] and model["tracks"] == len(search)
    assert model["metrics"]["test_accuracy"] == json.loads((search.model_dir / "metrics.json").read_text())[
        "test_accuracy"]
    assert "embedding_map.png" in model["images"] and model["top_k"] == 5 and model["rules"] == ["merge", "centroid"]
    for name in model["images"]:
        image = client.get(f"/figures/{name}")
        assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on ``port`` (Linux: /proc/net/tcp and tcp6)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                # the kernel prints each 32-bit word in host (little-endian) order
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(socket.inet_ntop(socket.AF_INET if width == 8 else socket.AF_INET6, words))
    return found


def test_serve_listens_on_loopback_only_by_default(workdir):  # noqa: F811
    port = free_port()
    command = [sys.executable, "-m", "pipeline", "serve", "--index-dir", str(workdir / "index" / "cifar10-tiny"),
               "--port", str(port)]
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not listening_addresses(port):
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        assert listening_addresses(port) == {"127.0.0.1"}
        # raw request lines, as no client library would normalise them
        for path in ("/audio/../../etc/passwd", "/../../etc/passwd", "/audio?track=../../etc/passwd",
                     "/audio?track=%2e%2e%2f%2e%2e%2fetc%2fpasswd", "//etc/passwd"):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read()
            assert response.status in (400, 404), (path, response.status)
            assert "error" in json.loads(body) and b"root:" not in body
            connection.close()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/api/query?track=drone/drone.00001.wav&k=3")
        assert len(json.loads(connection.getresponse().read())) == 3
        connection.close()
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0]
    assert f"http://127.0.0.1:{port}/" in output


def test_serve_errors_are_one_line(tmp_path, capsys):
    assert main(["serve", "--workdir", str(tmp_path)]) == 1
    assert main(["serve", "--index-dir", str(tmp_path / "none")]) == 1
    with pytest.raises(SystemExit):
        main(["serve", "--index-dir", str(tmp_path), "--port", "70000"])
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 3 and all(line.startswith("melsearch: ") for line in errors)
    assert "no finished index" in errors[0] and "a port is 0-65535" in errors[2]


def test_a_moved_file_or_a_non_audio_path_in_the_id_table_is_a_404(tmp_path):
    files = _AudioFiles([{"track_id": "gone.wav", "label": "", "path": str(tmp_path / "gone.wav")},
                         {"track_id": "t.wav", "label": "", "path": "/etc/passwd"}])
    for track in ("gone.wav", "t.wav"):
        with pytest.raises(HTTPError, match="no longer where the index says") as refused:
            files.path_of(track)
        assert refused.value.status_code == 404
