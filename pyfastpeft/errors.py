"""The error type of bad user input (flags, config files, data, adapter folders, checkpoints).

``UserError`` is a ``ValueError``, so library callers that catch ``ValueError`` keep working; the
command line turns it (and only it, plus a missing or unwritable user path) into one
``pyfastpeft: error: ...`` line with exit status 2. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Input the user gave cannot be used; the message names the flag, key or file and what was expected."""
