"""A fault-injecting OpenAI-dialect upstream, in the manner of Envoy's fault filter.

Each upstream model name has a behaviour the test sets (``fake.behaviour["primary"] = "status:503"``):

    ok               a normal answer (the Video object of the OpenAI dialect, §3.1 of the reference)
    status:N         answer HTTP N with the OpenAI error envelope (§3.3), 429 with Retry-After
    unsure:N         answer HTTP N as ``status:N`` with ``x-should-retry: false`` (§4.4: the server's
                     own word that the client must not retry, as when a job may already exist)
    no-model         answer 404 as OpenAI does for a model it does not have (§3.3's envelope,
                     code ``model_not_found``)
    delay:S          wait S seconds before answering
    hang             read the body, then never answer
    reset            close the connection without answering
    nonjson          answer 200 with an HTML page
    flaky:N          answer 503 to the first N retrieves of a video, then normally
    drip:S           send the content slowly, 1 KiB every S seconds
    truncate         send half the content (or the JSON answer) promised by Content-Length,
                     then close
    truncate-chunked send content chunked, then close before the final chunk
    made-html        make the job, then answer 200 with an HTML page (a proxy's page in front, say)
    made-no-id       make the job, then answer 200 with JSON that has no ``id``
    trickle:S        make the job, then send its JSON answer one byte every S seconds
    held-stream      make the job, answer as an event stream (``text/event-stream``, the OpenAI-dialect
                     streamed create of apifree's optional ``stream`` flag): one event, then no more
    made-timeout:N   make the job, then answer N with an HTML page, as a provider's front answers
                     when it gave up waiting on the server that took the job (nginx's 504 Gateway
                     Time-out, Cloudflare's 524 "A timeout occurred")
    large            send 256 MiB of content, as fast as the reader takes it
    A+B              A, then B (``delay:0.5+status:503``: a refusal after half a second)

``fake.reset_next_upload = True`` makes the next create read 64 KiB of its body, then close the
connection, and ``fake.stall_next_upload = True`` makes it read 64 KiB, then read no more and not
answer until ``fake.stall_released`` is set (the model is not known that early). ``fake.streaming``
counts content answers under way.

Everything received is recorded: path, headers, the raw body, and which model it was for.
"""

from __future__ import annotations

import asyncio
import email.policy
import itertools
import json
import time
from dataclasses import dataclass, field
from email.parser import BytesParser
from typing import Any

from aiohttp import web


@dataclass
class Hit:
    method: str
    path: str
    model: str | None
    headers: dict[str, str]
    body: bytes


