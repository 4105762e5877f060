"""``train_tsm.py``: parse the command line / ``--config`` TOML, run the stage(s) (:mod:`.build`), and
report any failure as one line."""

from __future__ import annotations

import sys

from tsm_trainer.data import DatasetError
from tsm_trainer.training.build import run
from tsm_trainer.training.config import load_config
from tsm_trainer.training.loop import NonFiniteLossError


def main(argv: list[str] | None = None) -> int:
    """Every failure is one line ``error: ...`` on stderr and exit code 2; --debug adds the traceback."""
    args = sys.argv[1:] if argv is None else argv
    try:
        run(load_config(argv))
    except KeyboardInterrupt:
        raise
    except Exception as e:
        if "--debug" in args:
            import traceback

            traceback.print_exc()
        known = isinstance(e, (ValueError, OSError, NonFiniteLossError, DatasetError))
        text = str(e).strip() or type(e).__name__
        if not known:
            text = f"{type(e).__name__}: {text} (run with --debug for the traceback)"
        print(f"error: {text}", file=sys.stderr)
        return 2
    return 0
