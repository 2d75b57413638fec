"""What adapters for providers with their own (non-OpenAI) API share.

- :class:`ModelSpec`: what one upstream model accepts, in OpenAI terms: each supported ``size`` and
  ``seconds`` with its native value. Anything else is refused with a 400 that lists the allowed
  values; nothing is snapped silently.
- :meth:`NativeAdapter.parse_create`: the client's create, validated against the model's spec.
- :class:`ImageInput`: ``input_reference`` as bytes (upload or data URL) or as a URL.
- :meth:`NativeAdapter.call_json`: one JSON request to the provider's API.
- :meth:`NativeAdapter.stream_result`: a provider's result URL streamed to the client, following
  redirects only to the provider's result hosts; a gone result becomes 410, never a 500.
- :func:`synthetic_progress`: progress for providers that report none, rising with time.
- :func:`rate_limited`, :func:`out_of_quota`, :func:`refused` (from ``base``, with
  :func:`~gateway.providers.base.auth_rejected`),
  :func:`upstream_failed`: a provider's own error codes mapped to the OpenAI envelope.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlsplit

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway import jsonio
from gateway.bodies import RequestBody, data_url_image, field_values
from gateway.errors import ApiError, UpstreamError, bad_request, expired_result
from gateway.providers.base import (
    REDIRECTS,
    Adapter,
    Call,
    is_web_url,
    range_headers,
    read_limited,
    redirect_target,
    refused,
    split_url,
)
from gateway.videos import DEFAULT_SECONDS, DEFAULT_SIZE, validate_prompt


@dataclass(frozen=True)
class Tier:
    """A resolution tier: the OpenAI sizes that share it and the ``seconds`` a model makes at it."""

    name: str
    sizes: frozenset[str]
    seconds: frozenset[str]


@dataclass(frozen=True)
class ModelSpec:
    """What one upstream model accepts.

    sizes            OpenAI ``size`` → the native value(s) (e.g. ``{"aspectRatio": "16:9", ...}``)
    seconds          OpenAI ``seconds`` → the native duration value
    default_size, default_seconds
                     what a create that names none gets when the model does not make OpenAI's
                     defaults (720x1280, 4 s): :meth:`size_when_unnamed`
    image_input      accepts ``input_reference``
    text_input       accepts a create without an image (False: image-to-video only)
    extra_params     extra request fields (``extra_body``) passed through unchanged
    expected_seconds typical generation time, for synthesised progress
    image_field      the native input field that takes ``input_reference``, for providers whose
                     models each name their own
    tiers            resolution tiers and the ``seconds`` each makes; a size in no tier takes every
                     ``seconds``
    image_only_sizes sizes only an input image can give (the video takes the image's orientation)
    """

    sizes: Mapping[str, Any]
    seconds: Mapping[str, Any]
    default_size: str
    default_seconds: str
    image_input: bool = True
    text_input: bool = True
    extra_params: frozenset[str] = frozenset()
    expected_seconds: float = 90.0
    image_field: str | None = None
    tiers: tuple[Tier, ...] = ()
    image_only_sizes: frozenset[str] = frozenset()

    def size_when_unnamed(self, seconds: str | None, *, image: bool) -> str:
        """The ``size`` of a create that names none: OpenAI's default (``720x1280``) where the model
        makes it, so that an application moved from OpenAI gets what it got there; else the model's
        own default."""
        made = DEFAULT_SIZE in self.sizes and (image or DEFAULT_SIZE not in self.image_only_sizes)
        if made and (seconds is None or self.takes(DEFAULT_SIZE, seconds, image=image)):
            return DEFAULT_SIZE
        return self.default_size

    def seconds_when_unnamed(self, size: str, *, image: bool) -> str:
        """The ``seconds`` of a create that names none: OpenAI's default (``4``) where the model makes
        it at ``size``, else the model's own default."""
        if DEFAULT_SECONDS in self.seconds and self.takes(size, DEFAULT_SECONDS, image=image):
            return DEFAULT_SECONDS
        return self.default_seconds

    def tier(self, size: str) -> Tier | None:
        return next((tier for tier in self.tiers if size in tier.sizes), None)

    def takes(self, size: str, seconds: str, *, image: bool) -> bool:
        """Whether ``size`` and ``seconds`` go together, with or without an input image."""
        if not image and size in self.image_only_sizes:
            return False
        tier = self.tier(size)
        return tier is None or seconds in tier.seconds


@dataclass
class ImageInput:
    """An ``input_reference``: the image itself, or a URL the client gave."""

    data: bytes | None = None
    mime: str = "image/png"
    url: str | None = None

    def base64(self) -> str:
        assert self.data is not None
        return base64.b64encode(self.data).decode()

    def data_uri(self) -> str:
        return self.url if self.data is None and self.url else f"data:{self.mime};base64,{self.base64()}"


@dataclass
class CreateRequest:
    """A validated create: OpenAI values and the model's native ones."""

    prompt: str
    size: str
    seconds: str
    native_size: Any
    native_seconds: Any
    image: ImageInput | None
    spec: ModelSpec
    extras: dict[str, Any] = field(default_factory=dict)

    def seed(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "size": self.size, "seconds": self.seconds}


def durations(*seconds: int) -> dict[str, int]:
    """OpenAI ``seconds`` → the same number, for providers that take whole seconds."""
    return {str(s): s for s in seconds}


def synthetic_progress(started_at: float, expected_seconds: float, now: float | None = None) -> int:
    """1..95, rising with the time since ``started_at``; never 100 before the provider says done."""
    elapsed = (time.time() if now is None else now) - started_at
    return max(1, min(95, int(95 * elapsed / max(1.0, expected_seconds))))


async def image_input(body: RequestBody) -> ImageInput | None:
    """``input_reference`` as an upload, a data URL, or an http(s) URL (never fetched here); the
    image is sent inline, so it is held in memory, up to ``MAX_IMAGE_BYTES``."""
    upload = body.files.get("input_reference")
    if upload is not None:
        data = await upload.read()
        if not data:
            raise bad_request("input_reference is an empty file.", param="input_reference")
        return ImageInput(data=data, mime=_image_type(data, upload.content_type))
    ref = body.get_object("input_reference")
    url = ref.get("image_url") if ref else body.get("input_reference")
    if ref and ref.get("file_id"):
        raise bad_request(
            "input_reference.file_id is not supported by this gateway; upload the image instead.",
            param="input_reference",
        )
    if not isinstance(url, str) or not url:
        return None
    if url.startswith("data:"):
        mime, data = data_url_image(url)
        return ImageInput(data=data, mime=_image_type(data, mime))
    if not is_web_url(url):
        raise bad_request(
            "input_reference.image_url must be an https URL or a data URL.", param="input_reference"
        )
    return ImageInput(url=url)


# Spellings clients and their libraries give the common types (media types are case-insensitive).
_IMAGE_ALIASES = {"image/x-png": "image/png", "image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg"}


def _image_type(data: bytes, declared: str) -> str:
    """The image's media type: what its bytes say for the types providers take (PNG, JPEG, WebP),
    else the one the client declared, in its standard spelling. Providers match the type they are
    sent exactly: ``image/PNG`` or ``image/x-png`` is refused there though the image is a PNG."""
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[8:12] == b"WEBP":
        return "image/webp"
    mime = declared.split(";")[0].strip().lower()
    mime = _IMAGE_ALIASES.get(mime, mime)
    return mime if mime.startswith("image/") else "application/octet-stream"


def _allowed(values: Iterable[str], sep: str = ", ") -> str:
    return sep.join(sorted(values, key=lambda v: (len(v), v)))


def _shape(size: str) -> str | None:
    width, _, height = size.partition("x")
    if not (width.isdigit() and height.isdigit()):
        return None
    return "landscape" if int(width) > int(height) else "portrait" if int(width) < int(height) else "square"


def same_origin(url: str, base: str) -> bool:
    """Whether ``url`` has ``base``'s scheme, host and port: where the gateway may send a credential."""
    got, own = split_url(url), urlsplit(base)
    if got is None:
        return False
    try:
        return (got.scheme, got.hostname, got.port) == (own.scheme, own.hostname, own.port)
    except ValueError:  # a port out of range
        return False


class NativeAdapter(Adapter):
    """Base of adapters that translate to a provider's own API.

    Subclasses declare ``models`` (upstream model name → :class:`ModelSpec`); ``default_spec``, when
    set, serves upstream model names the adapter does not list.
    """

    models: ClassVar[Mapping[str, ModelSpec]] = {}
    default_spec: ClassVar[ModelSpec | None] = None
    default_result_hosts: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def known_spec(cls, upstream_model: str, options: Mapping[str, Any]) -> ModelSpec | None:
        """The spec of an upstream model (``options`` being the provider's), None for one this
        adapter does not know."""
        return cls.models.get(upstream_model, cls.default_spec)

    @classmethod
    def unknown_model(cls, upstream_model: str) -> str:
        known = ", ".join(sorted(cls.models))
        return f"the {cls.kind} provider does not know the model '{upstream_model}' (known: {known})"

    @classmethod
    def model_problem(cls, upstream_model: str, options: Mapping[str, Any]) -> str | None:
        if cls.known_spec(upstream_model, options) is None:
            return cls.unknown_model(upstream_model)
        return None

    def spec(self, upstream_model: str) -> ModelSpec:
        spec = self.known_spec(upstream_model, self.config.options)
        if spec is None:  # the config's check refuses such a model: only a stored task's can be one
            unknown = self.unknown_model(upstream_model)
            raise ApiError(
                400,
                f"{unknown[:1].upper()}{unknown[1:]}; fix the gateway's routing config.",
                param="model",
                code="unsupported_model",
            )
        return spec

    async def parse_create(self, call: Call, body: RequestBody) -> CreateRequest:
        await body.read_rest()
        spec = self.spec(call.deployment.upstream_model)
        has_image = (
            "input_reference" in body.files
            or bool(body.get("input_reference"))
            or body.get_object("input_reference") is not None  # input_reference[image_url] fields
        )
        # A value the client sent is checked as sent: "" or 0 is refused, not taken for a default.
        asked_size, asked_seconds = body.get("size"), body.get("seconds")
        if asked_size is not None:
            size = str(asked_size)
        else:
            size = spec.size_when_unnamed(
                None if asked_seconds is None else str(asked_seconds), image=has_image
            )
        if size not in spec.sizes:
            raise bad_request(
                f"size '{size}' is not supported by model '{call.deployment.model}'; "
                f"supported sizes: {_allowed(spec.sizes)}.",
                param="size",
                code="unsupported_value",
            )
        seconds = (
            str(asked_seconds)
            if asked_seconds is not None
            else spec.seconds_when_unnamed(size, image=has_image)
        )
        if seconds not in spec.seconds:
            raise bad_request(
                f"seconds '{seconds}' is not supported by model '{call.deployment.model}'; "
                f"supported values: {_allowed(spec.seconds)}.",
                param="seconds",
                code="unsupported_value",
            )
        image = await image_input(body)
        if image is not None and not spec.image_input:
            raise bad_request(
                f"Model '{call.deployment.model}' does not take an input_reference image.",
                param="input_reference",
                code="unsupported_value",
            )
        if image is None and not spec.text_input:
            raise bad_request(
                f"Model '{call.deployment.model}' needs an input_reference image.",
                param="input_reference",
                code="missing_required_parameter",
            )
        extras = {name: value for name in spec.extra_params if (value := _field(body, name)) is not None}
        request = CreateRequest(
            prompt=validate_prompt(body.get("prompt")),
            size=size,
            seconds=seconds,
            native_size=spec.sizes[size],
            native_seconds=spec.seconds[seconds],
            image=image,
            spec=spec,
            extras=extras,
        )
        _check_combination(call.deployment.model, request)
        return request

    async def credential_headers(self, call: Call) -> Mapping[str, str]:
        """Credentials that must be fetched before an API request (a minted token, say)."""
        return {}

    async def api_headers(self, call: Call) -> CIMultiDict[str]:
        """Headers of a request to the provider's JSON API; the client's own are never forwarded."""
        headers = self.upstream_headers(call, forward_client=False)
        headers["Accept"] = "application/json"
        headers["Accept-Encoding"] = "identity"
        headers.update(await self.credential_headers(call))
        return headers

    async def call_json(
        self,
        call: Call,
        method: str,
        url: str,
        *,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> Any:
        """One JSON request to the provider; its errors mapped to the OpenAI envelope."""
        answer, _ = await self.call_json_with_headers(
            call, method, url, json_body=json_body, headers=headers, params=params
        )
        return answer

    async def call_json_with_headers(
        self,
        call: Call,
        method: str,
        url: str,
        *,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> tuple[Any, Mapping[str, str]]:
        """:meth:`call_json`, plus the answer's headers (for a Retry-After sent with a refusal in
        an HTTP 200, say)."""
        sent = await self.api_headers(call)
        sent.update(headers or {})
        data = None
        if json_body is not None:
            data = json.dumps(json_body).encode()
            sent["Content-Type"] = "application/json"
        if params:
            url = str(URL(url).update_query(params))
        answer = await self.exchange(call, method, url, headers=sent, data=data)
        return await self.json_of(answer), answer.headers

    def result_hosts(self) -> tuple[str, ...]:
        return (*self.default_result_hosts, *self.config.result_hosts)

    async def stream_result(
        self,
        call: Call,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        content_type: str = "video/mp4",
    ) -> web.StreamResponse:
        """Stream a result file to the client (Range passed on); the URL never reaches the client.

        ``headers`` (a provider's credential, say) go to the first URL only; a redirect's target
        gets the range headers alone."""
        ranged = {**range_headers(call.request.headers), "Accept-Encoding": "identity"}
        sent: dict[str, str] = {**(headers or {}), **ranged}
        for _ in range(4):
            if not self.result_host_allowed(url):
                raise UpstreamError(
                    502,
                    "Upstream error: the provider's result is on a host this gateway does not "
                    "trust; add it to the provider's result_hosts.",
                    kind="payload",
                )
            async with self.send(call, "GET", url, headers=sent, streaming=True) as response:
                if response.status in REDIRECTS and "Location" in response.headers:
                    url = redirect_target(response)
                    sent = ranged
                    continue
                if response.status in (403, 404, 410):
                    raise expired_result()
                if response.status >= 400:
                    raise self.provider_error(
                        response.status, response.headers, await read_limited(response, 65536)
                    )
                return await self.relay(call, response, default_content_type=content_type)
        raise UpstreamError(502, "Upstream error: too many redirects for the result.", kind="payload")


def _check_combination(model: str, request: CreateRequest) -> None:
    """What a spec's ``image_only_sizes`` and ``tiers`` refuse, with the allowed values listed."""
    spec, size, seconds = request.spec, request.size, request.seconds
    image = request.image is not None
    tier = spec.tier(size)
    label = f" ({tier.name})" if tier is not None else ""
    if not image and size in spec.image_only_sizes:
        text_sizes = [s for s in spec.sizes if s not in spec.image_only_sizes]
        shapes = {_shape(s) for s in text_sizes}
        only = f" ({shapes.pop()} only)" if len(shapes) == 1 and None not in shapes else ""
        raise bad_request(
            f"size '{size}'{label} needs an input_reference image on model '{model}' (the video takes "
            f"the image's orientation); supported without one{only}: {', '.join(text_sizes)}.",
            param="size",
            code="unsupported_value",
        )
    if tier is not None and seconds not in tier.seconds:
        fitting = [s for s in spec.sizes if spec.takes(s, seconds, image=image)]
        sizes = f"size{'s' if len(fitting) > 1 else ''} {', '.join(fitting)}"
        needs = f" {seconds} seconds takes {sizes}." if fitting else ""
        raise bad_request(
            f"seconds '{seconds}' is not supported at size '{size}'{label} by model '{model}': it makes "
            f"only {_allowed(tier.seconds, ' or ')}-second videos there; supported values at "
            f"{tier.name}: {_allowed(tier.seconds)}.{needs}",
            param="seconds",
            code="unsupported_value",
        )


@contextlib.contextmanager
def expired_if_gone() -> Iterator[None]:
    """Within, the provider's 404 for a job means its result has expired: a 410."""
    try:
        yield
    except UpstreamError as exc:
        if exc.upstream_status == 404:
            raise expired_result() from None
        raise


@contextlib.contextmanager
def model_must_exist(
    provider: str, model: str, about_the_model: Callable[[UpstreamError], bool] | None = None
) -> Iterator[None]:
    """Within (a create), the provider's 404 means it has no model by the name the routing config
    gives: :func:`upstream_model_missing`. A provider whose 404 may be about something else (a file
    the create names) says which are about the model."""
    try:
        yield
    except UpstreamError as exc:
        if exc.upstream_status != 404 or (about_the_model is not None and not about_the_model(exc)):
            raise
        raise upstream_model_missing(provider, model, exc.message, upstream_status=404) from None


def upstream_model_missing(provider: str, model: str, text: str, *, upstream_status: int) -> UpstreamError:
    """The provider has no model by the name the routing config gives (retired, or mistyped): the
    operator's to fix, not the client's "not found"; a 5xx, so the create goes on to the model's next
    deployment."""
    return upstream_failed(
        f"Upstream error: {provider} has no model '{model}'; fix the gateway's routing config. ({text})",
        upstream_status=upstream_status,
        code="upstream_model_not_found",
    )


@contextlib.contextmanager
def ignore_refusals(*statuses: int) -> Iterator[None]:
    """Within, the provider's refusal with one of ``statuses`` is swallowed (a delete of a job
    that is already gone, say)."""
    try:
        yield
    except UpstreamError as exc:
        if exc.upstream_status not in statuses:
            raise


# A provider's own error codes as the OpenAI envelope. ``text`` is the provider's message (prefixed
# with its name); ``upstream_status`` is the HTTP status it answered with, 200 for a refusal inside
# a successful answer.


def rate_limited(text: str, *, upstream_status: int, retry_after: str) -> UpstreamError:
    """429 with Retry-After: the provider's own, else the adapter's default for that provider."""
    return UpstreamError(
        429,
        text,
        kind="4xx",
        upstream_status=upstream_status,
        type="rate_limit_error",
        code="rate_limited",
        headers={"Retry-After": retry_after},
    )


def out_of_quota(text: str, *, upstream_status: int) -> UpstreamError:
    """402: the provider account has no balance or quota left."""
    return refused(
        402, text, code="insufficient_quota", upstream_status=upstream_status, type="insufficient_quota"
    )


def upstream_failed(
    message: str,
    *,
    upstream_status: int | None,
    status: int = 502,
    code: str = "upstream_error",
    retry_after: str | None = None,
) -> UpstreamError:
    """The provider failed, not the request (kind ``5xx``: a create may fail over to another deployment);
    ``message`` is the whole text, "Upstream error: ..." included."""
    return UpstreamError(
        status,
        message,
        kind="5xx",
        upstream_status=upstream_status,
        code=code,
        headers={"Retry-After": retry_after} if retry_after else {},
    )


def not_offered(variant: str, kind: str) -> ApiError:
    return ApiError(
        404,
        f"The {kind} provider offers no '{variant}' for videos; only 'video' is available.",
        param="variant",
        code="variant_not_available",
    )


def field_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


# Extra parameters whose values are text, whatever they look like: in a form, where every value is
# text, "1990" or "true" given as a negative prompt stays that, not a number or a boolean.
TEXT_EXTRAS = frozenset(
    {
        "negative_prompt",
        "negativePrompt",
        "mode",
        "personGeneration",
        "audio_url",
        "end_image",
        "last_frame_image",
        "service_tier",
        "acceleration",
    }
)


def _field(body: RequestBody, name: str) -> Any:
    """An extra parameter: JSON values as given. A form's values are text: parsed as (strict) JSON
    where they are (the SDK writes ``True`` as ``true``), except :data:`TEXT_EXTRAS`; an object or
    a list the SDK flattened into bracketed fields is put together again (:func:`_unflattened`)."""
    value = body.get(name)
    if body.kind != "multipart":
        return value
    if value is None:
        return _unflattened(body, name)
    return value if name in TEXT_EXTRAS else _form_value(value)


def _form_value(text: str) -> Any:
    try:
        return jsonio.loads_shallow(text.encode("utf-8", "surrogatepass"))
    except jsonio.JSONDecodeError:
        return text


_MEMBER_PATH = re.compile(r"(?:\[[^\[\]]+\])+")  # an object's member, at any depth: [a][b]


def _unflattened(body: RequestBody, name: str) -> Any:
    """An object or a list the SDKs send in a form as bracketed fields (``Querystring`` with
    ``array_format="brackets"``): ``name[key]`` for an object's members, at any depth; ``name[]``
    repeated for a list; ``name[][key]`` for a list of objects, the i-th value of each key being
    the i-th object's (the SDK groups a repeated field's values). None when there are none; other
    shapes cannot be told apart in a form, and are refused."""
    prefix = name + "["
    found = [(field[len(name) :], value) for field, value in body.fields.items() if field.startswith(prefix)]
    if not found:
        return None
    if all(path == "[]" for path, _ in found):
        return [_form_value(v) for v in field_values(found[0][1])]
    if all(path.startswith("[]") and _MEMBER_PATH.fullmatch(path[2:]) for path, _ in found):
        columns = {path[2:]: field_values(value) for path, value in found}
        rows = max(len(values) for values in columns.values())
        if all(len(values) == rows for values in columns.values()):
            return [
                _object([(path, values[i]) for path, values in columns.items()], name) for i in range(rows)
            ]
    elif all(_MEMBER_PATH.fullmatch(path) for path, _ in found):
        return _object(found, name)
    raise bad_request(
        f"'{name}' is nested too deeply to be sent as form fields; send it as JSON text "
        f"(extra_body={{'{name}': json.dumps(value)}}) or send the request as JSON.",
        param=name,
    )


def _object(members: list[tuple[str, Any]], name: str) -> dict[str, Any]:
    """An object from its members' bracketed paths (``[a][b]``) and their form values."""
    built: dict[str, Any] = {}
    for path, value in members:
        keys = path[1:-1].split("][")
        node = built
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise bad_request(f"'{name}' names '{key}' both as a value and as an object.", param=name)
            node = child
        if keys[-1] in node:
            raise bad_request(f"'{name}' gives '{keys[-1]}' more than once.", param=name)
        node[keys[-1]] = _form_value(value)
    return built
