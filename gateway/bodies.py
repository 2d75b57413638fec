"""Request bodies: JSON or multipart, read only as far as routing needs, streamed on unchanged.

A multipart create may carry a large ``input_reference`` file. The router needs ``model`` before it
can pick an upstream, so the body is read part by part until the wanted fields are known; the raw
bytes read so far are kept in a :class:`Spool` (memory, then a temp file) and replayed ahead of the
rest of the client's stream. The upstream gets the same bytes, same boundary, same parts, except the
field values the gateway replaces (``model`` → upstream name, ``video[id]`` → upstream ID). The rest
of the stream is still parsed on its way through, so that a second copy of a field the gateway checked
(:data:`SINGLE_FIELDS`) is refused before the upstream has the whole body, and so that those fields'
values are known when they come after the ones routing needs (the SDKs send ``seconds`` and ``size``
after ``model``); file parts are passed over, nothing of them kept.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import tempfile
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from email.message import Message
from typing import IO, Any

from aiohttp import web

from gateway import jsonio
from gateway.config import Limits
from gateway.context import CONTEXT
from gateway.errors import ApiError, bad_request, shutting_down, storage_failed
from gateway.headers import media_type
from gateway.videos import MAX_PROMPT_CHARS, prompt_too_long

CHUNK = 256 * 1024
_MAX_PART_HEADERS = 16 * 1024
_MAX_PREAMBLE = 64 * 1024
_MAX_PADDING = 1024  # spaces and tabs after a delimiter; RFC 2046 sets no bound, nor do others
_MAX_TEXT_FIELDS = 40 * 1024 * 1024
MAX_PARTS = 100
# Objects and arrays a JSON body may hold: a create has a handful; millions (a small gzipped body can
# inflate to them) would take seconds of the event loop to parse and walk.
MAX_JSON_CONTAINERS = 10_000
MAX_JSON_DEPTH = jsonio.MAX_DEPTH
# Fields the gateway itself reads (to route, check access, show the video) or replaces. A second
# copy would reach a pass-through upstream unchecked, and an upstream may well read that one.
SINGLE_FIELDS = frozenset({"model", "prompt", "size", "seconds", "video[id]"})
# The longest of them a streamed form may hold: a prompt of the API's longest, in UTF-8.
MAX_SINGLE_FIELD_BYTES = 4 * MAX_PROMPT_CHARS


class Spool:
    """Bytes held in memory up to ``memory_limit``, then in an anonymous temporary file.

    File I/O runs in a worker thread, in batches, so the event loop never blocks on disk.
    """

    def __init__(self, memory_limit: int = 1024 * 1024) -> None:
        self._memory_limit = memory_limit
        self._buffer = bytearray()
        self._file: IO[bytes] | None = None
        self.size = 0

    async def write(self, data: bytes) -> None:
        self._buffer += data
        self.size += len(data)
        if len(self._buffer) >= self._memory_limit:
            await self._flush()

    async def _flush(self) -> None:
        if not self._buffer:
            return
        data, self._buffer = bytes(self._buffer), bytearray()
        try:
            if self._file is None:
                self._file = await asyncio.to_thread(tempfile.TemporaryFile, prefix="video-gateway-")
            await asyncio.to_thread(self._append, self._file, data)
        except OSError as exc:
            raise storage_failed("this upload", exc) from None

    @staticmethod
    def _append(f: IO[bytes], data: bytes) -> None:
        f.seek(0, 2)
        f.write(data)

    async def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Yield bytes [start, end) in chunks of at most ``CHUNK``."""
        end = self.size if end is None else end
        if self._file is None:
            for pos in range(start, end, CHUNK):
                yield bytes(self._buffer[pos : min(pos + CHUNK, end)])
            return
        await self._flush()
        pos = start
        while pos < end:
            try:
                data = await asyncio.to_thread(self._read_at, self._file, pos, min(CHUNK, end - pos))
            except OSError as exc:
                raise storage_failed("this upload", exc) from None
            if not data:
                return
            pos += len(data)
            yield data

    @staticmethod
    def _read_at(f: IO[bytes], pos: int, n: int) -> bytes:
        f.seek(pos)
        return f.read(n)

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    def close(self) -> None:
        self._buffer = bytearray()
        if self._file is not None:
            self._file.close()
            self._file = None


