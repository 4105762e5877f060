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
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tsm_trainer.base_model import BaseModelError, load_components  # noqa: E402
from tsm_trainer.export import kohya_to_peft, peft_to_kohya  # noqa: E402
from tsm_trainer.file_format import TSMFileError, load_file, save_file_atomic  # noqa: E402
from tsm_trainer.targets import lora_name_index  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="a plain LoRA .safetensors (kohya or PEFT keys)")
    parser.add_argument("--to", choices=("peft", "kohya"), required=True)
    parser.add_argument("--base", required=True, help="the base model's diffusers folder")
    parser.add_argument("--out", required=True, help="output .safetensors")
    args = parser.parse_args(argv)
    try:
        tensors, metadata = load_file(args.file)
        if "tsm.format_version" in metadata:
            raise ValueError(f"{args.file} is a native TSM file: export its experts first (tools/export_experts.py)")
        denoiser_name, denoiser, encoders = load_components(args.base)
        index = lora_name_index(denoiser, [m for _, m in encoders])
        components = [denoiser_name] + [c for c, _ in encoders]
        if args.to == "peft":
            out = kohya_to_peft(tensors, index, components)
        else:
            out = peft_to_kohya(tensors, index, components)
    except (TSMFileError, BaseModelError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    save_file_atomic(out, args.out, meta, add_hashes=args.to == "kohya")
    print(f"{args.file} -> {args.out} ({args.to}, {sum(k.endswith(('lora_A.weight', 'lora_down.weight')) for k in out)} modules)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
