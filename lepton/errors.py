"""User-facing errors.

A ``LeptonError`` is a problem with the user's input or environment that the CLI prints as one line
(no traceback) before exiting non-zero. Anything else escaping to the CLI is a bug and keeps its
traceback.
"""


class LeptonError(Exception):
    """An error whose message is complete and actionable on its own (it names the file, field, row)."""


class SpecError(LeptonError):
    """The job spec is malformed or names something that does not exist."""


class DataError(LeptonError):
    """The data set cannot be read or does not fit the spec."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of ``exc``'s message, or its type name when it has none: the part of
    a library's (or the user's code's) error worth quoting in a one-line ``LeptonError``."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
