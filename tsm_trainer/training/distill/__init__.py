"""Distillation into a few-step student with one timestep expert per step (DMD2-style)."""

from .loop import DistillTrainer
from .student import default_student_timesteps, parse_student_timesteps

__all__ = ["DistillTrainer", "default_student_timesteps", "parse_student_timesteps"]
