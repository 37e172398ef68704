"""What the run is doing now: the stage and the folder it writes. The scripts' edge (cli.run) names them in the one
line that a Ctrl-C, a SIGTERM or a full disk ends a run with, so the user knows where it stopped and that the same
command resumes it."""

_current = {"name": "start-up", "folder": None}


def stage(name: str, folder: str | None = None) -> None:
    """Enters a stage of the run, e.g. stage("fitting factors (lambda)", factors_folder)."""
    _current.update(name=name, folder=folder)


def current() -> dict:
    """{"name": the stage, "folder": the folder it writes, or None}."""
    return dict(_current)
