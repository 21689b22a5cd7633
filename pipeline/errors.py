"""The one error type the library raises for bad input or bad state."""


class MelsearchError(Exception):
    """A problem the user can fix: the message names the file or value and what is wrong.

    The CLI prints it as one line on stderr and exits non-zero; it never shows a traceback.
    """
