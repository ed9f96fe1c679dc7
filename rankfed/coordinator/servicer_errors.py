"""One table from the coordinator's exceptions to gRPC status codes, applied at the edge."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from rankfed.aggregation import AdapterError
from rankfed.coordinator import errors

log = logging.getLogger("rankfed.coordinator")

STATUS_OF: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (errors.AuthError, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (errors.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.PreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.InvalidUpdateError, grpc.StatusCode.INVALID_ARGUMENT),
    (AdapterError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.TooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DuplicateError, grpc.StatusCode.ALREADY_EXISTS),
    (errors.StorageError, grpc.StatusCode.UNAVAILABLE),
)


def status_of(exc: Exception) -> grpc.StatusCode | None:
    for kind, code in STATUS_OF:
        if isinstance(exc, kind):
            return code
    return None


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    code = status_of(exc)
    if code is None:
        log.exception("internal error in %s", method)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the coordinator log")
    log.info("rejected %s: %s", method, exc, extra={"method": method, "status": code.name})
    await context.abort(code, str(exc))


def unary(fn: Callable):
    """Map core exceptions of a unary (or stream-unary) handler to statuses."""

    @functools.wraps(fn)
    async def wrapper(self, request, context):
        try:
            return await fn(self, request, context)
        except (errors.CoordinatorError, AdapterError) as exc:
            await _abort(context, exc, fn.__name__)
        except Exception as exc:  # noqa: BLE001 - anything else is a bug: INTERNAL, logged with traceback
            if isinstance(exc, (grpc.aio.AbortError,)):
                raise
            await _abort(context, exc, fn.__name__)

    return wrapper


def streaming(fn: Callable[..., AsyncIterator]):
    """The same for server-streaming handlers (async generators)."""

    @functools.wraps(fn)
    async def wrapper(self, request, context):
        try:
            async for item in fn(self, request, context):
                yield item
        except (errors.CoordinatorError, AdapterError) as exc:
            await _abort(context, exc, fn.__name__)
        except Exception as exc:  # noqa: BLE001
            if isinstance(exc, (grpc.aio.AbortError,)):
                raise
            await _abort(context, exc, fn.__name__)

    return wrapper
