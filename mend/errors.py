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


class EditNotFoundError(MendError, KeyError):
    """No edit (or revision) with the given id exists in the journal."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class NoEditorError(MendError):
    """An edit was asked of a service that has no trained editor loaded."""


class StateConflictError(MendError):
    """The request is valid but the journal's state forbids it (edit already rolled back,
    request_id reused for a different request, journal written for another base model)."""


class DeadlineExceededError(MendError):
    """The caller's deadline passed before the work could start; nothing was changed."""


class UnstableEditError(StateConflictError):
    """The editor produced a non-finite update, or one that would make the weights non-finite.
    MEND editors are meta-trained on edits of the base model; after many accumulated edits the
    inputs drift out of their range (see the sequential rows of `mend eval`)."""


class JournalUnavailableError(MendError):
    """The journal's database cannot be reached; the message says whether anything may have been written."""


class NotLeaderError(StateConflictError):
    """A write was sent to a read replica; the message names the leader that takes writes."""


class JournalFullError(MendError):
    """The journal's database or disk cannot grow: nothing was written; the write can be retried once there is space."""


class JournalCorruptError(MendError):
    """The journal's file or rows are damaged (a failed page check, or a row whose hash does not match):
    nothing is served from it; restore a backup or start a new journal."""
