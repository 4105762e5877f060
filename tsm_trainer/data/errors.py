"""Exceptions of the data layer. Both are ValueError so callers can catch them broadly."""


class DatasetConfigError(ValueError):
    """A dataset config TOML is wrong: the message names the key, the file and what is valid."""


class DatasetError(ValueError):
    """The data on disk cannot be trained on (empty dataset, unreadable files with on_error='raise')."""
