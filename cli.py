"""Command-line plumbing shared by the four scripts: user errors as one line, argument types."""

import argparse
import sys


class UserError(Exception):
    """Bad input from the command line or the file system: reported as one line, no traceback."""


def cli(main):
    """Run a script's `main`, turning a `UserError` into one line on stderr and exit status 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def positive_int(value: str) -> int:
    """argparse type for sizes and counts: a batch of 0 or -1 examples is a typo, caught before any work."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{value}'") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {number}")
    return number
