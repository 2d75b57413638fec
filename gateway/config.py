"""The YAML config: parsed, checked against one JSON Schema, resolved into frozen dataclasses.

Every problem is reported at once, each as ``file:line: key.path: message``, so whoever edits the
file at 3 a.m. fixes it in one pass. Secrets are referenced as ``${ENV}`` or ``${ENV:-default}``
and expanded after parsing, so a key containing YAML syntax cannot change the document.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import yaml

DEFAULT_CONFIG_PATH = Path("config/gateway.yaml")
EMBEDDED_CONFIG_PATH = Path(__file__).with_name("default.yaml")

GiB = 1024**3
MiB = 1024**2


class ConfigError(Exception):
    """The config is not usable; ``problems`` lists every reason, one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Timeouts:
    """Upstream timeouts in seconds.

    connect  opening a connection (or waiting for a pooled one)
    read     idle time between two reads of an answer, on every call, streaming ones included; on
             Linux also the longest an upload may go untaken (gateway.sockets)
    request  whole call for metadata calls (create, retrieve, delete); never for up/downloads
    """

    connect: float = 5.0
    read: float = 60.0
    request: float = 120.0


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    kind: str
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    timeouts: Timeouts = Timeouts()
    max_connections: int = 100
    poll_after_ms: int | None = None  # None: the adapter's default_poll_after_ms
    result_hosts: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Deployment:
    """One way to serve a public model: a provider plus the name the provider knows it by."""

    name: str
    model: str
    provider: str
    upstream_model: str
    weight: float = 1.0
    priority: int = 0
    max_concurrent_requests: int | None = None
    max_concurrent_uploads: int | None = None


@dataclass(frozen=True)
class ClientKey:
    name: str
    digest: bytes = field(repr=False)
    models: frozenset[str] | None = None
    creates_per_minute: int | None = None
    max_in_progress: int | None = None


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 2 * GiB
    max_json_bytes: int = 32 * MiB
    client_idle_timeout: float = 60.0
    header_timeout: float = 30.0
    keepalive_timeout: float = 75.0


@dataclass(frozen=True)
class Resilience:
    """How the router treats failing deployments (Envoy's outlier detection and retry policy).

    consecutive_failures   failures in a row that eject a deployment
    base_ejection_seconds  ejection lasts this times the number of times it was ejected
    max_ejection_seconds   ... but never longer than this (Envoy's max_ejection_time)
    read_attempts          tries of a retrieve, list refresh or download on connect errors, 502/503/504
    read_deadline_seconds  all tries of one read together, by when the provider must begin to answer
    backoff_seconds        base of the jittered exponential backoff between tries
    """

    consecutive_failures: int = 5
    base_ejection_seconds: float = 30.0
    max_ejection_seconds: float = 300.0
    read_attempts: int = 3
    read_deadline_seconds: float = 10.0
    backoff_seconds: float = 0.1


@dataclass(frozen=True)
class GatewayConfig:
    source: str
    host: str = "127.0.0.1"
    port: int = 8080
    public_base_url: str | None = None
    signing_key: str | None = field(default=None, repr=False)
    data_dir: Path = Path(".video-gateway")
    store_path: Path = Path(".video-gateway/gateway.sqlite3")
    default_model: str | None = None
    limits: Limits = Limits()
    resilience: Resilience = Resilience()
    workers: int | str = 1
    drain_seconds: float = 30.0
    drain_delay_seconds: float = 0.0
    watch_config: bool = True
    admin_key: str | None = field(default=None, repr=False)
    metrics_path: str | None = "/metrics"
    metrics_key: str | None = field(default=None, repr=False)
    log_format: str = "console"
    log_level: str = "info"
    cors_origins: tuple[str, ...] = ()
    keys: tuple[ClientKey, ...] = ()
    providers: Mapping[str, ProviderConfig] = field(default_factory=dict)
    models: Mapping[str, tuple[Deployment, ...]] = field(default_factory=dict)


_TIMEOUTS_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {k: {"type": "number", "exclusiveMinimum": 0} for k in ("connect", "read", "request")},
}

_DEPLOYMENT_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["provider"],
    "properties": {
        "name": {"type": "string", "minLength": 1, "description": "Label for logs and metrics."},
        "provider": {"type": "string", "description": "A key of `providers`."},
        "model": {"type": "string", "minLength": 1, "description": "Upstream model name (default: public)."},
        "weight": {"type": "number", "exclusiveMinimum": 0, "default": 1},
        "priority": {"type": "integer", "default": 0, "description": "Lower tiers are tried first."},
        "max_concurrent_requests": {"type": "integer", "minimum": 1, "description": "Bulkhead: open calls."},
        "max_concurrent_uploads": {
            "type": "integer",
            "minimum": 1,
            "description": "Bulkhead: open calls that make a video or character (all but reads and deletes).",
        },
    },
}


