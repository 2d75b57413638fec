"""A fake Runway API (api.dev.runwayml.com), from runwayml/sdk-python as summarised in the reference §c.

- auth: ``Authorization: Bearer <key>`` (401 otherwise) and ``X-Runway-Version: 2024-11-06`` (400 if missing);
- ``POST /v1/text_to_video`` / ``/v1/image_to_video``: ``{model, promptText, ratio, duration, promptImage}`` →
  ``{"id": <uuid>}``; a daily-cap refusal is HTTP 429. Checked as the reference lists them: ``ratio``
  from the model's enum (gen4.5 and gen4_turbo take six for image-to-video, gen4.5 two for
  text-to-video; veo3.x four), ``duration`` from the model's, ``promptText`` up to 1000 UTF-16 code
  units, ``promptImage`` an HTTPS URL or a data URI under 5 MB (1024 × 1024 × 5 characters, by
  Runway's input docs); anything else is a 400;
- ``GET /v1/tasks/{id}``: status moves one step per poll ``PENDING → THROTTLED → RUNNING (progress 0.4)
  → SUCCEEDED (output: [url])``; prompts with ``[fail]`` end ``FAILED`` with ``failureCode``,
  ``[cancel]`` ends ``CANCELLED``;
- ``DELETE /v1/tasks/{id}`` → 204; unknown task → 404;
- the output URL points at ``/outputs/{id}.mp4`` on this server, like Runway's CloudFront links.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

STEPS = ("PENDING", "THROTTLED", "RUNNING", "SUCCEEDED")
_GEN4 = {"1280:720", "720:1280", "1104:832", "960:960", "832:1104", "1584:672"}
_VEO = {"1280:720", "720:1280", "1080:1920", "1920:1080"}
RATIOS = {  # (model, endpoint) → ratios
    ("gen4.5", "image_to_video"): _GEN4,
    ("gen4.5", "text_to_video"): {"1280:720", "720:1280"},
    ("gen4_turbo", "image_to_video"): _GEN4,
    **{
        (veo, endpoint): _VEO
        for veo in ("veo3.1", "veo3.1_fast", "veo3")
        for endpoint in ("image_to_video", "text_to_video")
    },
}
DURATIONS = {
    "gen4.5": range(2, 11),
    "gen4_turbo": (5, 10),
    "veo3.1": (4, 6, 8),
    "veo3.1_fast": (4, 6, 8),
    "veo3": (8,),
}
MAX_DATA_URI = 5 * 1024 * 1024


@dataclass
class FakeRunway:
    api_key: str
    video: Path
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    creates: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    running_progress: Any = 0.4  # what a RUNNING task reports (a fraction, by Runway's docs)
    redirect_to: str | None = None  # outputs answer a 302 here instead (for broken Locations)
    next_id: str | None = None  # the task ID the next create answers (for odd IDs), then generated again

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth], client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/text_to_video", self.create)
        app.router.add_post("/v1/image_to_video", self.create)
        app.router.add_get("/v1/tasks/{id}", self.get_task)
        app.router.add_delete("/v1/tasks/{id}", self.delete_task)
        app.router.add_get("/outputs/{name}", self.output)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/outputs/"):
            return await handler(request)
        self.headers.append(dict(request.headers))
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": "Invalid API key."}, status=401)
        if request.headers.get("X-Runway-Version") != "2024-11-06":
            return web.json_response({"error": "A valid X-Runway-Version header is required."}, status=400)
        return await handler(request)

    async def create(self, request: web.Request) -> web.Response:
        body = await request.json()
        endpoint = request.path.rsplit("/", 1)[-1]
        self.creates.append((endpoint, body))
        if "[429]" in body.get("promptText", ""):
            # reference §c: the daily cap is a 429 on create; no Retry-After is documented
            return web.json_response({"error": "You have exceeded your daily generation limit."}, status=429)
        if not _valid(endpoint, body):
            return web.json_response({"error": "Validation of body failed"}, status=400)
        task_id = self.next_id if self.next_id is not None else str(uuid.uuid4())
        self.next_id = None
        self.tasks[task_id] = {
            "id": task_id,
            "createdAt": "2026-11-25T10:00:00.000Z",
            "status": "PENDING",
            "prompt": body.get("promptText", ""),
            "polls": 0,
        }
        return web.json_response({"id": task_id})

    async def get_task(self, request: web.Request) -> web.Response:
        task = self.tasks.get(request.match_info["id"])
        if task is None:
            return web.json_response({"error": "Task not found."}, status=404)
        task["polls"] += 1
        step = STEPS[min(task["polls"], len(STEPS) - 1)]
        answer: dict[str, Any] = {"id": task["id"], "createdAt": task["createdAt"], "status": step}
        if step == "RUNNING":
            answer["progress"] = self.running_progress
        if step == "SUCCEEDED":
            if "[fail]" in task["prompt"]:
                answer.update(
                    status="FAILED",
                    failure="Content moderation rejected the input.",
                    failureCode="SAFETY.INPUT.TEXT",
                )
            elif "[cancel]" in task["prompt"]:
                answer["status"] = "CANCELLED"
            else:
                answer["output"] = [
                    str(request.url.with_path(f"/outputs/{task['id']}.mp4").with_query(_jwt="x"))
                ]
        return web.json_response(answer)

    async def delete_task(self, request: web.Request) -> web.Response:
        if self.tasks.pop(request.match_info["id"], None) is None:
            return web.json_response({"error": "Task not found."}, status=404)
        return web.Response(status=204)

    async def output(self, request: web.Request) -> web.StreamResponse:
        if self.redirect_to is not None:
            return web.Response(status=302, headers={"Location": self.redirect_to})
        return web.FileResponse(self.video, headers={"Content-Type": "video/mp4"})


def _valid(endpoint: str, body: dict[str, Any]) -> bool:
    model, prompt, image = body.get("model"), body.get("promptText", ""), body.get("promptImage")
    if body.get("ratio") not in RATIOS.get((model, endpoint), ()):
        return False
    if not isinstance(body.get("duration"), int) or body["duration"] not in DURATIONS.get(model, ()):
        return False
    if not isinstance(prompt, str) or len(prompt.encode("utf-16-le")) // 2 > 1000:
        return False
    if endpoint == "image_to_video":
        if not isinstance(image, str) or not image.startswith(("https://", "data:")):
            return False
        if image.startswith("data:") and len(image) >= MAX_DATA_URI:
            return False
    return True