# An image the gateway must hold whole (to send it inline, base64 in a provider's JSON, or to draw
# it) may be no larger than this; a file for the provider itself streams through, up to the upload
# limit. IMAGE_PARTS are the file parts a body read to its end (for a native or local provider) holds.
MAX_IMAGE_BYTES = 20 * 1024 * 1024
IMAGE_PARTS = frozenset({"input_reference"})


def image_too_large(param: str = "input_reference") -> ApiError:
    limit = MAX_IMAGE_BYTES // (1024 * 1024)
    return ApiError(413, f"{param} is larger than {limit} MiB.", param=param, code="request_too_large")


def data_url_image(url: str) -> tuple[str, bytes]:
    """The media type and bytes of an ``input_reference`` given as a base64 ``data:`` URL, bounded
    as an uploaded image is (:data:`MAX_IMAGE_BYTES`)."""
    head, _, payload = url.partition(",")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(
            "input_reference.image_url is not valid base64 data.", param="input_reference"
        ) from None
    if len(data) > MAX_IMAGE_BYTES:
        raise image_too_large()
    return head[5:].split(";")[0], data


@dataclass
class UploadedFile:
    name: str
    filename: str | None
    content_type: str
    data: Spool

    async def read(self) -> bytes:
        """The whole file, in memory: an image part is no larger than :data:`MAX_IMAGE_BYTES`
        (:meth:`RequestBody.read_rest` refuses one as soon as it passes that)."""
        return await self.data.read()


@dataclass
class PartInfo:
    name: str
    filename: str | None
    content_type: str
    value_start: int
    value_end: int = -1


class MultipartError(ValueError):
    pass


