"""Compare a base model with LoRA / TSM files: held-out denoising loss per timestep interval (one
fixed draw for every file), loss-against-t plots and sample grids. ``tools/evaluate.py`` is the CLI."""

from tsm_trainer.evaluation.compare import Evaluation, evaluate_files, load_lora_file
from tsm_trainer.evaluation.plots import labelled_grid, plot_loss_curves

__all__ = ["Evaluation", "evaluate_files", "labelled_grid", "load_lora_file", "plot_loss_curves"]
