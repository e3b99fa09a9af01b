"""User-facing errors.

Every failure a user can cause (bad input, a tampered file, a missing model) raises a subclass of
`MedrwrError` with a one-line message. The CLI prints that line and exits non-zero; it never shows a
traceback for these.
"""


class MedrwrError(Exception):
    """An error with a one-line, user-readable message.

    A library names a setting or a parameter in its message as `{name}` (an `AskSettings` field, or an argument of
    the API such as `packs`; listed in `names`), never by a command-line flag: `str(error)` shows the name,
    `worded(name_of)` a front end's own word for it (the CLI: its flag; serve: the JSON key)."""

    exit_code = 1

    def __init__(self, message: str, names: tuple = ()):
        self.template, self.names = " ".join(str(message).split()), tuple(names)
        super().__init__(self.worded(str))

    def worded(self, name_of) -> str:
        """The message with each name as `name_of(name)` words it."""
        text = self.template
        for name in self.names:  # plain replacement: braces in quoted user text are not a format
            text = text.replace("{" + name + "}", name_of(name))
        return text


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
    """A setting out of its range or of the wrong type: "{field} {problem}", the field worded by each front end."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, " ".join(str(problem).split())
        super().__init__("{" + field + "} " + self.problem, (field,))