class MultipartParser:
    """Incremental multipart/form-data parser that reports absolute byte offsets.

    ``feed`` returns events: ``("part", PartInfo)``, ``("data", bytes)``, ``("end", PartInfo)``,
    ``("done", None)``. Offsets let the caller splice a replacement value into the raw bytes.
    With ``data_events`` off, part values are skipped without being copied, except those of the
    text fields named in ``kept``.
    """

    def __init__(self, boundary: str) -> None:
        self.data_events = True
        self.kept: frozenset[str] = frozenset()
        self._delimiter = b"--" + boundary.encode("ascii")
        self._body_delimiter = b"\r\n" + self._delimiter
        self._buffer = bytearray()
        # The (up to) two bytes just before the buffer, consumed already: none at the body's start
        # and at a value's start (a delimiter there begins the body's first line, or is ambiguous).
        self._behind = b""
        self._offset = 0
        self._state = "preamble"
        self._part: PartInfo | None = None
        self.first_boundary: int | None = None
        self.done = False

    def feed(self, data: bytes) -> list[tuple[str, Any]]:
        if self.done or self._skipped(data):
            return []
        self._buffer += data
        events: list[tuple[str, Any]] = []
        while self._step(events):
            pass
        return events

    def _skipped(self, data: bytes) -> bool:
        """Pass over a chunk inside a value without copying it, when no data events are wanted and no
        delimiter ends in it: the middle of a large file costs one search."""
        delimiter, keep = self._delimiter, len(self._body_delimiter)
        if self._reported() or self._state != "body" or len(data) <= keep or len(self._buffer) > keep:
            return False
        if delimiter in self._buffer + data[:keep] or delimiter in data:
            return False
        self._offset += len(self._buffer) + len(data) - keep
        self._behind = (self._behind + bytes(self._buffer) + data[-keep - 2 : -keep])[-2:]
        self._buffer = bytearray(data[-keep:])
        return True

    def _consume(self, n: int) -> None:
        self._behind = (self._behind + bytes(self._buffer[max(0, n - 2) : n]))[-2:]
        del self._buffer[:n]
        self._offset += n

    def _step(self, events: list[tuple[str, Any]]) -> bool:
        buf = self._buffer
        if self._state == "preamble":
            i = self._line_delimiter()
            # the same limit however the bytes arrive (the preamble is never consumed: offset 0)
            if i > _MAX_PREAMBLE or (i < 0 and len(buf) > _MAX_PREAMBLE + len(self._delimiter) - 1):
                raise MultipartError("no multipart boundary found in the body")
            if i < 0:
                return False
            self.first_boundary = self._offset + i
            self._consume(i + len(self._delimiter))
            self._state = "delimiter"
            return True
        if self._state == "headers":
            i = buf.find(b"\r\n\r\n")
            # the same limit however the bytes arrive: the block may not exceed it, found or not
            if i > _MAX_PART_HEADERS or (i < 0 and len(buf) > _MAX_PART_HEADERS + 3):
                raise MultipartError("multipart part headers are too large")
            if i < 0:
                return False
            self._part = self._parse_headers(bytes(buf[:i]), self._offset + i + 4)
            self._consume(i + 4)
            self._behind = b""
            self._state = "body"
            events.append(("part", self._part))
            return True
        if self._state == "body":
            assert self._part is not None
            i = self._line_delimiter()
            i = i - 2 if i >= 0 else -1  # where the CRLF before it starts
            if i < 0:
                keep = len(self._body_delimiter)  # with the CRLF: a bare LF is told from one
                if len(buf) > keep:
                    self._data(events, len(buf) - keep)
                    self._consume(len(buf) - keep)
                return False
            if i:
                self._data(events, i)
            self._part.value_end = self._offset + i
            events.append(("end", self._part))
            self._part = None
            self._consume(i + len(self._body_delimiter))
            self._state = "delimiter"
            return True
        if self._state == "delimiter":
            return self._after_delimiter(events)
        return False

    def _line_delimiter(self) -> int:
        """Where in the buffer the next delimiter that begins a line (after CRLF, or the body's very
        start) starts, or -1. Parsers end lines differently: Python's email and werkzeug also at a
        bare LF or CR, and take a delimiter right after a part's headers for one. They would find
        parts the gateway did not, so such a delimiter is refused."""
        buf, delimiter = self._buffer, self._delimiter
        i = buf.find(delimiter)
        while i >= 0:
            before = bytes(buf[i - 2 : i]) if i >= 2 else (self._behind + bytes(buf[:i]))[-2:]
            if before == b"\r\n" or (not before and self._state == "preamble"):
                return i
            if not before or before[-1:] in (b"\r", b"\n"):
                raise MultipartError("a multipart delimiter must follow CRLF")
            i = buf.find(delimiter, i + 1)
        return -1

    def _reported(self) -> bool:
        """Whether the value of the part under way is reported in data events."""
        part = self._part
        return self.data_events or (part is not None and part.filename is None and part.name in self.kept)

    def _data(self, events: list[tuple[str, Any]], n: int) -> None:
        if self._reported():
            events.append(("data", bytes(self._buffer[:n])))

    def _after_delimiter(self, events: list[tuple[str, Any]]) -> bool:
        """The rest of a delimiter's line: ``--`` (the last), or CRLF after what RFC 2046 §5.1.1
        calls transport padding (spaces and tabs), which a receiver must accept."""
        buf = self._buffer
        if len(buf) < 2:
            return False
        if buf[:2] == b"--":
            self._consume(len(buf))
            self._state = "epilogue"
            self.done = True
            events.append(("done", None))
            return False
        padding = 0
        while padding < len(buf) and buf[padding] in b" \t":
            padding += 1
            if padding > _MAX_PADDING:
                raise MultipartError("malformed multipart boundary line")
        if len(buf) < padding + 2:
            return False
        if buf[padding : padding + 2] != b"\r\n":
            raise MultipartError("malformed multipart boundary line")
        self._consume(padding + 2)
        self._state = "headers"
        return True

    @staticmethod
    def _parse_headers(raw: bytes, value_start: int) -> PartInfo:
        message = Message()
        for line in raw.decode("utf-8", "replace").split("\r\n"):
            name, sep, value = line.partition(":")
            if not sep:
                raise MultipartError("malformed multipart part header")
            message[name.strip()] = value.strip()
        name = message.get_param("name", header="content-disposition")
        if not isinstance(name, str) or message.get_content_disposition() != "form-data":
            raise MultipartError("every multipart part needs Content-Disposition: form-data with a name")
        dispositions = message.get_all("content-disposition", [])
        if len(dispositions) != 1:  # parsers differ on which one counts, as for two names
            raise MultipartError("a multipart part must have one Content-Disposition")
        _check_plain_name(dispositions[0])
        filename = message.get_filename()
        content_type = message.get("content-type", "application/octet-stream" if filename else "text/plain")
        return PartInfo(name, filename, content_type, value_start)


