"""Convert a LoRA between kohya format and diffusers/PEFT format, so that
``pipe.load_lora_weights(file)`` loads it with nothing skipped (alpha folded into lora_B).

Key names depend on the model (diffusers SDXL paths vs SGM names, transformers 5's CLIP),
so the base model's diffusers folder is read (configs only; no weights are loaded).

Example:
    python tools/convert.py exported/tsm8_e3of8.safetensors --to peft --base ./sd15-diffusers --out e3_peft.safetensors
    python tools/convert.py e3_peft.safetensors --to kohya --base ./sd15-diffusers --out e3_kohya.safetensors
"""

from __future__ import annotations

import argparse
import sys

from tsm_trainer.base_models.loading import load_components
from tsm_trainer.cli.errors import about_file, add_debug_flag, run_tool
from tsm_trainer.cli.python_version import require_python_311
from tsm_trainer.core.file_format import check_not_an_input, load_file, save_file_atomic
from tsm_trainer.core.targets import lora_name_index
from tsm_trainer.core.tensor_checks import check_lora_tensors
from tsm_trainer.files.export import kohya_to_peft, peft_to_kohya


def run(args: argparse.Namespace) -> int:
    check_not_an_input(args.out, [args.file])
    tensors, metadata = load_file(args.file)
    if "tsm.format_version" in metadata:
        raise ValueError(f"{args.file} is a native TSM file: export its experts first (tools/export_experts.py)")
    check_lora_tensors(tensors, args.file)
    denoiser_name, denoiser, encoders = load_components(args.base)
    index = lora_name_index(denoiser, [m for _, m in encoders])
    components = [denoiser_name] + [c for c, _ in encoders]
    with about_file(args.file):
        out = (kohya_to_peft if args.to == "peft" else peft_to_kohya)(tensors, index, components)
    meta = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    # both directions write alpha = rank (PEFT has no per-module alpha): the deltas are folded
    rank = max(v.shape[0] for k, v in out.items() if k.endswith(("lora_A.weight", "lora_down.weight")))
    meta["tsm.alpha_folded"] = "true"
    if "ss_network_alpha" in meta:
        meta["ss_network_alpha"] = str(rank)
    save_file_atomic(out, args.out, meta, add_hashes=args.to == "kohya")
    print(
        f"{args.file} -> {args.out} ({args.to}, "
        f"{sum(k.endswith(('lora_A.weight', 'lora_down.weight')) for k in out)} modules)"
    )
    return 0


def main(argv=None) -> int:
    require_python_311()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="a plain LoRA .safetensors (kohya or PEFT keys)")
    parser.add_argument("--to", choices=("peft", "kohya"), required=True)
    parser.add_argument("--base", required=True, help="the base model's diffusers folder")
    parser.add_argument("--out", required=True, help="output .safetensors")
    add_debug_flag(parser)
    return run_tool(run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
