"""Failpoints: named places where a test can kill the process, as databases ship them, to prove that a run killed
there publishes nothing half-written and resumes exactly.

    GLUE_KILL_AT=before_lambda python analyze.py ...      # SIGKILL on reaching `failpoint("before_lambda")`
    GLUE_KILL_AT=lds_run_saved:3 python evaluate_lds.py build ...   # ... on its third pass

A SIGKILL runs no cleanup, as a real kill (OOM killer, a lost node). With GLUE_KILL_AT unset a failpoint does nothing.
"""

import os
import signal

ENV = "GLUE_KILL_AT"
_passes = {}


def failpoint(name: str) -> None:
    """SIGKILL this process at `name` when GLUE_KILL_AT names it, or at its N-th pass with GLUE_KILL_AT=name:N."""
    target, _, count = os.environ.get(ENV, "").partition(":")
    if target == name:
        _passes[name] = _passes.get(name, 0) + 1
        if _passes[name] == int(count or 1):
            os.kill(os.getpid(), signal.SIGKILL)
