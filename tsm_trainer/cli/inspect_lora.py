"""Summarise LoRA / TSM .safetensors files, and check them against a base model.

Reads native TSM files, kohya LoRAs (incl. per-expert exports) and diffusers/PEFT LoRAs and
prints the family, modules per prefix, ranks, alphas, TSM scales/stage/expert intervals,
metadata and whether the stored sshs_model_hash matches the tensors.

examples:
  python tools/inspect_lora.py outputs/demo/tsm_foster8.safetensors
  python tools/inspect_lora.py a.safetensors b.safetensors --json
  python tools/inspect_lora.py tsm8.safetensors --check --base models/stable-diffusion-v1-5

exit status: 0 ok; 1 with --check when a file does not fit the base model (reasons are
printed); 2 when a file or the base model cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys

from tsm_trainer.base_models.loading import load_base_model
from tsm_trainer.cli.errors import add_debug_flag, run_tool
from tsm_trainer.cli.python_version import require_python_311
from tsm_trainer.core.file_format import TSMFileError
from tsm_trainer.files.inspection import check_against_model, format_summary, summarize

MAX_REASONS = 20


def main(argv=None) -> int:
    require_python_311()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", metavar="FILE", help=".safetensors LoRA or TSM file(s)")
    parser.add_argument("--json", action="store_true", help="print a JSON list (one object per file) instead of text")
    parser.add_argument(
        "--check", action="store_true", help="validate each file against --base (exit 1 if one doesn't fit)"
    )
    parser.add_argument(
        "--base",
        metavar="PATH",
        help="local diffusers model folder (model_index.json, unet/ or "
        "transformer/, text_encoder*/; configs only, no weights are "
        "loaded); implies --check",
    )
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.check and not args.base:
        parser.error("--check needs --base PATH (a local diffusers model folder)")
    return run_tool(run, args)


def run(args: argparse.Namespace) -> int:
    check = bool(args.base)
    denoiser, encoders = None, []
    if check:
        denoiser, encoders = load_base_model(args.base)

    status = 0
    results = []
    for path in args.files:
        try:
            summary = summarize(path)
            reasons = check_against_model(path, denoiser, encoders) if check else None
        except TSMFileError as e:
            status = 2
            results.append({"path": path, "error": str(e)})
            print(f"error: {e}", file=sys.stderr)
            continue
        if reasons is not None:
            summary["check"] = {"base": args.base, "fits": not reasons, "reasons": reasons}
            if reasons and status == 0:
                status = 1
        results.append(summary)
        if not args.json:
            print(format_summary(summary))
            if reasons is not None:
                if reasons:
                    print(
                        f"  check:       DOES NOT FIT {args.base} "
                        f"({len(reasons)} reason{'s' if len(reasons) != 1 else ''})"
                    )
                    for r in reasons[:MAX_REASONS]:
                        print(f"    - {r}")
                    if len(reasons) > MAX_REASONS:
                        print(f"    ... and {len(reasons) - MAX_REASONS} more (--json lists all)")
                else:
                    print(f"  check:       fits {args.base}")
            print()
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    return status


if __name__ == "__main__":
    sys.exit(main())
