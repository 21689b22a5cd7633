"""Luigi tasks, one per stage, plus the whole-pipeline wrapper (``luigi --module tasks ...``)."""
