"""The standalone trainer: configuration, model families, the training loop, checkpoints."""
