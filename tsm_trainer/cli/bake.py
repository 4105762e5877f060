"""Bake a LoRA into a base model: one expert of a native TSM file, or a plain (e.g. merged) LoRA.

Writes a new diffusers folder (base is a folder) or a new single-file checkpoint (base is an
SD1/SD2/SDXL original-layout .safetensors), atomically. Un-bake with the same LoRA and a
negated multiplier (restores the weights to within float rounding; keep the original model
for an exact copy).

    python tools/bake.py --base models/sd15 --lora out/tsm8.safetensors --expert 3 --out models/sd15-tsm-e3
    python tools/bake.py --base sd_xl_base_1.0.safetensors --lora merged.safetensors --multiplier 0.8 \\
        --out sdxl-baked.safetensors
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from tsm_trainer.cli.errors import add_debug_flag, run_tool
from tsm_trainer.cli.python_version import require_python_311
from tsm_trainer.core.file_format import check_not_an_input
from tsm_trainer.files.bake import BakeError, bake_diffusers_folder, bake_single_file, load_lora_for_bake


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  python tools/bake.py --base models/sd15 --lora tsm8.safetensors --expert 3 --out models/sd15-e3\n"
        "  python tools/bake.py --base sd15.safetensors --lora merged.safetensors --out sd15-merged.safetensors\n"
        "  # un-bake (within float rounding):\n"
        "  python tools/bake.py --base models/sd15-e3 --lora tsm8.safetensors --expert 3 --multiplier -1 "
        "--out models/sd15-again",
    )
    p.add_argument(
        "--base",
        required=True,
        help="diffusers pipeline folder, or an SD1/SD2/SDXL original-layout .safetensors checkpoint",
    )
    p.add_argument("--lora", required=True, help="native TSM file (with --expert) or a plain kohya LoRA .safetensors")
    p.add_argument("--expert", type=int, help="native TSM file: the expert to bake (0-based)")
    p.add_argument("--scale", type=int, help="native TSM file: the scale of --expert (default: the core scale)")
    p.add_argument("--multiplier", type=float, default=1.0, help="LoRA strength (default 1.0; negative un-bakes)")
    p.add_argument("--out", required=True, help="output folder (folder base) or .safetensors file (checkpoint base)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (after the new one is written)")
    add_debug_flag(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    require_python_311()
    return run_tool(run, parse_args(argv))


def run(args: argparse.Namespace) -> int:
    if not math.isfinite(args.multiplier):
        raise BakeError(f"--multiplier {args.multiplier}: must be a finite number")
    check_not_an_input(args.out, [args.lora], "--out")
    lora, what = load_lora_for_bake(args.lora, args.expert, args.scale)
    if os.path.isdir(args.base):
        baked = bake_diffusers_folder(args.base, lora, args.out, args.multiplier, args.overwrite, source=args.lora)
    elif os.path.isfile(args.base):
        baked = bake_single_file(args.base, lora, args.out, args.multiplier, args.overwrite, source=args.lora)
    else:
        raise BakeError(f"{args.base}: no such folder or file")
    print(f"baked {what} x {args.multiplier} into {len(baked)} module(s) of {args.base} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
