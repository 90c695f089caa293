"""The one exception type for bad input.

Anything a user can get wrong (a malformed file, a wrong flag, a corrupt
checkpoint, an empty corpus) raises `MinidpoError` with a single line that says
what is wrong and where (``path:line`` or ``--flag``). The CLI turns it into
``minidpo: error: <message>`` on stderr and exit code 2; library callers can
catch it. Programming errors are left as ordinary exceptions with tracebacks.

Two helpers keep that promise where the message is not written here: `one_line`
(a message that echoes a 1 MB prompt is cut to a readable line) and `out_of_memory`
(an allocation that failed because a size was too large is bad input too, not a bug).
"""

from __future__ import annotations

import re


class MinidpoError(Exception):
    """Bad input, reported as one line naming what and where; exit code 2 in the CLI."""

    exit_code = 2


# The longest error line printed: enough for two paths and a sentence, not a pasted file.
MAX_LINE = 400


def one_line(message: str, limit: int = MAX_LINE) -> str:
    """`message` on one line (newlines as spaces), its middle cut when longer than `limit`
    characters: the start (what and where) and the end (why) stay, with the count cut."""
    text = " ".join(str(message).split("\n"))
    if len(text) <= limit:
        return text
    keep = (limit - 40) // 2
    return f"{text[:keep]}...[{len(text) - 2 * keep:,} characters cut]...{text[-keep:]}"


_NO_MEMORY = re.compile(r"can't allocate memory|out of memory|Unable to allocate", re.IGNORECASE)
_ASKED = re.compile(r"allocate (\d+) bytes|allocate ([\d.]+ ?[KMGTP]i?B)")


def out_of_memory(e: BaseException) -> str | None:
    """How much an allocation that failed asked for ("745 GiB"; "" when not said), or None
    when `e` is not a failed allocation (NumPy's MemoryError, torch's allocator or CUDA
    out-of-memory RuntimeError)."""
    if not isinstance(e, (MemoryError, RuntimeError)):
        return None
    text = str(e)
    if not isinstance(e, MemoryError) and not _NO_MEMORY.search(text):
        return None
    m = _ASKED.search(text)
    if m is None:
        return ""
    return f"{int(m[1]) / 2**30:,.0f} GiB" if m[1] else m[2].replace(". ", " ")
