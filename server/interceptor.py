"""One interceptor around every mend.v1 call: request id, auth, readiness, concurrency limit,
latency metrics, and the single place where domain errors become gRPC status codes.

Health and reflection pass through untouched, so generic tools always work.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
import uuid

import grpc

from mend.errors import (CheckpointMismatchError, ConfigError, DeadlineExceededError, EditNotFoundError, InvalidEditError,
                         MendError, NoEditorError, StateConflictError, TargetResolutionError)

log = logging.getLogger(__name__)

SERVICE_PREFIX = "/mend.v1.EditService/"
WRITE_METHODS = {"ApplyEdit", "ApplyEdits", "RollbackEdit", "RollbackTo"}

STATUS_OF = {  # most specific class first; the first match along the exception's MRO wins
    InvalidEditError: grpc.StatusCode.INVALID_ARGUMENT,
    TargetResolutionError: grpc.StatusCode.INVALID_ARGUMENT,
    ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    EditNotFoundError: grpc.StatusCode.NOT_FOUND,
    NoEditorError: grpc.StatusCode.FAILED_PRECONDITION,
    StateConflictError: grpc.StatusCode.FAILED_PRECONDITION,
    CheckpointMismatchError: grpc.StatusCode.FAILED_PRECONDITION,
    DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
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
    def __init__(self, holder, read_token: str = "", write_token: str = "", max_concurrent: int = 16):
        self.holder = holder  # server.app.ServiceHolder: phase, service, metrics
        self.read_token, self.write_token = read_token, write_token
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
                self._admit(name, metadata)
                self._count(+1)
                try:
                    return behaviour(request, context)
                finally:
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

    def _admit(self, name: str, metadata: dict) -> None:
        """Raise Denied unless the caller may run `name` now; on success one slot is held."""
        self._authorize(name, metadata.get("authorization", ""))
        phase = self.holder.phase
        if phase != "serving":
            raise Denied(grpc.StatusCode.UNAVAILABLE, f"the server is {phase}; retry shortly" if phase == "starting"
                         else f"the server is {phase}; retry against another replica or after restart")
        if not self._slots.acquire(blocking=False):
            raise Denied(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"the server is already handling {self.max_concurrent} requests; retry with backoff")

    def _authorize(self, name: str, header: str) -> None:
        token = header[len("Bearer "):] if header.startswith("Bearer ") else ""
        is_write = name in WRITE_METHODS
        needed = [self.write_token] if is_write else [self.read_token, self.write_token]
        if not (self.write_token if is_write else self.read_token):
            return  # this kind of call is open: no token configured for it
        if any(t and hmac.compare_digest(token, t) for t in needed):
            return
        if not token:
            raise Denied(grpc.StatusCode.UNAUTHENTICATED, "missing bearer token: send metadata 'authorization: Bearer <token>'")
        if is_write and self.read_token and hmac.compare_digest(token, self.read_token):
            raise Denied(grpc.StatusCode.PERMISSION_DENIED, f"{name} changes the model and needs the write token; this is the read token")
        raise Denied(grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")