_KEY_FORMS = [{"required": ["key"]}, {"required": ["sha256"]}]
_WORKERS_FORMS = [{"type": "integer", "minimum": 1}, {"const": "auto"}]
# Names that become dict keys, label values and paths: YAML reads `2025:` or `yes:` as a number or
# a boolean, which must be quoted.
_STRING_NAMES = {"type": "string"}
# What goes into an HTTP header: a line break would end it (a key read from a file with its newline).
_LINE_BREAK = {"type": "string", "pattern": "[\r\n]"}
_HEADER_VALUE = {"type": "string", "not": _LINE_BREAK}
_HEADER_NAME = {"type": "string", "pattern": "^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"}
_BASE_URL_PATTERN = "^https?://[^\\s/?#@]+(/[^\\s?#]*)?$"
# a host name, or a suffix of host names written with its leading dot; not a URL
_RESULT_HOST_PATTERN = (
    "^\\.?[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$"
)
_SHA256_HEX = "^[0-9a-fA-F]{64}$"  # a client key given as its digest (keys[].sha256)
# a browser's Origin: scheme://host[:port], the host a name or an address; or "*" for any
_ORIGIN_PATTERN = "^(\\*|https?://([A-Za-z0-9.-]+|\\[[0-9A-Fa-f:.]+\\])(:[0-9]{1,5})?)$"
# What a value that does not match a pattern must be, in words.
_PATTERN_WORDS = {
    "\\S": "must not be empty",
    "^/": "must start with /",
    "^https?://": "must start with http:// or https://",
    _BASE_URL_PATTERN: "must be an http(s) URL with a host, such as https://api.example.com/v1",
    _RESULT_HOST_PATTERN: "must be a host name (cdn.example.com) or a suffix (.example.com), not a URL",
    _SHA256_HEX: "must be 64 hexadecimal digits (a SHA-256 digest)",
    _ORIGIN_PATTERN: 'must be an origin, scheme://host[:port] such as https://app.example.com, or "*"',
}