# One parameter of a Content-Disposition value: a token, "=", then a token or a quoted string.
_DISPOSITION_PARAM = re.compile(r';[ \t]*([^\s=;"]+)[ \t]*=[ \t]*("(?:[^"\\]|\\.)*"|[^\s;"]*)[ \t]*')


def _check_plain_name(disposition: str) -> None:
    """Refuse a part whose name another parser could read otherwise: a name given twice (parsers
    differ on which one counts), an RFC 2231 ``name*``, or a backslash escape (``"mo\\del"``, which
    some read as ``model``). The gateway rewrites fields by name (``model``, ``video[id]``) and
    passes the rest through byte for byte, so the provider must see the very names the gateway saw;
    else a client could smuggle a ``model`` the gateway never checked."""
    _, semicolon, rest = disposition.partition(";")
    rest, at, names = semicolon + rest, 0, []
    for param in _DISPOSITION_PARAM.finditer(rest):
        if param.start() != at:
            break
        at = param.end()
        names.append(param.group(1).lower())
        if names[-1] == "name" and "\\" in param.group(2):
            raise MultipartError("a multipart part name must not contain a backslash")
    if (
        rest[at:].strip(" \t;")
        or names.count("name") != 1
        or "name*" in names
        or len(set(names)) != len(names)
    ):
        raise MultipartError(
            "a multipart part's Content-Disposition must give one plain name and each parameter once"
        )


