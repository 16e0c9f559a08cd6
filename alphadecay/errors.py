"""The exception types that end a run with a one-paragraph message instead of a traceback.

The entry points (`torchrun_main.py`, `vit_main.py`, the evaluation and ESD command lines) print a `UserError` as
`error: <message>` and exit with its `exit_code`. Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: the message names the flag or file and what would be valid."""

    exit_code = 2


class RunFault(UserError):
    """The run's environment stopped it (a save that could not be written, a hub that stayed down): the message says
    what failed, what was kept (the checkpoints) and how to continue. Exit code 1."""

    exit_code = 1


class HubUnavailable(RunFault):
    """Streamed training data could not be read for longer than --hub_retry_seconds. Exit code 75 (EX_TEMPFAIL: try
    again later), so a job script can tell an outage it should resubmit from a mistake it should not."""

    exit_code = 75


class RunDiverged(RunFault):
    """The loss or the gradient norm stopped being finite (--nonfinite): the message names the update, the last
    checkpoint and what to try. Exit code 3, so a job script can tell a diverged run (change something before
    resuming) from an outage."""

    exit_code = 3
