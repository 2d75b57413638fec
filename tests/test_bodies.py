"""The streaming body reader (gateway/bodies.py): multipart parser, read_body, upstream bodies, Spool."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import random
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gateway.bodies as bodies
from gateway.bodies import CHUNK, MultipartError, MultipartParser, PartInfo, Spool, read_body
from gateway.config import Limits
from gateway.errors import ApiError

BOUNDARY = "----gw-test-boundary-7MA4YWxkTrZu0gW"
MiB = 1024 * 1024


# --- building multipart bodies by hand ----------------------------------------------------------


@dataclass
class Part:
    name: str
    data: bytes
    filename: str | None = None
    content_type: str | None = None

    @property
    def expected_type(self) -> str:
        if self.content_type is not None:
            return self.content_type
        return "application/octet-stream" if self.filename is not None else "text/plain"


def multipart(
    parts: Sequence[Part], boundary: str = BOUNDARY, preamble: bytes = b"", epilogue: bytes = b"\r\n"
) -> bytes:
    out = bytearray(preamble)
    for p in parts:
        disposition = f'form-data; name="{p.name}"'
        if p.filename is not None:
            disposition += f'; filename="{p.filename}"'
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if p.content_type is not None:
            out += f"Content-Type: {p.content_type}\r\n".encode()
        out += b"\r\n" + p.data + b"\r\n"
    out += f"--{boundary}--".encode() + epilogue
    return bytes(out)


def content_type(boundary: str = BOUNDARY) -> str:
    return f"multipart/form-data; boundary={boundary}"


def value_span(raw: bytes, name: str) -> tuple[int, int]:
    """Offsets of the value of the (only) part called ``name`` in a body built by ``multipart``."""
    marker = f'name="{name}"'.encode()
    assert raw.count(marker) == 1
    start = raw.index(b"\r\n\r\n", raw.index(marker)) + 4
    end = raw.index(f"\r\n--{BOUNDARY}".encode(), start)
    return start, end


def splice(raw: bytes, span: tuple[int, int], value: bytes) -> bytes:
    return raw[: span[0]] + value + raw[span[1] :]


# --- running the parser -------------------------------------------------------------------------


@dataclass
class Parsed:
    info: PartInfo
    data: bytes


def run_parser(boundary: str, chunks: Iterable[bytes]) -> tuple[list[Parsed], MultipartParser]:
    """Feed ``chunks``; check the event grammar; return the parts with their joined data."""
    parser = MultipartParser(boundary)
    parts: list[Parsed] = []
    current: Parsed | None = None
    done = 0
    for chunk in chunks:
        for kind, value in parser.feed(chunk):
            assert done == 0, f"event {kind!r} after done"
            if kind == "part":
                assert current is None, "part started inside a part"
                assert isinstance(value, PartInfo)
                current = Parsed(value, b"")
            elif kind == "data":
                assert current is not None, "data outside a part"
                assert isinstance(value, bytes) and value, "data events carry non-empty bytes"
                current.data += value
            elif kind == "end":
                assert current is not None and value is current.info, "end does not match its part"
                parts.append(current)
                current = None
            else:
                assert (kind, value) == ("done", None)
                assert current is None
                done += 1
    return parts, parser


def split_every(raw: bytes, size: int) -> list[bytes]:
    return [raw[i : i + size] for i in range(0, len(raw), size)]


def split_at(raw: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = [0, *sorted(set(cuts)), len(raw)]
    return [raw[a:b] for a, b in itertools.pairwise(points)]


def assert_parsed(raw: bytes, boundary: str, chunks: list[bytes], expected: Sequence[Part]) -> None:
    parts, parser = run_parser(boundary, chunks)
    assert parser.done
    assert parser.first_boundary == raw.index(f"--{boundary}".encode())
    got = [(p.info.name, p.info.filename, p.info.content_type, p.data) for p in parts]
    assert got == [(e.name, e.filename, e.expected_type, e.data) for e in expected]
    for p in parts:
        assert 0 < p.info.value_start <= p.info.value_end <= len(raw)
        assert raw[p.info.value_start : p.info.value_end] == p.data


# A body with the awkward cases: empty value, CRLF and dashes inside values, a near-boundary inside
# a file, a value ending in CR, non-ASCII names, explicit and default content types.
TRICKY_PARTS = [
    Part("model", b"sora-2"),
    Part("prompt", "A fox \u2014 in snow\r\n--not a boundary\r\n".encode()),
    Part("empty", b""),
    Part("seconds", b"8\r"),
    Part("input_reference[image_url]", b"https://example.com/a.png"),
    Part(
        "input_reference",
        b"\x89PNG\r\n\x1a\n" + f"\r\n--{BOUNDARY[:-1]}".encode() + bytes(range(256)) + b"\r\n-",
        filename="caf\u00e9 frame.png",
        content_type="image/png",
    ),
    Part("blob", bytes(range(256)) * 2, filename="b.bin"),
    Part("size", b"1280x720", content_type="text/plain; charset=utf-8"),
]


@pytest.mark.parametrize(
    "preamble,epilogue",
    [(b"", b"\r\n"), (b"This is the preamble.\r\n", b""), (b"\r\n", b"\r\nepilogue text\r\n")],
    ids=["plain", "preamble", "crlf-preamble+epilogue"],
)
def test_parser_every_split_size(preamble: bytes, epilogue: bytes):
    raw = multipart(TRICKY_PARTS, preamble=preamble, epilogue=epilogue)
    assert len(raw) > 300
    for size in [*range(1, 301), len(raw) - 1, len(raw)]:
        assert_parsed(raw, BOUNDARY, split_every(raw, size), TRICKY_PARTS)


def test_parser_takes_transport_padding_after_a_delimiter_whatever_the_split():
    """RFC 2046 §5.1.1: spaces and tabs may follow a delimiter before its line ends, and a receiver
    must accept them (as Python's email, Go's mime/multipart and aiohttp do)."""
    delimiter = f"--{BOUNDARY}\r\n".encode()
    raw = multipart(TRICKY_PARTS).replace(delimiter, f"--{BOUNDARY} \t  \r\n".encode())
    assert raw.count(b" \t  \r\n") == len(TRICKY_PARTS)
    for size in [*range(1, 40), len(raw)]:
        assert_parsed(raw, BOUNDARY, split_every(raw, size), TRICKY_PARTS)


def test_parser_byte_at_a_time_and_with_empty_feeds():
    raw = multipart(TRICKY_PARTS)
    chunks = [c for b in split_every(raw, 1) for c in (b"", b)]
    assert_parsed(raw, BOUNDARY, chunks, TRICKY_PARTS)


def test_parser_ignores_input_after_done():
    raw = multipart(TRICKY_PARTS[:2])
    parts, parser = run_parser(BOUNDARY, [raw, b"--garbage\r\n\r\n", f"--{BOUNDARY}\r\n".encode()])
    assert parser.done and len(parts) == 2


def test_parser_form_without_parts():
    parts, parser = run_parser(BOUNDARY, [f"--{BOUNDARY}--\r\n".encode()])
    assert parts == [] and parser.done


_NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_[]-.", min_size=1, max_size=12)
_BOUNDARY = st.from_regex(r"[A-Za-z0-9'()+_,.-]{1,70}", fullmatch=True)


def _delimits(value: bytes, boundary: str) -> bool:
    """Whether some parser would end a part's value at a delimiter in it: after CRLF (every parser),
    after a bare LF or CR, or at its very start (Python's email and werkzeug)."""
    delimiter = f"--{boundary}".encode()
    return value.startswith(delimiter) or any(end + delimiter in value for end in (b"\r", b"\n"))


@st.composite
def forms(draw: st.DrawFn) -> tuple[str, list[Part], bytes]:
    boundary = draw(_BOUNDARY)
    delimiter = f"\r\n--{boundary}".encode()
    noise = st.sampled_from([b"\r\n", b"--", b"\r", b"\n", delimiter[:-1], delimiter[2:], b"\r\n\r\n"])
    data = st.lists(st.one_of(st.binary(max_size=40), noise), max_size=6).map(b"".join)
    parts = draw(
        st.lists(
            st.builds(
                Part,
                name=_NAME,
                data=data.filter(lambda d: not _delimits(d, boundary)),
                filename=st.none() | _NAME,
                content_type=st.none() | st.sampled_from(["image/png", "video/mp4", "text/plain"]),
            ),
            max_size=5,
        )
    )
    preamble = draw(st.sampled_from([b"", b"\r\n", b"preamble\r\n"]))
    epilogue = draw(st.sampled_from([b"", b"\r\n", b"\r\ntrailing junk"]))
    return boundary, parts, multipart(parts, boundary, preamble, epilogue)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(form=forms(), data=st.data())
def test_parser_random_forms_random_splits(form: tuple[str, list[Part], bytes], data: st.DataObject):
    boundary, parts, raw = form
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=30))
    assert_parsed(raw, boundary, split_at(raw, cuts), parts)


