"""A fake OpenAI-dialect upstream (OpenAI itself, vLLM-Omni, aggregators) that records what it got.

Shapes follow the reference ``shared/reference/openai-videos-api.md``:
- endpoints and methods: §1 table (create, retrieve, delete, content, remix, edits, extensions,
  characters); every success is HTTP 200;
- the Video object: §3.1 (13 keys, ``seconds`` a string, unix-second timestamps);
- delete answer: §3.2 ``{"id", "object": "video.deleted", "deleted": true}``;
- error envelope: §3.3 ``{"error": {"message", "type", "param", "code"}}``, 429 with ``Retry-After``;
- ``stream`` on create: §7 (apifree's optional flag), answered as ``text/event-stream``. No source
  documents the events of a streamed video create (§1: no SSE for videos in any source), so their
  shape here is assumed, UNVERIFIED: ``event: video.<status>`` lines, a Video object per ``data:``
  line, ``data: [DONE]`` at the end; the gateway's relay must not depend on more than that.

Behaviour is steered by the prompt, as a test would: ``[429]``, ``[400]``, ``[500]``, ``[nonjson]``,
``[hang]`` (never answers), ``[redirect]`` (content is a 302 to a signed URL on ``/signed/...``, which answers
403 as an object store does once such a URL is past its time when ``signed_urls_expired`` is set),
``[redirect elsewhere]`` (the same 302, to a host name the provider never named),
``[odd events]`` (a streamed create starts with events whose data is no JSON), ``[leaky events]``
(it starts with an error event quoting the provider's key and a signed URL), ``[fail leaky]`` (the
job fails with a message quoting the key), ``[cut stream]``
(a streamed create's connection drops after its first event), ``[slow]`` (the
job is made at once, as a provider makes it on reading the request, but the answer to its create (a
stream too), remix, edit, extension or delete comes :data:`SLOW_SECONDS` later).
Jobs move queued → in_progress → completed, one step per retrieve.

A job whose prompt has ``[unreadable]`` answers its retrieves and deletes 500, in the error
envelope, with a message that quotes its job ID, as a provider's internal error may.
A job whose prompt has ``[no remix]`` refuses a remix with a 404 in the error envelope that quotes
its own job ID, as a server with the route may for a job it will not remix; ``[no remix 400]``
refuses it with a 400, quoting it too.

``terse`` makes create and retrieve answer with the fields of apifree's remix example only (§7: ``id``,
``object``, ``created_at``, ``status``, ``model``, plus ``progress``): no ``size``, ``seconds`` or
``prompt``, so what a client asked for reaches its video only through the gateway.

``without`` names routes this server lacks (``remix``, ``edits``, ``extensions``), as a self-hosted
server may implement only create, retrieve and content: each answers what aiohttp answers for a path
it has no route for, a plain-text ``404: Not Found``.
"""

from __future__ import annotations

import asyncio
import email.policy
import itertools
import json
import time
from dataclasses import dataclass, field
from email.parser import BytesParser
from pathlib import Path
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

SLOW_SECONDS = 1.0