def schema() -> dict[str, Any]:
    """The JSON Schema of the config file; ``config/schema.json`` is this, written out."""
    from gateway.providers import ADAPTERS

    kind_rules = [
        {
            "if": {"properties": {"kind": {"const": kind}}, "required": ["kind"]},
            "then": {
                "required": list(adapter.required_fields),
                "properties": {
                    "options": adapter.options_schema,
                    # an empty value (an unset "${KEY:-}") is as missing as none
                    **{name: {"pattern": "\\S"} for name in adapter.required_fields if name != "options"},
                },
            },
        }
        for kind, adapter in sorted(ADAPTERS.items())
    ]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "video-gateway configuration",
        "type": "object",
        "additionalProperties": False,
        "required": ["keys", "providers", "models"],
        "properties": {
            "server": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    # empty (a variable set empty) would listen on every interface
                    "host": {"type": "string", "pattern": "\\S"},
                    "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                    "public_base_url": {
                        "type": "string",
                        "pattern": "^https?://",
                        "description": "How providers reach this gateway (signed image URLs for Luma).",
                    },
                    "signing_key": {
                        "type": "string",
                        "minLength": 16,
                        "description": "Key for signed URLs; set it so they survive restarts and replicas.",
                    },
                    "drain_seconds": {
                        "type": "number",
                        "minimum": 0,
                        "description": "On SIGTERM, how long in-flight requests may finish.",
                    },
                    "drain_delay_seconds": {
                        "type": "number",
                        "minimum": 0,
                        "description": "On SIGTERM, /readyz fails this long before the listener closes.",
                    },
                    "watch_config": {"type": "boolean", "description": "Reload when the file changes."},
                    "workers": {
                        "oneOf": _WORKERS_FORMS,
                        "description": "Processes sharing the port; auto: one per CPU (or cgroup CPU quota).",
                    },
                },
            },
            "admin": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key"],
                "properties": {
                    "key": {"type": "string", "minLength": 8, "description": "Bearer key of /admin."}
                },
            },
            "resilience": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "consecutive_failures": {"type": "integer", "minimum": 1},
                    "base_ejection_seconds": {"type": "number", "exclusiveMinimum": 0},
                    "max_ejection_seconds": {"type": "number", "exclusiveMinimum": 0},
                    "read_attempts": {"type": "integer", "minimum": 1},
                    "read_deadline_seconds": {"type": "number", "exclusiveMinimum": 0},
                    "backoff_seconds": {"type": "number", "minimum": 0},
                },
            },
            "data_dir": {  # empty would be the working directory, not the volume meant
                "type": "string",
                "pattern": "\\S",
                "description": "Where the task store and local renders live.",
            },
            "store": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"kind": {"enum": ["sqlite"]}, "path": {"type": "string", "pattern": "\\S"}},
            },
            "default_model": {"type": "string", "description": "Used when a create names no model."},
            "limits": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "max_upload_bytes": {"type": "integer", "minimum": 1},
                    "max_json_bytes": {"type": "integer", "minimum": 1},
                    "client_idle_timeout": {"type": "number", "exclusiveMinimum": 0},
                    "header_timeout": {"type": "number", "exclusiveMinimum": 0},
                    "keepalive_timeout": {"type": "number", "exclusiveMinimum": 0},
                },
            },
            "cors": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "allow_origins": {
                        "type": "array",
                        "items": {"type": "string", "pattern": _ORIGIN_PATTERN},
                        "description": "Origins whose pages may call the API from a browser "
                        '(scheme://host[:port]), or "*" for any; none by default.',
                    },
                },
            },
            "metrics": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "enabled": {"type": "boolean", "default": True},
                    "path": {"type": "string", "pattern": "^/", "default": "/metrics"},
                    "key": {
                        "type": "string",
                        "minLength": 8,
                        "description": "Bearer key scrapers must send (optional).",
                    },
                },
            },
            "logging": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "format": {"enum": ["json", "console"]},
                    "level": {"enum": ["debug", "info", "warning", "error"]},
                },
            },
            "keys": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "oneOf": _KEY_FORMS,
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "key": {"type": "string", "minLength": 8, "description": "Usually ${ENV}."},
                        "sha256": {"type": "string", "pattern": _SHA256_HEX},
                        "models": {"type": "array", "items": {"type": "string"}},
                        "limits": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "creates_per_minute": {"type": "integer", "minimum": 1},
                                "max_in_progress": {"type": "integer", "minimum": 1},
                            },
                        },
                    },
                },
            },
            "providers": {
                "type": "object",
                "minProperties": 1,
                "propertyNames": _STRING_NAMES,
                "additionalProperties": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["kind"],
                    "properties": {
                        "kind": {"enum": sorted(ADAPTERS)},
                        "base_url": {"type": "string", "pattern": _BASE_URL_PATTERN},
                        "api_key": _HEADER_VALUE,
                        "headers": {
                            "type": "object",
                            "propertyNames": _HEADER_NAME,
                            "additionalProperties": _HEADER_VALUE,
                        },
                        "timeouts": _TIMEOUTS_SCHEMA,
                        "max_connections": {"type": "integer", "minimum": 1},
                        "poll_after_ms": {
                            "type": "integer",
                            "minimum": 100,
                            "description": "openai-poll-after-ms sent while a video is unfinished "
                            "(default: the provider's own pace, 1000 for most).",
                        },
                        "result_hosts": {
                            "type": "array",
                            "items": {"type": "string", "pattern": _RESULT_HOST_PATTERN},
                        },
                        "options": {"type": "object"},
                    },
                    "allOf": kind_rules,
                },
            },
            "models": {
                "type": "object",
                "minProperties": 1,
                "propertyNames": _STRING_NAMES,
                "additionalProperties": {
                    "oneOf": [
                        _DEPLOYMENT_SCHEMA,
                        {"type": "array", "minItems": 1, "items": _DEPLOYMENT_SCHEMA},
                    ]
                },
            },
        },
    }


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read, check and resolve a config file; raise ConfigError listing every problem."""
    return parse_config(read_config(path), str(path), os.environ if env is None else env)


def read_config(path: str | Path) -> str:
    """A config file's text; ConfigError when it cannot be read."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start})"]) from None


