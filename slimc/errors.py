"""Errors that reach the user.

slimc separates two kinds of failure, as compilers do: a *user error* (bad input, bad option,
a model that cannot be captured) gets a one-paragraph message that names the problem and the
fix, and exit code 2; anything else is an internal error (exit code 1) and keeps its traceback
for a bug report. Raising :class:`UsageError` is how any layer, including a plugin, says
"this is the user's to fix".
"""

from __future__ import annotations


class SlimcError(Exception):
    """Base class of every error slimc raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} {self.hint}"
        return self.message


class UsageError(SlimcError):
    """The user asked for something that cannot be done as asked (exit code 2)."""

    exit_code = 2


class CaptureError(UsageError):
    """``torch.export`` could not capture the model."""


class LoweringError(SlimcError):
    """TVM could not import or build the captured graph."""


class VerificationError(SlimcError):
    """A transformed IR or a built artifact disagrees with the model it came from.

    This is never downgraded to a warning: a wrong artifact is worse than no artifact.
    """


class PluginError(SlimcError):
    """A plugin misbehaved (bad registration, exception inside a hook)."""


class PluginFailure(UsageError, PluginError):
    """A third-party plugin failed while slimc used it (exit code 2: the fix is the plugin's
    or the user's choice to leave it out, not slimc's); the message names the plugin."""
