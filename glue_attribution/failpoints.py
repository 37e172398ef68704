"""Failpoints: named places where a test can kill the process or fail a write, as databases ship them, to prove that
a run stopped there publishes nothing half-written and resumes exactly.

    GLUE_KILL_AT=before_lambda python analyze.py ...       # SIGKILL on reaching `failpoint("before_lambda")`
    GLUE_KILL_AT=lds_run_saved:3 python evaluate_lds.py build ...    # ... on its third pass
    GLUE_KILL_AT=before_lambda GLUE_KILL_SIGNAL=INT ...    # Ctrl-C there instead (TERM: what kill and SLURM send)
    GLUE_FAIL_AT=before_lambda ...                         # a full disk there: OSError(ENOSPC)

A SIGKILL runs no cleanup, as a real kill (OOM killer, a lost node). With neither variable set a failpoint does nothing.
"""

import errno
import os
import signal

_passes = {}


def _reached(variable: str, name: str) -> bool:
    target, _, count = os.environ.get(variable, "").partition(":")
    if target != name:
        return False
    _passes[variable, name] = _passes.get((variable, name), 0) + 1
    return _passes[variable, name] == int(count or 1)


def failpoint(name: str) -> None:
    """At `name`: the signal GLUE_KILL_SIGNAL (default KILL) to this process when GLUE_KILL_AT names it (or at its
    N-th pass with name:N); OSError(ENOSPC) when GLUE_FAIL_AT does."""
    if _reached("GLUE_KILL_AT", name):
        os.kill(os.getpid(), signal.Signals[f"SIG{os.environ.get('GLUE_KILL_SIGNAL', 'KILL')}"])
    if _reached("GLUE_FAIL_AT", name):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