def parse_config(text: str, source: str, env: Mapping[str, str]) -> GatewayConfig:
    raw, locator = _parse_yaml(text, source)
    lines, problems = locator.lines, locator.problems

    def at(path: tuple[Any, ...], message: str) -> _Problem:
        while path not in lines and path:
            path = path[:-1]
        return _at(source, lines.get(path), path, message)

    if raw is None:
        raw = {}
    expanded: set[tuple[Any, ...]] = set()  # paths whose ${ENV} failed: the value left is not theirs

    def env_problem(path: tuple[Any, ...], message: str) -> None:
        expanded.add(path)
        problems.append(at(path, message))

    from_env: dict[tuple[Any, ...], list[str]] = {}
    raw = _expand_env(raw, (), env, env_problem, from_env)

    def about_value(path: tuple[Any, ...], message: str) -> _Problem:
        """A problem with a value, naming the variables it came from (the file does not show it)."""
        names = from_env.get(path)
        if names:
            message += " (the value of " + ", ".join(f"${{{name}}}" for name in names) + ")"
        return at(path, message)

    validator = _Validator(schema())
    errors = [e for top in validator.iter_errors(raw) for e in _written_errors(top)]
    for error in sorted(errors, key=lambda e: list(map(str, e.absolute_path))):
        path = tuple(error.absolute_path)
        if path in expanded:
            continue
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            for key in _unknown_keys(error):  # each unknown key at its own line
                problems.append(at((*path, key), _schema_message(error, [key])))
            continue
        if "propertyNames" in error.schema_path:  # a name that is not a string, at its own line
            line = lines.get((*path, error.instance), lines.get(path))
            wrong = (
                "cannot be an HTTP header name (letters, digits and !#$%&'*+.^_`|~- only)"
                if error.validator == "pattern"
                else "is not a string; quote it"
            )
            problems.append(_at(source, line, path, f"name {error.instance!r} {wrong}"))
            continue
        problems.append(about_value(path, _schema_message(error)))
    _check_references(raw, lambda p, m: problems.append(about_value(p, m)))
    if problems:
        raise ConfigError([text for _, text in sorted(problems, key=lambda problem: problem[0])])
    return _resolve(raw, source)


# A problem: its line (0 for none), to list problems in the file's order, and its text.
_Problem = tuple[int, str]


def _at(source: str, line: int | None, path: tuple[Any, ...], message: str) -> _Problem:
    """One problem as ``file:line: key.path: message``."""
    prefix = f"{source}:{line}" if line else source
    text = f"{prefix}: {_dotted(path) or '(top level)'}: {message}" if path else f"{prefix}: {message}"
    return line or 0, text


def _parse_yaml(text: str, source: str) -> tuple[Any, _Locator]:
    """The document's value, and where each of its keys is written (a :class:`_Locator` that walked it)."""
    loader = yaml.SafeLoader(text)
    locator = _Locator(source, loader.construct_object)
    try:
        node = loader.get_single_node()
        if node is not None:
            # before the document is built: building writes the keys a merge (<<) brings into the
            # mapping's node, where a key that overrides one of them would look written twice
            locator.walk(node)
        raw = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        line = text.splitlines()[mark.line] if mark and mark.line < len(text.splitlines()) else ""
        problem = str(getattr(exc, "problem", exc))
        hint = ""
        if _UNQUOTED_REF_IN_FLOW.search(line):
            hint = ' (inside {...}, quote ${ENV} references: "${ENV}")'
        elif "mapping values are not allowed" in problem:
            hint = " (quote a value that holds ': '; else check the indentation here and above)"
        elif any(words in problem for words in _INDENTATION_PROBLEMS):
            hint = " (check the indentation of this line and of the lines above it)"
        elif "'\\t'" in problem and mark:  # a tab does not show, where it ends a line least of all
            hint = f" (a tab, at column {mark.column + 1}: YAML takes spaces only; write spaces there)"
        raise ConfigError([f"{where}: not valid YAML: {problem}{hint}"]) from None
    finally:
        loader.dispose()
    return raw, locator


_MERGE_TAG = "tag:yaml.org,2002:merge"
# A flow mapping's "{" (not the one of "${"), then an unquoted ${...} in it: YAML reads that "{" as
# another mapping.
_UNQUOTED_REF_IN_FLOW = re.compile(r"(?<!\$)\{[^\"']*\$\{")
# PyYAML's words for a block that does not line up, most often a line indented too far or not enough.
_INDENTATION_PROBLEMS = (
    "expected <block end>",
    "did not find expected key",
)


class _Locator:
    """Where each key and item of a document is written, and the keys written twice (YAML would
    silently keep the last). A mapping value is located at its key's line."""

    def __init__(self, source: str, key_of: Callable[[yaml.Node], Any]) -> None:
        self.source = source
        self._key_of = key_of
        self.lines: dict[tuple[Any, ...], int] = {(): 1}
        self.problems: list[_Problem] = []

    def walk(
        self, node: yaml.Node, path: tuple[Any, ...] = (), ancestors: tuple[yaml.Node, ...] = ()
    ) -> None:
        """Raises ConfigError at an alias of an enclosing node: the document would be infinitely deep."""
        if not path:
            self.lines[()] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            children = [
                (self._key_of(k), k.start_mark.line + 1, v) for k, v in node.value if k.tag != _MERGE_TAG
            ]
        elif isinstance(node, yaml.SequenceNode):
            children = [(i, v.start_mark.line + 1, v) for i, v in enumerate(node.value)]
        else:
            return
        first: dict[Any, int] = {}
        for key, line, child in children:
            if key in first:
                message = f"duplicate key (first on line {first[key]}); remove one"
                self.problems.append(_at(self.source, line, (*path, key), message))
            first.setdefault(key, line)
            self.lines[(*path, key)] = line
            if any(child is a for a in (*ancestors, node)):
                _, loop = _at(
                    self.source, line, (*path, key), "an alias of a value that encloses it (a loop)"
                )
                raise ConfigError([loop])
            self.walk(child, (*path, key), (*ancestors, node))


