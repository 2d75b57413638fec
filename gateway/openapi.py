"""The gateway's own API as an OpenAPI 3.1 document, served at ``/openapi.json``.

It describes what this gateway answers (the OpenAI Videos surface plus its own health, admin and
metrics routes), including every error status, so that schema-driven fuzzers can hold it to it.
"""

from __future__ import annotations

from typing import Any

from gateway import __version__
from gateway.videos import VIDEO_KEYS

_ERROR_STATUSES = {
    "400": "Invalid request (bad JSON or multipart, a bad parameter)",
    "401": "Missing or wrong API key",
    "403": "The key may not use this model",
    "404": "Unknown model, video or route",
    "405": "Method not allowed",
    "408": "The request body stalled",
    "409": "The video is not finished",
    "410": "The provider's result has expired",
    "413": "Body too large",
    "415": "Unsupported content type",
    "417": "Unsupported expectation",
    "429": "Rate limited (per key or upstream)",
    "500": "Gateway failure",
    "502": "Upstream failed or unreachable",
    "503": "Upstream busy or unavailable",
    "504": "Upstream timed out",
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

_CREATE = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        "prompt": {"type": "string", "minLength": 1, "maxLength": 32000},
        "model": {"type": "string"},
        "seconds": {"type": ["string", "integer"]},
        "size": {"type": "string"},
        "input_reference": {"type": "object", "properties": {"image_url": {"type": "string"}}},
    },
}

_CREATE_FORM = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        "prompt": {"type": "string", "minLength": 1, "maxLength": 32000},
        "model": {"type": "string"},
        "seconds": {"type": "string"},
        "size": {"type": "string"},
        "input_reference": {"type": "string", "format": "binary"},
    },
}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: str) -> dict[str, Any]:
    return {s: _json({"$ref": "#/components/schemas/Error"}, _ERROR_STATUSES[s]) for s in statuses}


_COMMON = ("400", "401", "404", "405", "429", "500", "502", "503", "504")
_BODY = ("403", "408", "413", "415", "417")
_VIDEO_ID = {"name": "video_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _videos(prefix: str) -> dict[str, Any]:
    video = {"$ref": "#/components/schemas/Video"}
    create_body = {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/CreateVideo"}},
            "multipart/form-data": {"schema": {"$ref": "#/components/schemas/CreateVideoForm"}},
        },
    }
    prompt_body = {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["prompt"],
                    "properties": {"prompt": {"type": "string"}},
                }
            }
        },
    }
    return {
        f"{prefix}/videos": {
            "post": {
                "operationId": f"createVideo{prefix}",
                "requestBody": create_body,
                "responses": {"200": _json(video), **_errors(*_COMMON, *_BODY)},
            },
            "get": {
                "operationId": f"listVideos{prefix}",
                "parameters": [
                    {"name": "after", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 100},
                    },
                    {"name": "order", "in": "query", "schema": {"enum": ["asc", "desc"]}},
                ],
                "responses": {"200": _json({"$ref": "#/components/schemas/VideoList"}), **_errors(*_COMMON)},
            },
        },
        f"{prefix}/videos/{{video_id}}": {
            "get": {
                "operationId": f"getVideo{prefix}",
                "parameters": [_VIDEO_ID],
                "responses": {"200": _json(video), **_errors(*_COMMON)},
            },
            "delete": {
                "operationId": f"deleteVideo{prefix}",
                "parameters": [_VIDEO_ID],
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/DeletedVideo"}),
                    **_errors(*_COMMON),
                },
            },
        },
        f"{prefix}/videos/{{video_id}}/content": {
            "get": {
                "operationId": f"getVideoContent{prefix}",
                "parameters": [
                    _VIDEO_ID,
                    {
                        "name": "variant",
                        "in": "query",
                        "schema": {"enum": ["video", "thumbnail", "spritesheet"]},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "The media",
                        "content": {
                            t: {"schema": {"type": "string", "format": "binary"}}
                            for t in ("video/mp4", "image/webp", "image/jpeg")
                        },
                    },
                    **_errors(*_COMMON, "409", "410"),
                },
            }
        },
        f"{prefix}/videos/{{video_id}}/remix": {
            "post": {
                "operationId": f"remixVideo{prefix}",
                "parameters": [_VIDEO_ID],
                "requestBody": prompt_body,
                "responses": {"200": _json(video), **_errors(*_COMMON, *_BODY, "409")},
            },
        },
        f"{prefix}/models": {
            "get": {
                "operationId": f"listModels{prefix}",
                "responses": {"200": _json({"$ref": "#/components/schemas/ModelList"}), **_errors(*_COMMON)},
            },
        },
    }


def document() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for prefix in ("/v1", "/v1/openai"):
        paths.update(_videos(prefix))
    paths["/healthz"] = {
        "get": {
            "operationId": "healthz",
            "security": [],
            "responses": {"200": _json({"type": "object", "properties": {"status": {"type": "string"}}})},
        }
    }
    paths["/readyz"] = {
        "get": {
            "operationId": "readyz",
            "security": [],
            "responses": {
                "200": _json({"type": "object", "properties": {"status": {"type": "string"}}}),
                "503": _json({"type": "object", "properties": {"status": {"type": "string"}}}, "Draining"),
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
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
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
                            "items": {
                                "type": "object",
                                "required": ["id", "object"],
                                "properties": {"id": {"type": "string"}, "object": {"const": "model"}},
                            },
                        },
                    },
                },
                "CreateVideo": _CREATE,
                "CreateVideoForm": _CREATE_FORM,
                "Error": _ERROR,
            },
        },
    }
