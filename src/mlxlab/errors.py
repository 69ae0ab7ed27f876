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
