"""Shared fixtures: synthetic labelled audio, the real GTZAN sample clips, broken files."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline.synth import write_synthetic_dataset

REAL_AUDIO = os.environ.get("MELSEARCH_REAL_AUDIO", "")
# The 120 emotify MP3s (<genre>/<genre>.NNN.mp3, ID3-tagged; set by .ci/run): real music with real tags
EMOTIFY_AUDIO = os.environ.get("MELSEARCH_EMOTIFY_AUDIO", "")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """4 classes x 6 clips of 4 s at 22050 Hz, GTZAN's layout (``<class>/<class>.NNNNN.wav``)."""
    out = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(out, n_per_class=6, seconds=4.0, n_classes=4, seed=1)
    return out


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str]]:
    """Six labelled synthetic 3 s clips at 22050 Hz, then a 1 s 440 Hz tone, as (track_id, path)."""
    root = tmp_path_factory.mktemp("audio")
    paths = write_synthetic_dataset(root, n_per_class=2, seconds=3.0, sr=22050, n_classes=3, seed=0)
    sf.write(root / "short.wav", (0.5 * np.sin(2 * np.pi * 440.0 * np.arange(22050) / 22050)).astype(np.float32),
             22050)
    return [(path.stem, str(path)) for path in paths] + [("short", str(root / "short.wav"))]


@pytest.fixture(scope="session")
def real_audio_dir() -> Path:
    """The real GTZAN clips named by MELSEARCH_REAL_AUDIO (set by .ci/run); skips when absent."""
    if not REAL_AUDIO or not Path(REAL_AUDIO).is_dir():
        pytest.skip("MELSEARCH_REAL_AUDIO is not set to a folder of real clips")
    return Path(REAL_AUDIO)


@pytest.fixture(scope="session")
def emotify_dir() -> Path:
    """The emotify MP3s named by MELSEARCH_EMOTIFY_AUDIO (set by .ci/run); skips when absent."""
    if not EMOTIFY_AUDIO or not Path(EMOTIFY_AUDIO).is_dir():
        pytest.skip("MELSEARCH_EMOTIFY_AUDIO is not set to the emotify MP3s")
    return Path(EMOTIFY_AUDIO)


def write_tags(path: Path, **names: str) -> Path:
    """Set easy tags (title, artist, album, tracknumber) on a FLAC, Ogg or MP3 file, as a tagger would."""
    import mutagen

    audio = mutagen.File(path, easy=True)
    if audio.tags is None:
        audio.add_tags()
    for key, value in names.items():
        audio[key] = value
    audio.save()
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def add_broken_files(folder: Path) -> dict[str, Path]:
    """Put a zero-byte .wav, a text file named .mp3 and a truncated .au into ``folder``'s first label folders."""
    labels = sorted(p for p in folder.iterdir() if p.is_dir())
    empty = labels[0] / "empty.wav"
    empty.write_bytes(b"")
    text = labels[1] / "notes.mp3"
    text.write_text("this is not audio\n" * 50)
    truncated = labels[-1] / "cut.au"
    sf.write(truncated, np.zeros(22050, dtype=np.float32), 22050, format="AU", subtype="PCM_16")
    truncated.write_bytes(truncated.read_bytes()[:20000])
    return {"empty": empty, "text": text, "truncated": truncated}


@pytest.fixture
def copy_tree(tmp_path):
    """Copy a folder under tmp_path (tests may add broken files to the copy)."""

    def _copy(src: Path, name: str = "audio") -> Path:
        return Path(shutil.copytree(src, tmp_path / name))

    return _copy


def make_genres_tar(path: Path, genres=("blues", "jazz"), per_genre=2, fmt="au") -> Path:
    """A small genres.tar.gz in GTZAN's layout: genres/<genre>/<genre>.NNNNN.<fmt>."""
    with tarfile.open(path, "w:gz") as tar:
        for genre in genres:
            for i in range(per_genre):
                buffer = io.BytesIO()
                tone = np.sin(np.linspace(0, 400 * (i + 1), 22050)).astype(np.float32) * 0.3
                sf.write(buffer, tone, 22050, format=fmt.upper(), subtype="PCM_16")
                info = tarfile.TarInfo(f"genres/{genre}/{genre}.{i:05d}.{fmt}")
                info.size = buffer.tell()
                buffer.seek(0)
                tar.addfile(info, buffer)
    return path


class _Zeros(io.RawIOBase):
    """``size`` zero bytes, read in blocks: an archive member that is never held in memory whole."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def make_zero_bomb(path: Path, size: int) -> Path:
    """A .tar.gz (or .zip) of a few kB per 10 MB: one good-looking song, then ``size`` bytes of zeros as a .wav."""
    buffer = io.BytesIO()
    sf.write(buffer, np.sin(np.linspace(0, 400, 22050)).astype(np.float32) * 0.3, 22050, format="AU",
             subtype="PCM_16")
    good = buffer.getvalue()
    name = "genres/blues/blues.00001.wav"
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("genres/blues/blues.00000.au", good)
            with zf.open(name, "w", force_zip64=True) as out:
                shutil.copyfileobj(io.BufferedReader(_Zeros(size), 1 << 20), out, 1 << 20)
        return path
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("genres/blues/blues.00000.au")
        info.size = len(good)
        tar.addfile(info, io.BytesIO(good))
        info = tarfile.TarInfo(name)
        info.size = size
        tar.addfile(info, io.BufferedReader(_Zeros(size), 1 << 20))
    return path


class ArchiveServer:
    """Serves files from a dict on 127.0.0.1 with HTTP Range; can cut a response short once or answer 404."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.cut_next_at, self.requests = files, None, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):  # noqa: N802 (http.server's naming)
                server.requests.append((self.path, self.headers.get("Range")))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                if server.cut_next_at is not None:
                    payload, server.cut_next_at = payload[: server.cut_next_at], None
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
