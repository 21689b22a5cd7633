"""``melsearch`` (and ``python -m pipeline``): the one command line. One parser with a subcommand per job, one logging
set-up, one error handler that prints one line; each subcommand calls one library or pipeline function.

It lives in ``tasks/`` because ``run`` drives Luigi; the library (``pipeline/``) knows nothing of it, and imports
stay inside the commands, so ``query`` loads neither matplotlib nor the training code.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from models import MODEL_NAMES
from pipeline.errors import MelsearchError
from pipeline.io import atomic_path
from pipeline.layout import STAGES
from pipeline.query import RECOMMEND_RULES, MusicSearch
from pipeline.runtime import quiet_openmp

log = logging.getLogger(__name__)


class _OneLineMelsearchErrors(logging.Filter):
    """Luigi logs a failed task's traceback; for our own errors one line says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], MelsearchError):
            record.msg, record.args, record.exc_info, record.exc_text = str(record.exc_info[1]), (), None, None
        return True


# Loggers whose INFO lines are a run's progress: shown on stderr unless --quiet.
PROGRESS_LOGGERS = ("tasks.progress", "pipeline.train", "pipeline.server")


def _configure_logging(verbose: int, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("luigi-interface").addFilter(_OneLineMelsearchErrors())
    if quiet:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("melsearch: %(message)s"))
    for name in PROGRESS_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(min(level, logging.INFO))
        logger.addHandler(handler)
        logger.propagate = False


def _configure_stages(args: argparse.Namespace) -> list[str]:
    """Apply the command line's stage settings (tasks/ owns the mapping to Luigi) and return the model names."""
    from tasks.config import configure, model_names, settings_from_flags

    flags = {name: getattr(args, name) for name in ("split", "preset", "epochs", "device", "model", "gtzan_url",
                                                    "gtzan_sha256")}
    overrides = settings_from_flags(flags, args.set or [], args.stage_settings)
    configure(overrides)
    return model_names()


def _workdir_arg(parser: argparse.ArgumentParser, text: str = "where every stage writes") -> None:
    # `make run WORKDIR=~/x` passes the tilde through quotes: expand it here (and in every path flag)
    parser.add_argument("--workdir", default="data/work", type=os.path.expanduser,
                        help=f"{text} (default: data/work; s3://BUCKET/PREFIX for a bucket)")