@dataclass
class Received:
    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class FakeOpenAIUpstream:
    api_key: str
    media: dict[str, Path]
    received: list[Received] = field(default_factory=list)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    characters: dict[str, dict[str, Any]] = field(default_factory=dict)
    signed_urls_expired: bool = False
    stream_gate: asyncio.Event = field(default_factory=asyncio.Event)  # "[held stream]" waits for it
    without: set[str] = field(default_factory=set)
    terse: bool = False
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def requests(self, method: str, path_prefix: str = "") -> list[Received]:
        return [r for r in self.received if r.method == method and r.path.startswith(path_prefix)]

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record], client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/videos/edits", self.edit)
        app.router.add_post("/v1/videos/extensions", self.edit)
        app.router.add_post("/v1/videos/characters", self.create_character)
        app.router.add_get("/v1/videos/characters/{cid}", self.get_character)
        app.router.add_post("/v1/videos", self.create)
        app.router.add_get("/v1/videos/{vid}", self.retrieve)
        app.router.add_delete("/v1/videos/{vid}", self.delete)
        app.router.add_get("/v1/videos/{vid}/content", self.content)
        app.router.add_post("/v1/videos/{vid}/remix", self.remix)
        app.router.add_get("/signed/{vid}", self.signed)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.read()
        self.received.append(
            Received(request.method, request.path, dict(request.query), CIMultiDict(request.headers), body)
        )
        if (
            request.path.startswith("/v1/")
            and request.headers.get("Authorization") != f"Bearer {self.api_key}"
        ):
            return _error(
                401, "Incorrect API key provided.", "invalid_request_error", None, "invalid_api_key"
            )
        try:
            return await handler(request)
        except _NotFound:
            return _error(404, "Video not found.", "invalid_request_error", "video_id", "not_found")

    async def _fields(self, request: web.Request) -> dict[str, Any]:
        """The body's fields; files as ``{"filename", "size"}`` (parsed by the stdlib, not the gateway)."""
        body = self.received[-1].body
        if not body:
            return {}
        if request.content_type == "application/json":
            data: dict[str, Any] = json.loads(body)
            return data
        head = f"Content-Type: {request.headers['Content-Type']}\r\n\r\n".encode()
        message = BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
        fields: dict[str, Any] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True) or b""
            filename = part.get_filename()
            fields[name] = {"filename": filename, "size": len(payload)} if filename else payload.decode()
        return fields

    def _new_job(self, fields: dict[str, Any], remixed_from: str | None = None) -> dict[str, Any]:
        job_id = f"up_{next(self._ids):04d}"
        job = {
            "id": job_id,
            "object": "video",
            "model": fields.get("model", "sora-2"),
            "status": "queued",
            "progress": 0,
            "created_at": int(time.time()),
            "completed_at": None,
            "expires_at": None,
            "prompt": fields.get("prompt"),
            "size": fields.get("size", "720x1280"),
            "seconds": str(fields.get("seconds", "4")),
            "remixed_from_video_id": remixed_from,
            "error": None,
        }
        self.jobs[job_id] = job
        return job

    async def _misbehave(self, prompt: str) -> web.Response | None:
        if "[429]" in prompt:
            return _error(
                429,
                "Rate limit reached for video generation.",
                "rate_limit_error",
                None,
                "rate_limit_exceeded",
                {"Retry-After": "7"},
            )
        if "[400]" in prompt:
            return _error(
                400, "Invalid size for this model.", "invalid_request_error", "size", "invalid_value"
            )
        if "[400 leaky]" in prompt:  # a provider quoting the key it was sent in every field
            key = f"Bearer {self.api_key}"
            return _error(400, f"Bad key {key}.", f"invalid {key}", f"header {key}", f"no_{self.api_key}")
        if "[500]" in prompt:
            return _error(500, "The server had an error.", "server_error", None, None)
        if "[nonjson]" in prompt:
            return web.Response(text="<html>bad gateway</html>", content_type="text/html")
        if "[hang]" in prompt:
            await asyncio.sleep(3600)
        return None

    async def create(self, request: web.Request) -> web.StreamResponse:
        fields = await self._fields(request)
        trouble = _wrong_type(fields) or await self._misbehave(str(fields.get("prompt", "")))
        if trouble is not None:
            return trouble
        job = self._new_job(fields)
        if str(fields.get("stream", "")).lower() == "true" or fields.get("stream") is True:
            return await self._stream(request, job)
        await self._slow(job)
        response = web.json_response(self._shown(job))
        if "[cookie]" in (job["prompt"] or ""):  # a load balancer's affinity cookie, say
            response.set_cookie("affinity", job["id"], path="/")
        return response

    async def _slow(self, job: dict[str, Any]) -> None:
        if "[slow]" in (job["prompt"] or ""):
            await asyncio.sleep(SLOW_SECONDS)

    async def _stream(self, request: web.Request, job: dict[str, Any]) -> web.StreamResponse:
        await self._slow(job)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if "[leaky events]" in (job["prompt"] or ""):  # a provider's error event quoting what it must not
            await response.write(
                b'event: error\nid: up_evt_1\ndata: {"message": "auth failed for Bearer '
                + self.api_key.encode()
                + b'; see https://cdn.example/v.mp4?X-Amz-Signature=5f0c0ffee&X-Amz-Expires=60"}\n\n'
            )
        if "[odd events]" in (job["prompt"] or ""):  # events that are no JSON a parser could take
            await response.write(b"event: progress\ndata: " + b"[" * 100_000 + b"\n\ndata: NaN\n\n")
            deep = b'{"id": "%s", "status": ' % job["id"].encode() + b"[" * 1000 + b"]" * 1000 + b"}"
            await response.write(b"data: " + deep + b"\n\n")
        for status, progress in (("queued", 0), ("in_progress", 50), ("completed", 100)):
            job.update(status=status, progress=progress)
            event = f"event: video.{status}\ndata: {json.dumps(job)}\n\n".encode()
            if "[crlf events]" in (job["prompt"] or ""):
                # CRLF line ends (the SSE spec allows CRLF, LF or CR), each event reaching the
                # client in two reads, the last CR in one and its LF in the next
                event = event.replace(b"\n", b"\r\n")
                await response.write(event[:-1])
                await asyncio.sleep(0.02)
                event = event[-1:]
            elif "[cr events]" in (job["prompt"] or ""):  # CR line ends, the SSE spec's third kind
                event = event.replace(b"\n", b"\r")
            await response.write(event)
            if "[held stream]" in (job["prompt"] or ""):  # the job runs on; its next event comes later
                await self.stream_gate.wait()
            if "[endless event]" in (job["prompt"] or ""):  # then an event that never ends, written
                await response.write(b"data: ")  # on and on, never stalling past a read timeout
                for _ in range(300):
                    await response.write(b"x" * (256 * 1024))
                    await asyncio.sleep(0.05)
            if "[cut stream]" in (job["prompt"] or ""):  # the connection drops after the first event
                assert request.transport is not None
                request.transport.close()
                return response
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _job(self, request: web.Request) -> dict[str, Any]:
        job = self.jobs.get(request.match_info["vid"])
        if job is None:
            raise _NotFound
        return job

    async def retrieve(self, request: web.Request) -> web.Response:
        job = self._job(request)
        if "[unreadable]" in (job["prompt"] or ""):
            return _error(500, f"Could not read job {job['id']}.", "server_error", None, None)
        if job["status"] == "queued":
            job.update(status="in_progress", progress=40)
        elif job["status"] == "in_progress":
            failed = "[fail" in (job["prompt"] or "")
            message = "Blocked."
            if "[fail leaky]" in (job["prompt"] or ""):  # a provider that quotes the key it was sent
                message = f"Storage write failed for key {self.api_key} (api_key={self.api_key})."
            job.update(
                status="failed" if failed else "completed",
                progress=100,
                completed_at=int(time.time()),
                expires_at=int(time.time()) + 3600,
                error={"code": "moderation_blocked", "message": message} if failed else None,
            )
        return web.json_response(self._shown(job))

    def _shown(self, job: dict[str, Any]) -> dict[str, Any]:
        terse = ("id", "object", "created_at", "status", "model", "progress")
        return {name: job[name] for name in terse} if self.terse else job

    async def delete(self, request: web.Request) -> web.Response:
        job = self._job(request)
        if "[unreadable]" in (job["prompt"] or ""):
            return _error(500, f"Could not delete job {job['id']}.", "server_error", None, None)
        del self.jobs[job["id"]]
        await self._slow(job)
        return web.json_response({"id": job["id"], "object": "video.deleted", "deleted": True})

    async def content(self, request: web.Request) -> web.StreamResponse:
        job = self._job(request)
        variant = request.query.get("variant", "video")
        if "[redirect]" in (job["prompt"] or ""):
            raise web.HTTPFound(f"/signed/{job['id']}?variant={variant}")
        if "[redirect elsewhere]" in (job["prompt"] or ""):  # a host the provider never named
            port = request.url.port
            raise web.HTTPFound(f"http://localhost:{port}/signed/{job['id']}?variant={variant}")
        return self._media(variant)

    async def signed(self, request: web.Request) -> web.StreamResponse:
        if self.signed_urls_expired:  # S3's and GCS's answer to an expired presigned URL
            return web.Response(
                status=403,
                text="<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>",
                content_type="application/xml",
            )
        return self._media(request.query.get("variant", "video"))

    def _media(self, variant: str) -> web.StreamResponse:
        if variant not in self.media:
            return _error(
                404, f"No {variant} for this video.", "invalid_request_error", "variant", "not_found"
            )
        content_type = {"video": "video/mp4", "thumbnail": "image/webp", "spritesheet": "image/jpeg"}[variant]
        headers = {  # what a CDN in front of a provider adds: its caching, its file's name
            "Content-Type": content_type,
            "Cache-Control": "public, max-age=86400",
            "Content-Disposition": f'attachment; filename="up_render_{variant}.bin"',
        }
        return web.FileResponse(self.media[variant], headers=headers)

    async def remix(self, request: web.Request) -> web.Response:
        if "remix" in self.without:
            raise web.HTTPNotFound()
        source = self._job(request)
        prompt = source.get("prompt") or ""
        if "[no remix]" in prompt or "[no remix 400]" in prompt:
            status = 400 if "[no remix 400]" in prompt else 404
            message = f"Video '{source['id']}' cannot be remixed."
            return _error(status, message, "invalid_request_error", None, "not_found")
        fields = await self._fields(request)
        job = self._new_job({**source, "prompt": fields.get("prompt")}, remixed_from=source["id"])
        await self._slow(job)
        return web.json_response(job)

    async def edit(self, request: web.Request) -> web.Response:
        if request.path.rpartition("/")[2] in self.without:
            raise web.HTTPNotFound()
        fields = await self._fields(request)
        if trouble := _wrong_type(fields):
            return trouble
        ref = fields.get("video") if isinstance(fields.get("video"), dict) else None
        source_id = (ref or {}).get("id") or fields.get("video[id]")
        if isinstance(source_id, str) and source_id not in self.jobs:
            return _error(404, "Video not found.", "invalid_request_error", "video", "not_found")
        job = self._new_job({"prompt": fields.get("prompt"), "seconds": fields.get("seconds", 4)})
        await self._slow(job)
        return web.json_response(job)

    async def create_character(self, request: web.Request) -> web.Response:
        fields = await self._fields(request)
        cid = f"upchar_{next(self._ids):04d}"
        self.characters[cid] = {"id": cid, "name": fields.get("name"), "created_at": int(time.time())}
        return web.json_response(self.characters[cid])

    async def get_character(self, request: web.Request) -> web.Response:
        character = self.characters.get(request.match_info["cid"])
        if character is None:
            return _error(404, "Character not found.", "invalid_request_error", "character_id", "not_found")
        return web.json_response(character)


def _error(
    status: int,
    message: str,
    type_: str,
    param: str | None,
    code: str | None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


class _NotFound(Exception):
    pass


def _wrong_type(fields: dict[str, Any]) -> web.Response | None:
    """``seconds`` is a string enum (§2.1: "4" | "8" | "12"); a JSON number is refused as OpenAI
    refuses a value of the wrong type."""
    seconds = fields.get("seconds")
    if seconds is None or isinstance(seconds, str):
        return None
    return _error(
        400,
        f"Invalid type for 'seconds': expected a string, but got {type(seconds).__name__} instead.",
        "invalid_request_error",
        "seconds",
        "invalid_type",
    )
