"""A small web app over :class:`pipeline.query.MusicSearch`: search by song or upload, listen, get recommendations.

``melsearch serve --workdir data/work`` starts it on http://127.0.0.1:8000/.
Endpoints (every error is JSON ``{"error": "<one line>"}`` with a 4xx/5xx status, never a traceback)::

    GET  /                               the page (pipeline/static/index.html)
    GET  /api/query?track=ID&k=N         neighbours of an indexed song, never the song itself
    POST /api/query?k=N                  neighbours of an uploaded audio file (multipart field "file")
    GET  /api/recommend?history=A,B&k=N  what to play after a history (oldest first; &rule=merge|centroid)
    GET  /api/tracks?q=TEXT              indexed songs whose id, file name, title, artist or album holds TEXT
    GET  /api/playlist.m3u?track=A&track=B  those songs as an extended M3U download (their paths on the server)
    GET  /api/model                      the index's figures (meta.json) and the model's metrics.json
    GET  /figures/NAME                   embedding_map.png of the index, curves.png and confusion.png of the model
    GET  /audio?track=ID                 the song's audio file, with HTTP Range (the player seeks)

Results are ``[{"rank", "track_id", "name", "title", "artist", "album", "track_number", "duration_s", "tags",
"label", "distance"}]`` (``name``: "artist - title", :func:`pipeline.tags.display_name`; ``tags``: the song's top
tags, [] when the model has none); ``/api/tracks`` gives the same without rank and distance. ``&tag=TAG`` on
query, recommend and tracks keeps only songs whose top tags hold TAG. ``/audio`` serves only files that the
index's id table names, found by track id; nothing of the request becomes a path.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import h11
import soundfile as sf
import uvicorn
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from pipeline.audio import is_audio_path
from pipeline.errors import MelsearchError, UndecodableAudioError
from pipeline.index import MAP_FILE
from pipeline.manifest import path_from_text
from pipeline.playlist import format_m3u, track_entries
from pipeline.query import RECOMMEND_RULES, MusicSearch
from pipeline.tags import display_name

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MAX_UPLOAD_MB = 50.0
MAX_K = 100
MAX_SUGGESTIONS = 50
KEEP_ALIVE_S = 5  # a connection that sends no whole request for this long is closed
STATIC_DIR = Path(__file__).parent / "static"

# What browsers call each format; Chromium and Firefox play none of .au/.snd/.aif(f), so those are sent as WAV
MEDIA_TYPES = {
    ".wav": "audio/wav", ".mp3": "audio/mpeg", ".flac": "audio/flac", ".ogg": "audio/ogg", ".oga": "audio/ogg",
    ".opus": "audio/ogg", ".m4a": "audio/mp4", ".au": "audio/basic", ".snd": "audio/basic", ".aif": "audio/aiff",
    ".aiff": "audio/aiff",
}
TRANSCODE_TO_WAV = {".au", ".snd", ".aif", ".aiff"}
# the model's images shown on the page: name -> where it lies ("index" or "model" folder)
FIGURES = {MAP_FILE: "index", "confusion.png": "model", "curves.png": "model"}


class HTTPError(HTTPException):
    """An answer with a status and a one-line message (sent as ``{"error": message}``)."""


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split()) or "error"}, status_code=status, headers=headers)


def _shown(text: str, limit: int = 100) -> str:
    """What of a client's text (a track id, a file name) an error message echoes: at most ``limit`` characters."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _check_range(header: str, size: int) -> None:
    """Refuse a ``Range`` header that Starlette's FileResponse would answer in text/plain (RFC 9110 section 14).

    Malformed (not ``bytes=`` and a list of ``first-last``, ``first-`` or ``-suffix``, or first > last): 400.
    None of it within the file's ``size`` bytes: 416 with ``Content-Range: bytes */size``. Stricter than
    the RFC, which serves the satisfiable part of a list: a list with any range past the end is refused.
    """
    unit, _, ranges = header.partition("=")
    specs = [spec.strip() for spec in ranges.split(",")]
    if unit.strip().lower() != "bytes" or not all(re.fullmatch(r"\d+-\d*|-\d+", spec) for spec in specs):
        raise HTTPError(400, f"Range: {_shown(header)!r} is not bytes=FIRST-LAST, FIRST- or -SUFFIX")
    for spec in specs:
        first, last = spec.split("-")
        if first and last and int(first) > int(last):
            raise HTTPError(400, f"Range: {spec} ends before it starts")
        if (int(first) >= size) if first else (int(last) == 0 or size == 0):
            raise HTTPError(416, f"Range: {spec} is past the end of the file ({size} bytes)",
                            headers={"Content-Range": f"bytes */{size}"})


class UploadLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413 JSON, before or while it is received.

    Starlette's multipart parser spools files of any size to disk and FastAPI turns errors in it into a
    generic 400, so the body is counted here, in front of both.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT"):
            await self.app(scope, receive, send)
            return
        too_big = _error(413, f"upload over the limit of {self.max_bytes / 2**20:g} MB")
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await too_big(scope, receive, send)
            return
        received, exceeded, answered = 0, False, False

        async def counted() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise HTTPError(413, "upload over the limit")
            return message

        async def guarded(message: Message) -> None:
            nonlocal answered
            if exceeded:  # whatever the app made of the cut body, the answer is 413
                if not answered:
                    answered = True
                    await too_big(scope, receive, send)
                return
            answered = answered or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not answered:
            await too_big(scope, receive, send)


class _AudioFiles:
    """Track id -> audio file of the index, with a cache of WAV copies for formats browsers do not play."""

    def __init__(self, tracks: Sequence[dict]) -> None:
        self.by_id = {row["track_id"]: row for row in tracks}
        self._item_of = {track: item for item, track in enumerate(self.by_id)}
        self._cache = tempfile.TemporaryDirectory(prefix="melsearch-audio-")  # removed with the app
        self._lock = threading.Lock()

    def path_of(self, track: str | None) -> tuple[Path, str]:
        """(file, media type) of a track id; HTTPError 400 for a malformed id, 404 for any other."""
        if not track:
            raise HTTPError(400, "give the track id: /audio?track=ID")
        if not _looks_like_track_id(track):
            raise HTTPError(400, "not a track id")
        row = self.by_id.get(track)
        if row is None:
            raise HTTPError(404, "unknown track id")
        path = Path(path_from_text(row["path"]))
        # the id table is trusted to name audio files; anything else it might say is still not served
        if not is_audio_path(path) or not path.is_file():
            raise HTTPError(404, f"the audio of {track} is no longer where the index says")
        suffix = path.suffix.lower()
        if suffix in TRANSCODE_TO_WAV:
            wav = self._as_wav(path, track)
            if wav is not None:
                return wav, "audio/wav"
        return path, MEDIA_TYPES.get(suffix, "application/octet-stream")

    def _as_wav(self, path: Path, track: str) -> Path | None:
        """A 16-bit WAV copy of ``path`` in the cache (made once); None when soundfile cannot read it."""
        out = Path(self._cache.name) / f"{self._item_of[track]}.wav"
        with self._lock:
            if not out.is_file():
                try:
                    samples, sr = sf.read(os.fsencode(path), always_2d=True)  # bytes: a name may not be UTF-8
                    partial = out.with_suffix(".part")
                    sf.write(partial, samples, sr, format="WAV", subtype="PCM_16")
                    partial.replace(out)
                except (sf.LibsndfileError, RuntimeError, OSError) as exc:
                    log.warning("%s: sent as it is, not as WAV (%s)", path, exc)
                    return None
        return out


def _looks_like_track_id(track: str) -> bool:
    """False for what only a path could be: NUL, absolute or drive paths, backslashes, ``..`` parts, over-long."""
    if len(track) > 1024 or "\x00" in track or "\\" in track or track.startswith("/"):
        return False
    if re.match(r"^[A-Za-z]:", track) or re.match(r"^[a-z][a-z0-9+.-]*://", track, re.IGNORECASE):
        return False
    return ".." not in PurePosixPath(track).parts


# What the page sees of a song: its names and tags, not where the server keeps it
_SONG_FIELDS = ("title", "artist", "album", "track_number", "duration_s", "tags", "label")


def _song(row: dict) -> dict:
    """The public fields of a song of :meth:`MusicSearch.tracks` or a result, with its display ``name``."""
    return {"track_id": row["track_id"], "name": display_name(row), **{key: row[key] for key in _SONG_FIELDS}}


def _results(hits: list[dict]) -> list[dict]:
    """The public fields of query results (the server's file paths stay on the server)."""
    return [{"rank": hit["rank"], **_song(hit), "distance": hit["distance"]} for hit in hits]


