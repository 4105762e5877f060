#!/usr/bin/env python
"""`tsm-export` from a clone: `python tools/export_experts.py --help`.

The command lives in tsm_trainer/cli/export.py (installed as that command)."""

import os
import sys

# lets `python tools/export_experts.py` run from a clone without `pip install -e .` (the repo root holds tsm_trainer/)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tsm_trainer.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
