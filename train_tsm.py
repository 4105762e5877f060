#!/usr/bin/env python
"""Train TimeStep Master LoRA experts on a diffusers base model and a kohya dataset TOML.

    python train_tsm.py --pretrained_model ./sd15 --dataset_config dataset_configs/images_buckets.toml \
        --tsm_stage foster --tsm_scales 8 --max_train_steps 4000 --output_dir output --output_name tsm8

Every option is also a key of --config x.toml (the command line wins); --help lists them.
"""

import sys

from tsm_trainer.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
