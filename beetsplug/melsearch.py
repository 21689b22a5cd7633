"""melsearch as a beets plugin: ``beet melsearch`` indexes the library's songs, ``beet similar QUERY`` lists the
items that sound most like the first item matching QUERY (never that item itself).

In beets' config.yaml::

    plugins: melsearch
    melsearch:
        workdir: ~/.local/share/melsearch-beets   # default: <beets config folder>/melsearch
        model: musicnn                             # pretrained: needs no labelled music

The library's items may live anywhere (not only under beets' ``directory``): ``beet melsearch`` keeps a folder of
links to them, ``<workdir>/beets-items/<item id>-<file name>``, and runs melsearch's library pipeline on it (a
song already indexed is not embedded again), so each track id names its beets item.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from beets import config
from beets.plugins import BeetsPlugin
from beets.ui import Subcommand, UserError, print_

# under the work directory: one link per beets item
LINKS = "beets-items"


class MelsearchPlugin(BeetsPlugin):
    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self.config.add({"workdir": os.path.join(config.config_dir(), "melsearch"), "model": "musicnn"})

    def commands(self) -> list[Subcommand]:
        index = Subcommand("melsearch", help="index the library's songs (those matching QUERY) for 'beet similar'")
        index.parser.usage += " [QUERY]"
        index.func = self._index
        similar = Subcommand("similar", help="the items that sound most like the first item matching QUERY")
        similar.parser.usage += " QUERY"
        similar.parser.add_option("-n", "--number", type="int", default=10, help="how many items (default: 10)")
        similar.parser.add_path_option()  # -p, and -f FORMAT, as `beet ls` has them
        similar.parser.add_format_option(target="item")
        similar.func = self._similar
        return [index, similar]

    def _workdir(self) -> Path:
        return Path(self.config["workdir"].as_filename())

    def _index(self, lib, _opts, args: list[str]) -> None:
        from pipeline.errors import MelsearchError
        from tasks.config import configure, model_names, settings_from_flags
        from tasks.pipeline import run_pipeline

        workdir = self._workdir()
        items = list(lib.items(args))
        if not items:
            raise UserError("melsearch: no items to index")
        try:
            links = sync_links(workdir / LINKS, [(item.id, os.fsdecode(item.path)) for item in items])
        except OSError as exc:
            raise UserError(f"melsearch: {workdir / LINKS}: cannot link the library's songs there "
                            f"({exc.strerror or exc})") from exc
        _show_progress()
        try:
            configure(settings_from_flags({"model": self.config["model"].as_str()}))
            run_pipeline(workdir=str(workdir), library=str(links), models=model_names())
        except MelsearchError as exc:
            raise UserError(f"melsearch: {exc}") from exc
        print_(f"melsearch: {len(items)} items indexed in {workdir}")

    def _similar(self, lib, opts, args: list[str]) -> None:
        from pipeline.errors import MelsearchError
        from pipeline.query import MusicSearch

        if opts.number < 1:
            raise UserError("melsearch: -n must be at least 1")
        seed = lib.items(args).get()
        if seed is None:
            raise UserError(f"melsearch: no item matches {' '.join(args)!r}")
        if not (self._workdir() / LINKS).is_dir():
            raise UserError(f"melsearch: nothing indexed in {self._workdir()} yet: run 'beet melsearch' first")
        try:
            search = MusicSearch.load(self._workdir(), model=self.config["model"].as_str())
            track_of = {item_id_of(row["track_id"]): row["track_id"] for row in search.tracks()}
            if seed.id not in track_of:
                raise UserError(f"melsearch: {format(seed)} is not indexed yet: run 'beet melsearch'")
            shown = 0
            # ask for a few more: items removed from beets since indexing are skipped
            for hit in search.query_track(track_of[seed.id], top_k=opts.number + 10):
                item = lib.get_item(item_id_of(hit["track_id"]))
                if item is None or item.id == seed.id:
                    continue
                print_(format(item))
                shown += 1
                if shown == opts.number:
                    break
        except MelsearchError as exc:
            raise UserError(f"melsearch: {exc}") from exc


def _show_progress() -> None:
    """The run's progress lines on stderr, as ``melsearch run`` shows them (beets sets up only its own logger)."""
    progress = logging.getLogger("tasks.progress")
    if not progress.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("melsearch: %(message)s"))
        progress.addHandler(handler)
        progress.setLevel(logging.INFO)
        progress.propagate = False


def item_id_of(track_id: str) -> int | None:
    """The beets item id a track id of the links folder names (``12-song.mp3``, ``12.mp3`` -> 12), None for
    another id."""
    found = re.match(r"(\d+)[-.]", Path(track_id).name)
    return int(found.group(1)) if found else None


def sync_links(folder: Path, items: list[tuple[int, str]]) -> Path:
    """Make ``folder`` hold exactly one link ``<id>-<file name>`` to each ``(item id, path)``; return it.

    Links that name the same file stay untouched (the pipeline then knows every song); links of items removed,
    moved or renamed since go.
    """
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {_link_name(item_id, path): path for item_id, path in items}
    for entry in os.scandir(folder):
        if entry.name not in wanted or not entry.is_symlink() or os.readlink(entry.path) != wanted[entry.name]:
            os.unlink(entry.path)
    for name, path in wanted.items():
        if not os.path.lexists(folder / name):
            os.symlink(path, folder / name)
    return folder


def _link_name(item_id: int, path: str) -> str:
    """``<id>-<file name>``, or ``<id>.<ext>`` where that would be longer than a file name may be (255 bytes)."""
    name = f"{item_id}-{os.path.basename(path)}"
    return name if len(os.fsencode(name)) <= 255 else f"{item_id}{os.path.splitext(path)[1]}"
