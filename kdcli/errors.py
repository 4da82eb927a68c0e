"""Errors kd reports to the user as one line (no traceback): bad config, data, cache, checkpoint."""


class KDError(Exception):
    """Base class: the CLI prints `error: <message>` and exits with status 1."""


class ConfigError(KDError):
    """A config value is wrong: unknown name, mismatched shapes, missing required key."""


class DataError(KDError):
    """A dataset is missing or unreadable."""


class CorruptArtifact(KDError):
    """A checkpoint, cache or store entry failed its format or checksum check."""


class TrainingDiverged(KDError):
    """The loss became NaN or infinite."""
