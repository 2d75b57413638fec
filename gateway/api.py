"""Handlers of the ``/v1/videos`` API: tenancy, IDs, routing and limits here; provider work in adapters."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import Counter

from gateway import jsonio, limits, metrics
from gateway.auth import check_model_access, client_key
from gateway.bodies import RequestBody, read_body
from gateway.config import Deployment
from gateway.context import context, cut_answer, start_answer
from gateway.errors import (
    ApiError,
    UpstreamError,
    bad_request,
    expired_result,
    model_not_found,
    no_deployment_available,
    shutting_down,
    store_unavailable,
    video_not_found,
)
from gateway.headers import CONTENT_CACHE_CONTROL
from gateway.logs import log, scrub
from gateway.providers.base import Adapter, Call, EventStream, UpstreamVideo
from gateway.routing import RoutingTable
from gateway.state import Gateway, gateway
from gateway.store import StoreUnavailable, Task
from gateway.videos import (
    MAX_PROMPT_CHARS,
    VARIANTS,
    build_video,
    is_terminal,
    new_character_id,
    new_video_id,
    prompt_too_long,
)

T = TypeVar("T")

LIST_DEFAULT_LIMIT = 20
# ASCII digits only (str.isdigit() takes "²" and "５", which int() then refuses or reads), 0 to 100 as
# the API's OpenAPI document has it. A page of 0 says whether there are videos (has_more) and names
# none: the SDK's iteration stops at a page without data, so no cursor (last_id) is missed there.
_LIMIT = re.compile(r"[0-9]{1,3}")
_REFRESH_CONCURRENCY = 8
# How long a poll waits for its news to be saved before it answers anyway: a store stuck on a lock
# must not hold every poll for its 30 s busy timeout.
SAVE_WAIT_SECONDS = 1.0

FAILOVERS = Counter(
    "gateway_create_failovers_total", "Creates moved to the next deployment after a refusal.", ["model"]
)
READ_RETRIES = Counter(
    "gateway_upstream_retries_total", "Reads retried against the same deployment.", ["provider"]
)


def _json(data: Any, *, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=jsonio.dumps(data), content_type="application/json", headers=headers)


def _call(request: web.Request, deployment: Deployment, operation: str, *, starts_job: bool = False) -> Call:
    """The context of one upstream operation (``create``, ``retrieve``, ...: what its provider calls
    are timed as); its outcomes feed the health of the request's table, as a create's when it
    ``starts_job`` (a create, remix, edit, extension or character), else as a call about a video."""
    ctx = context(request)
    recorder = ctx.table.outcome_recorder(deployment, create=starts_job)
    call = ctx.call = Call(request, ctx.request_id, deployment, operation, ctx.upstream, on_outcome=recorder)
    return call


def _changing_call(request: web.Request, deployment: Deployment, operation: str) -> Call:
    """The context of an upstream operation that changes the provider's state (one that starts a
    job, or a delete): from here on the request runs to its end even if its client leaves
    (:func:`shielded`)."""
    ctx = context(request)
    if ctx.gateway.drain_over.is_set():  # the shutdown would drop it before its answer came
        raise shutting_down("did not send this request")
    ctx.changing = True
    return _call(request, deployment, operation, starts_job=operation != "delete")


def _deployment_of(table: RoutingTable, task: Task) -> tuple[Deployment, Adapter]:
    """The exact deployment that created a task: follow-ups are never re-balanced. A deployment of
    that name that a reload removed, or pointed at another provider or upstream model, is the task's
    as it was (a provider must not be sent another's model)."""
    upstream_model = task.state.get("upstream_model")  # characters keep none
    deployment = table.deployments.get(task.deployment)
    moved = deployment is not None and (
        deployment.provider != task.provider
        or (upstream_model is not None and deployment.upstream_model != upstream_model)
    )
    if deployment is None or moved:
        # re-pointed: a name of its own for logs, metrics and health (its failures are not the new one's)
        name = f"{task.deployment}@{task.provider}" if moved else task.deployment
        deployment = Deployment(name, task.model, task.provider, upstream_model or task.model)
    return deployment, table.adapter(task.provider)


async def _owned(request: web.Request, param: str = "video_id", kind: str = "video") -> Task:
    """The caller's task named in the path (the store's shared copy: never change it in place), or 404."""
    task_id = request.match_info[param]
    task = await gateway(request).store.get(task_id, client_key(request).name, kind)
    if task is None:
        raise _not_found(task_id, kind)
    return task


def _not_found(task_id: str, kind: str) -> ApiError:
    if kind == "character":
        return ApiError(
            404, f"No character found with id '{task_id}'.", param="character_id", code="character_not_found"
        )
    return video_not_found(task_id)


def _in_our_words(exc: ApiError, task: Task) -> ApiError:
    """A provider's error about ``task``, with the gateway's ID where the provider quoted its own
    for the job: the client knows its video by the one and has never seen the other."""
    if task.upstream_id and task.upstream_id in exc.message:
        exc.message = exc.message.replace(task.upstream_id, task.id)
    return exc


def _expired(task: Task) -> bool:
    expires_at = task.video.get("expires_at")
    return isinstance(expires_at, int) and time.time() >= expires_at


def _check_types(body: RequestBody) -> None:
    """JSON fields the gateway reads, there but of the wrong type: a 400 ``invalid_type``, not a
    missing parameter, nor a value passed on (``"seconds": true`` would show as ``"True"``)."""
    prompt, size, seconds = body.get("prompt"), body.get("size"), body.get("seconds")
    if prompt is not None and not isinstance(prompt, str):
        raise bad_request("'prompt' must be a string.", param="prompt", code="invalid_type")
    if isinstance(prompt, str) and len(prompt) > MAX_PROMPT_CHARS:
        raise prompt_too_long()
    if size is not None and not isinstance(size, str):
        raise bad_request("'size' must be a string such as '1280x720'.", param="size", code="invalid_type")
    if seconds is not None and type(seconds) not in (str, int):  # a bool is no number of seconds
        raise bad_request("'seconds' must be a string or an integer.", param="seconds", code="invalid_type")


_ASKED = ("prompt", "size", "seconds")  # what a client asks of a video, shown until its provider answers


def _seed(body: RequestBody) -> dict[str, Any]:
    """What the client asked for, shown until the provider says otherwise."""
    seed = {k: body.get(k) for k in _ASKED if isinstance(body.get(k), str | int)}
    if "seconds" in seed:
        seed["seconds"] = str(seed["seconds"])
    return seed


def _may_fail_over(exc: ApiError) -> bool:
    """Refused without taking the job: nothing connected, nothing sent, or a clear no (5xx, 429, a full
    bulkhead, an exhausted account or a rejected key: another deployment may well take it), or the
    deployment's own adapter refused what was asked (a size or duration its provider does not make:
    one of another kind may)."""
    if exc.code in ("upstream_busy", "insufficient_quota", "upstream_auth_failed"):
        return True
    if _refused_here(exc):
        return True
    if not isinstance(exc, UpstreamError):
        return False
    return (
        exc.kind == "connect"
        or (exc.kind == "timeout" and not exc.sent)
        or (exc.kind == "5xx" and exc.upstream_status not in _FRONT_TIMEOUTS and not _said_unsure(exc))
        or exc.status == 429
    )


def _refused_here(exc: ApiError) -> bool:
    """A 400 the adapter raised from the request itself, before its provider had a word."""
    return exc.status == 400 and not isinstance(exc, UpstreamError)


def _retryable_read(exc: ApiError) -> bool:
    """A connection that failed or timed out opening (a dropped SYN: nothing sent), or a 502/503/504."""
    return isinstance(exc, UpstreamError) and (
        exc.kind == "connect"
        or (exc.kind == "timeout" and not exc.sent)
        or (exc.kind == "5xx" and exc.upstream_status in (502, 503, 504))
    )


async def _start(
    request: web.Request,
    name: str,
    model: str,
    body: RequestBody,
    operation: Callable[[Adapter, Call], Awaitable[T]],
) -> tuple[Deployment, T]:
    """Send a create-like request to the model's deployments in order, failing over while it is safe.

    With more than one deployment the body is spooled first so it can be sent again, byte for byte.
    """
    ctx = context(request)
    gw, table = ctx.gateway, ctx.table
    candidates = table.candidates(model)
    if len(candidates) > 1:
        await body.make_replayable()
    # When none takes it: a deployment that failed may take the same request later, so its error is
    # the answer; the first refusal of the request itself only when every deployment refused it.
    last: ApiError | None = None
    refusal: ApiError | None = None
    for attempt, deployment in enumerate(candidates, 1):
        if not table.health.claim(deployment.name):
            continue
        probe = table.health.probing(deployment.name)  # this create probes it, back from an ejection
        call: Call | None = None
        try:
            with gw.bulkheads.enter_create(deployment) as calling:
                call = _changing_call(request, deployment, name)
                result = await operation(table.adapter(deployment.provider), call)
                if isinstance(result, EventStream):  # its call stays open while the events come
                    result.hold(calling.pop_all())
        except ApiError as exc:
            refused = _refused_here(exc)
            failing_over = attempt < len(candidates) and body.replayable and _may_fail_over(exc)
            (log.info if refused else log.warning)(
                "create_attempt_failed",
                request_id=ctx.request_id,
                model=model,
                deployment=deployment.name,
                attempt=attempt,
                status=exc.status,
                kind=getattr(exc, "kind", None),
                failing_over=failing_over,
            )
            if not failing_over:
                if refused and (last or refusal):
                    raise (last or refusal) from None
                raise
            FAILOVERS.labels(model).inc()
            if not refused:
                last = exc
            elif refusal is None:
                refusal = exc
            continue
        finally:
            if probe and (call is None or not call.reported):
                table.health.abandon_probe(deployment.name)
        log.info(
            "create_routed",
            request_id=ctx.request_id,
            model=model,
            deployment=deployment.name,
            attempts=attempt,
        )
        return deployment, result
    raise last or refusal or no_deployment_available(model)


async def _read(
    request: web.Request,
    task: Task,
    name: str,
    operation: Callable[[Adapter, Call], Awaitable[T]],
    deadline: float | None = None,
) -> T:
    """A retrieve or download: the task's own deployment, retried with jittered backoff inside one
    deadline (the event loop's time; ``read_deadline_seconds`` from now, or sooner when given: one
    shared with other reads) by which the try under way must have its answer begun too (not a
    download's stream). A try it cuts short after the provider had less than half the read deadline
    (the gateway's queue, or a list's deadline, took the time) is no failure of the provider's."""
    ctx = context(request)
    gw, table = ctx.gateway, ctx.table
    deployment, adapter = _deployment_of(table, task)
    policy = table.config.resilience
    loop = asyncio.get_running_loop()
    due = loop.time() + policy.read_deadline_seconds
    deadline = due if deadline is None else min(deadline, due)
    for attempt in range(1, policy.read_attempts + 1):
        try:
            with gw.bulkheads.enter(deployment, "requests"):
                call = _call(request, deployment, name)
                call.answer_by = deadline
                call.fair_wait = policy.read_deadline_seconds / 2
                return await operation(adapter, call)
        except ApiError as exc:
            if isinstance(exc, UpstreamError) and exc.upstream_status == 404:
                # the provider no longer has it: the gateway's own answer, which does not quote the
                # provider's ID for the job; past the video's expiry, its content is what is gone
                raise (expired_result() if _expired(task) else _not_found(task.id, task.kind)) from None
            delay = policy.backoff_seconds * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)
            if not _retryable_read(exc) or attempt == policy.read_attempts or loop.time() + delay > deadline:
                raise _in_our_words(exc, task) from None
            READ_RETRIES.labels(deployment.provider).inc()
            log.info(
                "read_retry",
                request_id=ctx.request_id,
                deployment=deployment.name,
                attempt=attempt,
                status=exc.status,
                delay_ms=round(delay * 1000),
            )
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


