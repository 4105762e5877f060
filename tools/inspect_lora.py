#!/usr/bin/env python
"""`tsm-inspect` from a clone: `python tools/inspect_lora.py --help`.

The command lives in tsm_trainer/cli/inspect_lora.py (installed as that command)."""

import os
import sys

# lets `python tools/inspect_lora.py` run from a clone without `pip install -e .` (the repo root holds tsm_trainer/)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tsm_trainer.cli.inspect_lora import main

if __name__ == "__main__":
    sys.exit(main())
