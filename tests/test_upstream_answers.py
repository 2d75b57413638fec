"""Whatever an upstream answers, the client gets a well-formed answer: a Video object (the 13 keys
of ``openai-videos-api.md`` §3.1, with their types), a character (§2.7), or the error envelope with
its fields as the SDKs read them, and never the gateway's own 500.

The upstreams here answer with documents the tests draw at random (seeded, so a failure replays):
the fields of the expected shape with values of any JSON type, unknown fields, numbers beyond 64
bits, ``NaN``, documents that are no object at all, and bytes that are no JSON. An OpenAI-dialect
upstream answers creates, polls and characters; a second upstream stands in for every provider kind
at once (it answers any path), with success documents and refusals in the providers' own shapes
(``providers.md``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway.providers import ADAPTERS
from gateway.videos import STATUS_SYNONYMS, STATUSES, VIDEO_KEYS
from tests.conftest import ALPHA_KEY, UPSTREAM_KEY, RunningGateway, StartGateway, call
from tests.provider_contract import start_provider_gateway
from tests.test_resilience import sample

JOB = {"id": "job_1", "object": "video", "status": "queued", "progress": 0, "created_at": 1_700_000_000}
ACTIVE = ("queued", "in_progress")


class RandomAnswers:
    """An OpenAI-dialect upstream (§1: POST /v1/videos, GET /v1/videos/{id}, and §2.7's character
    routes) whose retrieve answers ``self.next``, raw bytes as they are, whose create answers
    ``self.next_create`` when set, and whose character routes ``self.next_character``."""

    def __init__(self) -> None:
        self.next = b"{}"
        self.next_create: bytes | None = None
        self.next_character = b"{}"  # what both character routes answer
        self.creates = 0
        self.polled: list[str] = []  # each retrieve's request target, as sent
        self.content_location = ""  # where content redirects to (§2.3: a 302 to a signed URL)
        self.content_status = 302  # how: without a location, any status
        self.content_asked: list[str | None] = []  # the If-None-Match of each download, as it came

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/videos", self.create)
        app.router.add_post("/v1/videos/characters", self.character)
        app.router.add_get("/v1/videos/characters/{cid}", self.character)
        app.router.add_get("/v1/videos/{vid}", self.retrieve)
        app.router.add_get("/v1/videos/{vid}/content", self.content)
        return app

    async def content(self, request: web.Request) -> web.Response:
        self.content_asked.append(request.headers.get("If-None-Match"))
        headers = {"ETag": '"v1"', **({"Location": self.content_location} if self.content_location else {})}
        return web.Response(status=self.content_status, headers=headers, body=b"<html>moved</html>")

    async def character(self, request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=self.next_character, content_type="application/json")

    async def create(self, request: web.Request) -> web.Response:
        await request.read()
        self.creates += 1
        if self.next_create is not None:
            return web.Response(body=self.next_create, content_type="application/json")
        return web.json_response({**JOB, "id": f"job_{self.creates}"})

    async def retrieve(self, request: web.Request) -> web.Response:
        self.polled.append(request.raw_path)
        return web.Response(body=self.next, content_type="application/json")


def value(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["none", "bool", "int", "big", "float", "text", "status", "list", "object"]
    kind = rng.choice(kinds if depth < 2 else kinds[:7])
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.randint(-(10**12), 10**12)
    if kind == "big":  # past 64 bits; past a double's range (300 digits) the answer is no JSON to us
        return int("9" * rng.randint(19, 300))
    if kind == "float":
        return rng.choice([0.5, -3.25, 1e300, -1e-300, 99.9, 100.0])
    if kind == "text":
        return "".join(rng.choice("ab 7.-\u00e9\u4e2d\n\x00") for _ in range(rng.randint(0, 12)))
    if kind == "status":
        word = rng.choice([*STATUS_SYNONYMS, "", "weird"])
        return rng.choice([word, word.upper(), f" {word} "])
    if kind == "list":
        return [value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["code", "message", "x"]): value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def document(rng: random.Random, job_id: str) -> bytes:
    """One retrieve answer: mostly a Video-ish object about the job, sometimes something else."""
    shape = rng.random()
    if shape < 0.05:
        deep = b'{"id": "%s", "status": ' % job_id.encode() + b"[" * 1000 + b"]" * 1000 + b"}"
        return rng.choice(
            [b"[]", b'"completed"', b"42", b"null", b"<html>oops</html>", b"", b"9" * 400, deep]
        )
    if shape < 0.1:
        return b'{"id": "job_1", "status": "in_progress", "progress": NaN}'
    keys = rng.sample([*VIDEO_KEYS, "extra", "metadata"], rng.randint(0, len(VIDEO_KEYS)))
    fields = {key: value(rng) for key in keys}
    if rng.random() < 0.6:
        fields["status"] = rng.choice([*STATUS_SYNONYMS, "nonsense"])
    if rng.random() < 0.85:  # else whatever was drawn for it, if anything: no id is a 502
        fields["id"] = job_id
    return json.dumps(fields).encode()


def assert_video(video: dict[str, Any], video_id: str, model: str = "remote") -> None:
    assert list(video) == list(VIDEO_KEYS), video
    assert video["id"] == video_id and video["object"] == "video" and video["model"] == model
    assert video["status"] in STATUSES
    assert type(video["progress"]) is int and 0 <= video["progress"] <= 100
    assert type(video["created_at"]) is int
    for key in ("completed_at", "expires_at"):
        assert video[key] is None or type(video[key]) is int, (key, video[key])
    assert type(video["size"]) is str and type(video["seconds"]) is str
    assert video["prompt"] is None or type(video["prompt"]) is str
    if video["status"] == "completed":
        assert video["progress"] == 100 and video["completed_at"] is not None
    if video["status"] == "failed":
        assert type(video["error"]["code"]) is str and type(video["error"]["message"]) is str
    else:
        assert video["error"] is None


def assert_envelope(body: Any, sent: object) -> None:
    """The error envelope as the SDKs read it: a message, and type, param and code as text or null."""
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, (body, sent)
    assert type(error["message"]) is str and error["message"], (body, sent)
    for name in ("type", "param", "code"):
        assert error[name] is None or type(error[name]) is str, (name, body, sent)


def succeeded(answers: dict[int, int], status: int, body: Any, sent: bytes | None) -> bool:
    """Count the gateway's answer to what the provider ``sent``: True for a 200, or else it is a 502
    in the error envelope."""
    answers[status] = answers.get(status, 0) + 1
    assert status in (200, 502), (sent, body)
    if status == 502:
        assert_envelope(body, sent)
    return status == 200


def one_key_config(data_dir: Path, providers: dict[str, Any], models: dict[str, Any], **settings: Any) -> str:
    """A gateway config with the one client key ``alpha``, as YAML."""
    config = {"data_dir": str(data_dir), "keys": [{"name": "alpha", "key": ALPHA_KEY}], **settings}
    return yaml.safe_dump({**config, "providers": providers, "models": models})


@pytest.fixture
async def gateway(
    start_gateway: StartGateway, aiohttp_server: Any, tmp_path: Path
) -> tuple[RunningGateway, RandomAnswers]:
    fake = RandomAnswers()
    upstream = await aiohttp_server(fake.app())
    provider = {"kind": "openai", "base_url": str(upstream.make_url("/v1")), "api_key": UPSTREAM_KEY}
    model = {"provider": "up", "model": "upstream-model"}
    config = one_key_config(tmp_path, {"up": provider}, {"remote": model})
    return await start_gateway(config), fake


async def test_any_poll_answer_becomes_a_video_or_the_envelope(
    gateway: tuple[RunningGateway, RandomAnswers],
) -> None:
    gw, fake = gateway
    rng = random.Random(20261206)
    answers: dict[int, int] = {}
    video_id, last = "", None
    for _ in range(300):
        if last is None or last["status"] not in ACTIVE:  # a finished video is no longer polled
            status, _, created = await call(gw, "POST", "/v1/videos", json={"prompt": "p", "model": "remote"})
            assert status == 200, created
            video_id, last = created["id"], created
        fake.next = document(rng, f"job_{fake.creates}")
        status, _, body = await call(gw, "GET", f"/v1/videos/{video_id}")
        if not succeeded(answers, status, body, fake.next):
            continue
        assert_video(body, video_id)
        if last["status"] in ACTIVE and body["status"] in ACTIVE:
            assert body["progress"] >= last["progress"], (last, body, fake.next)
        last = body
    assert answers[200] > 200 and answers.get(502, 0) > 5, answers


async def test_any_create_answer_becomes_a_video_the_client_can_find_or_the_envelope(
    gateway: tuple[RunningGateway, RandomAnswers],
) -> None:
    """A create the provider answered with an ID is a video the client can poll; without one, a 502."""
    gw, fake = gateway
    rng = random.Random(6122026)
    answers: dict[int, int] = {}
    for _ in range(150):
        fake.next_create = document(rng, f"job_{fake.creates + 1}")
        status, _, body = await call(gw, "POST", "/v1/videos", json={"prompt": "p", "model": "remote"})
        if not succeeded(answers, status, body, fake.next_create):
            continue
        assert_video(body, body["id"])
        fake.next = json.dumps({"id": f"job_{fake.creates}", "status": "in_progress", "progress": 1}).encode()
        status, _, polled = await call(gw, "GET", f"/v1/videos/{body['id']}")
        assert status == 200, polled
        assert_video(polled, body["id"])
    assert answers[200] > 80 and answers.get(502, 0) > 5, answers


@pytest.mark.parametrize("upstream_id", ["..", "a/b?c#d e%41"])
async def test_an_upstream_id_is_polled_at_its_own_path(
    gateway: tuple[RunningGateway, RandomAnswers], upstream_id: str
) -> None:
    """An ID is one path segment whatever its characters: ``..`` or ``a/b`` cannot point a poll,
    sent with the provider's credential, at another path (servers resolve ``..``; this fake does
    not, so the test reads the target as sent)."""
    gw, fake = gateway
    fake.next_create = json.dumps({**JOB, "id": upstream_id}).encode()
    status, _, created = await call(gw, "POST", "/v1/videos", json={"prompt": "p", "model": "remote"})
    assert status == 200, created
    fake.next = json.dumps({**JOB, "id": upstream_id, "status": "in_progress", "progress": 5}).encode()
    status, _, polled = await call(gw, "GET", f"/v1/videos/{created['id']}")
    assert status == 200 and polled["progress"] == 5, polled
    (target,) = fake.polled
    root, version, videos, segment = target.split("/")
    assert (root, version, videos) == ("", "v1", "videos") and segment not in (".", ".."), target
    assert unquote(segment) == upstream_id


@pytest.mark.parametrize("location", ["http://[::1", "http://127.0.0.1:99999/v.mp4", "//"])
async def test_a_redirect_to_no_url_is_a_502(
    gateway: tuple[RunningGateway, RandomAnswers], location: str
) -> None:
    """A provider whose content redirects to something that is no URL failed: 502, not 500."""
    gw, fake = gateway
    fake.next_create = json.dumps({**JOB, "status": "completed", "progress": 100}).encode()
    status, _, created = await call(gw, "POST", "/v1/videos", json={"prompt": "p", "model": "remote"})
    assert status == 200 and created["status"] == "completed", created
    fake.content_location = location
    status, headers, body = await call(gw, "GET", f"/v1/videos/{created['id']}/content")
    assert status == 502, (status, headers, body)
    assert_envelope(body, location)


@pytest.mark.parametrize("status", [302, 307, 300, 204, 201, 304])
async def test_a_download_answer_that_carries_no_file_is_a_502(
    gateway: tuple[RunningGateway, RandomAnswers], status: int
) -> None:
    """A download answered under 400 but with no file to relay (a redirect that names no place, a
    204, a 304 to a request that asked nothing of the kind): the client gets a 502 in the envelope,
    not the provider's status with a body of nothing."""
    gw, fake = gateway
    fake.next_create = json.dumps({**JOB, "status": "completed", "progress": 100}).encode()
    status_, _, created = await call(gw, "POST", "/v1/videos", json={"prompt": "p", "model": "remote"})
    assert status_ == 200, created
    fake.content_status = status
    errors = 'gateway_upstream_errors_total{kind="payload",provider="up"}'
    before = await sample(gw, errors)
    got, headers, body = await call(gw, "GET", f"/v1/videos/{created['id']}/content")
    assert got == 502, (got, headers, body)
    assert body["error"]["type"] == "upstream_error" and str(status) in body["error"]["message"], body
    assert await sample(gw, errors) == before + 1  # an unusable answer, counted once


