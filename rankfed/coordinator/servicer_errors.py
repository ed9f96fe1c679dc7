"""One table from the coordinator's exceptions to gRPC status codes, applied at the edge;
the same wrappers count every RPC by method and final code for the metrics."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, NoReturn, TypeAlias, TypeVar

import grpc

from rankfed.aggregation import AdapterError
from rankfed.coordinator import errors
from rankfed.protocol import DecodeError, serde

log = logging.getLogger("rankfed.coordinator")

ServicerContext: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
"""What a handler of the asyncio server receives as ``context``."""

_Servicer = TypeVar("_Servicer")
_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


STATUS_OF: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (errors.AuthError, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (errors.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.PreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (AdapterError, grpc.StatusCode.INVALID_ARGUMENT),
    (DecodeError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.TooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DuplicateError, grpc.StatusCode.ALREADY_EXISTS),
    (errors.StorageError, grpc.StatusCode.UNAVAILABLE),
    (errors.RetryLaterError, grpc.StatusCode.UNAVAILABLE),
    (errors.StreamTimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
)


def status_of(exc: Exception) -> grpc.StatusCode | None:
    for kind, code in STATUS_OF:
        if isinstance(exc, kind):
            return code
    return None


# A status goes out after the messages already written. To a client that stopped reading a
# server stream it never goes out, and context.abort() would wait for it as long as the
# client keeps the connection: the handler stops waiting after this long. The status stays
# queued in gRPC core, so the client still gets it if it reads on; the call ends there when
# the client reads, disconnects or reaches its deadline.
STATUS_SEND_SECONDS = 5.0


async def _abort(context: ServicerContext, exc: Exception, method: str) -> NoReturn:
    code = status_of(exc)
    trailers: tuple[tuple[str, bytes], ...]
    if code is None:
        log.exception("internal error in %s", method)
        code, message, trailers = grpc.StatusCode.INTERNAL, f"internal error in {method}; see the coordinator log", ()
    else:
        log.info("rejected %s: %s", method, exc, extra={"method": method, "status": code.name})
        detail = getattr(exc, "detail", None)
        message = str(exc)
        trailers = (serde.error_detail_to_trailer(code.value[0], message, detail),) if detail is not None else ()
    try:
        async with asyncio.timeout(STATUS_SEND_SECONDS):
            await context.abort(code, message, trailing_metadata=trailers)
    except TimeoutError:
        log.info("%s: the client reads nothing; its %s status stays queued", method, code.name,
                 extra={"method": method, "status": code.name})
        # grpc.aio ends a handler that raises CancelledError quietly (its status is set).
        raise asyncio.CancelledError from None
    raise AssertionError("context.abort returned")  # pragma: no cover - it always raises


def _record(servicer: object, method: str, started: float, code: str, exc: BaseException | None) -> None:
    metrics = getattr(servicer, "metrics", None)
    if metrics is not None:
        metrics.rpc_done(method, code, time.perf_counter() - started, exc)


def _code(exc: BaseException) -> str:
    code = status_of(exc) if isinstance(exc, Exception) else None
    return (code or grpc.StatusCode.INTERNAL).name


def unary(
    fn: Callable[[_Servicer, _Request, ServicerContext], Awaitable[_Response]],
) -> Callable[[_Servicer, _Request, ServicerContext], Coroutine[Any, Any, _Response]]:
    """Map core exceptions of a unary (or stream-unary) handler to statuses."""

    @functools.wraps(fn)
    async def wrapper(self: _Servicer, request: _Request, context: ServicerContext) -> _Response:
        started, code = time.perf_counter(), "OK"
        error: BaseException | None = None
        try:
            return await fn(self, request, context)
        except asyncio.CancelledError as exc:  # the client went away or its deadline passed
            code, error = "CANCELLED", exc
            raise
        except grpc.aio.AbortError:
            code = "UNKNOWN"
            raise
        except Exception as exc:  # noqa: BLE001 - unknown ones are bugs: INTERNAL, logged with traceback
            code, error = _code(exc), exc
            await _abort(context, exc, fn.__name__)
        finally:
            _record(self, fn.__name__, started, code, error)

    return wrapper


def streaming(
    fn: Callable[[_Servicer, _Request, ServicerContext], AsyncIterator[_Response]],
) -> Callable[[_Servicer, _Request, ServicerContext], AsyncIterator[_Response]]:
    """The same for server-streaming handlers (async generators)."""

    @functools.wraps(fn)
    async def wrapper(self: _Servicer, request: _Request, context: ServicerContext) -> AsyncIterator[_Response]:
        started, code = time.perf_counter(), "OK"
        error: BaseException | None = None
        try:
            async for item in fn(self, request, context):
                yield item
        except asyncio.CancelledError as exc:
            code, error = "CANCELLED", exc
            raise
        except grpc.aio.AbortError:
            code = "UNKNOWN"
            raise
        except Exception as exc:  # noqa: BLE001
            code, error = _code(exc), exc
            await _abort(context, exc, fn.__name__)
        finally:
            _record(self, fn.__name__, started, code, error)

    return wrapper
