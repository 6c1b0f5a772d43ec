"""How a `beit` command fails: one line on stderr naming the file or setting and what to do,
exit status 1, and the traceback only when asked for (`BEIT_DEBUG=1` or `beit --debug`).

Every command callback is wrapped in `one_line_errors`. The project's own errors already
say what to do (a ConfigError names the key, StaleTokens says which stage to rerun), so
their message is the line. Operating-system errors get the file and a remedy (disk full:
free space and rerun, the completed outputs are kept). Anything else is a bug or an
unforeseen state: its type and message, and how to see the traceback.
"""
from __future__ import annotations

import errno
import functools
import os
from typing import Callable

import click

DEBUG_ENV = "BEIT_DEBUG"
_OWN = ("pipeline.", "model.", "stages.")  # modules whose exceptions carry a message meant for users
_PLAIN = (ValueError, FloatingPointError)


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _worker_original(message: str) -> str:
    """A DataLoader worker's exception arrives as 'Caught X in DataLoader worker process N.
    Original Traceback ...': keep its last line, the original 'module.Type: message'."""
    lines = [line for line in message.splitlines() if line.strip()]
    last = lines[-1] if lines else message
    head, sep, rest = last.partition(": ")
    return rest if sep and head.startswith(_OWN) else last


def one_line(err: BaseException) -> str:
    """The line a user sees for `err`."""
    message = str(err)
    if message.startswith("Caught ") and "Original Traceback" in message:
        message = _worker_original(message)
    if isinstance(err, OSError) and err.errno is not None:  # from the system: errno, filename
        where = err.filename or "an output"
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            return (f"disk full while writing {where}: free space (or point outputs.* at a larger disk) "
                    "and rerun the same command; everything completed before the failure is kept")
        return f"{where}: {err.strerror or message}"
    own = type(err).__module__.startswith(_OWN)
    if own or isinstance(err, (*_PLAIN, OSError)):  # OSError without errno: raised by us
        text = message
    else:
        text = f"{type(err).__name__}: {message} (rerun with {DEBUG_ENV}=1 for the traceback)"
    return " ".join(text.split())  # one line, whatever the message held


def one_line_errors(callback: Callable) -> Callable:
    """Decorator for a click command callback (put it below the click decorators)."""
    @functools.wraps(callback)
    def wrapper(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as err:
            if debugging():
                raise
            raise click.ClickException(one_line(err)) from None
    return wrapper
