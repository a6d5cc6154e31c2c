"""Typed domain errors. The server maps each to one gRPC status code, in one place."""


class MendError(Exception):
    """Base class of every error the library raises on purpose."""


class InvalidEditError(MendError, ValueError):
    """An edit request is malformed (empty prompt or target, bad field)."""


class TargetResolutionError(MendError, ValueError):
    """A requested edit target (layer name or pattern) does not exist in the model."""


class CheckpointMismatchError(MendError, ValueError):
    """An editor checkpoint does not fit the model it is loaded for."""


class ConfigError(MendError, ValueError):
    """A configuration value is out of range; the message says what to change."""
