"""The built-in ``local`` provider: real MP4s drawn from the prompt, no keys, no network.

:class:`LocalEngine` keeps its jobs on disk (one folder each), so they survive restarts. A job is
``queued`` for ``queue_seconds``, then ``in_progress`` with rising progress for ``run_seconds``
while it renders in a worker thread, then ``completed``. A prompt containing ``[fail]`` fails
halfway through its run, for demos and tests of the failure path. The same engine serves the
OpenAI dialect on its own (``video-gateway simulate``, see ``gateway/simulator.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from aiohttp import web

from gateway.bodies import RequestBody, UploadedFile, data_url_image
from gateway.errors import ApiError, bad_request, log_storage_failure, storage_failed
from gateway.providers.base import Adapter, Call, FileAnswer, UpstreamVideo
from gateway.render import probe_video, reference_problem, render_video
from gateway.store import Task
from gateway.videos import validate_prompt

VARIANTS = {
    "video": ("video.mp4", "video/mp4"),
    "thumbnail": ("thumbnail.webp", "image/webp"),
    "spritesheet": ("spritesheet.jpg", "image/jpeg"),
}
# The longest clip one request may ask for: a create, or one extension segment (the API's own limit).
MAX_SECONDS = 20
# The longest video the renderer draws: a full-length source plus a full-length extension.
MAX_TOTAL_SECONDS = 2 * MAX_SECONDS
_SIZE = re.compile(r"([0-9]{2,4})x([0-9]{2,4})")
_SECONDS = re.compile(r"[0-9]{1,3}")
_JOB_ID = re.compile(r"(video|char)_[0-9a-f]{32}")
_DELETED = "deleted"  # a file per deleted job: its ID and created_at, its place in lists
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

Derivation = Literal["remix", "edit", "extension"]
_DONE_TO = {"remix": "remixed", "edit": "edited", "extension": "extended"}


def parse_size(value: Any) -> tuple[int, int]:
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise bad_request(
            f"Invalid size {_shown(value)}: use WIDTHxHEIGHT, for example 1280x720.", param="size"
        )
    width, height = int(match[1]), int(match[2])
    if not (64 <= width <= 1920 and 64 <= height <= 1920) or width % 2 or height % 2:
        raise bad_request(
            f"Invalid size '{value}': width and height must be even numbers from 64 to 1920.", param="size"
        )
    return width, height


def parse_seconds(value: Any) -> int:
    """A whole number of seconds from 1 to MAX_SECONDS, as a JSON integer or ASCII digits."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _SECONDS.fullmatch(value):
        number = int(value)
    if number is None or not 1 <= number <= MAX_SECONDS:
        raise bad_request(
            f"Invalid seconds {_shown(value)}: use a whole number from 1 to {MAX_SECONDS}.", param="seconds"
        )
    return number


def _shown(value: Any) -> str:
    """A client's value for an error message, short whatever was sent (str() of a huge int raises)."""
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:40] + "...")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10**12:
        return str(value)
    return f"of type {type(value).__name__}"


def text_field(body: RequestBody, name: str) -> Any:
    """A field's value, None when absent; a file part under a text field's name is refused.

    The body must have been read to its end (:meth:`RequestBody.read_rest`). JSON ``null`` counts
    as absent; any other value, falsy or not, is the client's and is validated as given.
    """
    if name in body.files:
        raise bad_request(f"'{name}' must be a text field, not a file.", param=name)
    return body.get(name)


def model_field(body: RequestBody, default: str = "sora-2") -> str:
    value = text_field(body, "model")
    if value is None:
        return default
    if not isinstance(value, str) or not value.strip():
        raise bad_request("'model' must be a non-empty string.", param="model")
    return value


