"""Index a library with models trained elsewhere: genre precision@10 of the library's index, then an incremental rerun.

The library is a labelled folder flattened into one unlabelled folder of symlinks (its labels kept aside
to measure with); ``--hold-out`` of its files join it only for the second run, which must decode just those.
Without ``--labelled`` the run has no labelled source: musicnn's pretrained backbone indexes the library
untrained. Prints figures; asserts nothing::

    python bench/library.py --labelled ../shared/sample-audio --library ../shared/emotify-audio --model all
    python bench/library.py --library ../shared/emotify-audio --model musicnn
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.dataset import list_audio_files  # noqa: E402
from pipeline.embeddings import read_embeddings  # noqa: E402
from pipeline.index import genre_precision_at_k, read_index_meta  # noqa: E402

log = logging.getLogger("bench.library")


def flatten(labelled: Path, out: Path, *, hold_out: int) -> tuple[list[Path], dict[str, str]]:
    """Symlinks ``out/<label> <name>`` to every file of ``labelled`` but the last ``hold_out`` (returned)."""
    out.mkdir(parents=True, exist_ok=True)
    files = list_audio_files(labelled)
    held, labels = [], {}
    for index, path in enumerate(files):
        label = path.relative_to(labelled).parts[0]
        link = out / f"{label} {path.name}"  # a space in every name, on purpose
        labels[os.path.realpath(path)] = label
        if index % max(1, len(files) // max(hold_out, 1)) == 0 and len(held) < hold_out:
            held.append(link)
            continue
        link.symlink_to(path.resolve())
    return held, labels


def melsearch(*args: str) -> str:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"melsearch {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    log.info("melsearch %s: %.0f s", args[0], time.perf_counter() - started)
    return result.stdout


def index_precision(workdir: Path, status: dict, labels: dict[str, str]) -> dict[str, float]:
    """Genre precision@10 (leave-one-out, cosine) of each model's library embeddings, with the known labels."""
    figures = {}
    for entry in status["index"]["outputs"]:
        meta = read_index_meta(entry["output"])
        rows, vectors = read_embeddings(workdir / "embeddings" / meta["embeddings_key"] / "embeddings.parquet")
        known = [labels[os.path.realpath(row["path"])] for row in rows]
        figures[entry["model"]] = genre_precision_at_k(vectors, known, k=10)["genre_precision_at_10"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labelled", type=Path, default=None,
                        help="the source the models train on (default: none, for musicnn untrained)")
    parser.add_argument("--library", type=Path, required=True, help="a labelled folder, flattened for the test")
    parser.add_argument("--model", default="all")
    parser.add_argument("--hold-out", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("args", nargs="*", help="more `melsearch run` arguments (after --)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    base = Path(tempfile.mkdtemp(prefix="melsearch-library-"))
    workdir = args.workdir or base / "work"
    library = base / "library"
    held, labels = flatten(args.library, library, hold_out=args.hold_out)
    source = ["--audio-dir", str(args.labelled)] if args.labelled else []
    common = ["--workdir", str(workdir), *source, "--library", str(library), "--model", args.model, *args.args]
    for run in ("first", "second"):
        melsearch("run", *common)
        status = json.loads(melsearch("status", "--json", *common))
        features = [e["figures"] for e in status["features"]["outputs"] if "extracted" in e.get("figures", {})]
        counts = [e["figures"]["count"] for e in status["index"]["outputs"]]
        print(f"{run} run: {len(list(library.iterdir()))} files; features extracted/reused "
              f"{[(f['extracted'], f['reused'], f['failed']) for f in features]}; index counts {counts}")
        print(f"  genre precision@10 (known labels): {json.dumps(index_precision(workdir, status, labels))}")
        for link in held:
            link.symlink_to(os.path.realpath(args.library / link.name.split(' ', 1)[0] / link.name.split(' ', 1)[1]))
        held = []
    query = next(iter(sorted(library.iterdir())))
    print(melsearch("query", "--workdir", str(workdir), str(query), "--top-k", "5"))
    print(f"work directory: {workdir}")


if __name__ == "__main__":
    main()
