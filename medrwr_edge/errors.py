"""User-facing errors.

Every failure a user can cause (bad input, a tampered file, a missing model) raises a subclass of
`MedrwrError` with a one-line message. The CLI prints that line and exits non-zero; it never shows a
traceback for these.
"""


class MedrwrError(Exception):
    """An error with a one-line, user-readable message."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class InputError(MedrwrError):
    """The user gave us something we cannot use (file, text, option)."""

    exit_code = 2


class IntegrityError(MedrwrError):
    """A file does not match its recorded sha256, or a manifest is inconsistent."""


class EncoderMismatchError(IntegrityError):
    """A pack was built with a different encoder from the one offered."""


class ModelError(MedrwrError):
    """A model file is missing, corrupt, or cannot be loaded."""
