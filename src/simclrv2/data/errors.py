"""The exception types the data layer raises for user-fixable problems.

Missing folders, mismatched class lists, bad subset fractions or unknown entries in a
labelled-image list are mistakes in the user's input, not bugs. Raising a single
``ValueError`` subclass lets the command-line layer catch them and print the message
without a traceback, while library users can still catch plain ``ValueError``.
"""

from __future__ import annotations

__all__ = ["DataError", "MissingSplitError"]


class DataError(ValueError):
    """A dataset, folder or subset specification that cannot be used as given."""


class MissingSplitError(DataError, FileNotFoundError):
    """The requested split does not exist (e.g. an image folder without ``val``/``test``).

    Also a ``FileNotFoundError`` so callers that treat an absent evaluation split as
    optional can catch it as such, while it remains a :class:`DataError` for the CLI.
    """
