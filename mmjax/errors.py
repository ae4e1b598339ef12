"""The errors a user acts on: each message names what is wrong and the fix, in one line.

Commands print these as `error: ...` and exit with status 2 (`--debug` shows the traceback
where a command has it); anything else is a bug and keeps its traceback.
"""


class ConfigError(ValueError):
    """A configuration that cannot be used: the message names the field and the fix."""


class UsageError(ValueError):
    """A mistake in a command line or its inputs (a missing file, a bad flag value)."""
