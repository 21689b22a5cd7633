"""Finding built artifacts in a work directory (``<workdir>/<stage>/<name>-<key>/``) for predict, encode, query."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import MelsearchError


def find_artifact(workdir: str | os.PathLike, stage: str, marker: str, *, model: str | None = None) -> Path:
    """The most recently finished ``<workdir>/<stage>/<model>-<key>/`` folder holding ``marker``.

    ``model`` restricts the search to that model's folders. A folder counts only when ``marker`` (the
    file its stage writes last) exists, so an interrupted run is never picked.
    """
    pattern = f"{model}-*/{marker}" if model else f"*/{marker}"
    found = sorted(Path(workdir, stage).glob(pattern), key=lambda p: p.stat().st_mtime_ns)
    if not found:
        what = f"{model} " if model else ""
        raise MelsearchError(f"{Path(workdir, stage)}: no finished {what}{stage} here (run the pipeline first)")
    return found[-1].parent


def find_model_dir(workdir: str | os.PathLike, model: str | None = None) -> Path:
    """The newest trained model folder (``models/<model>-<key>/`` with ``metrics.json``)."""
    return find_artifact(workdir, "models", "metrics.json", model=model)


def find_index_dir(workdir: str | os.PathLike, model: str | None = None) -> Path:
    """The newest built index folder (``index/<model>-<key>/`` with ``meta.json``)."""
    return find_artifact(workdir, "index", "meta.json", model=model)
