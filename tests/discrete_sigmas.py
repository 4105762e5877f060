"""The discrete SD noise schedule for the UI stand-ins (lives in tsm_trainer: the workflow generator uses it)."""

from tsm_trainer.runtime.discrete_sigmas import DiscreteSigmas

__all__ = ["DiscreteSigmas"]