async def test_not_modified_reaches_the_client_that_asked_for_it(
    gateway: tuple[RunningGateway, RandomAnswers],
) -> None:
    """A conditional download goes upstream conditional, and the provider's 304 is an answer the
    client can take: relayed with its ETag, no body."""
    gw, fake = gateway
    fake.next_create = json.dumps({**JOB, "status": "completed", "progress": 100}).encode()
    _, _, created = await call(gw, "POST", "/v1/videos", json={"prompt": "p", "model": "remote"})
    fake.content_status = 304
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{gw.url}/v1/videos/{created['id']}/content",
            headers={"Authorization": f"Bearer {ALPHA_KEY}", "If-None-Match": '"v1"'},
        ) as response,
    ):
        assert response.status == 304 and await response.read() == b""
        assert response.headers["ETag"] == '"v1"'
    assert fake.content_asked == ['"v1"']


def character_document(rng: random.Random) -> bytes:
    """A character answer (§2.7: ``{id, name, created_at}``) with values of any JSON type."""
    if rng.random() < 0.05:
        return rng.choice([b"[]", b"null", b"<html>oops</html>", b""])
    keys = rng.sample(["id", "name", "created_at", "extra"], rng.randint(0, 4))
    fields = {key: value(rng) for key in keys}
    if rng.random() < 0.8:
        fields["id"] = rng.choice(["upchar_1", "upchar_1", ""])
    return json.dumps(fields).encode()


