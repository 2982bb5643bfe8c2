"""Errors a user can fix. The CLI prints their message as one line and exits 2."""


class GptexpError(Exception):
    """Bad input that the user can fix; the message says what is wrong and how to fix it."""


class RunFailed(Exception):
    """A run ended FAILED for a cause outside the code (disk full, a folder turned read-only):
    the CLI prints the message, which names the file and what to do, as one line and exits 1."""


class CorpusError(GptexpError, ValueError):
    """A corpus that cannot be used: missing, empty, not UTF-8, wrong checksum, too short.

    Also a ValueError: where the book's code fails on such data (or returns NaN), it fails with a
    ValueError, and code written against the book catches that.
    """


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so runs end KILLED, like KeyboardInterrupt for Ctrl-C."""


INTERRUPTS = (KeyboardInterrupt, Terminated)


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an error's message, at most `limit` characters (its type's name when empty):
    third-party errors (torch, safetensors, SQLAlchemy) span many lines, our messages one."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
