"""Errors a user can meet and fix.

Every :class:`LeukoError` carries one sentence that names the file (or setting) at fault and says
what to do. Commands print that sentence and exit with a non-zero status instead of a traceback.
"""


class LeukoError(Exception):
    """A problem with the user's input that the user can fix."""


class BadImageError(LeukoError):
    """An image file that cannot be used: unreadable, truncated, not an image, too large."""


class BadCheckpointError(LeukoError):
    """A file that is not a usable leukodetect checkpoint."""
