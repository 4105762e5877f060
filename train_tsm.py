#!/usr/bin/env python
"""Train TimeStep Master LoRA experts (or any kohya network module) with sd-scripts' train_network.py options.

    python train_tsm.py --pretrained_model_name_or_path ./sd15 --dataset_config dataset_configs/images_buckets.toml \
        --network_module networks.tsm_lora --network_args "tsm_scales=8" --max_train_steps 4000 \
        --output_dir output --output_name tsm8

The options are sd-scripts train_network.py's (also in a kohya --config_file TOML; the command line
wins); --help lists them. Installed as the ``tsm-train`` command.
"""

import sys

# the Python version check comes before the trainer is imported (tsm_trainer/cli/train.py)
from tsm_trainer.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