def assert_character(character: dict[str, Any], character_id: str | None = None) -> None:
    assert list(character) == ["id", "name", "created_at"], character
    assert character["id"].startswith("char_"), character
    assert character_id is None or character["id"] == character_id, character
    assert character["name"] is None or type(character["name"]) is str, character
    assert type(character["created_at"]) is int, character


async def test_any_character_answer_becomes_a_character_or_the_envelope(
    gateway: tuple[RunningGateway, RandomAnswers],
) -> None:
    """A character the provider answered with an ID is ``{id, name, created_at}`` with §2.7's types
    when created and when read back; without an ID, a 502."""
    gw, fake = gateway
    rng = random.Random(26122026)
    answers: dict[int, int] = {}
    form = {"name": "Mochi", "model": "remote"}
    for _ in range(100):
        fake.next_character = character_document(rng)
        data = aiohttp.FormData(form)
        data.add_field("video", b"\x00\x00\x00\x18ftypmp42", filename="clip.mp4", content_type="video/mp4")
        status, _, created = await call(gw, "POST", "/v1/videos/characters", data=data)
        if not succeeded(answers, status, created, fake.next_character):
            continue
        assert_character(created)
        fake.next_character = character_document(rng)
        status, _, read = await call(gw, "GET", f"/v1/videos/characters/{created['id']}")
        if succeeded(answers, status, read, fake.next_character):
            assert_character(read, created["id"])
    assert answers[200] > 60 and answers.get(502, 0) > 5, answers