async def _record(
    request: web.Request,
    deployment: Deployment,
    upstream: UpstreamVideo,
    seed: dict[str, Any],
    remixed_from: str | None = None,
) -> Task:
    """Give a new upstream job its gateway ID and commit it before the client hears of it. A job
    the caller has already (its provider replayed it for an Idempotency-Key it saw before) is the
    video the caller knows."""
    gw = gateway(request)
    owner = client_key(request).name
    replayable = "Idempotency-Key" in request.headers
    if replayable:
        try:
            known = await gw.store.find_upstream(owner, deployment.name, upstream.id)
        except StoreUnavailable:  # the job is started: record it (_add_started answers for a store down)
            known = None
        if known is not None:
            return known
    task = Task(
        id=new_video_id(),
        owner=owner,
        model=deployment.model,
        deployment=deployment.name,
        provider=deployment.provider,
        upstream_id=upstream.id,
        created_at=int(time.time()),
        status="queued",
        video=seed,
        state={**upstream.state, "upstream_model": deployment.upstream_model},
    )
    made_by = context(request).idempotency
    if made_by is not None:  # what a retry at the key's cap must ask to be this video (_replayed)
        asked = {name: seed[name] for name in _ASKED if name in seed}
        task.state[_IDEMPOTENCY] = {**made_by, "asked": asked}
    if remixed_from is None:
        remixed_from = await _map_remixed_from(gw, owner, deployment.name, upstream.fields)
    task.video = build_video(task, upstream.fields, remixed_from=remixed_from)
    task.status = task.video["status"]
    known = await _add_started(request, deployment, task, once=replayable)
    if known is not None:  # a concurrent create with the same key recorded the job first
        return known
    metrics.VIDEOS_CREATED.labels(task.model, task.provider).inc()
    if is_terminal(task.status):
        metrics.VIDEOS_FINISHED.labels(task.model, task.provider, task.status).inc()
    return task


