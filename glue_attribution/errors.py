"""The library's error types. Library code raises them; only the scripts' edge (`cli.run`) turns them into one line
on stderr and an exit status, so that a user error never ends in a traceback and a caller can catch what it expects.
"""


class GlueError(Exception):
    """Bad input (flags, files, data) or a result on disk that cannot be used; the message names the fix."""


class ResultMissing(GlueError):
    """The result has not been published (or was never finished)."""


class ResultDamaged(GlueError):
    """The result is there but fails verification: truncated, corrupt, or its metadata is unreadable."""


class Terminated(BaseException):
    """SIGTERM (what kill, SLURM and timeout send), raised like KeyboardInterrupt for SIGINT: the run unwinds (locks
    released, nothing half-published) and the scripts' edge ends it in one line. A BaseException, so that no
    `except Exception` on the way swallows it."""
