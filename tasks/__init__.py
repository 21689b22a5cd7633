"""Luigi tasks, one per stage, plus the whole-pipeline wrapper (``luigi --module tasks Pipeline ...``).

A Luigi program finds tasks by name among the classes defined so far, so when Luigi is already loaded (the
``luigi`` command, a worker, a script that imported it) every task module is imported here. Otherwise the
classes load on first use: ``melsearch query`` or ``encode`` start without Luigi (0.2-0.4 s of imports).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

_MODULE_OF = {"Dataset": "tasks.dataset", "DownloadGTZAN": "tasks.dataset", "Features": "tasks.features",
              "FeatureShard": "tasks.features", "Train": "tasks.train", "Pretrained": "tasks.train",
              "CompareModels": "tasks.train", "Embeddings": "tasks.search", "Index": "tasks.search",
              "Pipeline": "tasks.pipeline"}
__all__ = list(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'tasks' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)


if "luigi" in sys.modules:
    for _name in _MODULE_OF:
        __getattr__(_name)