async def _add_started(
    request: web.Request, deployment: Deployment, task: Task, *, once: bool = False
) -> Task | None:
    """Store a task whose job the provider has just accepted. When the store fails, the job is
    logged for operators and, for a video, cancelled upstream where the provider allows it; the
    client is told not to retry automatically, since a retry would start another job.

    With ``once`` (the provider may replay a job), the caller's task for the job when it has one
    already, and nothing is stored."""
    store = gateway(request).store
    try:
        if once:
            return await store.add_once(task)
        await store.add(task)
        return None
    except StoreUnavailable as exc:
        log.error(
            "started_job_not_recorded",
            request_id=context(request).request_id,
            deployment=deployment.name,
            upstream_id=task.upstream_id,
            kind=task.kind,
            error=str(exc),
        )
        if task.kind == "video":
            with contextlib.suppress(ApiError):
                adapter = context(request).table.adapter(deployment.provider)
                await adapter.delete(_call(request, deployment, "delete"), task)
        raise store_unavailable(
            "The provider started this job, but the gateway could not record it: its task store is "
            "unavailable. The job was cancelled where the provider allows it; retry shortly.",
            retry=False,
        ) from None


async def _map_remixed_from(gw: Gateway, owner: str, deployment: str, fields: dict[str, Any]) -> str | None:
    upstream_source = fields.get("remixed_from_video_id")
    if not isinstance(upstream_source, str) or not upstream_source:
        return None
    source = await gw.store.find_upstream(owner, deployment, upstream_source)
    return source.id if source is not None else None


async def _refresh(request: web.Request, task: Task, deadline: float | None = None) -> Task:
    """Ask the provider for news about an unfinished video and remember what it said."""
    if is_terminal(task.status):
        return task
    try:
        upstream = await _read(
            request, task, "retrieve", lambda adapter, call: adapter.retrieve(call, task), deadline
        )
    except ApiError as exc:
        # This process's copy may be behind: another worker or replica may have seen the video end
        # (answered from the store, as a finished video is) or seen it deleted.
        with contextlib.suppress(StoreUnavailable):
            stored = await gateway(request).store.get(task.id, task.owner, task.kind, cached=False)
            if stored is None:
                raise _not_found(task.id, task.kind) from None
            if is_terminal(stored.status):
                return stored
            task = stored
        if exc.status == 404 and (lost := await _lost(request, task)) is not None:
            return lost
        raise
    video = build_video(task, upstream.fields)
    state = {**task.state, **upstream.state} if upstream.state else task.state
    if _MISSING_SINCE in state:  # the provider knows the job again: a 404 of a moment
        state = {name: value for name, value in state.items() if name != _MISSING_SINCE}
    now = time.time()
    heard = state.get(_HEARD_AT)
    if not isinstance(heard, int | float) or now - heard >= LOST_AFTER_SECONDS / 4:
        state = {**state, _HEARD_AT: now}
    if video != task.video or state != task.state:
        task = replace(task, video=video, status=video["status"], state=state)
        await _save_news(request, task)
    return task


# How long a provider may answer 404 for an unfinished video before the gateway takes the job for
# lost (a provider that restarted, or purged it): failed, no longer polled, no longer counted in its
# key's max_in_progress. Not a 404 of a moment (a job not yet readable just after its create), nor
# an outage's (a provider's front answering 404 for everything while it is redeployed): a job ended
# on a guess that the provider then finishes is a billed video lost, so the wait is long.
LOST_AFTER_SECONDS = 3600.0
_MISSING_SINCE = "missing_since"
# When a poll last heard from the provider, saved at least every quarter of LOST_AFTER_SECONDS while
# the video is polled. Each worker keeps its own copy of a task: a sibling's missing_since, which a
# worker with nothing new to save would never overwrite, is cleared in the store by this save.
_HEARD_AT = "heard_at"


