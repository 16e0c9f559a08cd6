"""The two exception types the entry points print as one paragraph, without a traceback.

`UserError`: a mistake a user can fix (bad flags, files, sizes), found before any compute; exit code 2.
`RunFailed`: a run that had to stop on a fault (a diverged loss, a full disk, a hub down for too long) after saving
what could be saved; exit code 3. Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: the message names the flag or file and what would be valid."""

    exit_code = 2


class RunFailed(Exception):
    """A run stopped by a fault: the message says what happened, what was kept and what to try."""

    exit_code = 3
