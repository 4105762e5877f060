"""How a command-line tool reports a failure: one line ``error: ...`` on stderr and exit
status 2, never a traceback unless ``--debug`` asks for it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tsm_trainer.core.file_format import TSMFileError


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def error_message(error: BaseException) -> str:
    """The user-facing text of an exception: a KeyError's message without its repr quotes, an
    OSError with the path it concerns."""
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    if isinstance(error, OSError) and error.strerror:
        where = error.filename if error.filename is not None else ""
        return f"{where}: {error.strerror}" if where else error.strerror
    return str(error) or type(error).__name__


def run_tool(body: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``body(args)``; any exception becomes ``error: <message>`` and exit status 2."""
    try:
        return body(args)
    except Exception as e:
        if getattr(args, "debug", False):
            raise
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2


@contextmanager
def about_file(path: str) -> Iterator[None]:
    """Name ``path`` in a KeyError or ValueError raised while working on its tensors."""
    try:
        yield
    except TSMFileError:
        raise
    except (KeyError, ValueError) as e:
        message = error_message(e)
        raise ValueError(message if message.startswith(str(path)) else f"{path}: {message}") from e
