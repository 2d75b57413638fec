"""Upstreams that speak the OpenAI Videos dialect: OpenAI itself, vLLM-Omni, aggregator vendors.

Bodies pass through unchanged (multipart byte for byte) except the fields the gateway rewrites:
the model name and, for edits and extensions, the referenced video's ID.
"""

from __future__ import annotations

import asyncio
import contextlib
from functools import cached_property, partial
from typing import Any
from urllib.parse import quote

from aiohttp import web

from gateway.bodies import RequestBody
from gateway.errors import UpstreamError, expired_result
from gateway.headers import CONDITIONAL_REQUEST_HEADERS, media_type
from gateway.http1 import FixedHeaders
from gateway.providers.base import (
    REDIRECTS,
    Adapter,
    Call,
    EventStream,
    UpstreamVideo,
    error_from_upstream,
    path_segment,
    range_headers,
    read_limited,
    redirect_target,
)
from gateway.providers.native import model_must_exist
from gateway.store import Task


class OpenAIAdapter(Adapter):
    kind = "openai"
    required_fields = ("base_url",)

    @cached_property
    def _videos_url(self) -> str:
        return f"{self.base_url}/videos"

    def _url(self, *parts: str) -> str:
        """``{base_url}/videos/part/...``, each part one path segment."""
        return "/".join([self._videos_url, *[path_segment(p) for p in parts]])

    async def _post(self, call: Call, url: str, body: RequestBody, replace: dict[str, str]) -> Any:
        """POST a client body on; the parsed JSON answer, or the open event stream.

        A JSON ``seconds`` number, which the gateway takes, goes on as the dialect's string."""
        seconds = body.fields.get("seconds") if body.kind == "json" else None
        if type(seconds) is int:
            replace = {**replace, "seconds": str(seconds)}
        data, length = body.upstream_body(replace)
        headers = self.upstream_headers(call)
        headers["Accept-Encoding"] = "identity"
        if length is not None:
            headers["Content-Length"] = str(length)
        if body.kind == "json":
            headers["Content-Type"] = "application/json"
            # no upload to wait for: the answer must begin within the call's timeouts.request, as a
            # poll's does (sent streaming all the same, for an event stream it may get)
            due = asyncio.get_running_loop().time() + self.config.timeouts.request
            call.answer_by = due if call.answer_by is None else min(call.answer_by, due)
        # Entered, not closed in a finally: a failure reading the answer (cut off, say) must reach
        # send(), which maps it, rather than escape as aiohttp's own error.
        async with contextlib.AsyncExitStack() as closer:
            response = await closer.enter_async_context(
                self.send(call, "POST", url, headers=headers, data=data, body=body, streaming=True)
            )
            if (
                response.status < 400
                and media_type(response.headers.get("Content-Type")) == "text/event-stream"
            ):
                return EventStream(response, closer.pop_all(), partial(self.stream_cut_off, call))
            return await self.read_json(response)

    async def create(self, call: Call, body: RequestBody) -> UpstreamVideo | EventStream:
        upstream_model = call.deployment.upstream_model
        with model_must_exist(self.provider_name, upstream_model, _no_such_model):
            answer = await self._post(call, self._url(), body, {"model": upstream_model})
        return answer if isinstance(answer, EventStream) else _video(answer)

    async def retrieve(self, call: Call, task: Task) -> UpstreamVideo:
        return _video(await self._get_json(call, self._url(task.upstream_id)))

    @cached_property
    def _get_headers(self) -> FixedHeaders:
        """What every JSON GET sends but its request ID, built once (polls are the hot path; this
        adapter's credential does not change while it lives)."""
        headers = self.provider_headers()
        headers["Accept"] = "application/json"
        headers["Accept-Encoding"] = "identity"
        headers.popall("X-Request-ID", None)  # each request's own, added as it goes
        return FixedHeaders.of(headers)

    async def _get_json(self, call: Call, url: str) -> Any:
        headers = {"X-Request-ID": call.request_id}
        answer = await self.exchange(call, "GET", url, headers=headers, fixed=self._get_headers)
        return await self.json_of(answer)

    async def content(self, call: Call, task: Task, variant: str) -> web.StreamResponse:
        sent = call.request.headers
        # Which bytes the client wants, for the provider and for a result host it redirects to. The
        # media are compressed already; and a refusal compressed for the client's Accept-Encoding
        # would be bytes the gateway cannot read the provider's words from.
        asked = {name: sent[name] for name in CONDITIONAL_REQUEST_HEADERS if name in sent}
        asked = {"Accept-Encoding": "identity", **asked, **range_headers(sent)}
        headers = self.upstream_headers(call, forward_client=False)
        headers.update(asked)
        url = self._url(task.upstream_id, "content") + f"?variant={quote(variant)}"
        async with self.send(call, "GET", url, headers=headers, streaming=True) as response:
            if response.status in REDIRECTS and "Location" in response.headers:
                return await self._follow(call, redirect_target(response), asked)
            if response.status >= 400:
                raise self.provider_error(
                    response.status, response.headers, await read_limited(response, 65536)
                )
            return await self.relay(call, response)

    async def _follow(self, call: Call, url: str, headers: dict[str, str]) -> web.StreamResponse:
        """One redirect to a signed result URL, only to a host this provider is known to use; it
        gets ``headers`` (which bytes are wanted), none of the provider's own."""
        if not self.result_host_allowed(url):
            raise UpstreamError(
                502,
                "Upstream error: the provider redirected the download to an unknown host.",
                kind="payload",
            )
        async with self.send(call, "GET", url, headers=headers, streaming=True) as response:
            if response.status in REDIRECTS:
                raise UpstreamError(
                    502, "Upstream error: the provider's result URL redirected again.", kind="payload"
                )
            if response.status in (403, 404, 410):  # a signed URL past its time, or its file gone
                raise expired_result()
            if response.status >= 400:
                raise error_from_upstream(
                    response.status, response.headers, await read_limited(response, 65536)
                )
            return await self.relay(call, response)

    async def delete(self, call: Call, task: Task) -> None:
        headers = self.upstream_headers(call, forward_client=False)
        headers["Accept-Encoding"] = "identity"
        answer = await self.exchange(call, "DELETE", self._url(task.upstream_id), headers=headers)
        if answer.status != 404:
            await self.json_of(answer)

    async def remix(self, call: Call, task: Task, body: RequestBody) -> UpstreamVideo:
        return _video(await self._post(call, self._url(task.upstream_id, "remix"), body, _model(call, body)))

    async def edit(self, call: Call, task: Task | None, body: RequestBody) -> UpstreamVideo:
        replace = {**_model(call, body), **_video_ref(task)}
        return _video(await self._post(call, self._url("edits"), body, replace))

    async def extend(self, call: Call, task: Task | None, body: RequestBody) -> UpstreamVideo:
        replace = {**_model(call, body), **_video_ref(task)}
        return _video(await self._post(call, self._url("extensions"), body, replace))

    async def create_character(self, call: Call, body: RequestBody) -> dict[str, Any]:
        return _character(await self._post(call, self._url("characters"), body, _model(call, body)))

    async def get_character(self, call: Call, task: Task) -> dict[str, Any]:
        return _character(await self._get_json(call, self._url("characters", task.upstream_id)))