def _source_args(parser: argparse.ArgumentParser) -> None:
    _workdir_arg(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--audio-dir", default="", type=os.path.expanduser,
                        help="folder of audio; sub-folders are labels")
    source.add_argument("--archive", default="", type=os.path.expanduser,
                        help="local genres.tar.gz (or any .tar/.tar.gz/.zip of audio)")
    parser.add_argument("--library", default="", type=os.path.expanduser,
                        help="a folder of music to index (labels optional) with the models trained on the source; "
                             "alone, musicnn's pretrained backbone indexes it untrained")
    parser.add_argument("--model", default=None,
                        help=f"{', '.join(MODEL_NAMES)} or all (default: luigi.cfg [train] model, cifar10); "
                             "musicnn is pretrained: with --library alone it needs no labelled music")
    parser.add_argument("--split", choices=["auto", "gtzan", "random", "hash"], default=None,
                        help="how labelled tracks split into train/valid/test: gtzan (the artist-filtered lists), "
                             "random (stratified 80/10/10), hash (stable per track), auto (gtzan for GTZAN's "
                             "layout, else hash; the default)")
    parser.add_argument("--gtzan-url", action="append", help="mirror to download GTZAN from (repeatable)")
    parser.add_argument("--gtzan-sha256", action="append", help="accepted sha256 of that archive (repeatable)")
    parser.add_argument("--preset", choices=["default", "choi", "musicnn"], default=None,
                        help="log-mel settings (the musicnn model needs musicnn's: chosen for it when unset)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default: luigi.cfg [train] epochs, else 30)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                        help="where training and embedding run (default auto: the GPU when there is one)")
    parser.add_argument("--set", action="append", metavar="SECTION.OPTION=VALUE",
                        help="any stage setting, e.g. --set features.n_mels=96 (repeatable); also written "
                             "--features-n-mels 96. Sections: dataset, features, train, index (see README)")


def cmd_run(args: argparse.Namespace) -> int:
    models = _configure_stages(args)
    from tasks.pipeline import pipeline_status, run_pipeline

    source = {"workdir": args.workdir, "audio_dir": args.audio_dir, "archive": args.archive, "library": args.library,
              "models": models}
    run_pipeline(stage=args.stage, rerun=args.rerun, workers=args.workers, scheduler_url=args.scheduler_url, **source)
    _print_status(pipeline_status(**source), STAGES[: STAGES.index(args.stage) + 1])
    return 0


def _print_status(status: dict, stages: tuple[str, ...] = STAGES) -> None:
    """One line per output: stage, done or missing, path, and the headline figures."""
    from tasks.progress import headline

    for stage in stages:
        for entry in status[stage]["outputs"]:
            brief = headline(entry.get("figures", {}))
            print(f"{stage:<11} {entry['state']:<8} {entry['output']}  {entry.get('problem') or brief}")


def cmd_status(args: argparse.Namespace) -> int:
    models = _configure_stages(args)
    from tasks.pipeline import pipeline_status, recorded_status

    status = None
    if not (args.audio_dir or args.archive or args.library):  # the last run, whatever its source and settings
        status = recorded_status(args.workdir, models=[args.model] if args.model and args.model != "all" else None)
        if status is not None:
            print(f"melsearch: the latest run in {args.workdir} (latest-run.json); give the source flags for another",
                  file=sys.stderr)
    if status is None:
        status = pipeline_status(workdir=args.workdir, audio_dir=args.audio_dir, archive=args.archive,
                                 library=args.library, models=models)
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        _print_status(status)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from pipeline.synth import write_synthetic_dataset

    paths = write_synthetic_dataset(args.out_dir, n_per_class=args.per_class, seconds=args.seconds,
                                    n_classes=args.classes, seed=args.seed, fmt=args.format)
    print(f"wrote {len(paths)} clips to {args.out_dir}")
    return 0


def _classifier(args: argparse.Namespace):
    from pipeline.classifier import GenreClassifier
    from pipeline.layout import WorkDir

    if args.model_dir:
        return GenreClassifier.load(args.model_dir, device=args.device)
    model_dir, why = WorkDir(args.workdir).choose("train", args.model)
    classifier = GenreClassifier.load(model_dir, device=args.device)
    print(f"melsearch: model {model_dir} ({why})", file=sys.stderr)  # stdout stays the results
    return classifier


def cmd_predict(args: argparse.Namespace) -> int:
    classifier = _classifier(args)
    predictions = [classifier.predict(path) for path in args.files]
    if args.json:
        print(json.dumps(predictions, indent=2))
        return 0
    for p in predictions:
        top = sorted(p["probabilities"].items(), key=lambda kv: -kv[1])[:3]
        print(f"{p['path']}\t{p['label']}\t" + "  ".join(f"{label} {prob:.2f}" for label, prob in top))
    return 0


def _vector_path(out: str, song: str) -> Path:
    """Where ``encode --out`` writes: ``out`` itself, or ``out/<song>.npy`` when ``out`` is a folder (or ends in /)."""
    path = Path(out)
    if path.is_dir() or out.endswith(os.sep):
        return path / f"{Path(song).stem}.npy"
    return path


def cmd_encode(args: argparse.Namespace) -> int:
    import numpy as np

    out = _vector_path(args.out, args.file) if args.out else None
    vector = _classifier(args).encode(args.file)
    if out is not None:
        try:
            with atomic_path(out) as tmp, open(tmp, "wb") as handle:  # np.save would append .npy to a bare name
                np.save(handle, vector)
        except OSError as exc:
            raise MelsearchError(f"{out}: cannot write the vector ({exc.strerror or exc})") from exc
        print(f"wrote {vector.shape[0]}-d vector to {out}")
    else:
        print(json.dumps([round(float(v), 6) for v in vector]) if args.json else " ".join(f"{v:.6f}" for v in vector))
    return 0


def cmd_scheduler(args: argparse.Namespace) -> int:
    from tasks.scheduler import scheduler_status, start_scheduler, stop_scheduler

    action = {"start": start_scheduler, "stop": stop_scheduler, "status": scheduler_status}[args.action]
    print(action(args.workdir, port=args.port))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from tasks.config import configure, settings_from_flags
    from tasks.worker import run_worker

    configure(settings_from_flags({}, args.set or []))
    ran = run_worker(args.workdir, args.scheduler_url, args.workers)
    for name, state in ran:
        print(f"{state.lower()}: {name}")
    print(f"melsearch worker: {len(ran)} tasks ran here")
    return 0


def _index_args(parser: argparse.ArgumentParser, *, ranked: bool = True) -> None:
    """Which index to read (and for ranked answers how many and how): what query, recommend, tracks, serve share."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workdir", default="data/work", type=os.path.expanduser,
                       help="work directory: the index its latest run built (default: data/work)")
    where.add_argument("--index-dir", type=os.path.expanduser, help="an explicit index/<model>-<key> folder")
    parser.add_argument("--model", help="in --workdir, the index of this model name")
    if ranked:
        parser.add_argument("--top-k", type=_positive_int, default=10, metavar="K", help="results (default: 10)")
        parser.add_argument("--exact", action="store_true", help="brute-force search instead of Annoy, to compare")
        parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def _tag_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tag", metavar="TAG", help="only songs whose top tags hold TAG (a tagging model's, e.g. "
                        "musicnn's rock, mellow, female vocalists)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _load_search(args: argparse.Namespace, **load: str) -> MusicSearch:
    """The MusicSearch the flags name (a work directory's chosen index, or ``--index-dir``)."""
    return MusicSearch.load(args.index_dir or args.workdir, model=args.model, **load)


def _say_index(search: MusicSearch) -> None:
    """Which index answered and why, on stderr (stdout stays the results)."""
    print(f"melsearch: index {search.index_dir} ({search.chosen_because})", file=sys.stderr)


def _columns(cells: Sequence[Sequence[str]], right: tuple[int, ...] = ()) -> str:
    """Rows of text cells as aligned columns two spaces apart (``right``: right-aligned ones), the last unpadded."""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]) - 1)]
    return "\n".join("  ".join([*(f"{cell:>{width}}" if i in right else f"{cell:<{width}}"
                                   for i, (cell, width) in enumerate(zip(row, widths, strict=False))), row[-1]])
                     for row in cells)