async def _lost(request: web.Request, task: Task) -> Task | None:
    """The video failed as lost once its provider has not known it for :data:`LOST_AFTER_SECONDS`;
    None before then (the first 404 is noted, and the client gets the 404)."""
    since = task.state.get(_MISSING_SINCE)
    now = time.time()
    if isinstance(since, int | float) and now - since >= LOST_AFTER_SECONDS:
        # Not on this process's copy alone: another worker may have heard from the provider since.
        stored = await gateway(request).store.get(task.id, task.owner, task.kind, cached=False)
        if stored is None or is_terminal(stored.status):
            return stored
        task, since = stored, stored.state.get(_MISSING_SINCE)
    if not isinstance(since, int | float):
        await _save_news(request, replace(task, state={**task.state, _MISSING_SINCE: now}))
        return None
    if now - since < LOST_AFTER_SECONDS:
        return None
    lost = {"code": "video_not_found", "message": "The provider no longer has this video's job."}
    video = build_video(task, {"status": "failed", "error": lost})
    failed = replace(task, video=video, status=video["status"])
    await _save_news(request, failed)
    log.warning(
        "video_lost_upstream", video=task.id, provider=task.provider, missing_seconds=round(now - since)
    )
    return failed


async def _save_news(request: web.Request, task: Task) -> None:
    """Save what a poll learnt, waiting at most :data:`SAVE_WAIT_SECONDS`: the news is true either
    way, a save that takes longer goes on without holding the client, and one that fails is redone
    by the next poll, which learns the same."""
    request_id = context(request).request_id
    saving = asyncio.ensure_future(_save(gateway(request), task))
    try:
        await asyncio.wait_for(asyncio.shield(saving), SAVE_WAIT_SECONDS)
    except TimeoutError:
        log.warning("poll_save_slow", request_id=request_id, video=task.id, waited_seconds=SAVE_WAIT_SECONDS)
    except StoreUnavailable as exc:
        log.warning("poll_not_saved", request_id=request_id, video=task.id, error=str(exc))
    finally:
        if not saving.done():
            saving.add_done_callback(partial(_saved_late, request_id, task.id))


def _saved_late(request_id: str, video: str, saving: asyncio.Future[None]) -> None:
    if not saving.cancelled() and saving.exception() is not None:
        log.warning("poll_not_saved", request_id=request_id, video=video, error=str(saving.exception()))


async def _refresh_all(request: web.Request, tasks: list[Task]) -> list[Task]:
    """Refresh many videos at once, bounded, within one read deadline; a video whose provider fails
    or is not asked in time keeps its last known state."""
    gate = asyncio.Semaphore(_REFRESH_CONCURRENCY)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + context(request).table.config.resilience.read_deadline_seconds

    async def one(task: Task) -> Task:
        async with gate:
            if loop.time() >= deadline:
                return task
            try:
                return await _refresh(request, task, deadline)
            except ApiError:
                return task

    return list(await asyncio.gather(*(one(t) for t in tasks)))


async def _save(gw: Gateway, task: Task) -> None:
    """Save a video's news, its saves queued no deeper than one: the store writes one thing at a
    time, and stuck (another process holding its lock) it would gather a write for every poll, each
    to wait out the lock in turn, ahead of a create's. News that comes while a save of the video is
    under way replaces the one waiting, and is written next, even when the save under way failed
    (the store may be back by then); a failed save with nothing newer waiting is left to the next
    poll, which learns the same."""
    waiting = gw.news_waiting
    if task.id in waiting:
        waiting[task.id] = task
        return
    waiting[task.id] = task
    try:
        while True:
            news = waiting[task.id]
            try:
                if await gw.store.update(news):
                    metrics.VIDEOS_FINISHED.labels(news.model, news.provider, news.status).inc()
            except StoreUnavailable:
                if waiting[task.id] is news:
                    raise
                continue
            if waiting[task.id] is news:
                return
    finally:
        del waiting[task.id]


# A key at its max_in_progress cap has its unfinished videos asked about before a create is refused
# (some may have finished unseen): a poll each, on the provider account every tenant shares. At
# most once in this many seconds per key, however many creates it sends meanwhile (its SDK alone
# retries a 429 twice), each answered at once with the count as last known.
ACTIVE_REFRESH_SECONDS = 5.0


@contextlib.asynccontextmanager
async def _admit(request: web.Request) -> AsyncIterator[None]:
    """The per-key limits, for requests that start a video."""
    gw = gateway(request)
    key = client_key(request)

    async def refresh_active() -> None:
        now = time.monotonic()
        if now - gw.active_refreshed.get(key.name, -ACTIVE_REFRESH_SECONDS) < ACTIVE_REFRESH_SECONDS:
            return
        gw.active_refreshed[key.name] = now
        await _refresh_all(request, await gw.store.active(key.name))

    async with limits.admit(key, gw.store, refresh_active) as admission:
        context(request).admission = admission
        yield


# In a task's state: the Idempotency-Key, operation and source video of the request that made it,
# and what it asked for (its prompt, size and seconds).
_IDEMPOTENCY = "idempotency"