def ensure_completed(video: Mapping[str, Any], kind: Derivation) -> None:
    """Only a completed video can be remixed, edited or extended: 409 while it runs, 400 once failed."""
    param = "video_id" if kind == "remix" else "video"
    status = video["status"]
    if status in ("queued", "in_progress"):
        raise ApiError(
            409,
            f"The source video is {status}; it can be {_DONE_TO[kind]} once it is completed.",
            param=param,
            code="video_not_ready",
            headers={"x-should-retry": "false"},
        )
    if status != "completed":
        raise bad_request(
            f"The source video {status}; only a completed video can be {_DONE_TO[kind]}.",
            param=param,
            code="video_failed",
        )


@contextmanager
def _job_lock(folder: Path, *, wait: bool) -> Iterator[bool]:
    """A job folder's lock, held by a render writing into it and by a delete removing it, in any
    process on the data dir. False when the job is gone, or when another holds it and not ``wait``."""
    with ExitStack() as stack:
        try:
            lock = stack.enter_context(open(folder / ".render.lock", "ab"))
            fcntl.flock(lock, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (FileNotFoundError, BlockingIOError):
            yield False
            return
        yield (folder / "job.json").exists()


def _place(job: dict[str, Any]) -> tuple[Any, str]:
    """Where a job stands in lists: by creation, then ID."""
    return job["created_at"], job["id"]


@dataclass
class LocalEngine:
    """Jobs in folders under ``root``; status is derived from the clock and the rendered files."""

    root: Path
    queue_seconds: float = 1.0
    run_seconds: float = 3.0
    # Keep a deleted job's place for :meth:`list` (the simulator's lists; the gateway lists from its
    # own store, so its local providers keep none).
    keep_places: bool = False

    def __post_init__(self) -> None:
        self._renders: dict[str, asyncio.Task[None]] = {}
        # Rendering is CPU-bound: one render at a time in its own thread leaves the event loop its
        # CPU and the shared thread pool free for the job files that every request reads. Made on
        # first use, and again after an idle close (a provider a reload replaced or removed).
        self._renderer: ThreadPoolExecutor | None = None
        self._closed = False

    def _dir(self, job_id: str) -> Path:
        if not _JOB_ID.fullmatch(job_id):
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
        folder = self._dir(job_id)
        try:
            await asyncio.to_thread(self._write_job, folder, job, reference)
        except OSError as exc:
            await asyncio.to_thread(shutil.rmtree, folder, ignore_errors=True)
            raise storage_failed("this video", exc) from None
        self._start_render(job_id, job)
        return self._view(job, folder)

    @staticmethod
    def _write_job(folder: Path, job: dict[str, Any], reference: bytes | None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if reference:
            (folder / "reference.bin").write_bytes(reference)
        tmp = folder / "job.json.tmp"
        tmp.write_text(json.dumps(job))
        tmp.replace(folder / "job.json")

    def _start_render(self, job_id: str, job: dict[str, Any]) -> None:
        if self._closed or job_id in self._renders or "[fail]" in job["prompt"]:
            return  # once closed, the next process renders what is left
        task = asyncio.get_running_loop().create_task(self._render(job_id, job))
        self._renders[job_id] = task
        task.add_done_callback(lambda _: self._renders.pop(job_id, None))

    async def _render(self, job_id: str, job: dict[str, Any]) -> None:
        folder = self._dir(job_id)
        if self._renderer is None:
            self._renderer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-render")
        try:
            await asyncio.get_running_loop().run_in_executor(self._renderer, self._render_once, folder, job)
        except Exception as exc:  # a failed render is the job's outcome, not the server's problem
            if self._closed:
                return  # perhaps the closed renderer's refusal: the next engine renders it again
            if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
                # the gateway's trouble, and it passes: the video's next poll renders it again
                log_storage_failure("a local render", exc)
                return
            await asyncio.to_thread((folder / "error.txt").write_text, f"render failed: {exc}")

    @staticmethod
    def _render_once(folder: Path, job: dict[str, Any]) -> None:
        """Render the job unless it is rendered or being rendered (by another worker on the same data
        dir: the lock says so) or deleted. Temporary files found under the lock are a dead render's
        and go."""
        with _job_lock(folder, wait=False) as locked:
            if not locked or (folder / "video.mp4").exists():
                return
            for left in folder.glob(".*.tmp"):
                left.unlink(missing_ok=True)
            width, height = parse_size(job["size"])
            reference = folder / "reference.bin"
            render_video(
                folder,
                prompt=job["prompt"],
                width=width,
                height=height,
                seconds=int(job["seconds"]),
                reference_image=reference if reference.exists() else None,
            )

    def _progress(self, job: dict[str, Any], at: float) -> int:
        """Progress as of ``at``: rising with the clock over the run, 1 to 99."""
        started = job["created_at"] + self.queue_seconds
        share = (at - started) / self.run_seconds if self.run_seconds else 1.0
        return max(1, min(99, int(share * 100)))

    def _failed_at(self, job: dict[str, Any], folder: Path) -> float | None:
        """When the job shows as failed: halfway through its run, or when its render failed if later."""
        halfway = job["created_at"] + self.queue_seconds + self.run_seconds / 2
        if "[fail]" in job["prompt"]:
            return halfway
        try:
            return max(halfway, (folder / "error.txt").stat().st_mtime)
        except OSError:
            return None

    def _view(self, job: dict[str, Any], folder: Path) -> dict[str, Any]:
        """The job as an OpenAI Video, as of now.

        A finished job's ``completed_at`` is the moment it first showed as finished, never later,
        and a failed one keeps the progress it had reached then.
        """
        now = time.time()
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
        if now < job["created_at"] + self.queue_seconds:
            return view
        failed_at = self._failed_at(job, folder)
        if failed_at is not None and now >= failed_at:
            reason = "the prompt asked for a failure" if "[fail]" in job["prompt"] else "rendering failed"
            view.update(
                status="failed",
                progress=self._progress(job, failed_at),
                completed_at=int(failed_at),
                error={"code": "generation_failed", "message": f"Local render failed: {reason}."},
            )
            return view
        done_at = job["created_at"] + self.queue_seconds + self.run_seconds
        rendered = (folder / "video.mp4").exists()
        if now >= done_at and rendered:
            view.update(status="completed", progress=100, completed_at=int(done_at))
            return view
        view.update(status="in_progress", progress=self._progress(job, now))
        if failed_at is None and not rendered:  # a render cut off by a restart starts again
            self._start_render(job["id"], job)
        return view

    async def get(self, job_id: str) -> dict[str, Any] | None:
        try:
            folder = self._dir(job_id)
            job = json.loads(await asyncio.to_thread((folder / "job.json").read_text))
        except (KeyError, OSError, ValueError):
            return None
        return self._view(job, folder)

    async def source(self, job_id: str, kind: Derivation) -> dict[str, Any]:
        """The completed job to remix, edit or extend; an ApiError (404, 409, 400) otherwise."""
        video = await self.get(job_id)
        if video is None:
            raise ApiError(
                404,
                f"No video found with id '{job_id}'.",
                param="video_id" if kind == "remix" else "video",
                code="video_not_found",
            )
        ensure_completed(video, kind)
        return video

    async def list(self, *, after: str | None, limit: int, order: str) -> tuple[list[dict[str, Any]], bool]:
        """A page of jobs; KeyError for an ``after`` that names no job, live or deleted (a deleted
        one's place is kept, so that a page whose last job was deleted since still goes on)."""
        jobs = await asyncio.to_thread(self._all_jobs)
        desc = order == "desc"
        jobs.sort(key=_place, reverse=desc)
        if after is not None:
            cursor = next((j for j in jobs if j["id"] == after), None)
            if cursor is None:
                cursor = await asyncio.to_thread(self._deleted, after)
            mark = _place(cursor)
            jobs = [j for j in jobs if (_place(j) < mark if desc else _place(j) > mark)]
        return [self._view(j, self._dir(j["id"])) for j in jobs[:limit]], len(jobs) > limit

    def _all_jobs(self) -> list[dict[str, Any]]:
        jobs = []
        for path in self.root.glob("video_*/job.json"):
            with contextlib.suppress(FileNotFoundError):  # deleted since it was listed
                jobs.append(json.loads(path.read_text()))
        return jobs

    async def delete(self, job_id: str) -> bool:
        try:
            folder = self._dir(job_id)
        except KeyError:
            return False
        render = self._renders.get(job_id)
        if render is not None:
            render.cancel()  # one still waiting for the renderer is never drawn
        return await asyncio.to_thread(self._remove, folder)

    def _remove(self, folder: Path) -> bool:
        """Delete a job's folder once no render writes into it: the render lock waits for one under
        way, in this process or another on the same data dir. Its place in lists is kept."""
        with _job_lock(folder, wait=True) as locked:
            if locked and self.keep_places:
                with contextlib.suppress(OSError, ValueError):
                    job = json.loads((folder / "job.json").read_text())
                    place = {"id": job["id"], "created_at": job["created_at"]}
                    (self.root / _DELETED).mkdir(exist_ok=True)
                    (self.root / _DELETED / folder.name).write_text(json.dumps(place))
            if locked:
                shutil.rmtree(folder, ignore_errors=True)
            return locked

    def _deleted(self, job_id: str) -> dict[str, Any]:
        """Where a deleted job stood in lists; KeyError if there was no such job."""
        try:
            self._dir(job_id)
            return json.loads((self.root / _DELETED / job_id).read_text())
        except (OSError, ValueError):
            raise KeyError(job_id) from None

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
        if not _JOB_ID.fullmatch(character_id):
            return None
        try:
            text = await asyncio.to_thread((self.root / "characters" / f"{character_id}.json").read_text)
        except OSError:
            return None
        character: dict[str, Any] = json.loads(text)
        return character

    async def close(self) -> None:
        """Finish the render under way; those still waiting are drawn by the next process, when a
        poll finds them unrendered."""
        self._closed = True
        if self._renderer is not None:
            self._renderer.shutdown(wait=False, cancel_futures=True)
        renders = list(self._renders.values())
        if renders:
            await asyncio.wait(renders)

    async def close_when_idle(self, poll_seconds: float = 1.0) -> None:
        """Let the render thread go once no render is waiting; unlike :meth:`close`, a later poll of
        one of its videos (a provider a reload removed keeps its videos) still renders it."""
        while self._renders:
            await asyncio.sleep(poll_seconds)
        if self._renderer is not None:
            self._renderer.shutdown(wait=False)
            self._renderer = None


async def reference_image(body: RequestBody) -> bytes | None:
    """The ``input_reference`` image as bytes: an uploaded file, or a base64 data URL, which must
    be an image (the video is drawn from it).

    Remote references (an http(s) ``image_url``, a ``file_id``) are accepted but not fetched: the
    local provider works without network. Anything else is a 400.
    """
    image = await _given_reference(body)
    problem = None if image is None else await asyncio.to_thread(reference_problem, image)
    if problem is not None:
        raise bad_request(f"input_reference {problem}.", param="input_reference")
    return image


async def _given_reference(body: RequestBody) -> bytes | None:
    if "input_reference" in body.files:
        return await body.files["input_reference"].read()
    ref = body.get_object("input_reference")
    if ref is not None:
        return _reference_object(ref)
    value = body.get("input_reference")
    if value is None:
        return None
    if isinstance(value, str):
        return _image_url(value)
    raise bad_request(
        "'input_reference' must be an image file, an object with 'image_url' or 'file_id', or an image URL.",
        param="input_reference",
    )


def _reference_object(ref: dict[str, Any]) -> bytes | None:
    url, file_id = ref.get("image_url"), ref.get("file_id")
    if (url is None) == (file_id is None):
        raise bad_request(
            "input_reference needs exactly one of 'image_url' or 'file_id'.", param="input_reference"
        )
    if url is not None:
        return _image_url(url)
    if not isinstance(file_id, str) or not file_id:
        raise bad_request("input_reference.file_id must be a non-empty string.", param="input_reference")
    return None


def _image_url(url: Any) -> bytes | None:
    if not isinstance(url, str):
        raise bad_request("input_reference.image_url must be a string.", param="input_reference")
    if url[:8].lower().startswith(("http://", "https://")):
        return None
    if not url.startswith("data:") or "," not in url:
        raise bad_request(
            "input_reference.image_url must be an http(s) URL or a base64 data URL.", param="input_reference"
        )
    _, image = data_url_image(url)
    if not image:
        raise bad_request("input_reference.image_url holds no image data.", param="input_reference")
    return image


async def character_name(body: RequestBody) -> str:
    """The name of a character to create, read to its end; the API requires its clip too (a video
    file, checked as an edit's is), though the local provider draws no character from it."""
    name = body.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= 80:
        raise bad_request("'name' is required: 1 to 80 characters.", param="name")
    if "video" not in body.files:
        raise bad_request(
            "'video' is required: an uploaded clip of the character.",
            param="video",
            code="missing_required_parameter",
        )
    if await _probe_upload(body.files["video"]) is None:
        raise bad_request("'video' is not a video file the local provider can read.", param="video")
    return name


def request_fields(
    body: RequestBody, *, default_size: str = "720x1280", default_seconds: str = "4"
) -> dict[str, Any]:
    """Prompt, size and seconds of a create, validated for the local renderer.

    Only absent fields get the defaults; a given value is validated as it is (``0`` and ``""`` too).
    """
    size = text_field(body, "size")
    seconds = text_field(body, "seconds")
    size = default_size if size is None else size
    parse_size(size)
    return {
        "prompt": validate_prompt(text_field(body, "prompt")),
        "size": size,
        "seconds": parse_seconds(default_seconds if seconds is None else seconds),
    }


def derived_fields(body: RequestBody, source: Mapping[str, Any], kind: Derivation) -> dict[str, Any]:
    """Prompt, size and seconds of a remix, edit or extension of ``source`` (its size and seconds).

    The new video keeps the source's size. An extension's seconds (required) are added to the
    source's: ``Video.seconds`` of an extension is the stitched total.
    """
    size = text_field(body, "size")
    if size is not None and size != source["size"]:
        raise bad_request(
            f"Invalid size {_shown(size)}: a video made from another keeps its size, {source['size']}.",
            param="size",
        )
    seconds = text_field(body, "seconds")
    if kind == "extension":
        if seconds is None:
            raise bad_request(
                "'seconds' is required: the length of the extension.",
                param="seconds",
                code="missing_required_parameter",
            )
        total = int(source["seconds"]) + parse_seconds(seconds)
        if total > MAX_TOTAL_SECONDS:
            raise bad_request(
                f"Invalid seconds {_shown(seconds)}: the {source['seconds']} s video would become {total} s, "
                f"and the local renderer draws at most {MAX_TOTAL_SECONDS} s.",
                param="seconds",
            )
    else:
        total = int(source["seconds"]) if seconds is None else parse_seconds(seconds)
    return {"prompt": validate_prompt(text_field(body, "prompt")), "size": source["size"], "seconds": total}


async def uploaded_video(body: RequestBody) -> dict[str, Any]:
    """The size and whole seconds of the ``video`` file of an edit or extension, read with PyAV."""
    upload = body.files.get("video")
    if upload is None:
        raise bad_request(
            "'video' is required: an uploaded file or {\"id\": ...}.",
            param="video",
            code="missing_required_parameter",
        )
    probed = await _probe_upload(upload)
    if probed is None:
        raise bad_request("'video' is not a video file the local provider can read.", param="video")
    width, height, duration = probed
    size, seconds = f"{width}x{height}", max(1, round(duration))
    try:
        parse_size(size)
    except ApiError:
        raise bad_request(
            f"The uploaded video is {size}; the local provider renders even sizes from 64 to 1920.",
            param="video",
        ) from None
    if seconds > MAX_TOTAL_SECONDS:
        raise bad_request(
            f"The uploaded video is {seconds} s; the local renderer draws at most {MAX_TOTAL_SECONDS} s.",
            param="video",
        )
    return {"size": size, "seconds": seconds}


async def _probe_upload(upload: UploadedFile) -> tuple[int, int, float] | None:
    """Copy the spooled upload to a named temporary file, off the event loop, and probe it there."""
    copy = await asyncio.to_thread(tempfile.NamedTemporaryFile, prefix="video-gateway-probe-")
    try:
        async for chunk in upload.data.chunks():
            await asyncio.to_thread(copy.write, chunk)
        await asyncio.to_thread(copy.flush)
        return await asyncio.to_thread(probe_video, Path(copy.name))
    finally:
        await asyncio.to_thread(copy.close)


class LocalAdapter(Adapter):
    """The local engine as a provider of the gateway."""

    kind = "local"
    credential_header = None
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "queue_seconds": {"type": "number", "minimum": 0, "description": "Time a job stays queued."},
            "run_seconds": {"type": "number", "minimum": 0, "description": "Time a job stays in progress."},
        },
    }

    @classmethod
    def config_problems(cls, raw: Mapping[str, Any]) -> list[tuple[tuple[str, ...], str]]:
        return [
            ((name,), "does nothing for a local provider, which renders videos itself and calls no one")
            for name in ("base_url", "api_key")
            if name in raw
        ]

    async def start(self) -> None:
        opts = self.config.options
        self.engine = LocalEngine(
            self.env.data_dir / "local" / self.config.name,
            queue_seconds=float(opts.get("queue_seconds", 1.0)),
            run_seconds=float(opts.get("run_seconds", 3.0)),
        )

    async def close(self) -> None:
        await self.engine.close()

    async def close_when_idle(self, poll_seconds: float = 1.0) -> None:
        """No connection pools to close; the engine only lets its render thread go (not
        :meth:`close`, after which none of its videos would render again)."""
        await self.engine.close_when_idle(poll_seconds)

    async def _new(
        self, call: Call, fields: dict[str, Any], reference: bytes | None, remixed_from: str | None = None
    ) -> UpstreamVideo:
        job = await self.engine.create(
            model=call.deployment.upstream_model, reference=reference, remixed_from=remixed_from, **fields
        )
        return UpstreamVideo(job["id"], job)

    async def create(self, call: Call, body: RequestBody) -> UpstreamVideo:
        await body.read_rest()
        model_field(body)  # the gateway routed by it: a file part there would have been ignored
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
        self, call: Call, task: Task | None, body: RequestBody, kind: Derivation
    ) -> UpstreamVideo:
        """A new job from a completed video of this provider, or (edits, extensions) an uploaded one."""
        await body.read_rest()
        if task is None:
            source = await uploaded_video(body)
        else:
            source = await self.engine.source(task.upstream_id, kind)
        fields = derived_fields(body, source, kind)
        remixed_from = source["id"] if kind == "remix" else None
        return await self._new(call, fields, None, remixed_from=remixed_from)

    async def remix(self, call: Call, task: Task, body: RequestBody) -> UpstreamVideo:
        return await self._derived(call, task, body, "remix")

    async def edit(self, call: Call, task: Task | None, body: RequestBody) -> UpstreamVideo:
        return await self._derived(call, task, body, "edit")

    async def extend(self, call: Call, task: Task | None, body: RequestBody) -> UpstreamVideo:
        return await self._derived(call, task, body, "extension")

    async def create_character(self, call: Call, body: RequestBody) -> dict[str, Any]:
        await body.read_rest()
        return await self.engine.create_character(await character_name(body))

    async def get_character(self, call: Call, task: Task) -> dict[str, Any]:
        character = await self.engine.get_character(task.upstream_id)
        if character is None:
            raise ApiError(404, "The character no longer exists at its provider.", code="character_not_found")
        return character