# --- malformed input ----------------------------------------------------------------------------


def _head(headers: str) -> bytes:
    return f"--{BOUNDARY}\r\n{headers}\r\n\r\nvalue\r\n--{BOUNDARY}--\r\n".encode()


MALFORMED = {
    "no-boundary": b"x" * (70 * 1024),
    "boundary-not-at-line-start": b"y" * (70 * 1024) + f"text--{BOUNDARY}\r\n".encode(),
    "bad-header-line": _head('Content-Disposition: form-data; name="a"\r\nthis line has no colon'),
    "headers-too-large": _head('Content-Disposition: form-data; name="a"\r\nX-Pad: ' + "p" * 20_000),
    "endless-headers": f"--{BOUNDARY}\r\n".encode() + b"X-Pad: " + b"p" * 40_000,
    "no-content-disposition": _head("Content-Type: text/plain"),
    "disposition-without-name": _head('Content-Disposition: form-data; filename="a.png"'),
    "not-form-data": _head('Content-Disposition: attachment; name="a"'),
    "junk-after-boundary": f"--{BOUNDARY}junk\r\n".encode()
    + _head('Content-Disposition: form-data; name="a"'),
    # a delimiter other parsers see (after a bare LF or CR, or where a value starts) and this one would not
    "delimiter-after-a-bare-lf": multipart([Part("a", f"1\n--{BOUNDARY}\r\n".encode())]),
    "delimiter-after-a-bare-cr": multipart([Part("a", f"1\r--{BOUNDARY}--".encode())]),
    "delimiter-where-a-value-starts": multipart([Part("a", f"--{BOUNDARY}\r\n".encode())]),
    "delimiter-after-a-bare-lf-in-the-preamble": multipart(
        [Part("a", b"1")], preamble=b"x\n--" + BOUNDARY.encode() + b"\r\n"
    ),
    "junk-after-part-boundary": multipart([Part("a", b"1")]).replace(
        f"--{BOUNDARY}--".encode(), f"--{BOUNDARY}!!".encode()
    ),
    "junk-after-transport-padding": multipart([Part("a", b"1"), Part("b", b"2")]).replace(
        f"\r\n--{BOUNDARY}\r\n".encode(), f"\r\n--{BOUNDARY} \t x\r\n".encode()
    ),
    "endless-transport-padding": f"--{BOUNDARY}".encode() + b" " * 2000 + b"\r\n",
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_parser_rejects_malformed_input_whatever_the_split(raw: bytes):
    for size in (1, 7, 64, 1000, 4096, len(raw)):
        if size == 1 and len(raw) > 5000:
            continue  # byte-at-a-time over 70 KB is slow and adds nothing over size 7
        with pytest.raises(MultipartError):
            run_parser(BOUNDARY, split_every(raw, size))


def test_parser_header_limit_is_the_same_whatever_the_split():
    """16 KiB of headers is accepted, one byte more is not, however the bytes arrive."""
    prefix = 'Content-Disposition: form-data; name="a"\r\nX-Pad: '
    fits = _head(prefix + "p" * (bodies._MAX_PART_HEADERS - len(prefix)))
    too_big = _head(prefix + "p" * (bodies._MAX_PART_HEADERS - len(prefix) + 1))
    for size in (13, 1000, 16 * 1024, 16 * 1024 + 3, 16 * 1024 + 100, len(fits)):
        parts, parser = run_parser(BOUNDARY, split_every(fits, size))
        assert parser.done and [p.data for p in parts] == [b"value"]
        with pytest.raises(MultipartError):
            run_parser(BOUNDARY, split_every(too_big, size))


def test_parser_preamble_limit_is_the_same_whatever_the_split():
    form = multipart([Part("model", b"sora-2")])
    fits = b"p" * (bodies._MAX_PREAMBLE - 2) + b"\r\n" + form
    too_long = b"p" * (bodies._MAX_PREAMBLE - 1) + b"\r\n" + form
    for size in (4096, 60_000, bodies._MAX_PREAMBLE, len(fits)):
        parts, parser = run_parser(BOUNDARY, split_every(fits, size))
        assert parser.done and [p.data for p in parts] == [b"sora-2"]
        with pytest.raises(MultipartError):
            run_parser(BOUNDARY, split_every(too_long, size))


_TOKENS = st.sampled_from(
    [
        f"--{BOUNDARY}".encode(),
        f"\r\n--{BOUNDARY}".encode(),
        f"--{BOUNDARY}--".encode(),
        b"\r\n",
        b"\r\n\r\n",
        b"--",
        b"Content-Disposition: form-data; ",
        b'name="model"',
        b"name*=utf-8''%E2%82%AC",
        b"; filename*=x-unknown''a%ff",
        b'; filename="a\\"b"',
        b"Content-Type: image/png",
        b":",
        b";",
        b'"',
        b"\xff\xfe\x00",
    ]
)
_FUZZ = st.one_of(
    st.binary(max_size=400),
    st.lists(st.one_of(_TOKENS, st.binary(max_size=12)), max_size=40).map(b"".join),
)


def _outcome(chunks: list[bytes]) -> Any:
    try:
        parts, parser = run_parser(BOUNDARY, chunks)
    except MultipartError:
        return "error"
    return [(p.info, p.data) for p in parts], parser.done


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(form=forms(), data=st.data())
def test_parser_without_data_events_finds_the_same_parts(
    form: tuple[str, list[Part], bytes], data: st.DataObject
):
    """How the rest of a streamed body is checked: the same parts and offsets, no value copied."""
    boundary, _, raw = form
    chunks = split_at(raw, data.draw(st.lists(st.integers(0, len(raw)), max_size=30)))
    parsed, _ = run_parser(boundary, chunks)
    parser = MultipartParser(boundary)
    parser.data_events = False
    events = [event for chunk in chunks for event in parser.feed(chunk)]
    assert all(kind != "data" for kind, _ in events) and parser.done
    ended = [value for kind, value in events if kind == "end"]
    assert [(p.name, p.value_start, p.value_end) for p in ended] == [
        (p.info.name, p.info.value_start, p.info.value_end) for p in parsed
    ]


def test_parser_skipping_large_values_keeps_every_offset():
    """Values are skipped chunk by chunk, whole chunks at a time: offsets stay exact at any split."""
    big = Part("video", os.urandom(300_000) + f"\r\n--{BOUNDARY[:-1]}".encode() * 3, filename="v.mp4")
    raw = multipart([*TRICKY_PARTS, big, Part("model", b"last")])
    expected, _ = run_parser(BOUNDARY, [raw])
    for size in (len(BOUNDARY) + 1, len(BOUNDARY) + 4, 1000, 65_536, 100_003, len(raw)):
        parser = MultipartParser(BOUNDARY)
        parser.data_events = False
        events = [event for chunk in split_every(raw, size) for event in parser.feed(chunk)]
        ended = [(p.name, p.value_start, p.value_end) for kind, p in events if kind == "end"]
        assert ended == [(p.info.name, p.info.value_start, p.info.value_end) for p in expected], size
        assert parser.done and all(kind != "data" for kind, _ in events)


@pytest.mark.parametrize("data_events", [True, False])
def test_parser_takes_a_boundary_inside_a_line_for_data_however_the_bytes_arrive(data_events: bool):
    """``--boundary`` inside a line is no delimiter (RFC 2046). A read that ended just after one left
    it at the start of the kept bytes, where it was taken for a delimiter after nothing: refused."""
    value = b"A" * 50 + f"--{BOUNDARY}".encode() + b"ZZ" + b"B" * 50
    raw = multipart([Part("video", value, filename="v.bin"), Part("model", b"last")])
    for size in range(1, 120):
        parser = MultipartParser(BOUNDARY)
        parser.data_events = data_events
        events = [event for chunk in split_every(raw, size) for event in parser.feed(chunk)]
        assert parser.done and [p.name for kind, p in events if kind == "end"] == ["video", "model"], size
    assert_parsed(
        raw, BOUNDARY, split_every(raw, 7), [Part("video", value, filename="v.bin"), Part("model", b"last")]
    )


@pytest.mark.parametrize("line_end", [b"\n", b"\r"])
def test_parser_skipping_large_values_still_refuses_a_delimiter_after_a_bare_line_end(line_end: bytes):
    """The rest of a streamed upload is skipped, not copied; a delimiter after a bare LF or CR deep
    in it, where another parser would start a part, is refused there too, however the bytes arrive."""
    hidden = os.urandom(200_000) + line_end + f"--{BOUNDARY}\r\n".encode() + os.urandom(100_000)
    raw = multipart([Part("video", hidden, filename="v.mp4"), Part("model", b"last")])
    for size in (len(BOUNDARY) + 1, len(BOUNDARY) + 4, 1000, 65_536, 200_001, len(raw)):
        parser = MultipartParser(BOUNDARY)
        parser.data_events = False
        with pytest.raises(MultipartError):
            for chunk in split_every(raw, size):
                parser.feed(chunk)


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(raw=_FUZZ, data=st.data())
def test_parser_fuzz_only_raises_multipart_error(raw: bytes, data: st.DataObject):
    whole = _outcome([raw])  # anything but MultipartError propagates and fails the test
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=20))
    assert _outcome(split_at(raw, cuts)) == whole, "the result depends on how the bytes arrive"