async def _replayed(
    request: web.Request, operation: str, model: str, source: Task | None, body: RequestBody
) -> Task | None:
    """The unfinished video that a retry under an ``Idempotency-Key`` asks for again, when its key is
    at its ``max_in_progress``: the retry would be refused before its provider could replay the job,
    though that video is what put the key at its cap. It must be the same request: the same
    operation on the same source video, with the same model, and the same prompt and what else of
    it has been read; a streamed create (whose answer is its events) is left to the provider."""
    idempotency_key = request.headers.get("Idempotency-Key")
    key = client_key(request)
    if idempotency_key is None or key.max_in_progress is None:
        return None
    made_by = {"key": idempotency_key, "operation": operation, "source": source.id if source else None}
    context(request).idempotency = made_by
    asked = _seed(body)
    if "prompt" not in asked or body.get("stream") is not None:
        return None
    active = await gateway(request).store.active(key.name)
    if len(active) < key.max_in_progress:
        return None  # not at its cap: the provider replays the job, if it keeps keys
    for task in active:
        said = task.state.get(_IDEMPOTENCY)
        if not isinstance(said, dict) or task.model != model:
            continue
        same_request = all(said.get(name) == value for name, value in made_by.items())
        stored = said.get("asked") if isinstance(said.get("asked"), dict) else {}
        if same_request and all(stored.get(name) == value for name, value in asked.items()):
            return task
    return None


def _answer(request: web.Request, task: Task) -> web.Response:
    return _json(task.video, headers=limits.rate_headers(client_key(request), context(request).admission))


async def create_video(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    table = ctx.table
    body = await read_body(request, table.config.limits, until=("model",))
    try:
        _check_types(body)
        model = table.resolve_model(body.get("model"))
        check_model_access(client_key(request), model)
        ctx.model = model
        if (known := await _replayed(request, "create", model, None, body)) is not None:
            return _answer(request, known)
        async with _admit(request):
            deployment, result = await _start(request, "create", model, body, lambda a, c: a.create(c, body))
            if isinstance(result, EventStream):
                return await _relay_events(request, deployment, result, _seed(body))
            return _answer(request, await _record(request, deployment, result, _seed(body)))
    finally:
        body.close()


async def _relay_events(
    request: web.Request, deployment: Deployment, stream: EventStream, seed: dict[str, Any]
) -> web.StreamResponse:
    """Relay an upstream event stream, giving each video it mentions its gateway ID first.

    A client that left (see :func:`shielded`) is written no more, but the stream is read on until
    its video is recorded: the provider started the job, and the client is to find it in its list.
    A stream that breaks off upstream cuts the client's connection, so that it sees the break.
    Once its video is recorded, the create's admission is settled: the video counts against its
    key's ``max_in_progress`` from then on, not the create as well while the stream runs.
    """
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    tasks: dict[str, Task] = {}
    ctx = context(request)
    ctx.bytes_out = 0
    listening = False
    try:
        listening = await _sent(start_answer(request, response))
        async for event in stream.events():
            recorded = bool(tasks)
            data = await _translate_event(request, deployment, tasks, seed, event)
            if tasks and not recorded:
                await limits.settle(ctx.gateway.store, client_key(request), ctx.admission)
            listening = listening and await _sent(response.write(data))
            if listening:
                ctx.bytes_out += len(data)
            elif tasks:
                break
        if stream.cut_off:
            cut_answer(request, response)
        elif listening:
            await response.write_eof()
    except ApiError as exc:  # the 200 is out: the client hears it as the stream's last event
        log.warning("stream_ended_by_error", request_id=ctx.request_id, code=exc.code, error=exc.message)
        if listening:
            event = b"event: error\ndata: " + json.dumps(exc.body()).encode() + b"\n\n"
            if await _sent(response.write(event)):
                await _sent(response.write_eof())
    finally:
        await stream.aclose()
    return response


async def _sent(writing: Awaitable[None]) -> bool:
    """Whether a write to the client went out; False when the client is gone."""
    try:
        await writing
    except ConnectionError:
        return False
    return True


async def _translate_event(
    request: web.Request, deployment: Deployment, tasks: dict[str, Task], seed: dict[str, Any], event: bytes
) -> bytes:
    lines = event.rstrip(b"\n").split(b"\n")
    data = b"\n".join(line[5:].lstrip(b" ") for line in lines if line.startswith(b"data:"))
    try:
        payload = jsonio.loads_shallow(data) if data else None
    except jsonio.JSONDecodeError:
        return _passed_on(lines) + b"\n"
    if not isinstance(payload, dict) or not isinstance(payload.get("id"), str) or "status" not in payload:
        return _passed_on(lines) + b"\n"
    upstream_id = payload["id"]
    task = tasks.get(upstream_id)
    if task is None:
        task = tasks[upstream_id] = await _record(
            request, deployment, UpstreamVideo(upstream_id, payload), seed
        )
    else:  # its news, saved as a poll's is: one the store cannot take now, a later poll saves
        task.video = build_video(task, payload)
        task.status = task.video["status"]
        await _save_news(request, task)
    other = _passed_on([line for line in lines if not line.startswith(b"data:")])
    return other + b"data: " + json.dumps(task.video).encode() + b"\n\n"


def _passed_on(lines: list[bytes]) -> bytes:
    """A provider's event lines as the client gets them: credentials it quoted masked, and without
    its event IDs (they name its own jobs, and the gateway could not resume a stream from one)."""
    kept = b"".join(line + b"\n" for line in lines if not line.startswith(b"id:"))
    return scrub(kept.decode("utf-8", "replace")).encode()


async def retrieve_video(request: web.Request) -> web.Response:
    task = await _refresh(request, await _owned(request))
    ctx = context(request)
    ctx.model = task.model
    headers = {}
    if not is_terminal(task.status):
        headers["openai-poll-after-ms"] = str(ctx.gateway.poll_after_ms(task.provider))
    return _json(task.video, headers=headers)


def list_params(request: web.Request) -> tuple[str | None, int, str]:
    """``after``, ``limit`` and ``order`` of a list request (the simulator's too), or a 400."""
    query = request.query
    after = query.get("after") or None
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise bad_request("'order' must be 'asc' or 'desc'.", param="order")
    raw_limit = query.get("limit", str(LIST_DEFAULT_LIMIT))
    if not _LIMIT.fullmatch(raw_limit) or not 0 <= int(raw_limit) <= 100:
        raise bad_request("'limit' must be an integer from 0 to 100.", param="limit")
    return after, int(raw_limit), order


async def list_videos(request: web.Request) -> web.Response:
    gw = gateway(request)
    after, limit, order = list_params(request)
    try:
        tasks, has_more = await gw.store.list(client_key(request).name, after=after, limit=limit, order=order)
    except KeyError:
        raise bad_request(f"'after' names no video of yours: '{after}'.", param="after") from None
    data = [task.video for task in await _refresh_all(request, tasks)]
    return _json(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": has_more,
        }
    )


