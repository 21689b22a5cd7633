"""``python -m pipeline``: the ``melsearch`` command (:mod:`tasks.cli`)."""

from tasks.cli import entry

entry()
