#!/usr/bin/env python
"""`tsm-bake` from a clone: `python tools/bake.py --help`.

The command lives in tsm_trainer/cli/bake.py (installed as that command)."""

import os
import sys

# lets `python tools/bake.py` run from a clone without `pip install -e .` (the repo root holds tsm_trainer/)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tsm_trainer.cli.bake import main

if __name__ == "__main__":
    sys.exit(main())
