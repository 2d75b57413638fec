"""The gateway's own API as an OpenAPI 3.1 document, served at ``/openapi.json``.

It describes what this gateway answers (the OpenAI Videos surface, and its own health, admin,
metrics and hosted-file routes where the config has them), including every error status, so that
schema-driven fuzzers can hold it to it.
"""

from __future__ import annotations

from typing import Any

from gateway import __version__
from gateway.videos import MAX_PROMPT_CHARS, VARIANTS, VIDEO_KEYS

_ERROR_STATUSES = {
    "400": "Invalid request (bad JSON or multipart, a bad parameter)",
    "401": "Missing or wrong API key",
    "403": "The key may not use this model",
    "404": "Unknown model, video or route",
    "405": "Method not allowed",
    "408": "The request body stalled",
    "409": "The video is not finished",
    "410": "The provider's result has expired",
    "412": "If-Match or If-Unmodified-Since does not hold",
    "413": "Body too large",
    "415": "Unsupported content type",
    "416": "The range cannot be satisfied",
    "417": "Unsupported expectation (any route: only 'Expect: 100-continue' is)",
    "422": "The config did not load; nothing changed",
    "429": "Rate limited (per key or upstream)",
    "500": "Gateway failure",
    "502": "Upstream failed or unreachable",
    "503": "Upstream busy or unavailable",
    "504": "Upstream timed out",
    "4XX": "A provider's own refusal (a conflict with its job's state, say), passed on with its status",
}

_VIDEO = {
    "type": "object",
    "required": list(VIDEO_KEYS),
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "video"},
        "model": {"type": "string"},
        "status": {"enum": ["queued", "in_progress", "completed", "failed"]},
        "progress": {"type": "integer", "minimum": 0, "maximum": 100},
        "created_at": {"type": "integer"},
        "completed_at": {"type": ["integer", "null"]},
        "expires_at": {"type": ["integer", "null"]},
        "prompt": {"type": ["string", "null"]},
        "size": {"type": "string"},
        "seconds": {"type": "string"},
        "remixed_from_video_id": {"type": ["string", "null"]},
        "error": {
            "oneOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                },
            ]
        },
    },
}

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": ["string", "null"]},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

_PROMPT = {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS}
_MODEL = {"type": "string", "minLength": 1}
_SIZE = {"type": "string", "pattern": "^[0-9]+x[0-9]+$"}
_VIDEO_REFERENCE = {"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}}
_FILE = {"type": "string", "format": "binary"}

_CREATE = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        "prompt": _PROMPT,
        "model": _MODEL,
        "seconds": {"type": ["string", "integer"]},
        "size": _SIZE,
        "input_reference": {  # an object as the API has it; a URL alone, as some clients send it
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"image_url": {"type": "string"}, "file_id": {"type": "string"}},
                },
                {"type": "string"},
            ]
        },
    },
}

_CREATE_FORM = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        "prompt": _PROMPT,
        "model": _MODEL,
        "seconds": {"type": "string"},
        "size": _SIZE,
        "input_reference": _FILE,
        "input_reference[image_url]": {"type": "string"},
        "input_reference[file_id]": {"type": "string"},
    },
}


def _from_video(form: bool, *extra: str) -> dict[str, Any]:
    """An edit's (or, with ``seconds``, an extension's) body: a prompt and the source video, an
    upload or ``{id}`` of a video the gateway made (a form sends the ID as ``video[id]``)."""
    fields: dict[str, Any] = {"prompt": _PROMPT, "video": _FILE if form else _VIDEO_REFERENCE}
    fields.update({name: {"type": "string" if form else ["string", "integer"]} for name in extra})
    if not form:
        return {"type": "object", "required": list(fields), "properties": fields}
    required = [name for name in fields if name != "video"]
    fields["video[id]"] = {"type": "string"}
    either = [{"required": ["video"]}, {"required": ["video[id]"]}]
    return {"type": "object", "required": required, "properties": fields, "anyOf": either}


_CHARACTER = {
    "type": "object",
    "required": ["id", "name", "created_at"],
    "properties": {
        "id": {"type": ["string", "null"]},
        "name": {"type": ["string", "null"]},
        "created_at": {"type": "integer"},
    },
}

_CREATE_CHARACTER_FORM = {
    "type": "object",
    "required": ["name", "video"],
    "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 80}, "video": _FILE},
}

_MODEL = {
    "type": "object",
    "required": ["id", "object"],
    "properties": {"id": {"type": "string"}, "object": {"const": "model"}},
}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: str) -> dict[str, Any]:
    return {s: _json({"$ref": "#/components/schemas/Error"}, _ERROR_STATUSES[s]) for s in statuses}


def _media(description: str, types: tuple[str, ...]) -> dict[str, Any]:
    """A file's answers: the whole (200), a part (206, ``Range``), not modified (304), and the
    refusals of its conditions (412) and ranges (416)."""
    content = {t: {"schema": _FILE} for t in types}
    return {
        "200": {"description": description, "content": content},
        "206": {"description": f"{description}: the part that Range asked for", "content": content},
        "304": {"description": "Not modified (If-None-Match, If-Modified-Since)"},
        **_errors("412", "416"),
    }


