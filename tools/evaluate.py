#!/usr/bin/env python
"""`tsm-evaluate` from a clone: `python tools/evaluate.py --help`.

The command lives in tsm_trainer/cli/evaluate.py (installed as that command)."""

import os
import sys

# lets `python tools/evaluate.py` run from a clone without `pip install -e .` (the repo root holds tsm_trainer/)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tsm_trainer.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
