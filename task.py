"""The kronfluence `Task` for GLUE (what loss the factors approximate and what the scores measure): the code is in
glue_attribution/task.py; this file keeps its names where the scripts have always found them, `from task import
GlueTask`."""

from glue_attribution.task import *  # noqa: F403
