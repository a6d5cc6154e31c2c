"""One interceptor around every mend.v1 call: request id, auth, readiness, concurrency limit,
latency metrics, and the single place where domain errors become gRPC status codes.

Auth fails closed: bearer tokens, each with a name and a scope (`read`: queries; `write`: also
edits and rollbacks), from a tokens file (`load_tokens`) and/or the two config tokens (the
environment). With no token configured every call is open; once any token is, every call needs a
valid one (UNAUTHENTICATED), and writes a write-scoped one (PERMISSION_DENIED for a read token).
`anonymous_reads` is the one explicit exception: queries without a token. Tokens are compared in
constant time and never logged. The caller's token name (else "anonymous") is `CALLER` while the
call runs; the journal records it as the author of every write.

Health and reflection pass through untouched, so generic tools always work.
"""

from __future__ import annotations

import contextvars
import hmac
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import yaml

from mend.errors import (CheckpointMismatchError, ConfigError, DeadlineExceededError, EditNotFoundError, InvalidEditError,
                         JournalCorruptError, JournalFullError, JournalUnavailableError, MendError, NoEditorError,
                         StateConflictError, TargetResolutionError)

log = logging.getLogger(__name__)

SERVICE_PREFIX = "/mend.v1.EditService/"
WRITE_METHODS = {"ApplyEdit", "ApplyEdits", "RollbackEdit", "RollbackTo"}
CALLER = contextvars.ContextVar("mend_caller", default="anonymous")  # the token name of the call being served


@dataclass(frozen=True)
class Token:
    name: str
    secret: str
    scope: str  # read | write


def load_tokens(path: str) -> list[Token]:
    """A YAML (or JSON) list of {name, token, scope: read | write}; names and tokens must be unique."""
    try:
        entries = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"server.tokens_file {path}: cannot read it as YAML or JSON: {e}") from None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"server.tokens_file {path}: expected a non-empty list of {{name, token, scope}} entries")
    tokens = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or set(e) != {"name", "token", "scope"}:
            raise ConfigError(f"server.tokens_file {path} entry {i}: give exactly the keys name, token and scope")
        name, secret, scope = (str(e[k]) if e[k] is not None else "" for k in ("name", "token", "scope"))
        if not name.strip() or len(secret) < 16 or scope not in ("read", "write"):
            raise ConfigError(f"server.tokens_file {path} entry {i} ({name!r}): the name must be non-empty, "
                              "the token at least 16 characters, the scope read or write")
        tokens.append(Token(name, secret, scope))
    for field in ("name", "secret"):
        values = [getattr(t, field) for t in tokens]
        if len(set(values)) != len(values):
            raise ConfigError(f"server.tokens_file {path}: two entries share a {'token' if field == 'secret' else 'name'}")
    return tokens

STATUS_OF = {  # most specific class first; the first match along the exception's MRO wins
    InvalidEditError: grpc.StatusCode.INVALID_ARGUMENT,
    TargetResolutionError: grpc.StatusCode.INVALID_ARGUMENT,
    ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    EditNotFoundError: grpc.StatusCode.NOT_FOUND,
    NoEditorError: grpc.StatusCode.FAILED_PRECONDITION,
    StateConflictError: grpc.StatusCode.FAILED_PRECONDITION,
    CheckpointMismatchError: grpc.StatusCode.FAILED_PRECONDITION,
    DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    JournalUnavailableError: grpc.StatusCode.UNAVAILABLE,
    JournalFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    JournalCorruptError: grpc.StatusCode.DATA_LOSS,
    MendError: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_of(error: Exception) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


class Denied(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class ServiceInterceptor(grpc.ServerInterceptor):
    def __init__(self, holder, tokens: list[Token] = (), max_concurrent: int = 16, anonymous_reads: bool = False):
        self.holder = holder  # server.app.ServiceHolder: phase, service, metrics
        self.tokens = list(tokens)
        self.anonymous_reads = anonymous_reads  # queries without a token while tokens protect writes
        self.max_concurrent = max_concurrent
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._count_lock = threading.Lock()
        self.in_flight = 0  # admitted calls now running

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(SERVICE_PREFIX) or handler.unary_unary is None:
            return handler
        name = method[len(SERVICE_PREFIX):]
        behaviour = handler.unary_unary

        def wrapped(request, context):
            metadata = dict(context.invocation_metadata())
            request_id = metadata.get("x-request-id") or uuid.uuid4().hex[:16]
            context.set_trailing_metadata((("x-request-id", request_id),))
            start = time.perf_counter()
            code, message = grpc.StatusCode.OK, ""
            try:
                caller = self._admit(name, metadata)
                self._count(+1)
                bound = CALLER.set(caller)
                try:
                    return behaviour(request, context)
                finally:
                    CALLER.reset(bound)
                    self._count(-1)
                    self._slots.release()
            except Denied as e:
                code, message = e.code, str(e)
            except MendError as e:
                code, message = status_of(e), str(e)
            except Exception:  # never leak a stack trace to the caller; the log has it, under the request id
                log.exception("request %s %s failed", request_id, name)
                code, message = grpc.StatusCode.INTERNAL, f"internal error; the server log has the details under request id {request_id}"
            finally:
                seconds = time.perf_counter() - start
                self.holder.metrics.observe(name, code.name, seconds)
                log.info("request %s %s %s %.1f ms%s", request_id, name, code.name, seconds * 1000, f": {message}" if message else "")
            context.abort(code, message)

        return grpc.unary_unary_rpc_method_handler(
            wrapped, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)

    def _count(self, step: int) -> None:
        with self._count_lock:
            self.in_flight += step

    def _admit(self, name: str, metadata: dict) -> str:
        """The caller's name; raise Denied unless it may run `name` now. On success one slot is held."""
        caller = self._authorize(name, metadata.get("authorization", ""))
        phase = self.holder.phase
        if phase != "serving":
            raise Denied(grpc.StatusCode.UNAVAILABLE, f"the server is {phase}; retry shortly" if phase == "starting"
                         else f"the server is {phase}; retry against another replica or after restart")
        if not self._slots.acquire(blocking=False):
            raise Denied(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"the server is already handling {self.max_concurrent} requests; retry with backoff")
        return caller

    def _authorize(self, name: str, header: str) -> str:
        """The name of the caller's token ("anonymous" where no token is needed)."""
        presented = header[len("Bearer "):] if header.startswith("Bearer ") else ""
        token = None
        for t in self.tokens:  # every token is compared, so the time taken does not tell which one matched
            if hmac.compare_digest(presented.encode(), t.secret.encode()) and presented:
                token = t
        is_write = name in WRITE_METHODS
        if not self.tokens:
            return "anonymous"  # auth is off: no token configured at all
        if token is None and not presented and not is_write and self.anonymous_reads:
            return "anonymous"
        if token is None:
            raise Denied(grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token" if presented else
                         "missing bearer token: send metadata 'authorization: Bearer <token>'")
        if is_write and token.scope != "write":
            raise Denied(grpc.StatusCode.PERMISSION_DENIED, f"{name} changes the model and needs a write token; "
                                                            f"token {token.name!r} has the read scope")
        return token.name
