"""Distillation into a few-step student with one timestep expert per step (DMD2-style)."""

from tsm_trainer.training.distill.loop import DistillTrainer
from tsm_trainer.training.distill.student import default_student_timesteps, parse_student_timesteps

__all__ = ["DistillTrainer", "default_student_timesteps", "parse_student_timesteps"]
