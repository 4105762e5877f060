"""Export a native TSM file as standard kohya LoRAs that A1111, Forge, ComfyUI and diffusers load.

One file per expert (denoiser only, ``modelspec.timestep_range = "lo,hi"``, ``tsm.expert =
"e/n"``), plus one static text-encoder LoRA when the file has one. Use an expert in a UI that
can restrict a LoRA to a timestep range, or with --comfyui-workflow get a ComfyUI workflow
that switches experts by timestep with core nodes only.

Example:
    python tools/export_experts.py output/tsm8.safetensors --out_dir exported/
    python tools/export_experts.py output/tsm8.safetensors --out_dir exported/ --fold_alpha \\
        --comfyui-workflow exported/tsm8_workflow.json --checkpoint v1-5-pruned-emaonly.safetensors
"""

from __future__ import annotations

import argparse
import os
import sys

from tsm_trainer.cli.errors import about_file, add_debug_flag, run_tool
from tsm_trainer.cli.python_version import require_python_311
from tsm_trainer.files.export import write_expert_files


def main(argv=None) -> int:
    require_python_311()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="native TSM .safetensors file")
    parser.add_argument("--out_dir", required=True, help="folder for the exported files")
    parser.add_argument("--scale", type=int, action="append", help="export only this scale (repeatable)")
    parser.add_argument("--name", help="file name stem (default: the input's)")
    parser.add_argument(
        "--fold_alpha",
        action="store_true",
        help="fold alpha/r into lora_up and write alpha = rank (for diffusers/PEFT loaders)",
    )
    parser.add_argument("--comfyui-workflow", dest="workflow", help="also write a ComfyUI workflow JSON here")
    parser.add_argument(
        "--checkpoint",
        default="model.safetensors",
        help="workflow: checkpoint name as ComfyUI lists it (models/checkpoints)",
    )
    parser.add_argument("--prompt", default="a photo", help="workflow: positive prompt")
    parser.add_argument("--negative", default="", help="workflow: negative prompt")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--strength", type=float, default=1.0, help="workflow: LoRA strength")
    add_debug_flag(parser)
    return run_tool(run, parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    with about_file(args.file):
        written = write_expert_files(args.file, args.out_dir, args.scale, args.fold_alpha, args.name)
    for w in written:
        where = f"expert {w['e']}/{w['n']}  t in [{w['lo']}, {w['hi']})" if w["kind"] == "expert" else "text encoder"
        print(f"{where:<32} {w['path']}")
    if args.workflow:
        from tsm_trainer.files.comfyui_workflow import build_workflow, write_workflow

        experts = [(os.path.basename(w["path"]), w["lo"], w["hi"]) for w in written if w["kind"] == "expert"]
        scales = {w["n"] for w in written if w["kind"] == "expert"}
        if len(scales) != 1:
            print("error: a workflow schedules the experts of one scale; pass --scale N", file=sys.stderr)
            return 2
        te = next((os.path.basename(w["path"]) for w in written if w["kind"] == "text_encoder"), None)
        workflow = build_workflow(
            experts,
            args.checkpoint,
            te,
            args.prompt,
            args.negative,
            args.steps,
            args.cfg,
            args.seed,
            args.width,
            args.height,
            args.strength,
        )
        write_workflow(args.workflow, workflow)
        print(f"ComfyUI workflow: {args.workflow} (copy the LoRA files into ComfyUI/models/loras)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
