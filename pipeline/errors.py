"""The one error type the library raises for bad input or bad state, and the kinds callers tell apart."""


class MelsearchError(Exception):
    """A problem the user can fix: the message names the file or value and what is wrong.

    The CLI prints it as one line on stderr and exits non-zero; it never shows a traceback.
    """


class DiskFullError(MelsearchError):
    """A write failed for want of disk space: the message names the path; freeing space and running again completes."""


class UndecodableAudioError(MelsearchError):
    """A file that no installed decoder reads as audio: the message names it and gives the decoders' reasons."""
