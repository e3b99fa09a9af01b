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


class SettingError(InputError):
    """A setting out of its range or of the wrong type. The message names the `AskSettings` field; a front end
    words it in its own vocabulary with `worded(name_of)` (the CLI: its flag; serve: the JSON key)."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, " ".join(str(problem).split())
        super().__init__(f"{field} {self.problem}")

    def worded(self, name_of) -> str:
        """The message with the field named as `name_of(field)` calls it."""
        return f"{name_of(self.field)} {self.problem}"