async def delete_video(request: web.Request) -> web.Response:
    ctx = context(request)
    gw, table = ctx.gateway, ctx.table
    task = await _owned(request)
    ctx.model = task.model
    try:
        deployment, adapter = _deployment_of(table, task)
    except ApiError as exc:
        if exc.code != "provider_unavailable":
            raise
        # Its provider left the config (and the gateway restarted since): nobody here can ask about
        # it any more. Forgotten, it no longer holds its key's place; the log names it upstream.
        log.warning(
            "deleted_without_provider",
            request_id=ctx.request_id,
            video=task.id,
            provider=task.provider,
            upstream_id=task.upstream_id,
        )
    else:
        with gw.bulkheads.enter(deployment, "requests"):
            try:
                await adapter.delete(_changing_call(request, deployment, "delete"), task)
            except ApiError as exc:
                raise _in_our_words(exc, task) from None
    if not await gw.store.delete(task.id, task.owner):  # another delete of it won the race
        raise _not_found(task.id, task.kind)
    return _json({"id": task.id, "object": "video.deleted", "deleted": True})


async def video_content(request: web.Request) -> web.StreamResponse:
    variant = request.query.get("variant", "video")
    if variant not in VARIANTS:
        raise bad_request(f"'variant' must be one of: {', '.join(VARIANTS)}.", param="variant")
    task = await _refresh(request, await _owned(request))
    context(request).model = task.model
    if task.status != "completed":
        raise ApiError(
            409,
            f"Video '{task.id}' is {task.status}; its content can be downloaded once it is completed.",
            code="video_not_ready",
            headers={"x-should-retry": "false"},
        )
    try:
        response = await _read(
            request, task, "content", lambda adapter, call: adapter.content(call, task, variant)
        )
    except ApiError as exc:
        # A server that makes no thumbnail or spritesheet (Azure documents the video alone) answers
        # 404 for it about a video it still has, which the client must not be told is gone.
        if variant == "video" or exc.code != "video_not_found" or not await _still_held(request, task):
            raise
        raise ApiError(
            404,
            f"The provider serving this video has no '{variant}' for it; its 'video' can be downloaded.",
            param="variant",
            code="variant_not_available",
        ) from None
    if not response.prepared:  # a file the gateway serves itself (a relay sets it as it starts)
        response.headers["Cache-Control"] = CONTENT_CACHE_CONTROL
    return response


async def _still_held(request: web.Request, task: Task) -> bool:
    """Whether the provider still has ``task``'s job, asked by a retrieve after it answered 404 to
    another operation on it (the request's log keeps that operation's answer, not the check's). If
    it cannot be asked (busy, down, slow), that failure is raised: the client may retry."""
    ctx = context(request)
    refused = ctx.call
    try:
        await _read(request, task, "retrieve", lambda adapter, call: adapter.retrieve(call, task))
    except ApiError as check:
        if check.status in (404, 410):  # gone, or its result expired
            return False
        raise
    finally:
        ctx.call = refused
    return True


async def remix_video(request: web.Request) -> web.Response:
    ctx = context(request)
    table = ctx.table
    source = await _owned(request)
    ctx.model = source.model
    check_model_access(client_key(request), source.model)
    # ``model`` too: a pass-through upstream has it replaced only when the gateway has seen it
    body = await read_body(request, table.config.limits, until=("prompt", "model"))
    try:
        _check_types(body)
        deployment, adapter = _deployment_of(table, source)
        if (known := await _replayed(request, "remix", source.model, source, body)) is not None:
            return _answer(request, known)
        seed = {"size": source.video.get("size"), "seconds": source.video.get("seconds"), **_seed(body)}
        async with _admit(request):  # until the video is recorded, as it counts from then on
            with ctx.gateway.bulkheads.enter_create(deployment):
                async with _source_gone(request, source, "video_id"):
                    call = _changing_call(request, deployment, "remix")
                    upstream = await adapter.remix(call, source, body)
            task = await _record(request, deployment, upstream, seed, remixed_from=source.id)
        return _answer(request, task)
    finally:
        body.close()


@contextlib.asynccontextmanager
async def _source_gone(request: web.Request, source: Task, param: str) -> AsyncIterator[None]:
    """A provider's 404 for a remix, edit or extension of ``source``. If the provider no longer has
    the video (it purged the job), the client hears the gateway's answer for its own ID, as for any
    unknown video, not the provider's words (which may quote its job's ID). If it still has it, the
    404 was the operation's (a server without that route), and the provider's answer stands. If it
    cannot be asked, the client gets why. Any other refusal stands too. The provider's words always
    name the video by the gateway's ID, not by the provider's for its job."""
    try:
        yield
    except ApiError as exc:
        if exc.status != 404:
            raise _in_our_words(exc, source) from None
        if not await _still_held(request, source):
            raise video_not_found(source.id, param=param) from None
        raise ApiError(
            404,
            "The provider serving this video still has it, but answered 404 to this request: it may "
            f"not offer this operation. It said: {_in_our_words(exc, source).message}",
            type=exc.type,
            param=exc.param,
            code=exc.code,
            headers=exc.headers,
        ) from None


