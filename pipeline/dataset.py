"""The dataset stage: find the audio files, probe each one, label and split them, write the manifest."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import stat
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.audio import AUDIO_EXTENSIONS, is_audio_path, probe_audio
from pipeline.errors import MelsearchError
from pipeline.io import atomic_path, params_key
from pipeline.manifest import path_to_text, readable_name, write_manifest
from pipeline.tags import NAME_COLUMNS, read_file_tags

log = logging.getLogger(__name__)

GTZAN_GENRES = ("blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop", "reggae", "rock")
GTZAN_SPLIT_DIR = Path(__file__).resolve().parent.parent / "data" / "splits" / "gtzan-fault-filtered"
SPLIT_METHODS = ("auto", "gtzan", "random", "hash")
_GTZAN_NAME = re.compile(r"^(?P<genre>[a-z]+)\.\d{5}$")


@dataclass(frozen=True)
class AudioListing:
    """What :func:`scan_audio_folder` found: audio files with their ``os.stat`` (links followed), sorted by path,
    and the entries that cannot be read as ``(path, reason)``, sorted by path."""

    files: list[tuple[Path, os.stat_result]]
    rejected: list[tuple[Path, str]]


def _unfollowable(exc: OSError) -> str:
    """Why a listed entry cannot be followed (it is a symbolic link: a plain entry just listed can be stat'ed)."""
    if exc.errno == errno.ENOENT:
        return "broken symbolic link (its target does not exist)"
    if exc.errno == errno.ELOOP:
        return "symbolic link loop"
    return f"cannot be read ({exc.strerror or exc})"


def scan_audio_folder(root: str | os.PathLike) -> AudioListing:
    """Every file under ``root`` (recursively, hidden entries skipped) that has an audio extension, and every entry
    that cannot be read, with its reason.

    Symbolic links are followed, to files and folders alike; each folder is listed once (by device and inode), so
    a link back to a folder above it, or a second way into a folder, is an entry with its reason, never a loop.
    Entries that cannot be read: a broken or looping link (with an audio extension, or none, as a folder has),
    an audio file without read permission or that is not a regular file, a folder that cannot be listed (one
    entry for all it holds). Files with other extensions are ignored; a text file renamed ``.mp3`` is listed and
    later rejected. Raises MelsearchError when ``root`` itself is not a folder that can be listed.
    """
    root = Path(root)
    if not root.is_dir():
        raise MelsearchError(f"{root}: not a folder of audio")
    files: list[tuple[Path, os.stat_result]] = []
    rejected: list[tuple[Path, str]] = []
    listed: dict[tuple[int, int], Path] = {}

    def shown(folder: Path) -> str:
        return folder.relative_to(root).as_posix() if folder != root else "the top folder"

    def visit(folder: Path, info: os.stat_result) -> None:
        listed[(info.st_dev, info.st_ino)] = folder
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as exc:
            if folder == root:
                raise MelsearchError(f"{root}: cannot list this folder ({exc.strerror or exc})") from exc
            rejected.append((folder, f"folder cannot be listed ({exc.strerror or exc})"))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                info = entry.stat()
            except OSError as exc:
                if is_audio_path(entry.name) or not path.suffix:
                    rejected.append((path, _unfollowable(exc)))
                continue
            if stat.S_ISDIR(info.st_mode):
                first = listed.get((info.st_dev, info.st_ino))
                if first is None:
                    visit(path, info)
                elif first in path.parents:
                    rejected.append((path, f"symbolic link loop (a link back to {shown(first)})"))
                else:
                    rejected.append((path, f"the same folder as {shown(first)}, listed already"))
            elif is_audio_path(entry.name):
                if not stat.S_ISREG(info.st_mode):
                    rejected.append((path, "not a regular file"))
                elif not os.access(path, os.R_OK):
                    rejected.append((path, f"cannot be read ({os.strerror(errno.EACCES)})"))
                else:
                    files.append((path, info))

    visit(root, root.stat())
    return AudioListing(sorted(files, key=lambda item: item[0]), sorted(rejected))


def list_audio_files(root: str | os.PathLike) -> list[Path]:
    """The audio files of :func:`scan_audio_folder` (those that can be read), sorted."""
    return [path for path, _ in scan_audio_folder(root).files]


def folder_fingerprint(root: str | os.PathLike) -> str:
    """Short hash of the audio files' relative paths, sizes, mtimes and ctimes, and of the entries that cannot be
    read: changes when the collection changes, a file replaced under its old mtime or made readable included (as
    :func:`file_identity`, the ctime catches what the mtime was set back over)."""
    root = Path(root)
    listing = scan_audio_folder(root)
    entries = [(path.relative_to(root).as_posix(), info.st_size, info.st_mtime_ns, info.st_ctime_ns)
               for path, info in listing.files]
    entries += [(path.relative_to(root).as_posix(), reason) for path, reason in listing.rejected]
    return params_key(entries)


def _label_of(rel: Path) -> str:
    """The top-level sub-folder is the label (``Music/<genre>/artist/song.mp3``); files at the root have none."""
    return rel.parts[0] if len(rel.parts) > 1 else ""


def is_gtzan_name(rel: Path) -> bool:
    """True for ``<genre>/<genre>.NNNNN.<ext>`` with a GTZAN genre."""
    match = _GTZAN_NAME.match(rel.stem)
    return len(rel.parts) == 2 and bool(match) and match["genre"] == rel.parts[0] and rel.parts[0] in GTZAN_GENRES


def is_gtzan_layout(rels: Sequence[Path]) -> bool:
    """True for GTZAN's own layout (GTZAN, Kaggle's ``genres_original``, our samples).

    Every label folder is a GTZAN genre and at least 90% of the files carry GTZAN names; stray files
    (a broken copy, a note) do not turn the collection into a plain folder.
    """
    if not rels or any(len(rel.parts) < 2 or rel.parts[0] not in GTZAN_GENRES for rel in rels):
        return False
    return sum(map(is_gtzan_name, rels)) >= 0.9 * len(rels)


def load_gtzan_split(split_dir: str | os.PathLike = GTZAN_SPLIT_DIR) -> dict[str, str]:
    """Map GTZAN track id (``blues.00012``) to ``train``/``valid``/``test`` from the artist-filtered lists."""
    mapping = {}
    for split in ("train", "valid", "test"):
        for line in (Path(split_dir) / f"{split}.txt").read_text().split():
            mapping[Path(line).stem] = split
    return mapping


def hash_split(track_id: str, *, fractions: tuple[float, float] = (0.8, 0.9)) -> str:
    """Deterministic split from a hash of the track id: adding files never moves existing tracks.

    ``u = sha1(track_id) / 2**160``; ``u < 0.8`` train, ``< 0.9`` valid, else test, so every label gets the
    same expected 80/10/10 proportions.
    """
    u = int.from_bytes(hashlib.sha1(track_id.encode()).digest(), "big") / 2**160
    return "train" if u < fractions[0] else "valid" if u < fractions[1] else "test"


def random_split(ids_by_label: dict[str, list[str]], *, seed: int) -> dict[str, str]:
    """Stratified random 80/10/10 split: each label's ids shuffled with ``seed`` and cut in order.

    A label with 3 or more tracks keeps at least one in valid and one in test, so small classes are evaluated.
    """
    mapping = {}
    rng = np.random.default_rng(seed)
    for label in sorted(ids_by_label):
        ids = sorted(ids_by_label[label])
        order = rng.permutation(len(ids))
        n_valid = n_test = round(0.1 * len(ids))
        if len(ids) >= 3:
            n_valid, n_test = max(1, n_valid), max(1, n_test)
        n_train = len(ids) - n_valid - n_test
        for rank, i in enumerate(order):
            mapping[ids[i]] = "train" if rank < n_train else "valid" if rank < n_train + n_valid else "test"
    return mapping


def _assign_splits(rows: list[dict], method: str, ids_by_label: dict[str, list[str]], seed: int) -> None:
    """Set each labelled row's ``split`` by ``method`` (gtzan lists, random, or hash); unlabelled rows keep ""."""
    fixed = {"gtzan": load_gtzan_split, "random": lambda: random_split(ids_by_label, seed=seed)}.get(method, dict)()
    for row in rows:
        if row["label"]:
            row["split"] = fixed.get(row["track_id"], "excluded") if fixed else hash_split(row["track_id"])


def _labels_without_train(rows: list[dict]) -> list[str]:
    """Labels of readable tracks none of which is in the train split (a model would never learn them)."""
    labels = {row["label"] for row in rows if row["label"] and row["status"] == "ok"}
    trained = {row["label"] for row in rows if row["split"] == "train" and row["status"] == "ok"}
    return sorted(labels - trained)


def _give_every_label_a_train_track(rows: list[dict]) -> None:
    """A hash split of a small label can miss train: move its track with the lowest hash there, and say so.

    The choice depends on the track ids alone, so it is as stable as the hash split itself.
    """
    for label in _labels_without_train(rows):
        chosen = min((row for row in rows if row["label"] == label and row["status"] == "ok"),
                     key=lambda row: hashlib.sha1(row["track_id"].encode()).digest())
        log.warning("label %s has no train track in the hash split; %s moves from %s to train", label,
                    chosen["track_id"], chosen["split"])
        chosen["split"] = "train"


def _rejected(reason: str) -> dict:
    """The probe columns of a rejected row (no names: a file that does not decode is not a song)."""
    return {"duration_s": 0.0, "sample_rate": 0, "channels": 0, "status": "rejected", "reason": readable_name(reason),
            **dict.fromkeys(NAME_COLUMNS)}


def _probe_row(path: Path) -> dict:
    """The probe and name columns of one file: its audio's format, and the title etc. of its tags."""
    try:
        info = probe_audio(path)
    except (MelsearchError, OSError) as exc:  # OSError: made unreadable since it was listed
        return _rejected(str(exc).removeprefix(f"{path}: ") if isinstance(exc, MelsearchError)
                         else exc.strerror or str(exc))
    return {"duration_s": info.duration_s, "sample_rate": info.sample_rate, "channels": info.channels,
            "status": "ok", "reason": "", **read_file_tags(path).columns()}


def file_identity(path: str | os.PathLike) -> str:
    """What identifies one version of a file: a hash of its resolved path, inode, size, mtime and ctime (ns).

    A symlink is followed (two links to one file are one file); an edited, replaced or moved file is a new one,
    even one of the same size whose mtime was set back (writing or replacing it sets the ctime, which no one can
    set back). Raises OSError when the file cannot be stat'ed.
    """
    real = os.path.realpath(path)
    info = os.stat(real)
    facts = f"\0{info.st_ino}\0{info.st_size}\0{info.st_mtime_ns}\0{info.st_ctime_ns}"
    return hashlib.sha256(os.fsencode(real) + facts.encode()).hexdigest()[:32]


def _read_probe_cache(path: Path | None) -> dict[str, dict]:
    if path is None or not path.is_file():
        return {}
    try:
        return {row.pop("identity"): row for row in pq.read_table(path).to_pylist()}
    except Exception as exc:  # a cache: unreadable means empty
        log.warning("%s: unreadable probe cache, probing every file (%s)", path, exc)
        return {}


def _probe_cached(paths: Sequence[Path], cache_path: Path | None, workers: int | None) -> list[dict]:
    """:func:`_probe_row` of each path, from ``cache_path`` when it knows the file's identity; new probes added.

    A cache written before the name columns existed is probed again once (the names come with the probe).
    """
    cache = {identity: row for identity, row in _read_probe_cache(cache_path).items()
             if all(name in row for name in NAME_COLUMNS)}
    identities = []
    for path in paths:
        try:
            identities.append(file_identity(path))
        except OSError:
            identities.append("")  # a dangling link: probe it, and let the probe say why
    todo = [path for path, identity in zip(paths, identities, strict=True) if identity not in cache]
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        probing = pool.map(_probe_row, todo)
        probed = dict(zip(todo, tqdm(probing, total=len(todo), desc="probing audio", unit="file", disable=None),
                          strict=True))
    log.info("probed %d file(s), %d known from %s", len(todo), len(paths) - len(todo), cache_path)
    if cache_path is not None and todo:
        for path, identity in zip(paths, identities, strict=True):
            if identity and path in probed:
                cache[identity] = probed[path]
        table = pa.Table.from_pylist([{"identity": key, **row} for key, row in sorted(cache.items())])
        with atomic_path(cache_path) as tmp:
            pq.write_table(table, tmp)
    return [probed[path] if path in probed else dict(cache[identity])
            for path, identity in zip(paths, identities, strict=True)]


def build_manifest(
    audio_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    split: str = "auto",
    seed: int = 0,
    workers: int | None = None,
    probe_cache: str | os.PathLike | None = None,
) -> dict:
    """Probe every audio file under ``audio_dir`` and write the manifest Parquet at ``out_path`` (atomically).

    Parameters
    ----------
    audio_dir : folder whose top-level sub-folders are labels; files at its root are unlabelled.
    split : ``gtzan`` (artist-filtered lists; clips outside them ``excluded``), ``random`` (stratified
        80/10/10 with ``seed``), ``hash`` (stable per-track hash), or ``auto``: ``gtzan`` for GTZAN's layout,
        ``hash`` otherwise. Unlabelled files get split ``""``.
    workers : threads probing files (libsndfile releases the GIL); None = all cores.
    probe_cache : a Parquet file of earlier probes by :func:`file_identity`: only files it does not know are
        decoded, and it is extended with them (a library of 5,000 songs plus one probes one).

    Returns
    -------
    Figures: ``{"tracks", "ok", "rejected", "labels", "splits": {name: count}, "layout", "split_method"}``.
    """
    if split not in SPLIT_METHODS:
        raise MelsearchError(f"unknown split method {split!r} (choose from {', '.join(SPLIT_METHODS)})")
    root = Path(audio_dir).resolve()
    listing = scan_audio_folder(root)
    paths = [path for path, _ in listing.files]
    if not paths and not listing.rejected:
        raise MelsearchError(f"{root}: no audio files found (looked for {', '.join(AUDIO_EXTENSIONS)})")
    rels = [p.relative_to(root) for p in paths]
    gtzan = is_gtzan_layout(rels)
    method = ("gtzan" if gtzan else "hash") if split == "auto" else split
    if method == "gtzan" and not gtzan:
        raise MelsearchError(f"{root}: --split gtzan needs GTZAN's layout (<genre>/<genre>.NNNNN.au|wav)")

    probes = _probe_cached(paths, Path(probe_cache) if probe_cache is not None else None, workers)

    found = [*zip(paths, rels, probes, strict=True),
             *((path, path.relative_to(root), _rejected(reason)) for path, reason in listing.rejected)]
    rows, taken = [], set()
    for path, rel, probe in sorted(found, key=lambda item: item[0]):
        track_id = rel.stem if gtzan and is_gtzan_name(rel) else readable_name(rel.as_posix())
        if track_id in taken:  # caf\xe9.wav after café.wav, or blues.00001.wav after blues.00001.au
            track_id = os.fsencode(rel.as_posix()).decode("utf-8", "backslashreplace")
        if track_id in taken:
            probe = _rejected(f"another file has the track id {track_id}; rename one of them")
        taken.add(track_id)
        rows.append({"track_id": track_id, "path": path_to_text(path), "label": _label_of(rel), "split": "",
                     **probe})
        if probe["status"] == "rejected":
            log.warning("rejected %s: %s", readable_name(str(path)), probe["reason"])

    ids_by_label = defaultdict(list)
    for row in rows:
        if row["label"]:
            ids_by_label[row["label"]].append(row["track_id"])
    _assign_splits(rows, method, ids_by_label, seed)
    untrained = _labels_without_train(rows)
    if untrained and method == "gtzan" and split == "auto":
        log.warning("the GTZAN split gives %s no train track here; using the hash split instead",
                    ", ".join(untrained))
        method = "hash"
        _assign_splits(rows, method, ids_by_label, seed)
    if method == "hash":
        _give_every_label_a_train_track(rows)

    write_manifest(rows, out_path)
    ok = [r for r in rows if r["status"] == "ok"]
    splits: dict[str, int] = defaultdict(int)
    for row in ok:
        splits[row["split"] or "unlabelled"] += 1
    return {
        "tracks": len(rows),
        "ok": len(ok),
        "rejected": len(rows) - len(ok),
        "labels": sorted(ids_by_label),
        "splits": dict(sorted(splits.items())),
        "layout": "gtzan" if gtzan else "folder",
        "split_method": method,
        "rejected_files": [{"track_id": r["track_id"], "reason": r["reason"]} for r in rows if r["status"] != "ok"],
    }