_COMMON = ("400", "401", "404", "405", "417", "429", "500", "502", "503", "504")
_BODY = ("403", "408", "413", "415")
_VIDEO_ID = {"name": "video_id", "in": "path", "required": True, "schema": {"type": "string"}}
_CHARACTER_ID = {"name": "character_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _body(json: dict[str, Any] | None, form: dict[str, Any]) -> dict[str, Any]:
    content = {"application/json": {"schema": json}} if json is not None else {}
    return {"required": True, "content": {**content, "multipart/form-data": {"schema": form}}}


def _operation_id(name: str, prefix: str) -> str:
    """OpenAI's own operation IDs (openai-openapi) under ``/v1``; those of the same operations under
    the ``/v1/openai`` alias end in ``Openai``, as IDs must be unique."""
    return name if prefix == "/v1" else f"{name}Openai"


def _videos(prefix: str) -> dict[str, Any]:
    video = {"$ref": "#/components/schemas/Video"}
    create_body = {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/CreateVideo"}},
            "multipart/form-data": {"schema": {"$ref": "#/components/schemas/CreateVideoForm"}},
        },
    }
    text = {"type": "string", "maxLength": MAX_PROMPT_CHARS}
    prompt = {"type": "object", "required": ["prompt"], "properties": {"prompt": text}}
    prompt_body = _body(prompt, prompt)
    paths: dict[str, Any] = {
        f"{prefix}/videos": {
            "post": {
                "operationId": _operation_id("createVideo", prefix),
                "requestBody": create_body,
                "responses": {"200": _json(video), **_errors(*_COMMON, *_BODY)},
            },
            "get": {
                "operationId": _operation_id("ListVideos", prefix),
                "parameters": [
                    {  # a video ID from an earlier page; one the caller has not is a 400
                        "name": "after",
                        "in": "query",
                        "schema": {"type": "string", "pattern": "^video_[0-9a-f]{32}$"},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 0, "maximum": 100},
                    },
                    {"name": "order", "in": "query", "schema": {"enum": ["asc", "desc"]}},
                ],
                "responses": {"200": _json({"$ref": "#/components/schemas/VideoList"}), **_errors(*_COMMON)},
            },
        },
        f"{prefix}/videos/{{video_id}}": {
            "get": {
                "operationId": _operation_id("GetVideo", prefix),
                "parameters": [_VIDEO_ID],
                "responses": {"200": _json(video), **_errors(*_COMMON)},
            },
            "delete": {
                "operationId": _operation_id("DeleteVideo", prefix),
                "parameters": [_VIDEO_ID],
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/DeletedVideo"}),
                    **_errors(*_COMMON),
                },
            },
        },
        f"{prefix}/videos/{{video_id}}/content": {
            "get": {
                "operationId": _operation_id("RetrieveVideoContent", prefix),
                "parameters": [
                    _VIDEO_ID,
                    {
                        "name": "variant",
                        "in": "query",
                        "schema": {"enum": list(VARIANTS)},
                    },
                ],
                "responses": {
                    **_media("The media", ("video/mp4", "image/webp", "image/jpeg")),
                    **_errors(*_COMMON, "409", "410"),
                },
            }
        },
        f"{prefix}/videos/{{video_id}}/remix": {
            "post": {
                "operationId": _operation_id("CreateVideoRemix", prefix),
                "parameters": [_VIDEO_ID],
                "requestBody": prompt_body,
                "responses": {"200": _json(video), **_errors(*_COMMON, *_BODY, "409")},
            },
        },
        f"{prefix}/videos/edits": {
            "post": {
                "operationId": _operation_id("CreateVideoEdit", prefix),
                "requestBody": _body(_from_video(False), _from_video(True)),
                "responses": {"200": _json(video), **_errors(*_COMMON, *_BODY, "409")},
            },
        },
        f"{prefix}/videos/extensions": {
            "post": {
                "operationId": _operation_id("CreateVideoExtend", prefix),
                "requestBody": _body(_from_video(False, "seconds"), _from_video(True, "seconds")),
                "responses": {"200": _json(video), **_errors(*_COMMON, *_BODY, "409")},
            },
        },
        f"{prefix}/videos/characters": {
            "post": {
                "operationId": _operation_id("CreateVideoCharacter", prefix),
                "requestBody": _body(None, _CREATE_CHARACTER_FORM),
                "responses": {"200": _json(_CHARACTER), **_errors(*_COMMON, *_BODY)},
            },
        },
        f"{prefix}/videos/characters/{{character_id}}": {
            "get": {
                "operationId": _operation_id("GetVideoCharacter", prefix),
                "parameters": [_CHARACTER_ID],
                "responses": {"200": _json(_CHARACTER), **_errors(*_COMMON)},
            },
        },
        f"{prefix}/models": {
            "get": {
                "operationId": _operation_id("listModels", prefix),
                "responses": {"200": _json({"$ref": "#/components/schemas/ModelList"}), **_errors(*_COMMON)},
            },
        },
        f"{prefix}/models/{{model}}": {
            "get": {
                "operationId": _operation_id("retrieveModel", prefix),
                "parameters": [
                    {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {"200": _json(_MODEL), **_errors(*_COMMON)},
            },
        },
    }
    for path, item in paths.items():
        if path.startswith(f"{prefix}/videos"):  # what reaches a provider
            for operation in item.values():
                operation["responses"].update(_errors("4XX"))
    return paths


def _operations(metrics_path: str | None, hosted: bool) -> dict[str, Any]:
    """The gateway's own routes beside the API: admin (its own key), metrics and hosted files."""
    admin = [{"admin": []}]
    paths: dict[str, Any] = {
        "/admin/deployments": {
            "get": {
                "operationId": "adminDeployments",
                "security": admin,
                "responses": {
                    "200": _json(
                        {"type": "object", "required": ["config", "draining", "worker", "deployments"]}
                    ),
                    **_errors("401", "417"),
                },
            }
        },
        "/admin/reload": {
            "post": {
                "operationId": "adminReload",
                "security": admin,
                "responses": {
                    "200": _json({"type": "object", "required": ["reloaded", "problems"]}),
                    **_errors("401", "417"),
                    "422": _json(
                        {"type": "object", "required": ["reloaded", "problems"]}, _ERROR_STATUSES["422"]
                    ),
                },
            }
        },
    }
    if metrics_path is not None:
        text = {"schema": {"type": "string"}}
        paths[metrics_path] = {
            "get": {
                "operationId": "metrics",
                "security": [{"metrics": []}, {}],
                "responses": {
                    "200": {
                        "description": "Prometheus exposition",
                        "content": {"text/plain": text, "application/openmetrics-text": text},
                    },
                    "401": _json({"$ref": "#/components/schemas/Error"}, "Metrics key missing or wrong"),
                    **_errors("417"),
                },
            }
        }
    if hosted:
        paths["/files/{name}"] = {
            "get": {
                "operationId": "hostedFile",
                "security": [],
                "parameters": [
                    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                    {"name": "expires", "in": "query", "schema": {"type": "string"}},
                    {"name": "sig", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {
                    **_media(
                        "An image uploaded for a provider that fetches images by URL",
                        ("image/png", "image/jpeg", "image/webp"),
                    ),
                    **_errors("404", "417"),
                },
            }
        }
    return paths


def document(metrics_path: str | None = "/metrics", hosted: bool = False) -> dict[str, Any]:
    """The document for a gateway whose metrics are at ``metrics_path`` (None: off) and that hosts
    uploaded images (``hosted``)."""
    paths: dict[str, Any] = {}
    for prefix in ("/v1", "/v1/openai"):
        paths.update(_videos(prefix))
    paths.update(_operations(metrics_path, hosted))
    paths["/healthz"] = {
        "get": {
            "operationId": "healthz",
            "security": [],
            "responses": {
                "200": _json({"type": "object", "properties": {"status": {"type": "string"}}}),
                **_errors("417"),
            },
        }
    }
    paths["/openapi.json"] = {
        "get": {
            "operationId": "openapi",
            "security": [],
            "responses": {
                "200": _json({"type": "object", "required": ["openapi", "paths"]}, "This document"),
                **_errors("417"),
            },
        }
    }
    paths["/readyz"] = {
        "get": {
            "operationId": "readyz",
            "security": [],
            "responses": {
                "200": _json({"type": "object", "properties": {"status": {"type": "string"}}}),
                "503": _json({"type": "object", "properties": {"status": {"type": "string"}}}, "Draining"),
                **_errors("417"),
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "video-gateway",
            "version": __version__,
            "description": "OpenAI-compatible video generation gateway.",
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "admin": {"type": "http", "scheme": "bearer", "description": "The admin key"},
                "metrics": {"type": "http", "scheme": "bearer", "description": "The metrics key, when set"},
            },
            "schemas": {
                "Video": _VIDEO,
                "VideoList": {
                    "type": "object",
                    "required": ["object", "data", "first_id", "last_id", "has_more"],
                    "properties": {
                        "object": {"const": "list"},
                        "data": {"type": "array", "items": _VIDEO},
                        "first_id": {"type": ["string", "null"]},
                        "last_id": {"type": ["string", "null"]},
                        "has_more": {"type": "boolean"},
                    },
                },
                "DeletedVideo": {
                    "type": "object",
                    "required": ["id", "object", "deleted"],
                    "properties": {
                        "id": {"type": "string"},
                        "object": {"const": "video.deleted"},
                        "deleted": {"type": "boolean"},
                    },
                },
                "ModelList": {
                    "type": "object",
                    "required": ["object", "data"],
                    "properties": {
                        "object": {"const": "list"},
                        "data": {
                            "type": "array",
                            "items": _MODEL,
                        },
                    },
                },
                "CreateVideo": _CREATE,
                "CreateVideoForm": _CREATE_FORM,
                "Error": _ERROR,
            },
        },
    }