# Each provider kind with the options its config needs besides base_url and api_key.
KINDS: dict[str, dict[str, str]] = {
    "openai": {},
    "azure": {},
    "runway": {},
    "luma": {},
    "kling": {"access_key": "ak-gateway-tests"},
    "minimax": {},
    "replicate": {},
    "fal": {},
    "dashscope": {},
    "seedance": {},
    "veo": {},
    "vertex_veo": {"project": "gateway-tests"},
}


def upstream_model(kind: str) -> str:
    """A model the kind's adapter knows (the first of its table), for kinds that keep one."""
    return next(iter(getattr(ADAPTERS[kind], "models", None) or {}), "upstream-model")


FIELDS = ["message", "type", "param", "code", "status", "details", "reason", "detail", "loc", "msg"]


class AnyPath:
    """Every provider at once: any method, any path gets ``self.status`` with ``self.body``."""

    def __init__(self) -> None:
        self.status = 400
        self.body = b"{}"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.answer)
        return app

    async def answer(self, request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=self.status, body=self.body, content_type="application/json")


# Refusals every provider kind meets first: the cases random drawing found, each once a 500.
KNOWN_REFUSALS = [
    (429, {"detail": f"Request was throttled. Your rate limit resets in ~{'9' * 400}s."}),  # Replicate
    (429, {"error": {"status": "RESOURCE_EXHAUSTED", "details": [{"retryDelay": "1e400s"}]}}),  # Google
    (400, {"error": {"code": 400, "details": 1.5, "message": "m"}}),  # Google, details no list
    (422, {"detail": [{"loc": None, "msg": "field required"}]}),  # Luma, loc no list
    (400, {"error": {"message": "m", "type": 5, "param": ["prompt"], "code": {"a": 1}}}),  # OpenAI
    (400, b"[" * 100_000),  # nested past Python's recursion limit
    (400, b'{"error": {"status": "INVALID_ARGUMENT", "message": ' + b"[" * 1000 + b"]" * 1000 + b"}}"),
]


