"""The built-in ``local`` provider: real MP4s drawn from the prompt, no keys, no network.

:class:`LocalEngine` keeps its jobs on disk (one folder each), so they survive restarts. A job is
``queued`` for ``queue_seconds``, then ``in_progress`` with rising progress for ``run_seconds``
while it renders in a worker thread, then ``completed``. A prompt containing ``[fail]`` fails, for
demos and tests of the failure path. The same engine serves the OpenAI dialect on its own
(``video-gateway simulate``, see ``gateway/simulator.py``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.bodies import RequestBody
from gateway.errors import ApiError, bad_request
from gateway.providers.base import Adapter, Call, FileAnswer, UpstreamVideo
from gateway.render import render_video
from gateway.store import Task

VARIANTS = {
    "video": ("video.mp4", "video/mp4"),
    "thumbnail": ("thumbnail.webp", "image/webp"),
    "spritesheet": ("spritesheet.jpg", "image/jpeg"),
}
MAX_SECONDS = 20
_SIZE = re.compile(r"^(\d{2,4})x(\d{2,4})$")
_JOB_ID = re.compile(r"^(video|char)_[0-9a-f]{32}$")


def parse_size(value: Any) -> tuple[int, int]:
    match = _SIZE.match(str(value))
    if match is None:
        raise bad_request(f"Invalid size '{value}': use WIDTHxHEIGHT, for example 1280x720.", param="size")
    width, height = int(match[1]), int(match[2])
    if not (64 <= width <= 1920 and 64 <= height <= 1920) or width % 2 or height % 2:
        raise bad_request(
            f"Invalid size '{value}': width and height must be even numbers from 64 to 1920.", param="size"
        )
    return width, height


def parse_seconds(value: Any) -> int:
    text = str(value).strip()
    if not text.isdigit() or not 1 <= int(text) <= MAX_SECONDS:
        raise bad_request(
            f"Invalid seconds '{value}': use a whole number from 1 to {MAX_SECONDS}.", param="seconds"
        )
    return int(text)


def validate_prompt(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise bad_request(
            "'prompt' is required and must be a non-empty string.",
            param="prompt",
            code="missing_required_parameter",
        )
    if len(value) > 32000:
        raise bad_request("'prompt' is longer than 32000 characters.", param="prompt")
    return value


@dataclass
class LocalEngine:
    """Jobs in folders under ``root``; status is derived from the clock and the rendered files."""

    root: Path
    queue_seconds: float = 1.0
    run_seconds: float = 3.0

    def __post_init__(self) -> None:
        self._renders: dict[str, asyncio.Task[None]] = {}

    def _dir(self, job_id: str) -> Path:
        if not _JOB_ID.match(job_id):
            raise KeyError(job_id)
        return self.root / job_id

    async def create(
        self,
        *,
        prompt: str,
        model: str,
        size: str,
        seconds: int,
        reference: bytes | None = None,
        remixed_from: str | None = None,
    ) -> dict[str, Any]:
        job_id = "video_" + secrets.token_hex(16)
        job = {
            "id": job_id,
            "model": model,
            "prompt": prompt,
            "size": size,
            "seconds": seconds,
            "created_at": time.time(),
            "remixed_from_video_id": remixed_from,
        }
        await asyncio.to_thread(self._write_job, self._dir(job_id), job, reference)
        self._start_render(job_id, job)
        return self._view(job, self._dir(job_id))

    @staticmethod
    def _write_job(folder: Path, job: dict[str, Any], reference: bytes | None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if reference:
            (folder / "reference.bin").write_bytes(reference)
        tmp = folder / "job.json.tmp"
        tmp.write_text(json.dumps(job))
        tmp.replace(folder / "job.json")

    def _start_render(self, job_id: str, job: dict[str, Any]) -> None:
        if job_id in self._renders or "[fail]" in job["prompt"]:
            return
        task = asyncio.get_running_loop().create_task(self._render(job_id, job))
        self._renders[job_id] = task
        task.add_done_callback(lambda _: self._renders.pop(job_id, None))

    async def _render(self, job_id: str, job: dict[str, Any]) -> None:
        folder = self._dir(job_id)
        width, height = parse_size(job["size"])
        reference = folder / "reference.bin"
        try:
            await asyncio.to_thread(
                render_video,
                folder,
                prompt=job["prompt"],
                width=width,
                height=height,
                seconds=int(job["seconds"]),
                reference_image=reference if reference.exists() else None,
            )
        except Exception as exc:  # a failed render is the job's outcome, not the server's problem
            await asyncio.to_thread((folder / "error.txt").write_text, f"render failed: {exc}")

    def _view(self, job: dict[str, Any], folder: Path) -> dict[str, Any]:
        """The job as an OpenAI Video, as of now."""
        elapsed = time.time() - job["created_at"]
        done_at = job["created_at"] + self.queue_seconds + self.run_seconds
        view = {
            "id": job["id"],
            "object": "video",
            "model": job["model"],
            "prompt": job["prompt"],
            "size": job["size"],
            "seconds": str(job["seconds"]),
            "created_at": int(job["created_at"]),
            "remixed_from_video_id": job.get("remixed_from_video_id"),
            "completed_at": None,
            "expires_at": None,
            "error": None,
            "status": "queued",
            "progress": 0,
        }
        failed = "[fail]" in job["prompt"] or (folder / "error.txt").exists()
        if elapsed < self.queue_seconds:
            return view
        if failed and elapsed >= self.queue_seconds + self.run_seconds / 2:
            reason = "the prompt asked for a failure" if "[fail]" in job["prompt"] else "rendering failed"
            view.update(
                status="failed",
                completed_at=int(done_at),
                error={"code": "generation_failed", "message": f"Local render failed: {reason}."},
            )
            return view
        if time.time() >= done_at and (folder / "video.mp4").exists():
            view.update(status="completed", progress=100, completed_at=int(done_at))
            return view
        share = (elapsed - self.queue_seconds) / self.run_seconds if self.run_seconds else 1.0
        view.update(status="in_progress", progress=max(1, min(99, int(share * 100))))
        if not failed:
            self._start_render(job["id"], job)
        return view

    async def get(self, job_id: str) -> dict[str, Any] | None:
        try:
            folder = self._dir(job_id)
            job = json.loads(await asyncio.to_thread((folder / "job.json").read_text))
        except (KeyError, OSError, ValueError):
            return None
        return self._view(job, folder)

    async def list(self, *, after: str | None, limit: int, order: str) -> tuple[list[dict[str, Any]], bool]:
        jobs = await asyncio.to_thread(self._all_jobs)
        jobs.sort(key=lambda j: (j["created_at"], j["id"]), reverse=order == "desc")
        if after is not None:
            ids = [j["id"] for j in jobs]
            jobs = jobs[ids.index(after) + 1 :] if after in ids else []
        return [self._view(j, self._dir(j["id"])) for j in jobs[:limit]], len(jobs) > limit

    def _all_jobs(self) -> list[dict[str, Any]]:
        if not self.root.exists():
            return []
        return [json.loads(p.read_text()) for p in self.root.glob("video_*/job.json")]

    async def delete(self, job_id: str) -> bool:
        try:
            folder = self._dir(job_id)
        except KeyError:
            return False
        render = self._renders.get(job_id)
        if render is not None:
            await asyncio.wait({render})
        if not folder.exists():
            return False
        await asyncio.to_thread(shutil.rmtree, folder, True)
        return True

    async def asset(self, job_id: str, variant: str) -> tuple[Path, str]:
        """The finished file for a variant; ApiError 404/409 when there is none (yet)."""
        video = await self.get(job_id)
        if video is None:
            raise ApiError(
                404, f"No video found with id '{job_id}'.", param="video_id", code="video_not_found"
            )
        if video["status"] != "completed":
            raise ApiError(
                409,
                f"The video is {video['status']}; its content is available once it is completed.",
                code="video_not_ready",
                headers={"x-should-retry": "false"},
            )
        filename, content_type = VARIANTS[variant]
        return self._dir(job_id) / filename, content_type

    async def create_character(self, name: str) -> dict[str, Any]:
        character = {"id": "char_" + secrets.token_hex(16), "name": name, "created_at": int(time.time())}
        folder = self.root / "characters"
        await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread((folder / f"{character['id']}.json").write_text, json.dumps(character))
        return character

    async def get_character(self, character_id: str) -> dict[str, Any] | None:
        if not _JOB_ID.match(character_id):
            return None
        try:
            text = await asyncio.to_thread((self.root / "characters" / f"{character_id}.json").read_text)
        except OSError:
            return None
        character: dict[str, Any] = json.loads(text)
        return character

    async def close(self) -> None:
        renders = list(self._renders.values())
        if renders:
            await asyncio.wait(renders)


async def reference_image(body: RequestBody) -> bytes | None:
    """The ``input_reference`` image as bytes: an uploaded file, or a base64 data URL.

    Remote ``image_url``s are not fetched: the local provider works without network.
    """
    if "input_reference" in body.files:
        return await body.files["input_reference"].read()
    ref = body.get_object("input_reference")
    url = ref.get("image_url") if ref else body.get("input_reference")
    if isinstance(url, str) and url.startswith("data:") and "," in url:
        try:
            return base64.b64decode(url.split(",", 1)[1], validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(
                "input_reference.image_url is not valid base64 data.", param="input_reference"
            ) from None
    return None


def request_fields(
    body: RequestBody, *, default_size: str = "720x1280", default_seconds: str = "4"
) -> dict[str, Any]:
    """Prompt, size and seconds from a body, validated for the local renderer."""
    size = body.get("size") or default_size
    seconds = body.get("seconds") or default_seconds
    parse_size(size)
    return {
        "prompt": validate_prompt(body.get("prompt")),
        "size": str(size),
        "seconds": parse_seconds(seconds),
    }


class LocalAdapter(Adapter):
    """The local engine as a provider of the gateway."""

    kind = "local"
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "queue_seconds": {"type": "number", "minimum": 0, "description": "Time a job stays queued."},
            "run_seconds": {"type": "number", "minimum": 0, "description": "Time a job stays in progress."},
        },
    }

    async def start(self) -> None:
        opts = self.config.options
        self.engine = LocalEngine(
            self.env.data_dir / "local" / self.config.name,
            queue_seconds=float(opts.get("queue_seconds", 1.0)),
            run_seconds=float(opts.get("run_seconds", 3.0)),
        )

    async def close(self) -> None:
        await self.engine.close()

    async def _new(
        self, call: Call, fields: dict[str, Any], reference: bytes | None, remixed_from: str | None = None
    ) -> UpstreamVideo:
        job = await self.engine.create(
            model=call.deployment.upstream_model, reference=reference, remixed_from=remixed_from, **fields
        )
        return UpstreamVideo(job["id"], job)

    async def create(self, call: Call, body: RequestBody) -> UpstreamVideo:
        await body.read_rest()
        fields = request_fields(body)
        return await self._new(call, fields, await reference_image(body))

    async def retrieve(self, call: Call, task: Task) -> UpstreamVideo:
        job = await self.engine.get(task.upstream_id)
        if job is None:
            raise ApiError(404, "The video no longer exists at its provider.", code="video_not_found")
        return UpstreamVideo(job["id"], job)

    async def content(self, call: Call, task: Task, variant: str) -> web.StreamResponse:
        path, content_type = await self.engine.asset(task.upstream_id, variant)
        return FileAnswer(path, headers={"Content-Type": content_type})

    async def delete(self, call: Call, task: Task) -> None:
        await self.engine.delete(task.upstream_id)

    async def _derived(
        self, call: Call, task: Task | None, body: RequestBody, *, extend: bool
    ) -> UpstreamVideo:
        await body.read_rest()
        source = await self.engine.get(task.upstream_id) if task is not None else None
        size = source["size"] if source else body.get("size") or "720x1280"
        seconds = body.get("seconds") or (source["seconds"] if source else "4")
        if extend and source is not None:
            seconds = str(min(MAX_SECONDS, int(source["seconds"]) + parse_seconds(seconds)))
        fields = {
            "prompt": validate_prompt(body.get("prompt")),
            "size": size,
            "seconds": parse_seconds(seconds),
        }
        return await self._new(
            call, fields, None, remixed_from=source["id"] if source and not extend else None
        )

    async def remix(self, call: Call, task: Task, body: RequestBody) -> UpstreamVideo:
        return await self._derived(call, task, body, extend=False)

    async def edit(self, call: Call, task: Task | None, body: RequestBody) -> UpstreamVideo:
        return await self._derived(call, task, body, extend=False)

    async def extend(self, call: Call, task: Task | None, body: RequestBody) -> UpstreamVideo:
        return await self._derived(call, task, body, extend=True)

    async def create_character(self, call: Call, body: RequestBody) -> dict[str, Any]:
        await body.read_rest()
        name = body.get("name")
        if not isinstance(name, str) or not 1 <= len(name) <= 80:
            raise bad_request("'name' is required: 1 to 80 characters.", param="name")
        return await self.engine.create_character(name)

    async def get_character(self, call: Call, task: Task) -> dict[str, Any]:
        character = await self.engine.get_character(task.upstream_id)
        if character is None:
            raise ApiError(404, "The character no longer exists at its provider.", code="character_not_found")
        return character