# --- Spool --------------------------------------------------------------------------------------


@pytest.fixture
def temp_files(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every temp file a Spool opens."""
    opened: list[Any] = []
    real = bodies.tempfile.TemporaryFile

    def spy(*args: Any, **kwargs: Any) -> Any:
        f = real(*args, **kwargs)
        opened.append(f)
        return f

    monkeypatch.setattr(bodies.tempfile, "TemporaryFile", spy)
    return opened


async def collect(chunks: AsyncIterator[bytes]) -> list[bytes]:
    return [c async for c in chunks]


async def test_spool_spills_to_a_temp_file_and_reads_back_any_range(temp_files: list[Any]):
    rng = random.Random(7)
    data = rng.randbytes(3 * CHUNK + 12345)
    spool = Spool(memory_limit=100_000)
    pos = 0
    while pos < len(data):
        n = rng.choice([1, 17, 4096, 65536, 300_000])
        await spool.write(data[pos : pos + n])
        pos += n
    assert spool.size == len(data)
    assert len(temp_files) == 1, "writes beyond the memory limit go to one temp file"
    assert await spool.read() == data
    ranges = [(0, None), (0, len(data)), (0, 1), (5, 5), (CHUNK - 1, CHUNK + 1), (len(data) - 3, None)]
    ranges += [tuple(sorted(rng.sample(range(len(data) + 1), 2))) for _ in range(20)]
    for start, end in ranges:
        chunks = await collect(spool.chunks(start, end))
        assert b"".join(chunks) == data[start:end]
        assert all(0 < len(c) <= CHUNK for c in chunks)
    # the tail still in memory and the file are read together, also after more writes
    await spool.write(b"tail")
    assert b"".join(await collect(spool.chunks(len(data) - 2))) == data[-2:] + b"tail"
    spool.close()
    assert temp_files[0].closed


async def test_spool_under_its_limit_stays_in_memory(temp_files: list[Any]):
    spool = Spool(memory_limit=1024)
    await spool.write(b"a" * 1000)
    await spool.write(b"b" * 23)
    assert temp_files == []
    assert b"".join(await collect(spool.chunks(990, 1010))) == b"a" * 10 + b"b" * 10
    assert await spool.read() == b"a" * 1000 + b"b" * 23


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    writes=st.lists(st.binary(max_size=3000), max_size=12),
    limit=st.integers(1, 5000),
    data=st.data(),
)
def test_spool_random_writes_and_ranges(writes: list[bytes], limit: int, data: st.DataObject):
    whole = b"".join(writes)
    start = data.draw(st.integers(0, len(whole)))
    end = data.draw(st.integers(start, len(whole)))

    async def scenario() -> tuple[bytes, bytes]:
        spool = Spool(memory_limit=limit)
        try:
            for w in writes:
                await spool.write(w)
            return b"".join(await collect(spool.chunks(start, end))), await spool.read()
        finally:
            spool.close()

    part, everything = asyncio.run(scenario())
    assert part == whole[start:end]
    assert everything == whole


# --- read_body over HTTP ------------------------------------------------------------------------

LIMITS = web.AppKey("limits", Limits)
DEFAULT_LIMITS = Limits(max_upload_bytes=64 * MiB, max_json_bytes=MiB, client_idle_timeout=10)


async def _echo(request: web.Request) -> web.StreamResponse:
    """Route like the gateway would, then answer with the exact upstream body."""
    replace = json.loads(request.headers.get("X-Replace", '{"model": "renamed"}'))
    until = tuple(filter(None, request.headers.get("X-Until", "model").split(",")))
    try:
        body = await read_body(request, request.app[LIMITS], until=until)
        try:
            routed = {"fields": dict(body.fields), "bytes_read": body.bytes_read, "kind": body.kind}
            if "X-Replayable" in request.headers:
                await body.make_replayable()
            data, length = body.upstream_body(replace)
            if data is None or isinstance(data, bytes):
                out = data or b""
            else:
                out = b"".join([chunk async for chunk in data])
        finally:
            body.close()
    except ApiError as exc:
        return exc.response()
    return web.Response(
        body=out,
        content_type="application/octet-stream",
        headers={"X-Declared-Length": str(length), "X-Routed": json.dumps(routed)},
    )


async def _rest(request: web.Request) -> web.StreamResponse:
    try:
        body = await read_body(request, request.app[LIMITS], until=("model",))
        try:
            before = dict(body.fields)
            await body.read_rest()
            files = {
                name: {
                    "filename": f.filename,
                    "content_type": f.content_type,
                    "sha256": hashlib.sha256(await f.read()).hexdigest(),
                }
                for name, f in body.files.items()
            }
            answer = {
                "before": before,
                "fields": body.fields,
                "files": files,
                "object": body.get_object("input_reference"),
                "has_file": body.has_file("input_reference"),
            }
        finally:
            body.close()
    except ApiError as exc:
        return exc.response()
    return web.json_response(answer)


async def _object(request: web.Request) -> web.StreamResponse:
    until = tuple(filter(None, request.headers.get("X-Until", "model").split(",")))
    try:
        body = await read_body(request, request.app[LIMITS], until=until)
        body.close()
    except ApiError as exc:
        return exc.response()
    return web.json_response({"object": body.get_object("input_reference"), "missing": body.get_object("x")})


async def _aiohttp_parse(request: web.Request) -> web.StreamResponse:
    """aiohttp's own multipart parser, as an independent judge of what we produce."""
    form = await request.post()
    out: dict[str, Any] = {}
    for name, value in form.items():
        if isinstance(value, web.FileField):
            out[name] = {
                "filename": value.filename,
                "content_type": value.content_type,
                "sha256": hashlib.sha256(value.file.read()).hexdigest(),
            }
        else:
            out[name] = value
    return web.json_response(out)


def make_app(limits: Limits = DEFAULT_LIMITS) -> web.Application:
    app = web.Application(client_max_size=256 * MiB)
    app[LIMITS] = limits
    app.router.add_post("/echo", _echo)
    app.router.add_post("/rest", _rest)
    app.router.add_post("/object", _object)
    app.router.add_post("/aiohttp", _aiohttp_parse)
    return app


@pytest.fixture
async def client(aiohttp_client: Any) -> Any:
    return await aiohttp_client(make_app())


async def echo(client: Any, raw: bytes, ctype: str = content_type(), **headers: str) -> tuple[bytes, Any]:
    resp = await client.post("/echo", data=raw, headers={"Content-Type": ctype, **headers})
    assert resp.status == 200, await resp.text()
    return await resp.read(), resp


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_model_before_a_large_file_is_replaced_in_place(client: Any):
    video = os.urandom(5 * MiB)
    parts = [
        Part("prompt", b"A fox in the snow"),
        Part("model", b"sora-2"),
        Part("seconds", b"8"),
        Part("input_reference", video, filename="ref.bin", content_type="application/octet-stream"),
    ]
    raw = multipart(parts)
    out, resp = await echo(client, raw)
    assert out == splice(raw, value_span(raw, "model"), b"renamed")
    assert int(resp.headers["X-Declared-Length"]) == len(out)
    routed = json.loads(resp.headers["X-Routed"])
    # the text fields seen by then (at least up to the model), never the file
    assert routed["fields"].items() >= {"prompt": "A fox in the snow", "model": "sora-2"}.items()
    assert "input_reference" not in routed["fields"]
    assert routed["bytes_read"] < 2 * MiB, "routing should not wait for the whole upload"


async def test_model_after_a_large_file_spools_and_is_still_byte_identical(
    client: Any, temp_files: list[Any]
):
    video = os.urandom(3 * MiB)
    parts = [
        Part("input_reference", video, filename="ref.mp4", content_type="video/mp4"),
        Part("model", b"sora-2-pro"),
        Part("prompt", b"after the model"),
    ]
    raw = multipart(parts, preamble=b"preamble\r\n")
    out, resp = await echo(client, raw)
    assert len(out) == len(raw) - len(b"sora-2-pro") + len(b"renamed")
    assert out == splice(raw, value_span(raw, "model"), b"renamed")
    assert int(resp.headers["X-Declared-Length"]) == len(out)
    assert temp_files, "3 MB read before the model must have spilled to a temp file"
    assert all(f.closed for f in temp_files), "body.close() releases the temp file"


@pytest.mark.parametrize("preamble", [b"", b"a preamble\r\n"], ids=["no-preamble", "preamble"])
async def test_missing_model_is_inserted_as_valid_multipart(client: Any, preamble: bytes):
    image = os.urandom(200_000)
    parts = [
        Part("prompt", "un renard \u00e9l\u00e9gant".encode()),
        Part("size", b"1280x720"),
        Part("input_reference", image, filename="ref.png", content_type="image/png"),
    ]
    raw = multipart(parts, preamble=preamble)
    out, resp = await echo(client, raw)
    assert int(resp.headers["X-Declared-Length"]) == len(out)
    assert out.endswith(raw[len(preamble) :]), "the original parts follow unchanged"

    judged = await client.post("/aiohttp", data=out, headers={"Content-Type": content_type()})
    assert judged.status == 200, await judged.text()
    assert await judged.json() == {
        "model": "renamed",
        "prompt": "un renard \u00e9l\u00e9gant",
        "size": "1280x720",
        "input_reference": {"filename": "ref.png", "content_type": "image/png", "sha256": sha(image)},
    }
    # and our own parser agrees
    parsed, parser = run_parser(BOUNDARY, [out])
    assert parser.done
    assert [(p.info.name, p.data) for p in parsed] == [("model", b"renamed")] + [
        (p.name, p.data) for p in parts
    ]


async def test_bracketed_field_is_replaced_in_multipart(client: Any):
    parts = [Part("prompt", b"extend it"), Part("video[id]", b"video_gw_123"), Part("seconds", b"4")]
    raw = multipart(parts)
    out, resp = await echo(
        client, raw, **{"X-Replace": json.dumps({"video[id]": "video_up_9"}), "X-Until": "video[id]"}
    )
    assert out == splice(raw, value_span(raw, "video[id]"), b"video_up_9")
    assert int(resp.headers["X-Declared-Length"]) == len(out)


async def test_json_body_model_is_replaced(client: Any):
    sent = {
        "prompt": "A fox",
        "model": "sora-2",
        "seconds": "8",
        "input_reference": {"image_url": "https://x/y.png"},
    }
    resp = await client.post("/echo", json=sent)
    assert resp.status == 200, await resp.text()
    out = await resp.read()
    assert json.loads(out) == {**sent, "model": "renamed"}
    assert list(json.loads(out)) == list(sent), "field order is kept"
    assert int(resp.headers["X-Declared-Length"]) == len(out)

    sent = {"prompt": "A fox"}
    resp = await client.post("/echo", json=sent)
    assert json.loads(await resp.read()) == {"prompt": "A fox", "model": "renamed"}


async def test_json_bracketed_replacement_merges_into_the_object(client: Any):
    sent = {"prompt": "more", "video": {"id": "video_gw_1", "keep": True}}
    resp = await client.post("/echo", json=sent, headers={"X-Replace": json.dumps({"video[id]": "up_7"})})
    assert json.loads(await resp.read()) == {"prompt": "more", "video": {"id": "up_7", "keep": True}}


async def test_vendor_json_content_type_is_json(client: Any):
    resp = await client.post(
        "/echo", data=json.dumps({"model": "m"}), headers={"Content-Type": "application/vnd.gw+json"}
    )
    assert json.loads(await resp.read()) == {"model": "renamed"}


async def test_empty_body_is_kind_none(client: Any):
    resp = await client.post("/echo", headers={"Content-Type": "application/json"})
    assert resp.status == 200
    assert await resp.read() == b""
    assert json.loads(resp.headers["X-Routed"])["kind"] == "none"


@pytest.mark.parametrize("model_first", [True, False], ids=["model-first", "file-first"])
async def test_read_rest_collects_every_field_and_file(client: Any, model_first: bool):
    video = os.urandom(2 * MiB + 3)
    fields = [Part("model", b"sora-2"), Part("prompt", b"p"), Part("input_reference[detail]", b"high")]
    file_part = Part("input_reference", video, filename="clip.mp4", content_type="video/mp4")
    parts = [*fields, file_part] if model_first else [file_part, *fields]
    raw = multipart(parts)
    resp = await client.post("/rest", data=raw, headers={"Content-Type": content_type()})
    assert resp.status == 200, await resp.text()
    answer = await resp.json()
    assert answer["fields"] == {"model": "sora-2", "prompt": "p", "input_reference[detail]": "high"}
    assert answer["files"] == {
        "input_reference": {"filename": "clip.mp4", "content_type": "video/mp4", "sha256": sha(video)}
    }
    assert answer["has_file"] is True
    assert answer["object"] == {"detail": "high"}
    assert "model" in answer["before"]


async def test_get_object_from_multipart_brackets_and_from_json(client: Any):
    parts = [
        Part("input_reference[image_url]", b"https://example.com/a.png"),
        Part("input_reference[detail]", b"low"),
        Part("model", b"sora-2"),
    ]
    resp = await client.post("/object", data=multipart(parts), headers={"Content-Type": content_type()})
    assert await resp.json() == {
        "object": {"image_url": "https://example.com/a.png", "detail": "low"},
        "missing": None,
    }
    sent = {"model": "sora-2", "input_reference": {"image_url": "https://example.com/b.png"}}
    resp = await client.post("/object", json=sent)
    assert await resp.json() == {"object": sent["input_reference"], "missing": None}


# --- limits and errors --------------------------------------------------------------------------


async def error_of(resp: Any) -> tuple[int, str | None]:
    body = await resp.json()
    assert set(body["error"]) >= {"message", "type", "code"}
    return resp.status, body["error"]["code"]


async def test_content_length_over_the_limit_is_413(aiohttp_client: Any):
    client = await aiohttp_client(make_app(Limits(max_upload_bytes=10_000, max_json_bytes=5_000)))
    raw = multipart([Part("model", b"m"), Part("f", b"x" * 20_000, filename="f")])
    resp = await client.post("/echo", data=raw, headers={"Content-Type": content_type()})
    assert await error_of(resp) == (413, "request_too_large")
    # exactly at the limit is fine
    raw = multipart([Part("model", b"m"), Part("f", b"", filename="f")])
    raw = multipart([Part("model", b"m"), Part("f", b"x" * (10_000 - len(raw)), filename="f")])
    assert len(raw) == 10_000
    resp = await client.post("/echo", data=raw, headers={"Content-Type": content_type()})
    assert resp.status == 200
    # JSON has its own, smaller limit
    resp = await client.post("/echo", json={"model": "m", "prompt": "x" * 6_000})
    assert await error_of(resp) == (413, "request_too_large")


class _Unreadable:
    """A request payload that fails the test if anything reads it."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the body was read ({name}) although its length is over the limit")


async def test_content_length_over_the_limit_is_refused_without_reading():
    for ctype in (content_type(), "application/json"):
        request = make_mocked_request(
            "POST",
            "/echo",
            headers={"Content-Type": ctype, "Content-Length": str(10**9)},
            payload=_Unreadable(),  # type: ignore[arg-type]
        )
        with pytest.raises(ApiError) as info:
            await read_body(request, Limits(max_upload_bytes=10**6))
        assert info.value.status == 413


async def _generate(chunks: Iterable[bytes], pause: float = 0.0) -> AsyncIterator[bytes]:
    for chunk in chunks:
        if pause:
            await asyncio.sleep(pause)
        yield chunk


@pytest.mark.parametrize("model_first", [True, False], ids=["model-first", "file-first"])
async def test_chunked_body_over_the_limit_is_413(aiohttp_client: Any, model_first: bool):
    client = await aiohttp_client(make_app(Limits(max_upload_bytes=100_000, max_json_bytes=50_000)))
    parts = [Part("model", b"sora-2"), Part("f", os.urandom(300_000), filename="f")]
    raw = multipart(parts if model_first else parts[::-1])
    resp = await client.post(
        "/echo", data=_generate(split_every(raw, 16 * 1024)), headers={"Content-Type": content_type()}
    )
    assert await error_of(resp) == (413, "request_too_large")

    payload = json.dumps({"model": "m", "prompt": "x" * 80_000}).encode()
    resp = await client.post(
        "/echo", data=_generate(split_every(payload, 8192)), headers={"Content-Type": "application/json"}
    )
    assert await error_of(resp) == (413, "request_too_large")


async def test_chunked_body_under_the_limit_streams_through(client: Any):
    video = os.urandom(MiB)
    raw = multipart([Part("input_reference", video, filename="v"), Part("model", b"x"), Part("p", b"y")])
    resp = await client.post(
        "/echo", data=_generate(split_every(raw, 50_000)), headers={"Content-Type": content_type()}
    )
    assert resp.status == 200, await resp.text()
    assert await resp.read() == splice(raw, value_span(raw, "model"), b"renamed")
    assert resp.headers["X-Declared-Length"] == "None", "no Content-Length in, none promised out"


async def test_closing_boundary_and_epilogue_in_a_later_packet_are_forwarded(client: Any):
    """The parser may finish before the client's last bytes arrive; they still belong to the body."""
    raw = multipart([Part("prompt", b"p"), Part("model", b"sora-2")], epilogue=b"\r\n")
    cut = raw.rindex(b"--") + 2  # right after the closing "--", before its CRLF
    resp = await client.post(
        "/echo", data=_generate([raw[:cut], raw[cut:]], pause=0.05), headers={"Content-Type": content_type()}
    )
    assert resp.status == 200, await resp.text()
    assert await resp.read() == splice(raw, value_span(raw, "model"), b"renamed")


async def raw_post(
    client: Any, path: str, headers: dict[str, str], pieces: list[bytes]
) -> tuple[int, Any, bytes]:
    """POST over a plain socket, one TCP write per piece with a pause between: packet boundaries
    that the aiohttp client would not produce with a Content-Length."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        head = f"POST {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        writer.write(head.encode())
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.05)
        answer = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    head_bytes, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
    parsed = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), parsed, body


async def test_closing_boundary_in_its_own_packet_keeps_the_declared_length_true(client: Any):
    raw = multipart([Part("prompt", b"p"), Part("model", b"sora-2")], epilogue=b"\r\nepilogue")
    cut = raw.rindex(b"--") + 2
    status, headers, out = await raw_post(
        client,
        "/echo",
        {"Content-Type": content_type(), "Content-Length": str(len(raw))},
        [raw[:cut], raw[cut:]],
    )
    assert status == 200, out
    assert out == splice(raw, value_span(raw, "model"), b"renamed")
    assert int(headers["X-Declared-Length"]) == len(out), "the upstream would wait for bytes never sent"


async def test_unsupported_content_type_is_415(client: Any):
    resp = await client.post("/echo", data=b"model=sora-2", headers={"Content-Type": "text/plain"})
    assert await error_of(resp) == (415, "unsupported_media_type")
    resp = await client.post(
        "/echo", data=b"model=sora-2", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert (await error_of(resp))[0] == 415


MALFORMED_HTTP = {
    "bad-header-line": MALFORMED["bad-header-line"],
    "no-name": MALFORMED["no-content-disposition"],
    "headers-too-large": MALFORMED["headers-too-large"],
    "truncated": multipart([Part("prompt", b"p"), Part("model", b"m")])[:-30],
    "no-boundary-in-body": b"just some text, no parts at all",
    "junk-after-boundary": MALFORMED["junk-after-boundary"],
    # Part names another parser reads otherwise: the gateway must see the name the provider will see
    "escaped-name": multipart([Part("prompt", b"p"), Part("mo\\del", b"sora-2-pro")]),
    "two-names": multipart([Part("prompt", b"p"), Part('x"; name="model', b"sora-2-pro")]),
    "extended-name": multipart([Part("prompt", b"p"), Part("x\"; name*=\"UTF-8''model", b"sora-2-pro")]),
    "unquoted-and-quoted": multipart([Part("prompt", b"p"), Part('x"; NAME="model', b"sora-2-pro")]),
    "two-dispositions": multipart(
        [Part("prompt", b"p"), Part('x"\r\nContent-Disposition: form-data; name="model', b"z")]
    ),
}


@pytest.mark.parametrize("raw", MALFORMED_HTTP.values(), ids=MALFORMED_HTTP.keys())
async def test_malformed_multipart_is_400(client: Any, raw: bytes):
    resp = await client.post("/echo", data=raw, headers={"Content-Type": content_type()})
    assert await error_of(resp) == (400, "invalid_multipart")


async def test_a_windows_path_in_a_filename_is_no_malformed_part(client: Any):
    """Backslashes are refused in part names, which decide what a field is, not in filenames, where
    old browsers send a whole Windows path."""
    raw = multipart([Part("prompt", b"p"), Part("input_reference", b"img", filename="C:\\fakepath\\a.png")])
    resp = await client.post("/echo", data=raw, headers={"Content-Type": content_type()})
    assert resp.status == 200, await resp.text()


async def test_text_field_that_is_not_utf8_is_400(client: Any):
    raw = multipart([Part("prompt", b"caf\xe9"), Part("model", b"m")])
    resp = await client.post("/echo", data=raw, headers={"Content-Type": content_type()})
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "prompt"


async def test_a_file_sent_without_a_filename_is_told_so(client: Any):
    """httpx sends an SDK file tuple whose name is None without a filename: such a part is a field,
    read as text; an image is no UTF-8, and the answer says what to change."""
    png = b"\x89PNG\r\n\x1a\n\x00\xff"
    raw = multipart([Part("model", b"m"), Part("input_reference", png, content_type="image/png")])
    resp = await client.post("/echo", data=raw, headers={"Content-Type": content_type()})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == "input_reference" and "send a file with a filename" in error["message"]


async def test_multipart_without_boundary_parameter_is_400(client: Any):
    raw = multipart([Part("model", b"m")])
    resp = await client.post("/echo", data=raw, headers={"Content-Type": "multipart/form-data"})
    assert await error_of(resp) == (400, "invalid_multipart")


INVALID_JSON = {
    "syntax": b"{not json",
    "trailing-comma": b'{"model": "m",}',
    "array": b"[1, 2]",
    "string": b'"a string"',
    "not-utf8": b'{"a": "\xff"}',
    "NaN": b'{"model": "m", "seconds": NaN}',
    "Infinity": b'{"model": "m", "seconds": Infinity}',
    "-Infinity": b'{"model": "m", "x": [-Infinity]}',
    "overflow": b'{"model": "m", "seconds": 1e400}',
    "5000-digits": b'{"model": "m", "n": -' + b"9" * 5000 + b"}",
    "lone-surrogate": b'{"model": "\\udc00"}',
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "deep-object": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "past-the-depth": b'{"x": ' + b"[" * bodies.MAX_JSON_DEPTH + b"]" * bodies.MAX_JSON_DEPTH + b"}",
}


@pytest.mark.parametrize("raw", INVALID_JSON.values(), ids=INVALID_JSON.keys())
async def test_invalid_json_is_400(client: Any, raw: bytes):
    resp = await client.post("/echo", data=raw, headers={"Content-Type": "application/json"})
    assert await error_of(resp) == (400, "invalid_json")


async def test_a_json_body_in_another_encoding_is_told_it_must_be_utf8(client: Any):
    """A Latin-1 or UTF-16 body: the message names the encoding rule and where it broke, not the
    parser's inner words ('surrogates not allowed')."""
    for raw, at in ((b'{"model": "m", "prompt": "caf\xe9"}', 29), ('{"model": "m"}'.encode("utf-16"), 0)):
        resp = await client.post("/echo", data=raw, headers={"Content-Type": "application/json"})
        assert resp.status == 400
        message = (await resp.json())["error"]["message"]
        assert message == f"The JSON body is not UTF-8 text (byte {at} is not): send it as UTF-8.", message


async def test_json_depth_limit_is_exact_and_what_passes_is_forwarded_as_parsed(client: Any):
    def nested(depth: int) -> bytes:
        inner = depth - 1  # the body object is the first level
        return b'{"model": "m", "n": 18446744073709551615, "x": ' + b"[" * inner + b"]" * inner + b"}"

    resp = await client.post(
        "/echo", data=nested(bodies.MAX_JSON_DEPTH), headers={"Content-Type": "application/json"}
    )
    assert resp.status == 200, await resp.text()
    assert json.loads(await resp.read()) == {**json.loads(nested(bodies.MAX_JSON_DEPTH)), "model": "renamed"}
    resp = await client.post(
        "/echo", data=nested(bodies.MAX_JSON_DEPTH + 1), headers={"Content-Type": "application/json"}
    )
    assert await error_of(resp) == (400, "invalid_json")


def _repeated(name: str, where: str) -> bytes:
    """A form naming ``name`` twice: both in the head, or the second past a 2 MiB file."""
    first = [Part(field, b"first") for field in sorted(bodies.SINGLE_FIELDS)]
    second = Part(name, b"second")
    big = Part("input_reference", b"\0" * (2 * MiB), filename="big.bin")
    return multipart([*first, second] if where == "head" else [*first, big, second])


@pytest.mark.parametrize("where", ["head", "streamed"])
@pytest.mark.parametrize("name", sorted(bodies.SINGLE_FIELDS))
@pytest.mark.parametrize("path,extra", [("/echo", {}), ("/echo", {"X-Replayable": "1"}), ("/rest", {})])
async def test_a_single_field_given_twice_is_400(
    client: Any, name: str, where: str, path: str, extra: dict[str, str]
):
    raw = _repeated(name, where)
    resp = await client.post(path, data=raw, headers={"Content-Type": content_type(), **extra})
    body = await resp.json()
    assert resp.status == 400 and body["error"]["param"] == name, body
    assert body["error"]["code"] == "duplicate_parameter"
