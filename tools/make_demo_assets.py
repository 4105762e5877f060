#!/usr/bin/env python
"""Build the demo's tiny SD-shaped base model on the procedural shapes world (CPU, ~15-20 minutes).

    python tools/make_demo_assets.py            # -> demo_assets/base_model/, demo_assets/sample_grid.png
    python tools/make_demo_assets.py --quick --out_dir /tmp/assets   # seconds-long smoke run

See demo_world/make_assets.py for what is trained and how.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from demo_world.make_assets import main

if __name__ == "__main__":
    main()
