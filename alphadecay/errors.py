"""The one exception type for mistakes a user can fix (bad flags, files, sizes).

`torchrun_main.py` prints a `UserError` as a one-paragraph message without a traceback and exits with code 2.
Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: the message names the flag or file and what would be valid."""