# Paths the gateway's own routes take (app.build_app; a test checks that every route is here): /metrics
# must not shadow one or hide behind it.
_OWN_PATHS = re.compile(r"^/(?:v1(?:/.*)?|healthz|readyz|openapi\.json|admin(?:/.*)?|files(?:/.*)?)/?$")


def _base_url_problem(url: str) -> str | None:
    """What the schema's pattern cannot say about a provider's base URL."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        return f"the port of {url!r} is not a number from 1 to 65535"
    if parts.path.rstrip("/").endswith("/videos"):
        return f"{url!r} names the videos endpoint; give the API's root (https://host/v1, say)"
    return None


# Headers of one request's framing and of the connection, which no configured value may replace.
_CONNECTION_HEADERS = frozenset(
    [
        *("content-length", "transfer-encoding", "trailer", "te"),
        *("connection", "keep-alive", "proxy-connection", "upgrade"),
    ]
)


def _origin(value: str) -> str:
    """An origin as a browser's ``Origin`` header has it: lower case, without the scheme's own port."""
    value = value.lower()
    for default in ("https://", ":443"), ("http://", ":80"):
        if value.startswith(default[0]) and value.endswith(default[1]):
            return value.removesuffix(default[1])
    return value


def _check_references(raw: Any, problem: Any) -> None:
    """Checks the schema cannot express; tolerant of whatever the schema rejected, so that these
    problems are reported together with the schema's."""
    from gateway.providers import ADAPTERS

    if not isinstance(raw, dict):
        return
    providers = raw.get("providers") if isinstance(raw.get("providers"), dict) else {}
    models = raw.get("models") if isinstance(raw.get("models"), dict) else {}
    for name, entry in providers.items():
        kind = entry.get("kind") if isinstance(entry, dict) else None
        adapter = ADAPTERS.get(kind) if isinstance(kind, str) else None
        for path, message in adapter.config_problems(entry) if adapter is not None else ():
            problem(("providers", name, *path), message)
        base_url = entry.get("base_url") if isinstance(entry, dict) else None
        if isinstance(base_url, str) and (wrong := _base_url_problem(base_url)):
            problem(("providers", name, "base_url"), wrong)
        headers = entry.get("headers") if isinstance(entry, dict) else None
        for header in headers if isinstance(headers, dict) else ():
            if isinstance(header, str) and header.lower() in _CONNECTION_HEADERS:
                problem(
                    ("providers", name, "headers", header),
                    f"{header} is the gateway's to set on each request (it frames the request or manages "
                    "the connection); remove it",
                )
    seen_names: set[str] = set()
    for model, entries in models.items():
        listed = isinstance(entries, list)
        for i, d in enumerate(entries if listed else [entries]):
            if not isinstance(d, dict) or not isinstance(d.get("provider"), str):
                continue
            path = ("models", model, i) if listed else ("models", model)
            if d["provider"] not in providers:
                known = ", ".join(sorted(map(str, providers)))
                problem((*path, "provider"), f'unknown provider "{d["provider"]}" (known: {known})')
                continue
            entry = providers[d["provider"]] if isinstance(providers[d["provider"]], dict) else {}
            kind, options = entry.get("kind"), entry.get("options")
            adapter = ADAPTERS.get(kind) if isinstance(kind, str) else None
            upstream_model = d.get("model", model)
            if adapter is not None and isinstance(upstream_model, str):
                wrong = adapter.model_problem(upstream_model, options if isinstance(options, dict) else {})
                if wrong is not None:
                    problem((*path, "model") if "model" in d else path, wrong)
            name = d.get("name", f"{d['provider']}/{d.get('model', model)}")
            if not isinstance(name, str):
                continue
            if name in seen_names:
                problem((*path, "name"), f'deployment name "{name}" is used twice; give one a `name`')
            seen_names.add(name)

    keys = raw.get("keys") if isinstance(raw.get("keys"), list) else []
    # The name is the tenant: its videos are the name's. Entries of one name are that tenant's keys
    # (an old and a new one while a key is rotated), so they must grant the same.
    grants: dict[str, tuple[Any, Any]] = {}
    tenants: dict[bytes, str] = {}  # each key's digest → the tenant it belongs to
    for i, k in enumerate(keys):
        if not isinstance(k, dict):
            continue
        if isinstance(k.get("name"), str):
            grant = (k.get("models"), k.get("limits"))
            if grants.setdefault(k["name"], grant) != grant:
                problem(
                    ("keys", i, "name"),
                    f'key name "{k["name"]}" is used twice with other models or limits: entries of one '
                    "name are one tenant's keys (say, the old and the new while rotating) and grant the same",
                )
            digest = _digest_of(k)
            if digest is not None and tenants.setdefault(digest, k["name"]) != k["name"]:
                problem(
                    ("keys", i, "sha256" if "sha256" in k else "key"),
                    f'this key is also tenant "{tenants[digest]}"\'s: a client holding it would be taken '
                    "for one of the two and see that one's videos; give each tenant keys of its own",
                )
        allowed = k.get("models")
        for j, m in enumerate(allowed if isinstance(allowed, list) else ()):
            if isinstance(m, str) and m not in models:
                problem(("keys", i, "models", j), f'unknown model "{m}"')

    metrics_path = raw.get("metrics", {}).get("path") if isinstance(raw.get("metrics"), dict) else None
    if isinstance(metrics_path, str) and _OWN_PATHS.match(metrics_path):
        problem(("metrics", "path"), f"{metrics_path!r} is a path the gateway serves itself; pick another")

    default_model = raw.get("default_model")
    if isinstance(default_model, str) and default_model not in models:
        known = ", ".join(sorted(map(str, models)))
        problem(("default_model",), f'unknown model "{default_model}" (known: {known})')