async def _source_video(request: web.Request, body: RequestBody) -> Task | None:
    """The caller's video that ``video`` names as ``{"id"}`` / ``video[id]``; None for an uploaded file."""
    ref = body.get_object("video")
    if ref is not None and "id" in ref:
        video_id = ref["id"]
        if not isinstance(video_id, str):
            raise bad_request("'video.id' must be a string: a video ID.", param="video", code="invalid_type")
        source = await gateway(request).store.get(video_id, client_key(request).name)
        if source is None:
            raise video_not_found(video_id, param="video")
        return source
    if body.has_file("video"):
        return None
    if ref is None and body.get("video") is not None:  # a bare ID, say
        raise bad_request(
            "'video' must be an uploaded file or {\"id\": ...}.", param="video", code="invalid_type"
        )
    raise bad_request(
        "'video' is required: an uploaded file or {\"id\": ...}.",
        param="video",
        code="missing_required_parameter",
    )


async def _from_video(
    request: web.Request,
    name: str,
    operation: Callable[[Adapter, Call, Task | None, RequestBody], Awaitable[UpstreamVideo]],
    *,
    extension: bool = False,
) -> web.Response:
    """Edits and extensions: to the deployment that owns the referenced video, else routed by model.

    A multipart body is read until ``video[id]``, ``model`` (replaced on the way out) and an
    extension's ``seconds`` are known; lacking one, it is read to its end, so an uploaded ``video``
    file has been seen by then.
    """
    ctx = context(request)
    gw, table = ctx.gateway, ctx.table
    until = ("video[id]", "model", "seconds") if extension else ("video[id]", "model")
    body = await read_body(request, table.config.limits, until=until)
    try:
        _check_types(body)
        if extension and body.get("seconds") is None:
            raise bad_request(
                "'seconds' is required: the length of the extension.",
                param="seconds",
                code="missing_required_parameter",
            )
        source = await _source_video(request, body)
        model = source.model if source is not None else table.resolve_model(body.get("model"))
        ctx.model = model
        check_model_access(client_key(request), model)
        if (known := await _replayed(request, name, model, source, body)) is not None:
            return _answer(request, known)
        seed = {"size": source.video.get("size")} if source else {}
        async with _admit(request):  # until the video is recorded, as it counts from then on
            if source is not None:
                deployment, adapter = _deployment_of(table, source)
                with gw.bulkheads.enter_create(deployment):
                    async with _source_gone(request, source, "video"):
                        call = _changing_call(request, deployment, name)
                        upstream = await operation(adapter, call, source, body)
            else:
                deployment, upstream = await _start(
                    request, name, model, body, lambda a, c: operation(a, c, None, body)
                )
            task = await _record(request, deployment, upstream, {**seed, **_seed(body)})
        return _answer(request, task)
    finally:
        body.close()


async def edit_video(request: web.Request) -> web.Response:
    return await _from_video(request, "edit", lambda a, c, t, b: a.edit(c, t, b))


async def extend_video(request: web.Request) -> web.Response:
    return await _from_video(request, "extend", lambda a, c, t, b: a.extend(c, t, b), extension=True)


async def create_character(request: web.Request) -> web.Response:
    ctx = context(request)
    table = ctx.table
    body = await read_body(request, table.config.limits, until=("model",))
    try:
        model = table.resolve_model(body.get("model"))
        check_model_access(client_key(request), model)
        ctx.model = model
        deployment, answer = await _start(
            request, "create_character", model, body, lambda a, c: a.create_character(c, body)
        )
        created_at = answer.get("created_at")
        task = Task(
            id=new_character_id(),
            owner=client_key(request).name,
            model=model,
            deployment=deployment.name,
            provider=deployment.provider,
            upstream_id=answer["id"],
            created_at=created_at if type(created_at) is int else int(time.time()),
            status="completed",
            kind="character",
        )
        task.video = {"id": task.id, "name": _character_name(answer, None), "created_at": task.created_at}
        await _add_started(request, deployment, task)
        return _json(task.video)
    finally:
        body.close()


async def get_character(request: web.Request) -> web.Response:
    task = await _owned(request, "character_id", kind="character")
    answer = await _read(
        request, task, "retrieve_character", lambda adapter, call: adapter.get_character(call, task)
    )
    return _json(
        {
            "id": task.id,
            "name": _character_name(answer, task.video.get("name")),
            "created_at": task.created_at,
        }
    )


def _character_name(answer: dict[str, Any], known: str | None) -> str | None:
    """A character's name as the provider gives it (text or null), else the one the client has seen."""
    name = answer.get("name", known)
    return name if name is None or type(name) is str else known


async def list_models(request: web.Request) -> web.Response:
    key = client_key(request)
    models = [m for m in context(request).table.models if key.models is None or m in key.models]
    return _json({"object": "list", "data": [_model(m) for m in models]})


async def get_model(request: web.Request) -> web.Response:
    key = client_key(request)
    model = request.match_info["model"]
    if model not in context(request).table.models or (key.models is not None and model not in key.models):
        raise model_not_found(model)
    return _json(_model(model))


def _model(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 0, "owned_by": "video-gateway"}