def _song_cells(song: dict) -> tuple[str, str, str]:
    """A song's "artist - title", its label and its top tags, as text cells."""
    from pipeline.tags import display_name

    return display_name(song), song["label"] or "-", ", ".join(song["tags"]) or "-"


def format_table(results: Sequence[dict]) -> str:
    """Results as aligned text columns: rank, song ("artist - title"), label, distance, tags, track id."""
    cells = [("rank", "song", "label", "distance", "tags", "track_id")]
    cells += [(str(r["rank"]), *_song_cells(r)[:2], f"{r['distance']:.4f}", _song_cells(r)[2], r["track_id"])
              for r in results]
    return _columns(cells, right=(0, 3))


def format_tracks(tracks: Sequence[dict]) -> str:
    """Songs as aligned text columns: song ("artist - title"), label, tags, track id."""
    return _columns([("song", "label", "tags", "track_id")] + [(*_song_cells(t), t["track_id"]) for t in tracks])


def _print_results(args: argparse.Namespace, search: MusicSearch, results: list[dict],
                   table: Callable[[Sequence[dict]], str] = format_table) -> int:
    _say_index(search)
    print(json.dumps(results, indent=2) if args.json else table(results))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    search = _load_search(args, model_dir=args.model_dir, device=args.device)
    if args.track is not None:
        return _print_results(args, search, search.query_track(args.track, top_k=args.top_k, exact=args.exact,
                                                               tag=args.tag))
    return _print_results(args, search, search.query_file(args.file, top_k=args.top_k, exact=args.exact,
                                                          tag=args.tag))


def cmd_recommend(args: argparse.Namespace) -> int:
    history = [track.strip() for track in args.history.split(",") if track.strip()]
    search = _load_search(args)
    return _print_results(args, search, search.recommend(history, top_k=args.top_k, rule=args.rule, exact=args.exact,
                                                         tag=args.tag))


def cmd_tracks(args: argparse.Namespace) -> int:
    search = _load_search(args)
    return _print_results(args, search, search.find_tracks(args.text, limit=args.limit, tag=args.tag),
                          table=format_tracks)


