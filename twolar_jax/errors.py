"""The project's own errors: things a user can fix, with a message that names the file, line, field or option.

Every layer raises these (they subclass ValueError / FileNotFoundError, so plain `except ValueError`
still works); console entry points print them as one line on stderr and exit with code 2, while any
other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
from typing import Optional, Union

PathLike = Union[str, os.PathLike]


class TwolarError(Exception):
    """Base class of errors that a user can act on: bad input, bad option, missing file, bad checkpoint."""


class FormatError(TwolarError, ValueError):
    """A malformed input file. The message is `<file>:<line>: <field>: <what>` (line and field when known)."""

    def __init__(self, path: PathLike, lineno: Optional[int], field: Optional[str], what: str):
        self.path = str(path)
        self.lineno = lineno
        self.field = field
        self.what = what
        where = self.path if lineno is None else f"{self.path}:{lineno}"
        super().__init__(f"{where}: {field}: {what}" if field else f"{where}: {what}")

    def __reduce__(self):  # picklable across processes (tf.data, multiprocessing)
        return (type(self), (self.path, self.lineno, self.field, self.what))


class OptionError(TwolarError, ValueError):
    """A bad option value; the message names the option as the user gave it (flag, gin binding or argument)."""


class MissingFileError(TwolarError, FileNotFoundError):
    """An input file or directory that does not exist; the message names the path and what it should be."""


class CheckpointError(TwolarError, ValueError):
    """A checkpoint directory whose files do not match what its config describes."""


def check_choice(option: str, value: object, choices: tuple) -> None:
    """Raise OptionError naming `option` when `value` is not one of `choices`."""
    if value not in choices:
        raise OptionError(f"{option}={value!r}: expected one of {choices}")
