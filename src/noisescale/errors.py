"""Errors that the CLI turns into a clear message and exit code 2."""

from __future__ import annotations


class NoiseScaleInputError(ValueError):
    """Bad input from the user: the message says what was wrong and what to do.

    The command-line front end prints the message and exits with code 2; library callers can catch
    it as a ``ValueError``.
    """


class UnsupportedModuleError(NoiseScaleInputError):
    """A module whose per-example gradient norms noisescale cannot compute exactly."""


class GradientsChangedError(NoiseScaleInputError):
    """``.grad`` was changed in place (clipped, rescaled) between the last backward pass and
    ``tracker.step()``: the step is refused (a callback names its own fix)."""
