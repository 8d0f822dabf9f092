"""Errors meant for a person: one line that names the node, tensor, file or limit at fault."""

from __future__ import annotations


class HilcError(Exception):
    """A failure caused by the user's input or environment, reported as one line.

    ``exit_code`` 2 is for usage and input errors (the CLI's contract); other codes are for
    failures discovered later (for example 1 for a bit-exactness check that failed).
    """

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UnsupportedModelError(HilcError):
    """The model uses operators or attributes hilc cannot compile."""
