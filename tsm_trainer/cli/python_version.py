"""The check every command runs first: tsm-trainer needs Python 3.11 or newer (``tomllib`` reads
``--config_file`` and the dataset TOML; the pinned diffusers and transformers need 3.11 too).

It imports only ``sys``, and the command modules import nothing 3.11-only before calling it, so
on 3.10 the user gets this one line instead of an ImportError from deep inside the trainer.
"""

import sys


def require_python_311() -> None:
    """Exit with status 2 and one line on stderr when this interpreter is older than 3.11."""
    if sys.version_info < (3, 11):  # noqa: UP036 (the point: a clear line instead of a SyntaxError later)
        major, minor, micro = sys.version_info[:3]
        print(
            f"tsm-trainer needs Python 3.11 or newer (this is {major}.{minor}.{micro}): make the virtual "
            "environment with python3.11 (or newer) and install tsm-trainer into it again",
            file=sys.stderr,
        )
        raise SystemExit(2)
