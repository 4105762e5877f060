"""Merge the experts of one scale into one standard LoRA (DeMe-style: decouple by timestep,
then merge in parameter space).

Exact by default: the factors are concatenated, so the merged delta is exactly
``sum_e w_e * delta_e`` (rank = sum of the experts' ranks). ``--rank R`` truncates it by SVD
to rank R (the best rank-R approximation) and prints the relative error.

Example:
    python tools/merge_experts.py output/tsm8.safetensors --scale 8 --out merged.safetensors
    python tools/merge_experts.py output/tsm8.safetensors --scale 8 --weights interval --rank 16 --out m16.safetensors
    python tools/merge_experts.py output/tsm8.safetensors --scale 8 --experts 4,5,6,7 --weights 0.4,0.3,0.2,0.1 --out late.safetensors
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tsm_trainer.export import experts_in, fold_alpha, merge_experts, merge_weights, svd_truncate  # noqa: E402
from tsm_trainer.file_format import TSMFileError, check_tsm_metadata, load_file, save_file_atomic  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="native TSM .safetensors file")
    parser.add_argument("--scale", type=int, required=True, help="the scale whose experts are merged")
    parser.add_argument("--experts", help="comma-separated experts to merge (default: all of the scale)")
    parser.add_argument("--weights", default="uniform",
                        help="uniform, interval (share of timesteps) or comma-separated numbers, one per expert")
    parser.add_argument("--rank", type=int, help="SVD-truncate the merge to this rank")
    parser.add_argument("--fold_alpha", action="store_true", help="fold alpha/r into lora_up (alpha = rank)")
    parser.add_argument("--out", required=True, help="output .safetensors")
    args = parser.parse_args(argv)
    try:
        tensors, metadata = load_file(args.file)
        info = check_tsm_metadata(metadata, args.file)
        experts = [int(e) for e in args.experts.split(",")] if args.experts else experts_in(tensors).get(args.scale, [])
        weighting = args.weights if args.weights in ("uniform", "interval") else args.weights.split(",")
        weights = merge_weights(args.scale, experts, weighting, info["num_train_timesteps"])
        merged = merge_experts(tensors, args.scale, weights, experts)
    except (TSMFileError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.rank:
        merged, error = svd_truncate(merged, args.rank)
        print(f"SVD rank {args.rank}: relative Frobenius error {error:.4%}")
    if args.fold_alpha:
        merged = fold_alpha(merged)
    stem = os.path.splitext(os.path.basename(args.out))[0]
    meta = {k: v for k, v in metadata.items() if k.startswith(("ss_", "modelspec.")) and not k.startswith("sshs_")}
    rank = max(v.shape[0] for k, v in merged.items() if k.endswith("lora_down.weight"))
    meta.update({"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_args": "{}",
                 "ss_output_name": stem, "modelspec.title": stem, "tsm.source": os.path.basename(args.file),
                 "tsm.merged_from": f"scale {args.scale} experts {experts} weights {[round(w, 6) for w in weights]}"})
    meta.pop("modelspec.timestep_range", None)
    save_file_atomic(merged, args.out, meta)
    print(f"merged experts {experts} of scale {args.scale} with weights {[round(w, 4) for w in weights]} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
