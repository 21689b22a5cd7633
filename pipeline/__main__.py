"""``python -m pipeline``: the ``melsearch`` command (:mod:`tasks.cli`)."""

import sys

from tasks.cli import main

sys.exit(main())
