"""The query helper's command lines: ``python -m pipeline.query`` / ``melsearch query`` and ``melsearch recommend``.

Both print a table (or ``--json``: a list of ``{"rank", "track_id", "label", "distance", "path"}``) on stdout,
the index they searched and why on stderr, and one line with exit 1 on any error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from pipeline.errors import MelsearchError
from pipeline.query import RECOMMEND_RULES, MusicSearch


def format_table(results: Sequence[dict]) -> str:
    """Results as aligned text columns: rank, track id, label, distance, path."""
    header = ("rank", "track_id", "label", "distance", "path")
    cells = [header] + [
        (str(r["rank"]), r["track_id"], r["label"] or "-", f"{r['distance']:.4f}", r["path"]) for r in results
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(4)]
    lines = []
    for row in cells:
        lines.append(
            f"{row[0]:>{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]:>{widths[3]}}  {row[4]}"
        )
    return "\n".join(lines)


def _index_args(parser: argparse.ArgumentParser) -> None:
    """Which index to search, and how to print: the options both commands share."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workdir", default="data/work",
                       help="work directory: the index its latest run built (default: data/work)")
    where.add_argument("--index-dir", help="an explicit index/<model>-<key> folder")
    parser.add_argument("--model", help="in --workdir, the index of this model name")
    parser.add_argument("--top-k", type=int, default=10, metavar="K", help="results (default: 10)")
    parser.add_argument("--exact", action="store_true", help="brute-force search instead of Annoy, for comparison")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="melsearch query", description="Songs that sound like an audio file or a track of the index."
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("file", nargs="?", metavar="FILE", help="audio file (wav, au, mp3, flac, ogg, ...)")
    what.add_argument("--track", metavar="ID", help="a track id of the index (e.g. blues.00012)")
    _index_args(parser)
    parser.add_argument("--model-dir", help="embed FILE with this model folder (default: the one that built the index)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="where FILE is embedded")
    return parser


def build_recommend_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="melsearch recommend",
        description="Songs to play next after a listening history (oldest first), never one of the history.",
    )
    parser.add_argument("--history", required=True, metavar="ID,ID,...",
                        help="track ids of the index listened to, oldest first, comma-separated")
    parser.add_argument("--rule", default="merge", choices=RECOMMEND_RULES,
                        help="merge: the 5 nearest of each of the last 10 songs, merged (default, the original "
                             "project's rule); centroid: nearest to the mean of the last 10")
    _index_args(parser)
    return parser


def build_tracks_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="melsearch tracks",
        description="The index's songs (track id, label, file), those whose id or file name holds TEXT first: "
                    "the ids query --track and recommend --history take.",
    )
    parser.add_argument("text", nargs="?", default="", metavar="TEXT", help="part of an id or file name (any case)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="at most N songs (default: all)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workdir", default="data/work",
                       help="work directory: the index its latest run built (default: data/work)")
    where.add_argument("--index-dir", help="an explicit index/<model>-<key> folder")
    parser.add_argument("--model", help="in --workdir, the index of this model name")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    return parser


def format_tracks(tracks: Sequence[dict]) -> str:
    """Songs as aligned text columns: track id, label, path."""
    cells = [("track_id", "label", "path")] + [(t["track_id"], t["label"] or "-", t["path"]) for t in tracks]
    widths = [max(len(row[i]) for row in cells) for i in range(2)]
    return "\n".join(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]}" for row in cells)


def _answer(args: argparse.Namespace, search_with: Callable[[MusicSearch], list[dict]],
            table: Callable[[Sequence[dict]], str] = format_table, **load: str) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        search = MusicSearch.load(args.index_dir or args.workdir, model=args.model, **load)
        results = search_with(search)
    except MelsearchError as exc:
        print(f"melsearch: {exc}", file=sys.stderr)
        return 1
    print(f"melsearch: index {search.index_dir} ({search.chosen_because})", file=sys.stderr)  # stdout: the results
    print(json.dumps(results, indent=2) if args.json else table(results))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.query`` (and ``melsearch query``): print the neighbours; 1 with one line on errors."""
    args = build_parser().parse_args(argv)

    def neighbours(search: MusicSearch) -> list[dict]:
        if args.track is not None:
            return search.query_track(args.track, top_k=args.top_k, exact=args.exact)
        return search.query_file(args.file, top_k=args.top_k, exact=args.exact)

    return _answer(args, neighbours, model_dir=args.model_dir, device=args.device)


def recommend_main(argv: Sequence[str] | None = None) -> int:
    """``melsearch recommend``: print what to play after ``--history``; 1 with one line on errors."""
    args = build_recommend_parser().parse_args(argv)
    history = [track.strip() for track in args.history.split(",") if track.strip()]
    return _answer(args, lambda search: search.recommend(history, top_k=args.top_k, rule=args.rule,
                                                         exact=args.exact))


def tracks_main(argv: Sequence[str] | None = None) -> int:
    """``melsearch tracks``: print the index's songs, filtered by TEXT; 1 with one line on errors."""
    args = build_tracks_parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        print(f"melsearch: --limit must be at least 1, got {args.limit}", file=sys.stderr)
        return 1
    return _answer(args, lambda search: search.find_tracks(args.text, limit=args.limit), table=format_tracks)
