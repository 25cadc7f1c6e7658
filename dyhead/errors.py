"""One exception type for every bad input: the CLI prints its message as one line, no traceback."""


class DyheadError(Exception):
    """A user-facing error; the message names the file, key or value at fault."""