def _model(call: Call, body: RequestBody) -> dict[str, str]:
    """A ``model`` the client sent becomes the deployment's: the provider never sees a public name,
    nor one the key may not use (an edit by ID is routed by its source, not by that field)."""
    return {"model": call.deployment.upstream_model} if "model" in body.fields else {}


def _video_ref(task: Task | None) -> dict[str, str]:
    return {"video[id]": task.upstream_id} if task is not None else {}


def _no_such_model(refusal: UpstreamError) -> bool:
    """A 404 to a create about its model: OpenAI's ``model_not_found``, an Azure resource's
    ``DeploymentNotFound``. Another (a ``file_id`` the create names) stays the client's."""
    return refusal.code in ("model_not_found", "DeploymentNotFound") or refusal.param == "model"


def _video(answer: Any) -> UpstreamVideo:
    if not isinstance(answer, dict) or not isinstance(answer.get("id"), str) or not answer["id"]:
        raise UpstreamError(502, "Upstream error: the provider's answer has no video id.", kind="payload")
    if "created_at" not in answer and "created" in answer:
        answer["created_at"] = answer["created"]
    return UpstreamVideo(answer["id"], answer)


def _character(answer: Any) -> dict[str, Any]:
    if not isinstance(answer, dict) or not isinstance(answer.get("id"), str) or not answer["id"]:
        raise UpstreamError(502, "Upstream error: the provider's answer has no character id.", kind="payload")
    return answer
