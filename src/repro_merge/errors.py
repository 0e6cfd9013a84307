"""Errors the CLI turns into one-line messages and distinct exit codes.

Every error names the file it is about, so a user learns what is wrong before hours of work are spent.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug: an uncaught exception with a trace
EXIT_BAD_INPUT = 2  # bad usage or unusable input (same code argparse uses for usage errors)
EXIT_INPUT_MISMATCH = 3  # an input's hash is not the published one
EXIT_OUTPUT_MISMATCH = 4  # an output's hash is not the published one
EXIT_NOT_VERIFIABLE = 5  # built, but the published hash is TBA: never reported as a pass


class ReproMergeError(Exception):
    """Base of every expected failure; ``str()`` is the whole one-line message."""

    exit_code = EXIT_BAD_INPUT


class BadInputError(ReproMergeError):
    """An input file or folder cannot be used as given (missing, malformed, inconsistent)."""


class OutputExistsError(ReproMergeError):
    """The output folder already holds files we would not overwrite."""
