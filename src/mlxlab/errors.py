"""The project's user-error types: bad input the user can fix, as opposed to a bug.

`mlxlab train` turns these (and only these) into one line `mlxlab: error: <message>` and a
non-zero exit; anything else surfaces with its traceback. The message names the problem and the
fix. They subclass the built-in type a caller would expect (ValueError, FileNotFoundError), so
code catching those keeps working. This module imports nothing: every floor may raise them.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input (config, data, model files, a run folder); the message says how to fix it."""


class ConfigError(UserError, ValueError):
    """A configuration or input value that cannot work."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the config points at does not exist."""


class RemoteError(UserError, RuntimeError):
    """A remote URI that cannot be used (unknown scheme, missing package, credentials in it)."""


DISK_FULL = "disk full:"  # how a DiskFull's message starts (a sweep's job reads it back)


class DiskFull(UserError, OSError):
    """A write that found no space left (ENOSPC): the message names the folder, the space it
    needs and what to do; what was committed before it is intact and resumable."""

    def __str__(self) -> str:  # the message alone, not OSError's "[Errno 28] ..."
        return self.strerror or super().__str__()


class DataMismatch(ConfigError):
    """An objective given data of a kind it does not train on; config validation adds what the
    data is and which objectives train on it."""
