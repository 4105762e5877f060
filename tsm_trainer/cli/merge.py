"""Merge the experts of one scale into one standard LoRA (DeMe-style: decouple by timestep,
then merge in parameter space).

Exact by default: the factors are concatenated, so the merged delta is exactly
``sum_e w_e * delta_e`` (rank = sum of the experts' ranks). ``--rank R`` truncates it by SVD
to rank R (the best rank-R approximation) and prints the relative error of the denoiser's merge.

The text-encoder LoRA has no experts and is not merged: it is written unchanged beside the
output as ``<out>_te.safetensors`` (as export_experts.py does), because diffusers cannot load a
kohya q/v-only text-encoder LoRA in the same file (convert.py --to peft loads it).

Example:
    python tools/merge_experts.py output/tsm8.safetensors --scale 8 --out merged.safetensors
    python tools/merge_experts.py output/tsm8.safetensors --scale 8 --weights interval --rank 16 --out m16.safetensors
    python tools/merge_experts.py output/tsm8.safetensors --scale 8 --experts 4,5,6,7 \\
        --weights 0.4,0.3,0.2,0.1 --out late.safetensors
"""

from __future__ import annotations

import argparse
import os
import sys

from tsm_trainer.cli.errors import about_file, add_debug_flag, run_tool
from tsm_trainer.cli.python_version import require_python_311
from tsm_trainer.core.file_format import TSMFileError, check_not_an_input, load_file, save_file_atomic
from tsm_trainer.core.lora_math import experts_in
from tsm_trainer.core.tensor_checks import check_tsm_file
from tsm_trainer.files.export import (
    fold_alpha,
    merge_experts,
    merge_weights,
    plain_metadata,
    svd_truncate,
    text_encoder_lora,
)


def text_encoder_path(out: str) -> str:
    root, ext = os.path.splitext(out)
    return f"{root}_te{ext}"


def run(args: argparse.Namespace) -> int:
    if args.rank is not None and args.rank < 1:
        raise ValueError(f"--rank {args.rank}: must be >= 1 (leave it out for the exact merge)")
    te_out = text_encoder_path(args.out)
    check_not_an_input(args.out, [args.file])
    check_not_an_input(te_out, [args.file], "--out (its _te file)")
    tensors, metadata = load_file(args.file)
    info = check_tsm_file(tensors, metadata, args.file)
    with about_file(args.file):
        available = experts_in(tensors)
        if args.scale not in available:
            raise TSMFileError(
                f"{args.file}: no experts of scale {args.scale} (--scale); it holds scales {sorted(available)}"
            )
        experts = [int(e) for e in args.experts.split(",")] if args.experts else available[args.scale]
        weighting = args.weights if args.weights in ("uniform", "interval") else args.weights.split(",")
        weights = merge_weights(args.scale, experts, weighting, info["num_train_timesteps"])
        merged = merge_experts(tensors, args.scale, weights, experts)
    if args.rank is not None:
        merged, error = svd_truncate(merged, args.rank)
        print(f"SVD rank {args.rank}: relative Frobenius error of the denoiser's merge {error:.4%}")
    if args.fold_alpha:
        merged = fold_alpha(merged)
    stem = os.path.splitext(os.path.basename(args.out))[0]
    # a merge writes alpha = rank in every module: its alpha is always folded
    meta = plain_metadata(metadata, stem, stem, merged, alpha_folded=True)
    meta.update(
        {
            "tsm.source": os.path.basename(args.file),
            "tsm.merged_from": f"scale {args.scale} experts {experts} weights {[round(w, 6) for w in weights]}",
        }
    )
    te = text_encoder_lora(tensors)
    save_file_atomic(merged, args.out, meta)
    print(f"merged experts {experts} of scale {args.scale} with weights {[round(w, 4) for w in weights]} -> {args.out}")
    if te:
        te = fold_alpha(te) if args.fold_alpha else te
        te_stem = os.path.splitext(os.path.basename(te_out))[0]
        te_meta = plain_metadata(metadata, f"{stem} text encoder", te_stem, te, alpha_folded=args.fold_alpha)
        te_meta["tsm.source"] = os.path.basename(args.file)
        save_file_atomic(te, te_out, te_meta)
        print(f"text-encoder LoRA (not merged: it has no experts) -> {te_out}")
    return 0


def main(argv=None) -> int:
    require_python_311()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="native TSM .safetensors file")
    parser.add_argument("--scale", type=int, required=True, help="the scale whose experts are merged")
    parser.add_argument("--experts", help="comma-separated experts to merge (default: all of the scale)")
    parser.add_argument(
        "--weights",
        default="uniform",
        help="uniform, interval (share of timesteps) or comma-separated numbers, one per expert",
    )
    parser.add_argument("--rank", type=int, help="SVD-truncate the merge to this rank (>= 1)")
    parser.add_argument(
        "--fold_alpha",
        action="store_true",
        help="also fold alpha/r into the text-encoder LoRA (the merge always has alpha = rank)",
    )
    parser.add_argument("--out", required=True, help="output .safetensors")
    add_debug_flag(parser)
    return run_tool(run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
