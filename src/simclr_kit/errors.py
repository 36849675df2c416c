"""The one exception type that the command line turns into a single line on stderr and exit 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a path, a flag, a dataset or a checkpoint that cannot be used.

    The message is one line that says what is wrong and what to do about it.
    """
