"""Errors the gateway answers with, all rendered as the OpenAI error envelope.

    ApiError                      any answer that is not a success
     ├── client errors            400 / 401 / 403 / 404 / 405 / 413 / 415 / 429
     ├── UpstreamError            the provider failed us: 502 / 503 / 504, or its own 4xx passed on
     ├── store_unavailable()      503: the task store cannot be read or written
     └── internal_error()         500: the gateway's own bug

Handlers raise; the envelope in ``app.py`` renders, and ``connections.py`` for what aiohttp answers
below the routes. Nothing else builds error bodies.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from gateway.logs import log, scrub


class ApiError(Exception):
    """An error with everything the envelope needs.

    ``headers`` carries answer headers such as ``Retry-After`` or ``x-should-retry``.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The envelope; a provider's words in it (any field) may quote the credential it was sent."""
        return {
            "error": {
                "message": scrub(self.message),
                "type": scrub(self.type),
                "param": None if self.param is None else scrub(self.param),
                "code": None if self.code is None else scrub(self.code),
            }
        }

    def response(self) -> web.Response:
        return web.Response(
            status=self.status,
            text=json.dumps(self.body()),
            content_type="application/json",
            headers=self.headers,
        )


class UpstreamError(ApiError):
    """The provider refused, failed or could not be reached.

    ``kind`` is one of connect, timeout, reset, 4xx, 5xx, payload: the bounded set metrics use.
    ``sent`` tells whether the request body may have reached the provider (no failover then);
    ``upstream_status`` is the provider's own HTTP status when it answered.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str,
        sent: bool = False,
        upstream_status: int | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("type", "upstream_error")
        super().__init__(status, message, **kwargs)
        self.kind = kind
        self.sent = sent
        self.upstream_status = upstream_status


def from_http_exception(exc: web.HTTPException) -> ApiError:
    """One of aiohttp's own answers (no route, a method the route does not take...) in our words."""
    messages = {
        404: ("Unknown route.", "not_found"),
        405: ("Method not allowed on this route.", "method_not_allowed"),
        413: ("The request body is too large.", "request_too_large"),
    }
    message, code = messages.get(exc.status, (exc.reason, None))
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
    return ApiError(exc.status, message, code=code, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def video_not_found(video_id: str, param: str = "video_id") -> ApiError:
    """The one answer for unknown, foreign, deleted, forged and malformed IDs alike.

    ``param`` names where the ID came from: the path's ``video_id``, or a body's ``video``.
    """
    return ApiError(404, f"No video found with id '{video_id}'.", param=param, code="video_not_found")


def expired_result() -> ApiError:
    """The client's video, whose content the provider no longer has."""
    return ApiError(
        410,
        "The provider no longer has this video's content: its result has expired.",
        type="invalid_request_error",
        code="video_expired",
    )


def no_deployment_available(model: str) -> ApiError:
    """503 for a create none of whose model's deployments could be tried (all ejected, say)."""
    return ApiError(
        503,
        f"No deployment of '{model}' can take requests now.",
        type="server_error",
        code="no_deployment_available",
        headers={"Retry-After": "1"},
    )


def upstream_busy(what: str) -> ApiError:
    """503 at once for a deployment at one of its caps (``what``): the client may retry shortly,
    and a create may go to the model's next deployment. Not the provider's failure."""
    return ApiError(
        503,
        f"The upstream serving this request is at its concurrency limit ({what}); retry shortly.",
        type="server_error",
        code="upstream_busy",
        headers={"Retry-After": "1"},
    )


def shutting_down(what: str) -> ApiError:
    """503 for a request the gateway's shutdown cut off before anything reached the provider whole
    (``what`` happened): nothing was created, so the client may send it again, elsewhere or later."""
    return ApiError(
        503,
        f"The gateway is shutting down and {what}; nothing was created. Retry.",
        type="server_error",
        code="shutting_down",
        headers={"Retry-After": "1", "Connection": "close"},
    )


def store_unavailable(message: str = "", *, retry: bool = True) -> ApiError:
    """The task store failed. ``retry=False`` once a provider has accepted the job the request
    started: an automatic retry would start another one."""
    headers = {"Retry-After": "1"} if retry else {"Retry-After": "1", "x-should-retry": "false"}
    return ApiError(
        503,
        message or "The gateway's task store is unavailable; retry shortly.",
        type="server_error",
        code="store_unavailable",
        headers=headers,
    )


def log_storage_failure(what: str, exc: OSError) -> str:
    """Log one ``storage_failed`` error line (what could not be stored, and why); return the why."""
    reason = exc.strerror or type(exc).__name__
    log.error("storage_failed", what=what, reason=reason, errno=exc.errno)
    return reason


def storage_failed(what: str, exc: OSError) -> ApiError:
    """The gateway's own disk failed under ``what`` (an upload's temporary file, an image it hosts
    for a provider, a provider's inline video): a full disk, most often. The gateway's trouble, not
    the client's, and likely to pass: logged once with the reason, answered 503 to retry."""
    reason = log_storage_failure(what, exc)
    return ApiError(
        503,
        f"The gateway cannot store {what} right now ({reason}); retry shortly.",
        type="server_error",
        code="storage_unavailable",
        headers={"Retry-After": "5"},
    )


def internal_error(status: int = 500) -> ApiError:
    """The gateway's own failure (a bug): logged where it happened, never detailed to the client."""
    return ApiError(
        status, "The gateway failed to handle this request.", type="server_error", code="internal_error"
    )


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404,
        f"The model '{model}' does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def unsupported(feature: str, provider_kind: str) -> ApiError:
    return ApiError(
        400,
        f"{feature} is not supported by the provider serving this model ({provider_kind}).",
        code="unsupported_feature",
    )