@dataclass
class FaultyUpstream:
    behaviour: dict[str, str] = field(default_factory=dict)
    hits: list[Hit] = field(default_factory=list)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    retrieves: dict[str, int] = field(default_factory=dict)
    reset_next_upload: bool = False
    stall_next_upload: bool = False
    stall_released: asyncio.Event = field(default_factory=asyncio.Event)
    streaming: int = 0
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def hits_for(self, model: str, method: str = "POST") -> list[Hit]:
        return [h for h in self.hits if h.model == model and h.method == method]

    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_post("/v1/videos", self.create)
        app.router.add_get("/v1/videos/{vid}", self.retrieve)
        app.router.add_get("/v1/videos/{vid}/content", self.content)
        return app

    def _model_of(self, content_type: str, body: bytes) -> str | None:
        if not body:
            return None
        if content_type.startswith("application/json"):
            value = json.loads(body).get("model")
            return value if isinstance(value, str) else None
        message = BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + body
        )
        for part in message.iter_parts():
            if part.get_param("name", header="content-disposition") == "model":
                payload = part.get_payload(decode=True)
                return payload.decode() if isinstance(payload, bytes) else None
        return None

    async def _fault(self, request: web.Request, behaviour: str) -> web.StreamResponse | None:
        if "+" in behaviour:  # one after the other: "delay:0.5+status:503"
            for part in behaviour.split("+"):
                if (fault := await self._fault(request, part)) is not None:
                    return fault
            return None
        kind, _, arg = behaviour.partition(":")
        if kind == "no-model":
            message = "The model does not exist or you do not have access to it."
            error = {"message": message, "type": "invalid_request_error", "param": None}
            return web.json_response({"error": {**error, "code": "model_not_found"}}, status=404)
        if kind in ("status", "unsure"):
            status = int(arg)
            headers = {"Retry-After": "2"} if status == 429 else {}
            if kind == "unsure":
                headers["x-should-retry"] = "false"
            body = {
                "error": {
                    "message": f"injected {status}",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            }
            return web.json_response(body, status=status, headers=headers)
        if kind == "delay":
            await asyncio.sleep(float(arg))
        elif kind == "hang":
            await asyncio.sleep(3600)
        elif kind == "reset":
            assert request.transport is not None
            request.transport.close()
            await asyncio.sleep(0.1)
            return web.Response(status=500)
        elif kind == "nonjson":
            return web.Response(text="<html>oops</html>", content_type="text/html")
        return None

    async def create(self, request: web.Request) -> web.StreamResponse:
        if self.reset_next_upload:
            self.reset_next_upload = False
            await request.content.read(64 * 1024)
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=500)
        if self.stall_next_upload:
            self.stall_next_upload = False
            await request.content.read(64 * 1024)
            await self.stall_released.wait()
            return web.Response(status=500)
        body = await request.read()
        model = self._model_of(request.headers.get("Content-Type", ""), body)
        self.hits.append(Hit("POST", request.path, model, dict(request.headers), body))
        behaviour = self.behaviour.get(model or "", "ok")
        fault = await self._fault(request, behaviour)
        if fault is not None:
            return fault
        job_id = f"job_{next(self._ids)}"
        self.jobs[job_id] = {
            "id": job_id,
            "object": "video",
            "model": model,
            "status": "queued",
            "progress": 0,
            "created_at": int(time.time()),
            "size": "720x1280",
            "seconds": "4",
            "behaviour": behaviour,
        }
        answer = {k: v for k, v in self.jobs[job_id].items() if k != "behaviour"}
        if behaviour == "truncate":  # the job is made, but its answer breaks off
            return await _cut_off(request, json.dumps(answer).encode(), "application/json")
        if behaviour == "made-html":
            return web.Response(text="<html>accepted</html>", content_type="text/html")
        if behaviour == "made-no-id":
            return web.json_response({"task": answer})
        if behaviour == "held-stream":
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(f"event: video.queued\ndata: {json.dumps(answer)}\n\n".encode())
            await asyncio.sleep(3600)
        if behaviour.startswith("trickle:"):
            return await _trickle(request, json.dumps(answer).encode(), float(behaviour.partition(":")[2]))
        if behaviour.startswith("made-timeout:"):
            status = int(behaviour.partition(":")[2])
            page = f"<html>{status} timeout</html>"
            return web.Response(status=status, text=page, content_type="text/html")
        return web.json_response(answer)

    async def retrieve(self, request: web.Request) -> web.StreamResponse:
        job = self.jobs.get(request.match_info["vid"])
        self.hits.append(Hit("GET", request.path, job["model"] if job else None, dict(request.headers), b""))
        if job is None:
            return web.json_response(
                {
                    "error": {
                        "message": "not found",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": None,
                    }
                },
                status=404,
            )
        count = self.retrieves[job["id"]] = self.retrieves.get(job["id"], 0) + 1
        behaviour = self.behaviour.get(job["model"] or "", "ok")
        if behaviour.startswith("flaky:") and count <= int(behaviour.partition(":")[2]):
            return web.json_response(
                {"error": {"message": "flaky", "type": "server_error", "param": None, "code": None}},
                status=503,
            )
        if not behaviour.startswith("flaky:"):
            fault = await self._fault(request, behaviour)
            if fault is not None:
                return fault
        job.update(status="completed", progress=100, completed_at=int(time.time()))
        answer = {k: v for k, v in job.items() if k != "behaviour"}
        if behaviour == "truncate":
            return await _cut_off(request, json.dumps(answer).encode(), "application/json")
        return web.json_response(answer)

    async def content(self, request: web.Request) -> web.StreamResponse:
        job = self.jobs.get(request.match_info["vid"], {})
        behaviour = self.behaviour.get(job.get("model") or "", "ok")
        payload = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 64
        if behaviour == "hang":
            await asyncio.sleep(3600)
        if behaviour in ("truncate", "truncate-chunked"):
            return await _cut_off(request, payload, "video/mp4", chunked=behaviour == "truncate-chunked")
        if behaviour == "large":
            return await self._large(request)
        if behaviour.startswith("drip:"):
            response = web.StreamResponse(headers={"Content-Type": "video/mp4"})
            response.content_length = len(payload)
            await response.prepare(request)
            for i in range(0, len(payload), 1024):
                await response.write(payload[i : i + 1024])
                await asyncio.sleep(float(behaviour.partition(":")[2]))
            await response.write_eof()
            return response
        return web.Response(body=payload, content_type="video/mp4")

    async def _large(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "video/mp4"})
        response.content_length = 256 * 1024 * 1024
        chunk = bytes(1024 * 1024)
        self.streaming += 1
        try:
            await response.prepare(request)
            for _ in range(256):
                await response.write(chunk)
            await response.write_eof()
        except ConnectionError:  # the reader let go (the gateway, its client gone): as a CDN would
            response.force_close()
        finally:
            self.streaming -= 1
        return response


async def _trickle(request: web.Request, payload: bytes, seconds: float) -> web.StreamResponse:
    """An answer whose headers come at once and whose body comes a byte every ``seconds``."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(payload)
    await response.prepare(request)
    for at in range(len(payload)):
        await response.write(payload[at : at + 1])
        await asyncio.sleep(seconds)
    await response.write_eof()
    return response


async def _cut_off(
    request: web.Request, payload: bytes, content_type: str, *, chunked: bool = False
) -> web.StreamResponse:
    """A 200 that promises twice ``payload`` (or, chunked, no length), sends it, then closes the
    connection: chunked, the final empty chunk never comes."""
    response = web.StreamResponse(headers={"Content-Type": content_type})
    if not chunked:
        response.content_length = len(payload) * 2
    await response.prepare(request)
    await response.write(payload)
    assert request.transport is not None
    request.transport.close()
    return response