def cmd_playlist(args: argparse.Namespace) -> int:
    from pipeline.playlist import format_m3u, history_playlist, seed_playlist, song_path, write_m3u

    if (args.start is None) != (args.end is None):
        raise MelsearchError("a song path needs both ends: --from A --to B")
    search = _load_search(args, model_dir=args.model_dir, device=args.device)
    _say_index(search)
    if args.seed is not None:
        entries = seed_playlist(search, args.seed, args.n, exact=args.exact)
    elif args.history is not None:
        history = [track.strip() for track in args.history.split(",") if track.strip()]
        entries = history_playlist(search, history, args.n, rule=args.rule, exact=args.exact)
    else:
        entries = song_path(search, args.start, args.end, args.n)
    if args.out:
        write_m3u(entries, args.out, relative=args.relative)
        print(f"melsearch: wrote {len(entries)} songs to {args.out}", file=sys.stderr)
    if args.json:
        print(json.dumps(entries, indent=2))
    elif not args.out:
        sys.stdout.write(format_m3u(entries, relative_to="." if args.relative else None))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pipeline.server import serve

    search = _load_search(args, model_dir=args.model_dir, device=args.device)
    _say_index(search)
    options = {name: getattr(args, name) for name in ("host", "port", "top_k", "max_upload_mb") if name in args}
    serve(search, log_level="debug" if args.verbose > 1 else "info", **options)
    return 0