def _digest_of(entry: dict[str, Any]) -> bytes | None:
    """The SHA-256 of a `keys` entry's key (from `key`, or as `sha256` gives it); None if neither
    is usable (the schema reports that)."""
    sha256, key = entry.get("sha256"), entry.get("key")
    if isinstance(sha256, str) and re.fullmatch(_SHA256_HEX, sha256):
        return bytes.fromhex(sha256)
    return hashlib.sha256(key.encode()).digest() if isinstance(key, str) else None


def _resolve(raw: dict[str, Any], source: str) -> GatewayConfig:
    """Build the config from a document that passed the schema and the reference checks."""
    server = raw.get("server", {})
    data_dir = Path(raw.get("data_dir", ".video-gateway"))
    store = raw.get("store", {})
    limits = Limits(**raw.get("limits", {}))
    logging = raw.get("logging", {})
    metrics = raw.get("metrics", {})

    providers: dict[str, ProviderConfig] = {}
    for name, p in raw["providers"].items():
        providers[name] = ProviderConfig(
            name=name,
            kind=p["kind"],
            base_url=p["base_url"].rstrip("/") if "base_url" in p else None,
            api_key=p.get("api_key"),
            headers=dict(p.get("headers", {})),
            timeouts=Timeouts(**p.get("timeouts", {})),
            max_connections=p.get("max_connections", 100),
            poll_after_ms=p.get("poll_after_ms"),
            result_hosts=tuple(host.lower() for host in p.get("result_hosts", ())),
            options=dict(p.get("options", {})),
        )

    models: dict[str, tuple[Deployment, ...]] = {}
    for model, entries in raw["models"].items():
        entries = entries if isinstance(entries, list) else [entries]
        deployments = []
        for d in entries:
            upstream_model = d.get("model", model)
            name = d.get("name", f"{d['provider']}/{upstream_model}")
            deployments.append(
                Deployment(
                    name=name,
                    model=model,
                    provider=d["provider"],
                    upstream_model=upstream_model,
                    weight=float(d.get("weight", 1)),
                    priority=int(d.get("priority", 0)),
                    max_concurrent_requests=d.get("max_concurrent_requests"),
                    max_concurrent_uploads=d.get("max_concurrent_uploads"),
                )
            )
        models[model] = tuple(deployments)

    keys = []
    for k in raw["keys"]:
        digest = _digest_of(k)
        assert digest is not None  # the schema has every entry give a key or its sha256
        allowed = k.get("models")
        key_limits = k.get("limits", {})
        keys.append(
            ClientKey(
                k["name"],
                digest,
                frozenset(allowed) if allowed is not None else None,
                creates_per_minute=key_limits.get("creates_per_minute"),
                max_in_progress=key_limits.get("max_in_progress"),
            )
        )

    default_model = raw.get("default_model")

    return GatewayConfig(
        source=source,
        host=server.get("host", "127.0.0.1"),
        port=server.get("port", 8080),
        public_base_url=server.get("public_base_url"),
        signing_key=server.get("signing_key"),
        data_dir=data_dir,
        store_path=Path(store["path"]) if "path" in store else data_dir / "gateway.sqlite3",
        default_model=default_model,
        limits=limits,
        resilience=Resilience(**raw.get("resilience", {})),
        workers=server.get("workers", 1),
        drain_seconds=float(server.get("drain_seconds", 30.0)),
        drain_delay_seconds=float(server.get("drain_delay_seconds", 0.0)),
        watch_config=bool(server.get("watch_config", True)),
        admin_key=raw.get("admin", {}).get("key"),
        metrics_path=metrics.get("path", "/metrics") if metrics.get("enabled", True) else None,
        metrics_key=metrics.get("key"),
        log_format=logging.get("format", "console"),
        log_level=logging.get("level", "info"),
        cors_origins=tuple(_origin(value) for value in raw.get("cors", {}).get("allow_origins", ())),
        keys=tuple(keys),
        providers=providers,
        models=models,
    )