def shielded(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.Handler:
    """``handler``, run to its end even when its client leaves on the way.

    These handlers change a provider's state. A create the provider accepted is a job someone pays
    for: cancelled with the client's connection (aiohttp's handler cancellation), the handler would
    leave that job running upstream unrecorded, with no ID, in no list and outside the key's limits,
    and a delete would leave the video listed here though gone upstream. Run apart, the handler
    records what the provider did, so the client finds the video in its list, and logs how it ended.
    Only a request whose change was sent (:func:`_changing_call`) and whose body the gateway has
    whole is finished so. One whose client leaves before (waiting for its admission, say) is
    cancelled as before, and so is one whose client leaves mid-upload: its body is cut short on the
    way to the provider, which then starts nothing (and whose health is not blamed for it). A drain
    waits for these too (``Gateway.left_by_client``).

    A failure that leaves unknown whether the provider acted on the change is answered with
    ``x-should-retry: false`` (:func:`_unsure`). So is a change still waiting on its provider when a
    drain's time is up (a 504), before aiohttp's shutdown would drop its connection, which an SDK
    takes for one it may retry. From then on nothing more goes out: a change not yet sent, or the
    rest of an upload, is refused 503 ``shutting_down`` (:func:`_changing_call`, bodies), which the
    client may send again."""

    async def finish(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except UpstreamError as exc:
            if context(request).changing and _unsure(exc):
                exc.headers["x-should-retry"] = "false"
            raise

    async def run(request: web.Request) -> web.StreamResponse:
        drain_over = gateway(request).drain_over
        work = asyncio.ensure_future(finish(request))
        ending = asyncio.ensure_future(drain_over.wait())
        try:
            await asyncio.wait((work, ending), return_when=asyncio.FIRST_COMPLETED)
            # Not sent whole, aiohttp's shutdown ends it (an upload cut: a 503, see bodies); an event
            # stream already under way is cut by it too, as a stream the provider breaks off is.
            if not _sent_whole(request) or context(request).streaming:
                return await asyncio.shield(work)
            if work.done():
                return work.result()
            _leave_running(request, work)
            raise ApiError(
                504,
                "The gateway is shutting down before this request finished: the provider may have "
                "acted on it, and the gateway may not have recorded what it did.",
                type="server_error",
                code="shutting_down",
                headers={"x-should-retry": "false", "Connection": "close"},
            )
        except asyncio.CancelledError:
            # Nothing sent yet, or a body cut short (which must not reach the provider as if whole):
            # there is nothing to finish.
            if not _sent_whole(request):
                work.cancel()
                raise
            _leave_running(request, work)
            raise
        finally:
            ending.cancel()
            del work  # it holds the handler's error, whose traceback holds this frame: no cycle

    return run


def _sent_whole(request: web.Request) -> bool:
    """Whether the request's change went to its provider, with its body whole."""
    return context(request).changing and request.content.is_eof()


def _leave_running(request: web.Request, work: asyncio.Task[web.StreamResponse]) -> None:
    """Let a change its client no longer waits for run to its end, awaited by the drain."""
    left = gateway(request).left_by_client
    left.add(work)
    work.add_done_callback(left.discard)
    work.add_done_callback(partial(_ended_without_client, context(request).request_id, request.path))


# What a provider's front (its load balancer, nginx, Cloudflare's 524) answers when it gave up waiting
# on the server that had the request: that server may have made the job all the same.
_FRONT_TIMEOUTS = (504, 524)


def _unsure(exc: UpstreamError) -> bool:
    """Whether the provider may have acted on a request whose answer was lost: the request went out
    and then timed out or was reset, its front timed out waiting on it, or an answer came that could
    not be read (cut off, an HTML page, JSON without the job's id), or its 5xx says so. A create or
    delete sent again blindly might then start and bill a second job; a read may be tried again, and
    a clear refusal or another 5xx says nothing was done."""
    return (
        exc.kind == "payload"
        or (exc.sent and exc.kind in ("timeout", "reset"))
        or exc.upstream_status in _FRONT_TIMEOUTS
        or (exc.kind == "5xx" and _said_unsure(exc))
    )


def _said_unsure(exc: UpstreamError) -> bool:
    """The provider's 5xx says so itself (``x-should-retry: false``, as an OpenAI-dialect server,
    this gateway among them, answers when a job may exist): neither the client nor a failover may
    send the create again."""
    return exc.headers.get("x-should-retry") == "false"


def _ended_without_client(request_id: str, path: str, work: asyncio.Task[web.StreamResponse]) -> None:
    """Log how a :func:`shielded` handler whose client had left ended."""
    if work.cancelled():  # by the shutdown, at the end of the drain: the provider may have a job
        log.warning("abandoned_at_shutdown", request_id=request_id, path=path)
        return
    exc = work.exception()
    outcome: dict[str, Any]
    if exc is None:
        outcome = {"status": work.result().status}
    elif isinstance(exc, ApiError):
        outcome = {"status": exc.status, "error": exc.message}
    elif isinstance(exc, StoreUnavailable):  # as the envelope logs it
        log.error("store_unavailable", request_id=request_id, path=path, error=str(exc))
        return
    else:
        log.error("unhandled_error", request_id=request_id, path=path, exc_info=exc)
        return
    log.info("finished_without_client", request_id=request_id, path=path, **outcome)


def add_routes(add: Callable[..., None], prefix: str, expect: Any = None) -> None:
    """``add(method, path, handler, **options)`` for each route; literal routes first, as aiohttp
    matches in registration order. Within one prefix aiohttp tries routes in that order too, so the
    poll (the hot path) goes ahead of ``/videos`` itself, which no video path can match anyway."""
    videos = f"{prefix}/videos"
    post = {"expect_handler": expect} if expect is not None else {}
    add("POST", f"{videos}/edits", shielded(edit_video), **post)
    add("POST", f"{videos}/extensions", shielded(extend_video), **post)
    add("POST", f"{videos}/characters", shielded(create_character), **post)
    add("GET", f"{videos}/characters/{{character_id}}", get_character)
    add("GET", f"{videos}/{{video_id}}", retrieve_video)
    add("DELETE", f"{videos}/{{video_id}}", shielded(delete_video))
    add("POST", videos, shielded(create_video), **post)
    add("GET", videos, list_videos)
    add("GET", f"{videos}/{{video_id}}/content", video_content)
    add("POST", f"{videos}/{{video_id}}/remix", shielded(remix_video), **post)
    add("GET", f"{prefix}/models", list_models)
    add("GET", f"{prefix}/models/{{model}}", get_model)
