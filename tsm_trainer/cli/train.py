"""``tsm-train`` and ``python train_tsm.py``: sd-scripts' train_network.py options, run by
:func:`tsm_trainer.training.cli.main`. The trainer is imported after the Python version check,
because its config reader needs ``tomllib`` (3.11)."""

from __future__ import annotations

from tsm_trainer.cli.python_version import require_python_311


def main(argv: list[str] | None = None) -> int:
    """Train (see ``tsm-train --help``); exit status 0, or 2 with one ``error: ...`` line."""
    require_python_311()
    from tsm_trainer.training.cli import main as train_main

    return train_main(argv)
