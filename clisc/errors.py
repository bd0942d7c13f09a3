"""Errors that mean "the user gave us something we cannot use" (the CLI exits with code 2 on these)."""


class InputError(ValueError):
    """Bad user input: a missing or unreadable file, an unsupported image, a bad option value.

    The message names the file or value and says what to do; it is shown to the user as is.
    """


class Cancelled(RuntimeError):
    """The user cancelled a long operation; nothing was written."""
