"""Errors readlib raises for bad input, so the CLI can map them to exit code 2."""


class ConfigError(ValueError):
    """Bad user input (unknown task/method/backbone, out-of-range hyperparameter)."""


class DataNotFoundError(FileNotFoundError):
    """Task data is neither local nor reachable on the hub."""


class DataError(ConfigError):
    """Task data that is present but unusable: an unreadable file, a missing column, a bad label or text."""
