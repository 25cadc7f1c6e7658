"""One exception type for every bad input, and one way to warn: both one line, no traceback."""
import sys


class DyheadError(Exception):
    """A user-facing error; the message names the file, key or value at fault."""


def warn(message: str) -> None:
    """A one-line warning on stderr for input that is used but not as given (e.g. boxes dropped)."""
    print(f"dyhead: warning: {message}", file=sys.stderr, flush=True)