def refusal(rng: random.Random) -> bytes:
    """One error body in one of the providers' shapes, with values of any type."""
    fields = {name: value(rng) for name in rng.sample(FIELDS, rng.randint(0, 5))}
    shape = rng.random()
    if shape < 0.05:
        return rng.choice([b"", b"<html>502 Bad Gateway</html>", b"null", b"[]", b'"busy"'])
    if shape < 0.4:
        return json.dumps({"error": fields}).encode()
    if shape < 0.6:
        items = [{"loc": value(rng), "msg": value(rng), "type": value(rng)} for _ in range(rng.randint(0, 3))]
        return json.dumps({"detail": rng.choice([items, value(rng)])}).encode()
    if shape < 0.75:
        delay = rng.choice([value(rng), "27.5s", "infs", "s"])  # RetryInfo's is "<seconds>s"
        details = rng.choice([[{"reason": value(rng), "retryDelay": delay}], value(rng)])
        return json.dumps({"error": {**fields, "details": details}}).encode()
    if shape < 0.85:
        return json.dumps({"code": value(rng), "message": value(rng), "base_resp": value(rng)}).encode()
    return json.dumps(fields).encode()


@pytest.fixture
async def every_provider(
    start_gateway: StartGateway, aiohttp_server: Any, tmp_path: Path
) -> tuple[RunningGateway, AnyPath]:
    """A gateway with a provider of each kind, all at the one upstream, and model ``m-<kind>``."""
    fake = AnyPath()
    upstream = await aiohttp_server(fake.app())
    base_url = str(upstream.make_url("/v1"))
    provider = {"base_url": base_url, "api_key": UPSTREAM_KEY}
    config = one_key_config(
        tmp_path,
        {
            f"p-{kind}": {"kind": kind, **provider, **({"options": options} if options else {})}
            for kind, options in KINDS.items()
        },
        {f"m-{kind}": {"provider": f"p-{kind}", "model": upstream_model(kind)} for kind in KINDS},
        resilience={"backoff_seconds": 0.01},
    )
    return await start_gateway(config), fake


@pytest.mark.parametrize("kind", list(KINDS))
async def test_any_refusal_becomes_the_envelope(
    every_provider: tuple[RunningGateway, AnyPath], kind: str
) -> None:
    gw, fake = every_provider
    rng = random.Random(f"refusals-{kind}")
    statuses: dict[int, int] = {}
    drawn = [
        (rng.choice([400, 401, 402, 403, 404, 409, 413, 422, 429, 451, 500, 502, 503, 504]), refusal(rng))
        for _ in range(40)
    ]
    known = [(status, b if isinstance(b, bytes) else json.dumps(b).encode()) for status, b in KNOWN_REFUSALS]
    for fake.status, fake.body in [*known, *drawn]:  # each becomes what the upstream answers
        status, headers, body = await call(
            gw, "POST", "/v1/videos", json={"prompt": "p", "model": f"m-{kind}"}
        )
        statuses[status] = statuses.get(status, 0) + 1
        sent = (fake.status, fake.body)
        assert 400 <= status <= 599 and status != 500, (status, body, sent)
        assert_envelope(body, sent)
        assert headers.get("Retry-After", "1").isdigit() or status != 429, (headers, sent)
    assert len(statuses) > 2, statuses