@dataclass
class RequestBody:
    """A create-like request body, read as far as routing needs so far.

    ``fields`` is the JSON object, or the multipart text fields seen so far (bracketed names kept
    flat, e.g. ``input_reference[image_url]``); ``files`` the file parts once :meth:`read_rest` ran.
    """

    kind: str
    fields: dict[str, Any]
    files: dict[str, UploadedFile] = field(default_factory=dict)
    complete: bool = True
    bytes_read: int = 0
    failure: ApiError | None = None
    _request: web.Request | None = None
    _limits: Limits | None = None
    _boundary: str = ""
    _head: Spool | None = None
    _parts: dict[str, PartInfo] = field(default_factory=dict)
    _parser: MultipartParser | None = None
    _seen: _PartNames = field(default_factory=lambda: _PartNames())
    # the name and value so far of the part under way, a kept field's (_scan)
    _field_name: str = ""
    _field: bytearray = field(default_factory=bytearray)
    _first_boundary: int = 0
    _consumed: bool = False
    _spooled: bool = False

    def get(self, name: str) -> Any:
        return self.fields.get(name)

    def get_object(self, name: str) -> dict[str, Any] | None:
        """A nested object given as JSON or as bracketed multipart fields (``name[key]``)."""
        value = self.fields.get(name)
        if isinstance(value, dict):
            return value
        prefix = f"{name}["
        nested = {
            k[len(prefix) : -1]: v for k, v in self.fields.items() if k.startswith(prefix) and k[-1] == "]"
        }
        return nested or None

    @property
    def replayable(self) -> bool:
        """Can :meth:`upstream_body` be sent more than once (for failover)?"""
        return self.kind != "multipart" or self._spooled

    async def make_replayable(self) -> None:
        """Read the rest of the client's body into the spool, so it can be sent again byte for byte."""
        if self.replayable or self._consumed:
            return
        assert self._head is not None
        self._consumed = True
        async for chunk in self._rest():
            await self._head.write(chunk)
        self._spooled = True

    def has_file(self, name: str) -> bool:
        part = self._parts.get(name)
        return name in self.files or (part is not None and part.filename is not None)

    async def read_rest(self) -> None:
        """Parse to the end: every text field and every file part (spooled)."""
        if self.complete:
            return
        assert self._head is not None
        parser = MultipartParser(self._boundary)
        self._parser = None  # the collector below checks every part itself
        self._parts.clear()
        self.fields.clear()
        collector = _Collector(self)
        try:
            async for chunk in self._replay_and_rest({}):
                for event in parser.feed(chunk):
                    await collector.handle(event)
        except BaseException:
            # The file part being written (a client gone, a body over the limit) is not yet one of
            # self.files, which close() empties: its spool, maybe a temp file, goes here.
            if collector.file is not None:
                collector.file.data.close()
            raise
        if not parser.done:
            raise bad_request(
                "The multipart body ended before its closing boundary.", code="invalid_multipart"
            )
        self.complete = True

    def upstream_body(self, replace: dict[str, str]) -> tuple[Any, int | None]:
        """The body for the upstream and its length (None: send chunked)."""
        if self.kind == "json":
            fields = dict(self.fields)
            for name, value in replace.items():
                _set_bracketed(fields, name, value)
            data = jsonio.dumps(fields)
            return data, len(data)
        if self.kind == "none":
            return None, None
        if self.complete and self._head is None:
            raise RuntimeError("multipart body was fully parsed and cannot be streamed again")
        insertions = {name: v for name, v in replace.items() if name not in self._parts}
        delta = sum(
            len(v.encode()) - (self._parts[n].value_end - self._parts[n].value_start)
            for n, v in replace.items()
            if n in self._parts
        )
        delta += sum(len(self._part_bytes(n, v)) for n, v in insertions.items())
        length = None
        request = self._request
        # A Content-Length counts the bytes as sent; with a Content-Encoding, aiohttp hands on more
        # (decoded), and only an unknown length (chunked) promises the upstream no wrong count.
        if request is not None and request.content_length is not None and not _encoded(request):
            length = request.content_length + delta
        return self._replay_and_rest(replace), length

    def _part_bytes(self, name: str, value: str) -> bytes:
        return (
            f'--{self._boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        ).encode()

    async def _replay_and_rest(self, replace: dict[str, str]) -> AsyncIterator[bytes]:
        assert self._head is not None
        edits: list[tuple[int, int, bytes]] = []
        for name, value in replace.items():
            part = self._parts.get(name)
            if part is not None:
                edits.append((part.value_start, part.value_end, value.encode()))
            else:
                edits.append((self._first_boundary, self._first_boundary, self._part_bytes(name, value)))
        pos = 0
        for start, end, data in sorted(edits):
            async for chunk in self._head.chunks(pos, start):
                yield chunk
            yield data
            pos = end
        async for chunk in self._head.chunks(pos):
            yield chunk
        if not self._consumed:
            self._consumed = True
            async for chunk in self._rest():
                yield chunk

    async def _rest(self) -> AsyncIterator[bytes]:
        """The client's bytes past the head, parsed on the way (nothing kept) for repeated fields."""
        async for chunk in _read_stream(self, self._request, self._limits):
            if self._parser is not None:
                self._scan(chunk)
            yield chunk

    def _scan(self, chunk: bytes) -> None:
        """Check the parts a chunk starts and keep the values of :data:`SINGLE_FIELDS` it holds; a
        refusal is kept as :attr:`failure` for the upstream call."""
        assert self._parser is not None
        try:
            for kind, value in self._parser.feed(chunk):
                if kind == "part":
                    self._seen.note(value)
                    self._field_name = value.name
                    self._field.clear()
                elif kind == "data":
                    self._field += value
                    if len(self._field) > MAX_SINGLE_FIELD_BYTES:
                        name = self._field_name
                        raise bad_request(f"The field '{name}' is too long.", param=name)
                elif kind == "end" and value.name in self._parser.kept and value.filename is None:
                    text = self.fields[value.name] = _field_text(value, self._field)
                    if value.name == "prompt" and len(text) > MAX_PROMPT_CHARS:
                        raise prompt_too_long()
        except MultipartError as exc:
            self.failure = _malformed(exc)
            raise self.failure from None
        except ApiError as exc:
            self.failure = exc
            raise

    def close(self) -> None:
        if self._head is not None:
            self._head.close()
        for f in self.files.values():
            f.data.close()


# The request encodings the gateway reads: aiohttp decodes gzip and deflate itself, reads a name it
# does not know (compress, or "gzip, gzip") as plain bytes, and br or zstd only with extra packages.
_READ_ENCODINGS = ("", "identity", "gzip", "deflate")
UNREAD_ENCODING = "Unsupported Content-Encoding: send the body as is, gzipped or deflated"


def _coding(request: web.Request) -> str:
    return request.headers.get("Content-Encoding", "").strip().lower()


def _encoded(request: web.Request) -> bool:
    return _coding(request) not in ("", "identity")


class _Collector:
    """Collects text fields and spools file parts while a parser runs over a body."""

    def __init__(self, body: RequestBody, spool_files: bool = True) -> None:
        self.body = body
        self.spool_files = spool_files
        self.current: PartInfo | None = None
        self.text = bytearray()
        self.text_total = 0
        self.file: UploadedFile | None = None
        self.seen = _PartNames()

    async def handle(self, event: tuple[str, Any]) -> None:
        kind, value = event
        if kind == "part":
            self.seen.note(value)
            self.current = value
            self.text.clear()
            self.file = None
            if value.filename is not None and self.spool_files:
                self.file = UploadedFile(value.name, value.filename, value.content_type, Spool())
        elif kind == "data":
            if self.current is None:
                return
            if self.current.filename is None:
                self.text_total += len(value)
                if self.text_total > _MAX_TEXT_FIELDS:
                    raise ApiError(
                        413, "The text fields of this form are too large.", code="request_too_large"
                    )
                self.text += value
            elif self.file is not None:
                if self.current.name in IMAGE_PARTS and self.file.data.size + len(value) > MAX_IMAGE_BYTES:
                    raise image_too_large(self.current.name)  # at once, not after the whole upload
                await self.file.data.write(value)
        elif kind == "end":
            self.body._parts[value.name] = value
            if value.filename is None:
                text = _field_text(value, self.text)
                fields = self.body.fields
                if "[]" in value.name and value.name in fields:  # a list's next item (``name[]``)
                    fields[value.name] = [*field_values(fields[value.name]), text]
                else:
                    fields[value.name] = text
            elif self.file is not None:
                self.body.files[value.name] = self.file
            self.current = None


def field_values(value: str | list[str]) -> list[str]:
    """A form field's values: a list's (``name[]`` sent more than once) or its one."""
    return value if isinstance(value, list) else [value]


def _field_text(part: PartInfo, data: bytes | bytearray) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        message = f"Field '{part.name}' is not valid UTF-8."
        if part.content_type and not part.content_type.startswith("text/"):
            # a file sent without a filename (httpx sends a file tuple's None so)
            message = (
                f"Field '{part.name}' has no filename, so it is read as text, and it is "
                "not valid UTF-8: send a file with a filename."
            )
        raise bad_request(message, param=part.name) from None


class _PartNames:
    """The parts of a form so far. A second copy of one of :data:`SINGLE_FIELDS` is refused, and so
    is one with a filename, however empty: the gateway takes such a part for a file and so never reads
    it, where aiohttp and Go take a part with an empty filename for a field. So is a form of more than
    :data:`MAX_PARTS` parts: each costs time to parse and a file part a spool, and no client of the API
    sends more than a handful."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.count = 0

    def note(self, part: PartInfo) -> None:
        name = part.name
        self.count += 1
        if self.count > MAX_PARTS:
            raise bad_request(f"The form has more than {MAX_PARTS} parts.", code="invalid_multipart")
        if name in self.names and name in SINGLE_FIELDS:
            raise bad_request(
                f"The field '{name}' is given more than once.", param=name, code="duplicate_parameter"
            )
        if part.filename is not None and name in SINGLE_FIELDS:
            raise bad_request(
                f"The field '{name}' must be a plain form field, without a filename.",
                param=name,
                code="invalid_multipart",
            )
        self.names.add(name)


def _malformed(exc: MultipartError) -> ApiError:
    return bad_request(f"Malformed multipart body: {exc}.", code="invalid_multipart")


def _set_bracketed(target: dict[str, Any], name: str, value: str) -> None:
    """Set ``video[id]`` as ``target["video"]["id"]`` (or a plain key)."""
    if "[" in name and name.endswith("]"):
        outer, inner = name[:-1].split("[", 1)
        nested = target.get(outer)
        target[outer] = {**nested, inner: value} if isinstance(nested, dict) else {inner: value}
    else:
        target[name] = value


async def _read_stream(
    body: RequestBody, request: web.Request | None, limits: Limits | None
) -> AsyncIterator[bytes]:
    """The client's body, counted against the upload limit, with an idle timeout between reads."""
    if request is None or limits is None:
        return
    while True:
        try:
            async with asyncio.timeout(limits.client_idle_timeout):
                chunk = await request.content.readany()
        except TimeoutError:
            body.failure = ApiError(
                408, "The request body stalled: no data for too long.", code="request_timeout"
            )
            raise body.failure from None
        except asyncio.CancelledError:
            reader = asyncio.current_task()
            if reader is None or reader.cancelling():
                raise  # the reader's own cancellation
            # aiohttp ends a body still arriving when the server stops, at the end of a drain: the
            # provider gets it cut short and starts nothing, so the client may well send it again.
            body.failure = shutting_down("cut this upload off before it was whole")
            raise body.failure from None
        except web.RequestPayloadError as exc:  # e.g. a Content-Encoding the bytes do not decode as
            reason = str(exc).rpartition("message:")[2].strip().rstrip(".") or "it is malformed"
            body.failure = ApiError(
                400,
                f"The request body cannot be read: {reason}.",
                code="invalid_body",
                headers={"Connection": "close"},
            )
            # The rest cannot be read either: close after the answer, and mark the body ended so
            # that aiohttp does not read on after it (which raised the same error again, logged as
            # an unhandled one with a traceback).
            request.content.feed_eof()
            request.protocol.close()
            raise body.failure from None
        if not chunk:
            return
        if (ctx := request.get(CONTEXT)) is not None and ctx.gateway.drain_over.is_set():
            # The drain's time is up: what is left of the shutdown is too short for the provider's
            # answer, so the upload is cut off rather than let through whole (see api.shielded).
            body.failure = shutting_down("cut this upload off before it was whole")
            raise body.failure
        body.bytes_read += len(chunk)
        if body.bytes_read > limits.max_upload_bytes:
            body.failure = too_large(limits.max_upload_bytes)
            raise body.failure
        yield chunk


def too_large(limit: int) -> ApiError:
    return ApiError(
        413, f"The request body is larger than the limit of {limit} bytes.", code="request_too_large"
    )


JSON_TYPES = ("application/json",)
MULTIPART_TYPE = "multipart/form-data"


def _is_json(content_type: str) -> bool:
    return content_type in JSON_TYPES or content_type.endswith("+json")


def size_limit(request: web.BaseRequest, limits: Limits) -> int:
    """The most bytes the request's body may have, by its Content-Type: an upload's limit, and a
    JSON body's too (:func:`read_body` applies both)."""
    if _is_json(media_type(request.headers.get("Content-Type"))):
        return min(limits.max_json_bytes, limits.max_upload_bytes)
    return limits.max_upload_bytes


async def read_body(request: web.Request, limits: Limits, until: Iterable[str] = ("model",)) -> RequestBody:
    """Read a JSON or multipart body; for multipart, stop once every field in ``until`` was seen.

    Answers 413 before reading when Content-Length is over the limit, 415 for other content types.
    """
    if request.content_length is not None and request.content_length > limits.max_upload_bytes:
        raise too_large(limits.max_upload_bytes)
    content_type = media_type(request.headers.get("Content-Type"))
    if not request.body_exists:
        return RequestBody("none", {})
    if _coding(request) not in _READ_ENCODINGS:  # aiohttp would hand on such a body's bytes undecoded
        raise ApiError(415, f"{UNREAD_ENCODING}.", code="unsupported_media_type")
    if _is_json(content_type):
        return await _read_json(request, limits)
    if content_type == MULTIPART_TYPE:
        return await _read_multipart_head(request, limits, set(until))
    sent = request.headers.get("Content-Type", "").strip()
    told = f"Unsupported Content-Type '{sent[:100]}'" if sent else "The request has no Content-Type"
    raise ApiError(
        415, f"{told}: send application/json or multipart/form-data.", code="unsupported_media_type"
    )


async def _read_json(request: web.Request, limits: Limits) -> RequestBody:
    if request.content_length is not None and request.content_length > limits.max_json_bytes:
        raise too_large(limits.max_json_bytes)
    body = RequestBody("json", {})
    raw = bytearray()
    async for chunk in _read_stream(body, request, limits):
        raw += chunk
        if len(raw) > limits.max_json_bytes:
            raise too_large(limits.max_json_bytes)
    if not raw.strip():
        return RequestBody("none", {})
    containers = raw.count(b"{") + raw.count(b"[")
    if containers > MAX_JSON_CONTAINERS:
        message = f"The JSON body holds more than {MAX_JSON_CONTAINERS} objects and arrays."
        raise bad_request(message, code="invalid_json")
    try:
        fields = jsonio.loads(raw)
    except jsonio.JSONDecodeError as exc:
        try:
            raw.decode()
        except UnicodeDecodeError as undecodable:
            message = f"The JSON body is not UTF-8 text (byte {undecodable.start} is not): send it as UTF-8."
            raise bad_request(message, code="invalid_json") from None
        raise bad_request(f"The body is not valid JSON: {exc}", code="invalid_json") from None
    if containers > MAX_JSON_DEPTH and jsonio.nesting_exceeds(fields, MAX_JSON_DEPTH):
        raise bad_request(f"The JSON body nests deeper than {MAX_JSON_DEPTH} levels.", code="invalid_json")
    if not isinstance(fields, dict):
        raise bad_request("The JSON body must be an object.", code="invalid_json")
    body.fields = fields
    return body


async def _read_multipart_head(request: web.Request, limits: Limits, until: set[str]) -> RequestBody:
    boundary = _boundary(request)
    body = RequestBody(
        "multipart", {}, complete=False, _request=request, _limits=limits, _boundary=boundary, _head=Spool()
    )
    parser = MultipartParser(boundary)
    collector = _Collector(body, spool_files=False)
    assert body._head is not None
    try:
        stream = _read_stream(body, request, limits)
        async for chunk in stream:
            await body._head.write(chunk)
            for event in parser.feed(chunk):
                await collector.handle(event)
            if parser.done or until <= body._parts.keys():
                break
        else:
            if not parser.done:
                raise bad_request(
                    "The multipart body ended before its closing boundary.", code="invalid_multipart"
                )
        await stream.aclose()
    except MultipartError as exc:
        body.close()
        raise _malformed(exc) from None
    except BaseException:
        body.close()
        raise
    body._first_boundary = parser.first_boundary or 0
    parser.data_events, parser.kept = False, SINGLE_FIELDS
    body._parser, body._seen = parser, collector.seen
    if collector.current is not None:  # a part under way: what of its value the head read goes on
        body._field_name, body._field = collector.current.name, collector.text
    # even when the closing boundary was seen, the rest of the stream (its CRLF, an epilogue) is still
    # the client's body: it is replayed, or Content-Length would promise bytes that never come
    return body


def _boundary(request: web.Request) -> str:
    """The boundary of a multipart body. Content-Type goes on to the upstream as the client sent it,
    so one that gives a parameter twice is refused: parsers differ on which one counts."""
    message = Message()
    message["content-type"] = request.headers.get("Content-Type", "")
    names = [name.lower() for name, _ in message.get_params([])[1:]]
    if len(set(names)) != len(names):
        raise bad_request(
            "The Content-Type header gives a parameter more than once.", code="invalid_multipart"
        )
    boundary = message.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 200:
        raise bad_request("multipart/form-data needs a boundary parameter.", code="invalid_multipart")
    if not (boundary.isascii() and boundary.isprintable()):
        raise bad_request("The multipart boundary must be printable ASCII.", code="invalid_multipart")
    return boundary
