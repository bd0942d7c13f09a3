"""Errors that mean "the user gave us something we cannot use" (the CLI exits with code 2 on these)."""


class InputError(ValueError):
    """Bad user input: a missing or unreadable file, an unsupported image, a bad option value.

    The message names the file or value and says what to do; it is shown to the user as is.
    """


class Cancelled(RuntimeError):
    """The user cancelled a long operation; nothing was written."""


class EnvironmentProblem(InputError):
    """The Python environment cannot run CLISC: a package is missing, too old, or built for another torch.

    The message names the package, the version found and the one needed, and the command that fixes it.
    """


class WriteError(InputError):
    """A file could not be written completely: a full disk, a quota or file-size limit, an I/O error.

    The message names the file and the reason; an atomic writer (`clisc.writers.atomic_path`) has then left
    nothing under the file's name and kept any file it was to replace.
    """
