"""The library behind the scripts: one module per concern (see README.md, "Layout").

Only `cli` (and what it needs: errors, failpoints, progress, results, scores; numpy at most) is light to import: the
scripts parse their flags with it before they import torch, so --help and argument errors answer at once.
"""
