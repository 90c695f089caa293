"""The one exception type for bad input.

Anything a user can get wrong (a malformed file, a wrong flag, a corrupt
checkpoint, an empty corpus) raises `MinidpoError` with a single line that says
what is wrong and where (``path:line`` or ``--flag``). The CLI turns it into
``minidpo: error: <message>`` on stderr and exit code 2; library callers can
catch it. Programming errors are left as ordinary exceptions with tracebacks.
"""

from __future__ import annotations


class MinidpoError(Exception):
    """Bad input, reported as one line naming what and where; exit code 2 in the CLI."""

    exit_code = 2
