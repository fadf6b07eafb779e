"""The library's own error type.

Every mistake a user can make (a bad config, a missing file, an unknown character) raises
`BardlmError` with one line that names the problem and the fix. The CLI prints that line and
exits non-zero; anything else escaping is a bug in bardlm.
"""

from __future__ import annotations


class BardlmError(Exception):
    """A user-facing error: the message is one line naming the problem and the fix."""
