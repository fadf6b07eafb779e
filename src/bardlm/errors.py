"""The library's own error type.

Every mistake a user can make (a bad config, a missing file, an unknown character) raises
`BardlmError` with one line that names the problem and the fix. The CLI prints that line and
exits non-zero; anything else escaping is a bug in bardlm.
"""

from __future__ import annotations


class BardlmError(Exception):
    """A user-facing error: the message is one line naming the problem and the fix."""


class Interrupted(BardlmError):
    """Ctrl-C or SIGTERM stopped a run after it saved: not a failure. The message says how to
    continue; the CLI prints it as a note (not `error:`) and exits 130, as after Ctrl-C."""