def _expand_env(
    value: Any,
    path: tuple[Any, ...],
    env: Mapping[str, str],
    problem: Any,
    used: dict[tuple[Any, ...], list[str]],
) -> Any:
    """``value`` with its ${NAME} references replaced; ``used`` gets the names each path read.

    ``${NAME:-default}`` falls back when NAME is unset or empty, as in a shell and in Compose."""
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            used.setdefault(path, []).append(name)
            if default is not None:
                return env.get(name) or default
            if name in env and not env[name] and _is_secret_path(path):
                # a secret mount that failed, say: the provider would get no credential at all
                problem(
                    path, f"environment variable {name} is empty; write ${{{name}:-}} if no value is meant"
                )
                return ""
            if name in env:
                return env[name]
            problem(path, f"environment variable {name} is not set")
            return ""

        # Only the text as written is checked: a variable's value may hold anything, "${" included.
        if any("${" in literal for literal in _ENV_REF.split(value)[::3]):
            problem(path, _MALFORMED_REF)
            return value
        if _BARE_REF.fullmatch(value):  # $NAME would be taken as the value itself: a key, say
            problem(path, f"{value!r} is read as it is written; write ${{{value[1:]}}} for the variable")
            return value
        return _ENV_REF.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, (*path, k), env, problem, used) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, (*path, i), env, problem, used) for i, v in enumerate(value)]
    return value


_BARE_REF = re.compile(r"\$[A-Za-z_][A-Za-z0-9_]*")


_MALFORMED_REF = (
    "malformed ${...} reference: write ${NAME} or ${NAME:-default}, NAME made of letters, digits "
    "and _ and not starting with a digit"
)


def _dotted(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _non_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _finite_number(checker: Any, instance: Any) -> bool:
    """YAML's .inf and .nan are numbers that pass every bound; no setting can use them."""
    return (
        isinstance(instance, numbers.Number) and not isinstance(instance, bool) and not _non_finite(instance)
    )


def _whole_number(_: Any, instance: Any) -> bool:
    """An integer as YAML writes one. JSON Schema takes 8080.0 for one too, and it would stay a
    float: a port no socket takes, an ``openai-poll-after-ms: 2000.0`` no SDK parses."""
    return isinstance(instance, int) and not isinstance(instance, bool)


_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine_many(
        {"number": _finite_number, "integer": _whole_number}
    ),
)


def _written_errors(error: jsonschema.ValidationError) -> list[jsonschema.ValidationError]:
    """For a value that may be written in several forms (a deployment or a list of them), every
    error inside the form it was written in, so that each is reported at its own path and line."""
    if error.validator_value == _KEY_FORMS and not isinstance(error.instance, dict):
        return []  # the item's type error says it all
    if error.validator != "oneOf" or error.validator_value in (_KEY_FORMS, _WORKERS_FORMS):
        return [error]
    branches: dict[Any, list[jsonschema.ValidationError]] = {}
    for e in error.context or ():
        branches.setdefault(e.relative_schema_path[0], []).append(e)
    written = [
        errors
        for errors in branches.values()
        if not any(e.validator == "type" and not e.relative_path for e in errors)
    ]
    if len(written) != 1:
        return [error]
    return [inner for e in written[0] for inner in _written_errors(e)]


def _unknown_keys(error: jsonschema.ValidationError) -> list[Any]:
    return sorted(set(error.instance) - set(error.schema.get("properties", {})), key=str)