# Keys and words of the providers' documents (providers.md), for answers that look like theirs.
PROVIDER_WORDS = [
    *("id", "task_id", "status", "state", "task_status", "output", "data", "name", "done", "response"),
    *("video", "videos", "url", "uri", "video_url", "progress", "error", "failure_reason", "assets"),
    *("file_id", "base_resp", "status_code", "content", "task_result", "generateVideoResponse"),
    *("generatedSamples", "metrics", "created_at", "completed_at", "urls", "code", "message"),
    *("SUCCESS", "succeeded", "completed", "Success", "SUCCEEDED", "COMPLETED", "IN_QUEUE", "FAILED"),
]


def provider_document(rng: random.Random, depth: int = 0) -> Any:
    if depth < 3 and rng.random() < 0.5:
        return {
            rng.choice(PROVIDER_WORDS): provider_document(rng, depth + 1) for _ in range(rng.randint(0, 5))
        }
    if depth < 3 and rng.random() < 0.2:
        return [provider_document(rng, depth + 1) for _ in range(rng.randint(0, 2))]
    urls = ["http://127.0.0.1:9/v.mp4", "http://[::1/v.mp4", "https://127.0.0.1:99999/v.mp4"]
    return rng.choice([value(rng), rng.choice(PROVIDER_WORDS), rng.choice(urls)])


def job(kind: str, rng: random.Random) -> dict[str, Any]:
    """A document holding the job's ID under every name a provider gives it, and a status, with
    random fields on top half the time."""
    operation = f"models/{upstream_model(kind)}/operations/job1"
    if kind == "vertex_veo":
        operation = f"projects/gateway-tests/locations/us-central1/publishers/google/{operation}"
    status = rng.choice(PROVIDER_WORDS)
    document = {
        "id": "job_1",
        "task_id": "job_1",
        "request_id": "job1",
        "name": operation,
        "data": {"task_id": "job_1", "task_status": status},
        "output": {"task_id": "job_1", "task_status": status},
        "base_resp": {"status_code": 0},
        "code": 0,
        "status": status,
    }
    extra = provider_document(rng)
    if isinstance(extra, dict) and rng.random() < 0.5:
        document.update(extra)
    return document


@pytest.mark.parametrize("kind", list(KINDS))
async def test_any_provider_answer_becomes_a_video_or_the_envelope(
    every_provider: tuple[RunningGateway, AnyPath], kind: str
) -> None:
    """A provider answering each call with a random document: every create, poll, download and
    delete gets a well-formed Video, the media, or the envelope, and never a 500."""
    gw, fake = every_provider
    rng = random.Random(f"answers-{kind}")
    fake.status, model, answers = 200, f"m-{kind}", {}
    for _ in range(40):
        fake.body = json.dumps(job(kind, rng)).encode()
        status, _, created = await call(gw, "POST", "/v1/videos", json={"prompt": "p", "model": model})
        answers[("create", status)] = answers.get(("create", status), 0) + 1
        assert 200 <= status <= 599 and status != 500, (created, fake.body)
        if status != 200:
            assert_envelope(created, fake.body)
            continue
        assert_video(created, created["id"], model)
        video = f"/v1/videos/{created['id']}"
        calls = [("poll", "GET", video), ("poll", "GET", video), ("content", "GET", f"{video}/content")]
        for operation, method, path in [*calls, ("delete", "DELETE", video)]:
            fake.body = json.dumps(job(kind, rng) if rng.random() < 0.6 else provider_document(rng)).encode()
            status, _, body = await call(gw, method, path)
            answers[(operation, status)] = answers.get((operation, status), 0) + 1
            assert 200 <= status <= 599 and status != 500, (method, path, body, fake.body)
            if status >= 400:
                assert_envelope(body, fake.body)
            elif operation == "poll":
                assert_video(body, created["id"], model)
    assert answers.get(("create", 200), 0) > 30 and answers.get(("poll", 200), 0) > 10, answers


