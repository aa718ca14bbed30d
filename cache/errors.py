"""The one base class for every error a user can cause: bad input, missing files, a cache or
checkpoint that is not what it should be, a device this machine lacks, a run that diverged.

It lives on the ground floor (cache/ imports nothing else of the project) so that every package can
raise it. Each package subclasses it once for its own errors (CacheError, DatasetError, ExtractError,
ConfigError, ...). cli.py has one handler that prints a UserError as one line and leaves with its
`exit_code`; anything else that escapes a command is a bug and keeps its traceback (`msdn --debug`
shows the traceback of a UserError too).
"""
from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; its message names the file or option and the problem."""
    exit_code = 1
