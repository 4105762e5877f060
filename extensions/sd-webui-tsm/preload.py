import os

from modules import paths


def preload(parser):
    # same pattern as extensions-builtin/Lora/preload.py (--lora-dir)
    parser.add_argument(
        "--tsm-dir",
        type=str,
        help="Path to the directory with TimeStep Master (TSM) files.",
        default=os.path.join(paths.models_path, "TSM"),
    )