EXAMPLES = """examples:
  melsearch run --library ~/Music --model musicnn    index your music with a pretrained model (no labels needed)
  melsearch serve                                    a page to search and listen: http://127.0.0.1:8000/
  melsearch tracks blues                             the index's songs whose id, title, artist or album holds 'blues'
  melsearch query song.mp3 --top-k 5                 the 5 songs that sound most like a file
  melsearch query --track blues/song.mp3             ... or like a song of the index
  melsearch recommend --history ID,ID,ID             what to play next
  melsearch playlist --seed song.mp3 --out mix.m3u   a playlist of a song and those like it
  melsearch run --audio-dir ~/Music --model all      train the models on your labelled folders
  melsearch status                                   what the last run built, with its figures
  melsearch COMMAND --help                           every option of a command
"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors, as every other error (exit 2, as argparse's)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"melsearch: {message} (see {self.prog} --help)\n")


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="melsearch",
        description="A genre classifier, a vector per song and a 'sounds like' search engine for a music collection.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    common.add_argument("-q", "--quiet", action="store_true",
                        help="no progress lines on stderr (warnings and errors still show)")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the pipeline (Luigi) up to --stage", parents=[common])
    _source_args(run)
    run.add_argument("--stage", choices=STAGES, default="index", help="last stage to run (default: index)")
    run.add_argument("--rerun", choices=STAGES, default=None, help="recompute this stage and everything downstream")
    run.add_argument("--workers", type=int, default=1, help="Luigi workers: tasks run in parallel (default: 1)")
    run.add_argument("--scheduler-url", default=None, help="a luigid to run against, e.g. http://127.0.0.1:8082")
    run.set_defaults(func=cmd_run)

    status = commands.add_parser("status", help="per stage: done or not, outputs, figures", parents=[common])
    _source_args(status)
    status.add_argument("--json", action="store_true", help="print JSON (every figure) instead of a table")
    status.set_defaults(func=cmd_status)

    synth = commands.add_parser("synth", help="write a labelled folder of synthetic clips", parents=[common])
    synth.add_argument("out_dir", help="folder to write <class>/<class>.NNNNN.<format> into")
    synth.add_argument("--per-class", type=int, default=20, help="clips per class (default: 20)")
    synth.add_argument("--seconds", type=float, default=10.0, help="length of each clip (default: 10)")
    synth.add_argument("--classes", type=int, default=6, help="how many classes, up to 6 (default: 6)")
    synth.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same clips")
    synth.add_argument("--format", default="wav", choices=["wav", "flac", "ogg", "mp3"], help="audio format")
    synth.set_defaults(func=cmd_synth)

    for name, func, text in (("predict", cmd_predict, "genre and top-3 probabilities per audio file"),
                             ("encode", cmd_encode, "the embedding vector of one audio file")):
        command = commands.add_parser(name, help=text, parents=[common])
        if name == "predict":
            command.add_argument("files", nargs="+", metavar="FILE", type=os.path.expanduser, help="audio files")
        else:
            command.add_argument("file", metavar="FILE", type=os.path.expanduser, help="an audio file")
            command.add_argument("--out", help="write the vector to this .npy file, or DIR/<song>.npy for a folder "
                                 "(missing folders are made)")
        _workdir_arg(command, "work directory: the model its latest run trained")
        command.add_argument("--model", default=None,
                             help="which trained model (default: the latest run's, else the newest)")
        command.add_argument("--model-dir", default=None, help="an explicit train/<model>-<key> folder")
        command.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs")
        command.add_argument("--json", action="store_true", help="print JSON instead of text")
        command.set_defaults(func=func)

    query = commands.add_parser("query", help="songs that sound like an audio file or a track of the index",
                                parents=[common], description="Songs that sound like an audio file (it need not be "
                                "in the index) or a track of the index; never the query itself.")
    what = query.add_mutually_exclusive_group(required=True)
    what.add_argument("file", nargs="?", metavar="FILE", type=os.path.expanduser,
                      help="audio file (wav, au, mp3, flac, ogg, ...)")
    what.add_argument("--track", metavar="ID", help="a track id of the index (melsearch tracks lists them)")
    _index_args(query)
    _tag_arg(query)
    query.add_argument("--model-dir", help="embed FILE with this model folder (default: the one that built the index)")
    query.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="where FILE is embedded")
    query.set_defaults(func=cmd_query)

    recommend = commands.add_parser("recommend", help="songs to play after a listening history", parents=[common],
                                    description="Songs to play next after a listening history (oldest first), "
                                                "never one of the history.")
    recommend.add_argument("--history", required=True, metavar="ID,ID,...",
                           help="track ids of the index listened to, oldest first, comma-separated")
    recommend.add_argument("--rule", default="merge", choices=RECOMMEND_RULES,
                           help="merge: the 5 nearest of each of the last 10 songs, merged (default, the original "
                                "project's rule); centroid: nearest to the mean of the last 10")
    _index_args(recommend)
    _tag_arg(recommend)
    recommend.set_defaults(func=cmd_recommend)

    tracks = commands.add_parser("tracks", help="the index's songs (names, tags, track ids), filtered by TEXT",
                                 parents=[common], description="The index's songs (artist - title, label, tags, "
                                 "track id): the ids query --track and recommend --history take. With TEXT, those "
                                 "whose id, file name, title, artist or album holds it (any case), those that start "
                                 "with it first.")
    tracks.add_argument("text", nargs="?", default="", metavar="TEXT",
                        help="part of an id, file name, title, artist or album")
    tracks.add_argument("--limit", type=_positive_int, default=None, metavar="N", help="at most N (default: all)")
    tracks.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    _index_args(tracks, ranked=False)
    _tag_arg(tracks)
    tracks.set_defaults(func=cmd_tracks)

    playlist = commands.add_parser(
        "playlist", help="an M3U playlist: a song and those like it, after a history, or a path from A to B",
        parents=[common], description="An extended M3U playlist (#EXTINF: seconds, artist - title) of songs of the "
        "index: a seed and the songs most like it; what to play after a listening history; or a song path of N "
        "songs from A to B, each step close to the last and moving towards B. No song twice.")
    kind = playlist.add_mutually_exclusive_group(required=True)
    kind.add_argument("--seed", metavar="SONG", help="a track id or an audio file: it, then the songs most like it")
    kind.add_argument("--history", metavar="ID,ID,...", help="track ids listened to, oldest first: what to play next")
    kind.add_argument("--from", dest="start", metavar="SONG", help="a song path's first song (id or indexed file)")
    playlist.add_argument("--to", dest="end", metavar="SONG", help="a song path's last song (with --from)")
    playlist.add_argument("--n", type=int, default=10, metavar="N", help="songs in the playlist (default: 10)")
    playlist.add_argument("--out", type=os.path.expanduser, metavar="FILE.m3u",
                          help="write the playlist here (default: print it)")
    playlist.add_argument("--relative", action="store_true",
                          help="paths relative to the playlist's folder (default: absolute)")
    playlist.add_argument("--rule", default="merge", choices=RECOMMEND_RULES, help="--history's rule (as recommend's)")
    playlist.add_argument("--json", action="store_true", help="print the entries as JSON")
    playlist.add_argument("--exact", action="store_true", help="brute-force search instead of Annoy")
    _index_args(playlist, ranked=False)
    playlist.add_argument("--model-dir", help="embed a seed file with this model folder (default: the index's)")
    playlist.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="where a file is embedded")
    playlist.set_defaults(func=cmd_playlist)

    serve = commands.add_parser("serve", help="a web page to search, listen and get recommendations",
                                parents=[common], description="A web page to search the index, listen and get "
                                "recommendations, on 127.0.0.1 (this machine only) unless --host says otherwise.")
    _index_args(serve, ranked=False)
    serve.add_argument("--model-dir", help="embed uploads with this model folder (default: the one that built it)")
    # unset options take serve()'s defaults (pipeline/server.py), which the help repeats
    serve.add_argument("--host", default=argparse.SUPPRESS,
                       help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: all)")
    serve.add_argument("--port", type=_port, default=argparse.SUPPRESS, help="port (default: 8000)")
    serve.add_argument("--top-k", type=_positive_int, default=argparse.SUPPRESS, metavar="K",
                       help="results per query (default: 10)")
    serve.add_argument("--max-upload-mb", type=_positive_float, default=argparse.SUPPRESS, metavar="MB",
                       help="largest upload accepted (default: 50)")
    serve.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="where uploads are embedded")
    serve.set_defaults(func=cmd_serve)

    scheduler = commands.add_parser("scheduler", help="start, stop or check a luigid on 127.0.0.1", parents=[common])
    scheduler.add_argument("action", choices=["start", "stop", "status"], help="what to do with luigid")
    _workdir_arg(scheduler, "its pid file, logs and state go in WORKDIR/scheduler")
    scheduler.add_argument("--port", type=int, default=8082, help="port on 127.0.0.1 (default: 8082)")
    scheduler.set_defaults(func=cmd_scheduler)

    worker = commands.add_parser(
        "worker", help="join a run started elsewhere: take its tasks from luigid until SIGTERM", parents=[common],
        description="A worker for a machine that joins runs started elsewhere: it takes from luigid the pending "
        "feature shards, library parts and vector batches of WORKDIR's runs, whichever machine listed them, "
        "until SIGTERM or SIGUSR1, then finishes its running tasks and prints those it ran. Their parameters carry "
        "the run's settings; the stages themselves stay with the melsearch run processes.")
    _workdir_arg(worker, "the runs' work directory, as they name it")
    worker.add_argument("--scheduler-url", required=True, help="the luigid of the runs, e.g. http://10.0.0.5:8082")
    worker.add_argument("--workers", type=_positive_int, default=1, help="tasks run at once (default: 1)")
    worker.add_argument("--set", action="append", metavar="SECTION.OPTION=VALUE",
                        help="this machine's own settings, e.g. --set features.processes=4 (repeatable)")
    worker.set_defaults(func=cmd_worker)
    return parser


def entry() -> NoReturn:
    """The ``melsearch`` command: :func:`main`, then exit with its status.

    The cyclic collector is frozen first: CPython's exit would otherwise walk every object that torch, Luigi and
    matplotlib made, 0.6 s on a 2-core machine (0.1 s frozen), a third of a cold ``query``. Every output is
    written and closed by then, and ``atexit`` handlers still run.
    """
    code = main()
    gc.freeze()
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line), run the command; 0, or 1 with one line on stderr."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_openmp()  # before torch loads: a forward pass's threads must not spin when another program holds a core
    if any(arg.startswith("s3://") for arg in argv):  # luigi.cfg may name the endpoint
        from tasks.config import export_s3_endpoint

        export_s3_endpoint()
    parser = build_parser()
    args, args.stage_settings = parser.parse_known_args(argv)
    if args.stage_settings and args.func not in (cmd_run, cmd_status):
        parser.error(f"unrecognized arguments: {' '.join(args.stage_settings)}")
    _configure_logging(args.verbose, args.quiet or getattr(args, "json", False))
    try:
        return args.func(args)
    except MelsearchError as exc:
        print(f"melsearch: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("melsearch: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `melsearch ... | head`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error as Python flushes at exit
        return 141