def _schema_message(error: jsonschema.ValidationError, extra: list[Any] | None = None) -> str:
    if error.validator == "additionalProperties":
        extra = _unknown_keys(error) if extra is None else extra
        allowed = ", ".join(sorted(error.schema.get("properties", {})))
        return f"unknown key {', '.join(map(repr, extra))} (allowed: {allowed})"
    if error.validator == "required":
        return error.message.replace("is a required property", "is required")
    if error.validator == "oneOf" and error.validator_value == _KEY_FORMS:
        return "give exactly one of `key` or `sha256`"
    if error.validator == "oneOf" and error.validator_value == _WORKERS_FORMS:
        return 'must be a number of processes, 1 or more, or "auto"'
    if (
        error.validator == "type"
        and error.validator_value in ("number", "integer")
        and _non_finite(error.instance)
    ):
        return f"must be a finite {error.validator_value}, not {error.instance}"
    if (
        error.validator == "type"
        and error.validator_value in ("number", "integer")
        and _numeric_text(error.instance)
    ):
        if _EXPONENT.fullmatch(error.instance.strip()):
            how = "YAML reads a number such as 1e3 as text: write 1000"
            if error.validator_value == "number":
                how += " or 1.0e+3"
        else:
            how = "a quoted value, and a ${VARIABLE}'s, is text: write the number itself in the file"
        return f"{error.instance!r} is text, not {_KINDS[error.validator_value]} ({how})"
    if error.validator == "type" and error.validator_value == "integer" and type(error.instance) is float:
        whole = f": write {int(error.instance)}" if error.instance.is_integer() else ""
        return f"{error.instance!r} is not a whole number{whole}"
    if _may_hold_secret(tuple(error.absolute_path)):
        return _without_value(error)
    if error.validator == "enum":
        return f"{error.instance!r} is not one of: {', '.join(map(str, error.validator_value))}"
    if error.validator == "pattern" and error.validator_value in _PATTERN_WORDS:
        return _PATTERN_WORDS[error.validator_value]  # the value not quoted: a URL may hold a password
    if error.validator in _BOUND_WORDS:
        return f"{error.instance!r} {_BOUND_WORDS[error.validator]} {error.validator_value}"
    if error.validator == "type" and error.validator_value == "object" and error.instance is None:
        return "has no settings (are the lines meant to be under it indented further?)"
    if error.validator == "oneOf":
        best = jsonschema.exceptions.best_match(error.context or [])
        return _schema_message(best) if best is not None else error.message
    return error.message


# Where secrets are written ("*": any name or index). A problem at one of these paths, or above one
# (where a scalar may be a secret written one level too high), never quotes the value.
_SECRET_PATHS = (
    ("keys", "*", "key"),
    ("admin", "key"),
    ("metrics", "key"),
    ("server", "signing_key"),
    ("providers", "*", "api_key"),
    ("providers", "*", "headers", "*"),
)


def _is_secret_path(path: tuple[Any, ...]) -> bool:
    return any(len(path) == len(secret) and _along(path, secret) for secret in _SECRET_PATHS)


def _may_hold_secret(path: tuple[Any, ...]) -> bool:
    return any(len(path) <= len(secret) and _along(path, secret) for secret in _SECRET_PATHS)


def _along(path: tuple[Any, ...], secret: tuple[str, ...]) -> bool:
    """Whether ``path`` follows ``secret`` as far as it goes."""
    return all(want in ("*", part) for part, want in zip(path, secret, strict=False))


_KINDS = {
    "string": "a string",
    "object": "a mapping",
    "array": "a list",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "empty",
}


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _numeric_text(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        return math.isfinite(float(value))
    except ValueError:
        return False


def _kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    for kind, types in (
        ("integer", int),
        ("number", float),
        ("string", str),
        ("object", dict),
        ("array", list),
    ):
        if isinstance(value, types):
            return _KINDS[kind]
    return "empty" if value is None else type(value).__name__


_BOUND_WORDS = {
    "minimum": "must be at least",
    "exclusiveMinimum": "must be greater than",
    "maximum": "must be at most",
    "exclusiveMaximum": "must be less than",
}


def _without_value(error: jsonschema.ValidationError) -> str:
    """What is wrong, in words that do not include the value (which may be a secret)."""
    rule = error.validator_value
    if error.validator == "type":
        expected = " or ".join(_KINDS.get(t, t) for t in (rule if isinstance(rule, list) else [rule]))
        hint = "; quote it" if rule == "string" and isinstance(error.instance, int | float) else ""
        return f"must be {expected}, not {_kind_of(error.instance)}{hint}"
    if error.validator == "minLength":
        return f"is too short (at least {rule} characters)"
    if error.validator == "maxLength":
        return f"is too long (at most {rule} characters)"
    if error.validator == "pattern":
        return _PATTERN_WORDS.get(rule, f"does not match {rule!r}")
    if error.validator == "not" and rule == _LINE_BREAK:
        return "must be one line: it holds a line break (a key read from a file with its newline?)"
    if error.validator in ("minItems", "minProperties"):
        return "must not be empty"
    if error.validator == "enum":
        return f"must be one of: {', '.join(map(str, rule))}"
    return f"is not valid ({error.validator}; the value is not shown, it may be a secret)"


def sha256_hex(key: str) -> str:
    """The digest form of a client key, for `keys[].sha256`."""
    return hashlib.sha256(key.encode()).hexdigest()
