"""melsearch: log-mel features, genre CNNs, song embeddings and an Annoy search index.

The library knows nothing of Luigi: each stage is a plain function here, wired by ``tasks/``.
"""

__version__ = "0.1.0"