async def test_a_status_word_the_gateway_does_not_know_does_not_end_the_job(
    gateway: tuple[RunningGateway, RandomAnswers], session_log: Path
) -> None:
    """A provider that adds a stage ("uploading", say) must not fail every video in production: a
    failed video is no longer polled, so one the provider then finishes (and bills) would be lost.
    The word reads as in progress, is logged for the operator, and the job ends when the provider
    says so."""
    gw, fake = gateway
    status, _, created = await call(gw, "POST", "/v1/videos", json={"prompt": "p", "model": "remote"})
    assert status == 200, created
    fake.next = json.dumps({**JOB, "status": "uploading", "progress": 97}).encode()
    status, _, polled = await call(gw, "GET", f"/v1/videos/{created['id']}")
    assert status == 200 and polled["status"] == "in_progress" and polled["error"] is None, polled
    assert polled["progress"] == 97
    fake.next = json.dumps({**JOB, "status": "completed", "progress": 100}).encode()
    status, _, polled = await call(gw, "GET", f"/v1/videos/{created['id']}")
    assert status == 200 and polled["status"] == "completed", polled
    logged = [
        json.loads(line) for line in session_log.read_text().splitlines() if "unknown_upstream_status" in line
    ]
    assert any(entry.get("status") == "uploading" for entry in logged), logged


async def test_a_video_never_finishes_before_it_was_made(
    gateway: tuple[RunningGateway, RandomAnswers],
) -> None:
    """``created_at`` is the gateway's clock, ``completed_at`` the provider's: a provider whose clock
    is behind (or that sends a small number) must not make a video finish before it began."""
    gw, fake = gateway
    status, _, created = await call(gw, "POST", "/v1/videos", json={"prompt": "p", "model": "remote"})
    assert status == 200, created
    fake.next = json.dumps({**JOB, "status": "completed", "progress": 100, "completed_at": 2}).encode()
    status, _, polled = await call(gw, "GET", f"/v1/videos/{created['id']}")
    assert status == 200 and polled["completed_at"] >= polled["created_at"], polled


async def _unauthorized_page(request: web.Request) -> web.Response:
    """A front (a proxy, a WAF) refusing the provider's credential with its own page, in none of
    the shapes the provider's API documents for its errors."""
    return web.Response(
        status=401, text="<html><h1>401 Authorization Required</h1></html>", content_type="text/html"
    )


@pytest.mark.parametrize(
    ("kind", "model", "path"),
    [
        ("luma", "ray-2", "/dream-machine/v1"),
        ("fal", "fal-ai/kling-video/v2.5-turbo/pro/text-to-video", ""),
        ("replicate", "minimax/hailuo-02", ""),
        ("dashscope", "wan2.1-t2v-turbo", ""),
        ("seedance", "doubao-seedance-1-0-pro-250528", "/api/v3"),
        ("veo", "veo-3.1-generate-preview", ""),
        ("runway", "gen4.5", ""),
        ("minimax", "MiniMax-Hailuo-2.3", ""),
        ("openai", "sora-2", "/v1"),
    ],
)
async def test_a_401_in_any_shape_is_the_gateways_key_refused(
    start_gateway: StartGateway, tmp_path: Path, aiohttp_server: Any, kind: str, model: str, path: str
) -> None:
    """A provider's 401 refuses the gateway's own credential (the client's never goes upstream).
    Where its body was not in the provider's documented error shape, several adapters passed it on
    as a plain 401 invalid_request_error: to the SDK, the client's own key was wrong."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _unauthorized_page)
    server = await aiohttp_server(app)
    provider = f"""
        kind: {kind}
        base_url: {str(server.make_url("")).rstrip("/")}{path}
        api_key: ${{UPSTREAM_KEY}}
    """
    models = f"""
    public:
      provider: native
      model: {model}
    """
    gw = await start_provider_gateway(start_gateway, tmp_path, provider, models)
    status, _, body = await call(gw, "POST", "/v1/videos", json={"model": "public", "prompt": "x"})
    assert status == 401 and body["error"]["code"] == "upstream_auth_failed", body
    assert "gateway's" in body["error"]["message"], body