def _read_metrics(search: MusicSearch) -> dict | None:
    """The model's metrics.json without its bulky per-class tables, or None when the model folder lacks it."""
    import json

    path = search.model_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return {key: value for key, value in metrics.items() if key != "test"} if isinstance(metrics, dict) else None


def create_app(
    search: MusicSearch,
    *,
    top_k: int = 10,
    max_upload_mb: float = MAX_UPLOAD_MB,
) -> FastAPI:
    """The web app over ``search`` (no socket: serve it with uvicorn, or test it with FastAPI's TestClient).

    Parameters
    ----------
    search : the loaded index; file uploads load its model on first use.
    top_k : results when a request gives no ``k``.
    max_upload_mb : largest request body accepted (an upload's multipart body), in MiB; larger gets 413.
    """
    app = FastAPI(title="melsearch", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(UploadLimit, max_bytes=int(max_upload_mb * 2**20))
    files = _AudioFiles(search.tracks())
    ids = list(files.by_id)
    # one query at a time on the model: torch already uses every core, and the first upload loads it
    model_lock = threading.Lock()
    default_k = max(1, min(top_k, MAX_K))
    k_param = Query(default_k, ge=1, le=MAX_K, description="results")

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "request"
        return _error(400, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(MelsearchError)
    async def melsearch_error(_request: Request, exc: MelsearchError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return _error(500, f"internal error ({type(exc).__name__}); the server log has the details")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")

    @app.get("/api/query")
    def query_track(track: str | None = None, k: int = k_param, tag: str | None = None) -> list[dict]:
        if not track:
            raise HTTPError(400, "give a track id (?track=ID) or POST an audio file")
        if track not in files.by_id:
            raise HTTPError(404, f"{_shown(track)}: unknown track id")
        return _results(search.query_track(track, top_k=k, tag=tag))

    @app.post("/api/query")
    def query_upload(file: UploadFile | None = File(None), k: int = k_param,  # noqa: B008
                     tag: str | None = None) -> list[dict]:
        if file is None:
            raise HTTPError(400, "no file: send the audio as multipart field 'file'")
        name = Path(file.filename or "upload").name
        # keep an audio suffix (some decoders go by it); nothing else of the client's name reaches the disk
        suffix = Path(name).suffix.lower() if is_audio_path(name) else ".bin"
        with tempfile.TemporaryDirectory(prefix="melsearch-upload-") as tmp:
            path = Path(tmp) / f"upload{suffix}"
            with path.open("wb") as out:
                shutil.copyfileobj(file.file, out, length=2**20)
            if path.stat().st_size == 0:
                raise HTTPError(400, f"{_shown(name)}: empty file")
            try:
                with model_lock:
                    hits = search.query_file(path, top_k=k, tag=tag)
            except UndecodableAudioError as exc:  # its reasons ("not a regular file (possibly a pipe?)") mislead here
                log.info("upload %s: %s", name, exc)
                raise HTTPError(400, f"{_shown(name)}: not an audio file this server can decode") from exc
            except MelsearchError as exc:
                # the message names the temporary file: say the client's name instead
                raise HTTPError(400, f"{_shown(name)}: {str(exc).replace(str(path), '').lstrip(': ')}") from exc
        log.info("upload %s (%d bytes): %d results", name, file.size or 0, len(hits))
        return _results(hits)

    @app.get("/api/recommend")
    def recommend(history: str = "", k: int = k_param, rule: str = "merge", tag: str | None = None) -> list[dict]:
        songs = [track.strip() for track in history.split(",") if track.strip()]
        if not songs:
            raise HTTPError(400, "give a listening history: ?history=ID1,ID2,... (oldest first)")
        if rule not in RECOMMEND_RULES:
            raise HTTPError(400, f"rule: one of {', '.join(RECOMMEND_RULES)}")
        unknown = [track for track in songs if track not in files.by_id]
        if unknown:
            raise HTTPError(404, f"{', '.join(_shown(track) for track in unknown[:3])}: unknown track id")
        return _results(search.recommend(songs, top_k=k, rule=rule, tag=tag))

    @app.get("/api/tracks")
    def tracks(q: str = "", limit: int = Query(20, ge=1, le=MAX_SUGGESTIONS),  # noqa: B008
               tag: str | None = None) -> list[dict]:
        return [_song(row) for row in search.find_tracks(q, limit=limit, tag=tag)]

    @app.get("/api/playlist.m3u")
    def playlist(track: list[str] = Query([])) -> Response:  # noqa: B008
        # one parameter per song: a track id (a file name) may hold a comma
        songs = [song for song in track if song]
        if not songs:
            raise HTTPError(400, "give the songs: ?track=ID1&track=ID2...")
        if len(songs) > MAX_K + 1:  # a query's results and its seed
            raise HTTPError(400, f"at most {MAX_K + 1} songs in a playlist, got {len(songs)}")
        unknown = [track for track in songs if track not in files.by_id]
        if unknown:
            raise HTTPError(404, f"{', '.join(_shown(track) for track in unknown[:3])}: unknown track id")
        return Response(format_m3u(track_entries(search, songs)), media_type="audio/x-mpegurl; charset=utf-8",
                        headers={"Content-Disposition": 'attachment; filename="melsearch.m3u"'})

    @app.get("/api/model")
    def model() -> dict[str, Any]:
        meta = search.meta
        folders = {"index": search.index_dir, "model": search.model_dir}
        return {
            "index": {key: meta.get(key) for key in ("model", "model_key", "dim", "count", "n_trees", "metric")},
            "tracks": len(ids),
            "figures": meta.get("figures", {}),
            "metrics": _read_metrics(search),
            "images": [name for name, where in FIGURES.items() if (folders[where] / name).is_file()],
            "rules": list(RECOMMEND_RULES),
            "top_k": default_k,
            "max_upload_mb": max_upload_mb,
        }

    @app.get("/figures/{name}")
    def figure(name: str) -> FileResponse:
        where = FIGURES.get(name)
        path = (search.index_dir if where == "index" else search.model_dir) / name if where else None
        if path is None or not path.is_file():
            raise HTTPError(404, f"no figure {_shown(name)!r}")
        return FileResponse(path, media_type="image/png")

    @app.get("/audio")
    def audio(request: Request, track: str | None = None) -> Response:
        path, media_type = files.path_of(track)
        if "range" in request.headers:
            _check_range(request.headers["range"], path.stat().st_size)
        return FileResponse(path, media_type=media_type)  # answers Range with 206 (Starlette >= 0.39)

    return app


class _RequestDeadlineH11(H11Protocol):
    """uvicorn's HTTP/1.1, closing a connection that has not sent a whole request head ``timeout_keep_alive``
    seconds after it opened or after its last response.

    uvicorn arms its keep-alive timer only after a response and disarms it at the first byte received, so a
    client that connects and sends nothing, or half a request, would hold its connection forever.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn's
        self._deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def _arm_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        if not self.transport.is_closing():
            self._deadline = self.loop.call_later(self.timeout_keep_alive, self._close_if_idle)

    def _close_if_idle(self) -> None:
        if self.conn.their_state is h11.IDLE:  # h11 stays IDLE until a whole request head has arrived
            self.timeout_keep_alive_handler()


def server_config(app: FastAPI, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log_level: str = "info",
                  keep_alive_s: int = KEEP_ALIVE_S) -> uvicorn.Config:
    """uvicorn's settings for ``app``: HTTP/1.1 whose idle connections close after ``keep_alive_s`` seconds."""
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=_RequestDeadlineH11,
                          timeout_keep_alive=keep_alive_s)


def serve(
    search: MusicSearch,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    top_k: int = 10,
    max_upload_mb: float = MAX_UPLOAD_MB,
    log_level: str = "info",
) -> None:
    """Serve the page and API of ``search``'s index on ``host:port`` until interrupted.

    Loopback only unless ``host`` says otherwise (``0.0.0.0``: every interface, with a warning): the app
    has no accounts and plays the whole collection to whoever reaches it.
    """
    try:
        search.classifier  # noqa: B018 (load the model now, so the first upload does not wait for it)
    except MelsearchError as exc:
        log.warning("uploads will fail: %s", exc)
    app = create_app(search, top_k=top_k, max_upload_mb=max_upload_mb)
    if not _is_loopback(host):
        log.warning("listening on %s: anyone who can reach this machine can search and play the collection", host)
    log.info("serving %s (%d songs) on http://%s:%d/", search.index_dir, len(search), host, port)
    uvicorn.Server(server_config(app, host=host, port=port, log_level=log_level)).run()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
