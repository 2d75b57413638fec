"""The YAML config loader (gateway/config.py) and ``video-gateway check-config``."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import config as cfg
from gateway.config import ConfigError, GatewayConfig, load_config, parse_config, sha256_hex

REPO = Path(__file__).resolve().parent.parent
REPO_CONFIG = REPO / "config" / "gateway.yaml"
SRC = "test.yaml"
KEY = "sk-test-0123456789"

# A minimal valid document; tests append or substitute pieces.
BASE = f"""\
keys:
  - name: ci
    key: {KEY}
providers:
  local:
    kind: local
models:
  sora-2:
    provider: local
"""


def line_of(text: str, needle: str) -> int:
    """1-based number of the only line of ``text`` containing ``needle``."""
    hits = [n for n, line in enumerate(text.splitlines(), start=1) if needle in line]
    assert len(hits) == 1, f"{needle!r} is on lines {hits}, expected exactly one"
    return hits[0]


def problems_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, SRC, env or {})
    assert info.value.problems, "a ConfigError must list at least one problem"
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def problem_at(problems: list[str], line: int, path: str) -> str:
    """The one problem reported at ``SRC:line: path: ``."""
    prefix = f"{SRC}:{line}: {path}: "
    found = [p for p in problems if p.startswith(prefix)]
    assert len(found) == 1, f"expected one problem starting {prefix!r}, got:\n" + "\n".join(problems)
    return found[0][len(prefix) :]


# --- the shipped config ----------------------------------------------------------------------------


def test_repo_config_is_byte_identical_to_the_embedded_default():
    assert REPO_CONFIG.read_bytes() == cfg.EMBEDDED_CONFIG_PATH.read_bytes()


@pytest.mark.parametrize("path", [REPO_CONFIG, cfg.EMBEDDED_CONFIG_PATH], ids=["repo", "embedded"])
def test_shipped_configs_load(path: Path):
    config = load_config(path, env={})
    assert isinstance(config, GatewayConfig)
    assert config.source == str(path)
    assert config.providers, "the shipped config must define a provider"
    assert config.default_model in config.models
    for deployments in config.models.values():
        assert deployments
        assert all(d.provider in config.providers for d in deployments)
    # The demo key comes from ${VIDEO_GATEWAY_API_KEY:-...}: with the variable unset the
    # default applies, and with it set the variable wins.
    raw_key = re.search(r"\$\{VIDEO_GATEWAY_API_KEY:-([^}]*)\}", path.read_text()).group(1)
    assert [k.digest for k in config.keys] == [hashlib.sha256(raw_key.encode()).digest()]
    other = load_config(path, env={"VIDEO_GATEWAY_API_KEY": "sk-from-the-environment"})
    assert [k.digest for k in other.keys] == [hashlib.sha256(b"sk-from-the-environment").digest()]


def test_shipped_config_is_valid_under_the_schema():
    raw = yaml.safe_load(REPO_CONFIG.read_text())
    jsonschema.Draft202012Validator(cfg.schema()).validate(raw)


def test_schema_is_a_valid_json_schema():
    schema = cfg.schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    # every provider kind the gateway knows is allowed, nothing else
    from gateway.providers import ADAPTERS

    kinds = schema["properties"]["providers"]["additionalProperties"]["properties"]["kind"]["enum"]
    assert sorted(kinds) == sorted(ADAPTERS)


# --- ${ENV} expansion ------------------------------------------------------------------------------


def test_env_references_are_expanded():
    text = BASE.replace(
        "    kind: local\n",
        "    kind: local\n"
        "  up:\n"
        "    kind: openai\n"
        "    base_url: ${UP_URL:-https://default.example/v1}\n"
        "    api_key: ${UP_KEY}\n"
        "    headers:\n"
        "      X-Team: ${TEAM:-video}\n",
    )
    text += "data_dir: ${DATA_DIR:-/var/lib/gw}\n"
    # A value containing YAML syntax must stay a plain string: expansion happens after parsing.
    secret = "s3cret: [not, yaml] # really"
    config = parse_config(text, SRC, {"UP_KEY": secret, "TEAM": "research"})
    up = config.providers["up"]
    assert up.api_key == secret
    assert up.base_url == "https://default.example/v1"
    assert dict(up.headers) == {"X-Team": "research"}
    assert config.data_dir == Path("/var/lib/gw")
    assert config.store_path == Path("/var/lib/gw/gateway.sqlite3")

    config = parse_config(
        text, SRC, {"UP_KEY": "k", "UP_URL": "http://10.0.0.1:9000/v1/", "DATA_DIR": "/srv/gw"}
    )
    assert config.providers["up"].base_url == "http://10.0.0.1:9000/v1"  # trailing slash dropped
    assert config.data_dir == Path("/srv/gw")


def test_env_default_may_be_empty_and_serves_a_variable_set_empty_too():
    """As in a shell and in Compose, ``${NAME:-default}`` falls back when NAME is unset or empty:
    ``VIDEO_GATEWAY_DATA_DIR=`` must not put the store in the working directory."""
    text = BASE.replace("    kind: local\n", "    kind: local\n    headers:\n      X-A: a${EMPTY:-}b\n")
    assert dict(parse_config(text, SRC, {}).providers["local"].headers) == {"X-A": "ab"}
    assert dict(parse_config(text, SRC, {"EMPTY": "-"}).providers["local"].headers) == {"X-A": "a-b"}
    text += "data_dir: ${DATA_DIR:-/var/lib/gw}\n"
    assert parse_config(text, SRC, {"DATA_DIR": ""}).data_dir == Path("/var/lib/gw")


def test_a_credential_variable_set_empty_is_refused_unless_written_optional():
    """``api_key: ${VLLM_KEY}`` with the variable set but empty (a secret mount that failed) loaded,
    and the provider got no credential at all: the operator only saw its 401s. ``${VLLM_KEY:-}``
    still says that no key is meant."""
    text = BASE.replace(
        "    kind: local\n", "    kind: local\n  up:\n    kind: openai\n    base_url: http://u\n"
    )
    written = text.replace("    base_url: http://u\n", "    base_url: http://u\n    api_key: ${VLLM_KEY}\n")
    message = problem_at(
        problems_of(written, {"VLLM_KEY": ""}), line_of(written, "VLLM_KEY"), "providers.up.api_key"
    )
    assert "VLLM_KEY is empty" in message and "${VLLM_KEY:-}" in message, message
    optional = written.replace("${VLLM_KEY}", "${VLLM_KEY:-}")
    assert not parse_config(optional, SRC, {"VLLM_KEY": ""}).providers["up"].api_key


def test_a_number_written_as_text_is_told_how_to_write_it():
    """YAML reads ``1e3`` as text, and a ${VARIABLE} is always text: "'1e3' is not of type
    'number'" said neither."""
    text = BASE + "  sora-3:\n    - {provider: local, weight: 1e3}\n"
    message = problem_at(problems_of(text), line_of(text, "weight: 1e3"), "models.sora-3[0].weight")
    assert "'1e3' is text, not a number" in message and "1.0e+3" in message, message
    text = BASE + "server:\n  port: ${PORT}\n"
    message = problem_at(problems_of(text, {"PORT": "8080"}), line_of(text, "PORT"), "server.port")
    assert "'8080' is text, not an integer" in message and "${PORT}" in message, message


def test_a_whole_number_written_as_a_fraction_is_refused_where_a_whole_one_goes():
    """JSON Schema takes 8080.0 for an integer, and it stayed a float: ``serve`` died of a
    TypeError traceback, and ``openai-poll-after-ms: 2000.0`` broke the SDK's polling. Where a
    fraction is fine (a weight), 1.0e+3 still is."""
    text = BASE.replace("    kind: local\n", "    kind: local\n    poll_after_ms: 2.0e+3\n")
    text += "server:\n  port: 8080.0\n"
    problems = problems_of(text)
    message = problem_at(problems, line_of(text, "port:"), "server.port")
    assert message == "8080.0 is not a whole number: write 8080"
    message = problem_at(problems, line_of(text, "poll_after_ms"), "providers.local.poll_after_ms")
    assert message == "2000.0 is not a whole number: write 2000"
    weighted = BASE + "  sora-3:\n    - {provider: local, weight: 1.0e+3}\n"
    assert parse_config(weighted, SRC, {}).models["sora-3"][0].weight == 1000
    assert "write 1000)" in problems_of(BASE + "server:\n  port: 1e3\n")[0]  # not "or 1.0e+3"


@pytest.mark.parametrize(
    ("setting", "path"),
    [
        ('server: {host: "${BIND_HOST}"}', "server.host"),
        ("data_dir: ${DATA_DIR}", "data_dir"),
        ('store: {path: "${STORE_PATH}"}', "store.path"),
    ],
)
def test_where_to_listen_and_keep_data_is_never_empty(setting: str, path: str) -> None:
    """A variable set empty (a secret or env file that failed) made the gateway listen on every
    interface, or keep its store in the working directory rather than the volume."""
    env = {"BIND_HOST": "", "DATA_DIR": "", "STORE_PATH": ""}
    text = BASE + setting + "\n"
    assert problem_at(problems_of(text, env), line_of(text, setting), path).startswith("must not be empty")


def test_port_zero_is_refused_as_the_command_line_refuses_it():
    """The check took it, then each of several workers, given --port 0, died of a usage error."""
    text = BASE + "server: {port: 0, workers: 2}\n"
    assert problem_at(problems_of(text), line_of(text, "port: 0"), "server.port") == "0 must be at least 1"


@pytest.mark.parametrize(("written", "column"), [("    kind: local\t\n", 16), ("\tkind: local\n", 1)])
def test_a_tab_is_named_with_its_column(written: str, column: int) -> None:
    """PyYAML refuses a tab, even one that ends a line, where nobody can see it."""
    text = BASE.replace("    kind: local\n", written)
    (problem,) = problems_of(text)
    assert problem.startswith(f"{SRC}:{line_of(text, 'kind: local')}: not valid YAML")
    assert f"a tab, at column {column}: YAML takes spaces only" in problem, problem


def test_a_key_that_overrides_a_merged_one_is_no_duplicate():
    """YAML's merge key: ``b`` takes ``a``'s settings and overrides one. Building the document
    writes the merged keys into ``b``, where the override looked written twice."""
    text = BASE.replace(
        "  local:\n    kind: local\n",
        "  local:\n    kind: local\n"
        "  a: &defaults\n    kind: openai\n    base_url: http://10.0.0.5:8000/v1\n"
        "    timeouts: {connect: 5, read: 60}\n"
        "  b:\n    <<: *defaults\n    base_url: http://10.0.0.6:8000/v1\n",
    )
    text += "  m1: {provider: a}\n  m2: {provider: b}\n"
    config = parse_config(text, SRC, {})
    assert config.providers["b"].base_url == "http://10.0.0.6:8000/v1"
    assert config.providers["b"].timeouts.read == 60 and config.providers["a"].base_url.endswith(".5:8000/v1")
    twice = text.replace(
        "http://10.0.0.6:8000/v1\n", "http://x.example/v1\n    base_url: http://y.example/v1\n"
    )
    message = problem_at(problems_of(twice), line_of(twice, "y.example"), "providers.b.base_url")
    assert "duplicate key" in message


def test_a_variable_written_without_braces_is_refused():
    """``key: $WEB_APP_KEY`` loaded as the key "$WEB_APP_KEY", which anyone reading the file could
    then use; a provider's ``api_key`` so written went upstream as it stood."""
    text = BASE.replace(f"    key: {KEY}\n", "    key: $WEB_APP_KEY\n")
    message = problem_at(
        problems_of(text, {"WEB_APP_KEY": KEY}), line_of(text, "$WEB_APP_KEY"), "keys[0].key"
    )
    assert "${WEB_APP_KEY}" in message


def test_a_value_from_the_environment_names_its_variable_when_it_is_wrong():
    """The file shows ${VIDEO_GATEWAY_API_KEY}, not the 6 characters it held."""
    text = BASE.replace(f"    key: {KEY}\n", "    key: ${VIDEO_GATEWAY_API_KEY:-sk-local-dev-key}\n")
    problems = problems_of(text, {"VIDEO_GATEWAY_API_KEY": "secret"})
    message = problem_at(problems, line_of(text, "VIDEO_GATEWAY_API_KEY"), "keys[0].key")
    assert "too short" in message and "${VIDEO_GATEWAY_API_KEY}" in message, message


def test_unset_env_without_default_names_the_variable_and_its_line():
    text = BASE.replace(
        "    kind: local\n", "    kind: local\n  up:\n    kind: openai\n    base_url: http://u\n"
    )
    text = text.replace(
        "    base_url: http://u\n", "    base_url: http://u\n    api_key: ${MISSING_SECRET}\n"
    )
    problems = problems_of(text, env={"OTHER": "x"})
    message = problem_at(problems, line_of(text, "MISSING_SECRET"), "providers.up.api_key")
    assert "MISSING_SECRET" in message
    assert "not set" in message
    # the same text loads once the variable exists
    assert parse_config(text, SRC, {"MISSING_SECRET": "v"}).providers["up"].api_key == "v"


@pytest.mark.parametrize("written", ["${MISSING", "${ NAME }", "${BAD-NAME}", "${1BAD}", "x${NAME:-a"])
def test_malformed_env_reference_is_an_error_at_its_line(written: str):
    text = BASE.replace(f"    key: {KEY}\n", f'    key: "{written}-padding"\n')
    (problem,) = problems_of(text, env={"NAME": "sk-value-0123456789"})
    message = problem_at([problem], line_of(text, written), "keys[0].key")
    assert "malformed ${...} reference" in message and "${NAME}" in message
    # only the file is checked: a variable's value may hold the same characters
    text = BASE.replace(f"    key: {KEY}\n", "    key: ${CLIENT_KEY}\n")
    config = parse_config(text, SRC, {"CLIENT_KEY": f"{written}-padding"})
    assert config.keys[0].digest == hashlib.sha256(f"{written}-padding".encode()).digest()


def test_unset_env_is_the_only_problem_of_its_value():
    text = BASE.replace(f"    key: {KEY}\n", "    key: ${CLIENT_KEY}\n")
    (problem,) = problems_of(text)
    assert "CLIENT_KEY is not set" in problem_at([problem], line_of(text, "CLIENT_KEY"), "keys[0].key")


# --- every problem at once, each at its line -------------------------------------------------------

MANY_MISTAKES = f"""\
# a config with one mistake of each kind
server:
  host: 0.0.0.0
  port: "eighty"
bogus_top_level: 1
default_model: sora-3
keys:
  - name: both
    key: {KEY}
    sha256: "{sha256_hex(KEY)}"
  - name: neither
    models: [sora-2]
providers:
  local:
    kind: local
    colour: red
  openai-prod:
    kind: openai
    base_url: https://api.openai.com/v1
models:
  sora-2:
    - provider: opnai
      model: sora-2-2025
    - provider: local
"""


def test_every_problem_is_reported_at_once_with_line_and_path():
    text = MANY_MISTAKES
    problems = problems_of(text)
    for p in problems:
        assert re.match(rf"^{re.escape(SRC)}:\d+: \S+: \S", p), f"not file:line: key.path: message: {p}"

    msg = problem_at(problems, line_of(text, "bogus_top_level"), "bogus_top_level")
    assert "unknown key" in msg and "bogus_top_level" in msg

    msg = problem_at(problems, line_of(text, "colour:"), "providers.local.colour")
    assert "unknown key" in msg and "colour" in msg

    msg = problem_at(problems, line_of(text, "- provider: opnai"), "models.sora-2[0].provider")
    assert '"opnai"' in msg
    assert "local" in msg and "openai-prod" in msg, "the known providers must be listed"

    msg = problem_at(problems, line_of(text, "port:"), "server.port")
    assert "eighty" in msg and "integer" in msg

    for i, name in enumerate(["both", "neither"]):
        msg = problem_at(problems, line_of(text, f"- name: {name}"), f"keys[{i}]")
        assert "`key`" in msg and "`sha256`" in msg

    msg = problem_at(problems, line_of(text, "default_model:"), "default_model")
    assert '"sora-3"' in msg and "sora-2" in msg

    # nothing else: each mistake is reported once, in the file's order
    assert len(problems) == 7, "\n".join(problems)
    lines = [int(p.split(":")[1]) for p in problems]
    assert lines == sorted(lines), problems


def test_fixing_every_reported_problem_gives_a_valid_config():
    fixed = (
        MANY_MISTAKES.replace('"eighty"', "8080")
        .replace("bogus_top_level: 1\n", "")
        .replace("sora-3", "sora-2")
        .replace(f'    sha256: "{sha256_hex(KEY)}"\n', "")
        .replace(
            "    models: [sora-2]\n", f"    sha256: {sha256_hex('sk-other-key-000')}\n    models: [sora-2]\n"
        )
        .replace("    colour: red\n", "")
        .replace("opnai", "openai-prod")
    )
    config = parse_config(fixed, SRC, {})
    assert config.port == 8080
    assert [d.provider for d in config.models["sora-2"]] == ["openai-prod", "local"]
    assert config.keys[1].models == frozenset({"sora-2"})


def test_unknown_key_inside_a_deployment_is_reported_at_that_key():
    text = BASE + "  listed:\n    - provider: local\n      colour: 1\n  single:\n    provider: local\n"
    text += "    name: single-local\n    shade: 2\n"
    problems = problems_of(text)
    assert "colour" in problem_at(problems, line_of(text, "colour:"), "models.listed[0].colour")
    msg = problem_at(problems, line_of(text, "shade:"), "models.single.shade")
    assert "shade" in msg and "sha256" not in msg
    assert len(problems) == 2, problems


def test_an_upstream_model_the_provider_does_not_know_is_refused_at_its_line():
    """A mistyped upstream model used to load and then fail every create with a 400 that no client
    can act on (and no failover follows): the file is refused, naming the line and the known models.
    Upstreams that take any name (OpenAI dialect), Ark endpoint IDs, and a Replicate model given its
    input schema in options pass."""
    text = f"""\
keys:
  - name: ci
    key: {KEY}
providers:
  runway: {{kind: runway, api_key: k}}
  fal: {{kind: fal, api_key: k}}
  ark: {{kind: seedance, api_key: k}}
  replicate:
    kind: replicate
    api_key: k
    options: {{input_schemas: {{deployments/acme/hailuo: minimax/hailuo-02}}}}
  dialect: {{kind: openai, base_url: "http://127.0.0.1:9/v1"}}
models:
  gen:
    - {{provider: runway, model: gen4.5-typo}}
    - {{provider: runway, model: gen4.5, priority: 1}}
  kling: {{provider: fal, model: fal-ai/kling-video/v9/text-to-video}}
  chat: {{provider: ark, model: some-chat-model}}
  endpoint: {{provider: ark, model: ep-20260101-abc}}
  hailuo: {{provider: replicate, model: deployments/acme/hailuo}}
  unmapped: {{provider: replicate, model: deployments/acme/unmapped}}
  anything: {{provider: dialect, model: whatever-they-serve}}
"""
    problems = problems_of(text)
    typo = problem_at(problems, line_of(text, "gen4.5-typo"), "models.gen[0].model")
    assert "'gen4.5-typo'" in typo and "gen4.5, gen4_turbo" in typo, typo
    assert "v9" in problem_at(problems, line_of(text, "kling-video/v9"), "models.kling.model")
    assert "ep-" in problem_at(problems, line_of(text, "some-chat-model"), "models.chat.model")
    unmapped = problem_at(problems, line_of(text, "acme/unmapped"), "models.unmapped.model")
    assert "options.input_schemas" in unmapped
    assert len(problems) == 4, problems


@pytest.mark.parametrize(
    ("entry", "wanted"),
    [
        ('{kind: runway, api_key: ""}', "must not be empty"),  # "${RUNWAY_KEY:-}", the variable unset
        ('{kind: runway, api_key: "  "}', "must not be empty"),
        ('{kind: openai, base_url: "http://"}', "must be an http(s) URL with a host"),
        ('{kind: openai, base_url: "http:// space/v1"}', "must be an http(s) URL with a host"),
        ('{kind: openai, base_url: "http://user:pass@host/v1"}', "must be an http(s) URL with a host"),
        ('{kind: openai, base_url: "http://host:99999/v1"}', "port"),
        ('{kind: openai, base_url: "https://api.example.com/v1/videos"}', "videos endpoint"),
    ],
)
def test_a_provider_entry_that_cannot_work_is_refused_at_its_line(entry: str, wanted: str) -> None:
    """An empty credential, a base URL without a host, with a password in it, a port out of range,
    or pointing at the videos endpoint (paths are added to it: a POST there answers 405): each
    loaded before and failed at the first request."""
    text = BASE.replace("    kind: local\n", "    kind: local\n  broken: " + entry + "\n")
    problems = problems_of(text)
    message = problem_at(
        problems,
        line_of(text, "broken:"),
        "providers.broken." + ("api_key" if "api_key" in entry else "base_url"),
    )
    assert wanted in message, message
    assert len(problems) == 1, problems


def test_a_metrics_key_must_be_a_key() -> None:
    """``key: "${METRICS_KEY:-}"`` with the variable unset gave "", which a scraper matched by sending
    no key at all: /metrics was open to anyone, while the file said it was guarded."""
    text = BASE + 'metrics: {key: ""}\n'
    assert "short" in problem_at(problems_of(text), line_of(text, "metrics:"), "metrics.key")


@pytest.mark.parametrize(
    "path", ["/v1/videos", "/v1", "/healthz", "/readyz", "/openapi.json", "/admin/x", "/files/a"]
)
def test_metrics_may_not_take_a_path_the_gateway_serves(path: str) -> None:
    """/v1/videos as the metrics path answered the SDK's list with Prometheus text; /healthz hid the
    metrics behind the health check."""
    text = BASE + f"metrics: {{path: {path}}}\n"
    assert "serves itself" in problem_at(problems_of(text), line_of(text, "metrics:"), "metrics.path")


def test_every_route_the_app_adds_is_one_the_metrics_path_may_not_take(tmp_path: Path) -> None:
    """The check keeps its own list of the gateway's paths (the app is not built to load a config):
    a route added to the app but not to that list would let /metrics shadow it again."""
    from gateway.app import build_app

    text = BASE + f"data_dir: {tmp_path}\n"
    app = build_app(parse_config(text, SRC, {}))
    paths = {re.sub(r"\{[^}]*\}", "x", r.canonical) for r in app.router.resources()}
    paths -= {"/", "/metrics"}  # the catch-all for unknown paths, and the metrics route itself
    assert "/v1/videos/x/content" in paths and "/healthz" in paths, paths
    assert [p for p in sorted(paths) if not cfg._OWN_PATHS.match(p)] == []


def test_entries_of_one_key_name_are_one_tenant_and_grant_the_same():
    """Two values of one name (a rotation) load; two that grant different models or limits would
    make one tenant's rights depend on which of its keys it sends, and are refused."""
    rotating = BASE.replace(f"    key: {KEY}\n", f"    key: {KEY}\n  - name: ci\n    key: {KEY}-new\n")
    assert [k.name for k in parse_config(rotating, SRC, {}).keys] == ["ci", "ci"]
    text = rotating.replace(
        f"    key: {KEY}-new\n", f"    key: {KEY}-new\n    limits: {{max_in_progress: 2}}\n"
    )
    second = [n for n, line in enumerate(text.splitlines(), start=1) if line == "  - name: ci"][1]
    assert "one tenant's keys" in problem_at(problems_of(text), second, "keys[1].name")


@pytest.mark.parametrize(
    "second",
    [f"    key: {KEY}\n", f"    sha256: {sha256_hex(KEY).upper()}\n", "    key: ${SECOND_KEY}\n"],
    ids=["same-key", "its-sha256", "from-the-environment"],
)
def test_one_key_for_two_tenants_is_refused(second: str) -> None:
    """Two tenants given one key (an entry copied at 3 a.m., its key left as it was) loaded, and
    the last entry won: a client holding the key was taken for the other tenant and saw its
    videos, not its own. The message names the other tenant, never the key."""
    text = BASE.replace("providers:", f"  - name: other\n{second}providers:")
    problems = problems_of(text, {"SECOND_KEY": KEY})
    path = "keys[1].sha256" if "sha256" in second else "keys[1].key"
    message = problem_at(problems, line_of(text, "- name: other") + 1, path)
    assert 'tenant "ci"' in message and KEY not in message and sha256_hex(KEY) not in message.lower()


def test_a_provider_without_a_kind_is_told_so_alone():
    """Each kind's rules applied to a provider with no kind at all (an absent kind matched every
    "kind is X" condition), adding "'options' is required" twice to the one real problem."""
    text = BASE.replace("    kind: local\n", "    base_url: http://127.0.0.1:9/v1\n")
    (problem,) = problems_of(text)
    assert "'kind' is required" in problem_at([problem], line_of(text, "  local:"), "providers.local")


def test_settings_that_would_do_nothing_are_refused():
    """A base_url or api_key on a local provider, and a credential header that api_key overrides
    (Authorization here, api-key on Azure), loaded without a word and were never used."""
    text = BASE.replace("    kind: local\n", "    kind: local\n    api_key: sk-unused-key\n")
    assert "does nothing" in problem_at(
        problems_of(text), line_of(text, "api_key"), "providers.local.api_key"
    )
    for kind, extra, header in (
        ("openai", "    base_url: https://api.example.com/v1\n", "Authorization"),
        ("azure", "    base_url: https://r.openai.azure.com/openai/v1\n", "api-key"),
    ):
        text = BASE.replace(
            "    kind: local\n",
            f"    kind: local\n  up:\n    kind: {kind}\n{extra}    api_key: sk-upstream-1\n"
            f"    headers: {{{header}: Bearer other, X-Team: video}}\n",
        )
        message = problem_at(problems_of(text), line_of(text, "headers:"), f"providers.up.headers.{header}")
        assert "overrides" in message and "Bearer other" not in message, message
        without_key = text.replace("    api_key: sk-upstream-1\n", "")
        if kind == "openai":  # no api_key: the header is the credential (a proxy's, say)
            assert dict(parse_config(without_key, SRC, {}).providers["up"].headers)[header] == "Bearer other"
    vertex = BASE.replace(  # its token comes from a service account: no api_key, and still set
        "    kind: local\n",
        "    kind: local\n  vx:\n    kind: vertex_veo\n"
        "    options: {project: demo, service_account_file: /etc/gw/sa.json}\n"
        "    headers: {Authorization: Bearer mine, x-goog-user-project: other, X-Team: video}\n",
    )
    problems = problems_of(vertex)
    for header in ("Authorization", "x-goog-user-project"):
        assert "set by the gateway" in problem_at(
            problems, line_of(vertex, "headers:"), f"providers.vx.headers.{header}"
        )
    assert len(problems) == 2, problems


def test_key_may_only_name_known_models():
    text = BASE.replace(f"    key: {KEY}\n", f"    key: {KEY}\n    models: [sora-2, sora-9]\n")
    problems = problems_of(text)
    assert '"sora-9"' in problem_at(problems, line_of(text, "models: [sora-2, sora-9]"), "keys[0].models[1]")
    assert len(problems) == 1


def test_problems_mixing_int_and_string_keys_do_not_crash():
    problems = problems_of(BASE + "1: one\nbogus: two\n")
    assert any("bogus" in p for p in problems)
    assert any("unknown key 1" in p for p in problems)


# --- providers ---------------------------------------------------------------------------------------


def test_openai_provider_needs_base_url():
    text = BASE.replace("    kind: local\n", "    kind: local\n  up:\n    kind: openai\n    api_key: k\n")
    problems = problems_of(text)
    msg = problem_at(problems, line_of(text, "  up:"), "providers.up")
    assert "base_url" in msg and "required" in msg
    ok = text.replace("    api_key: k\n", "    api_key: k\n    base_url: https://api.example.com/v1/\n")
    assert parse_config(ok, SRC, {}).providers["up"].base_url == "https://api.example.com/v1"


def test_provider_credentials_and_headers_must_fit_in_an_http_header():
    """A key read from a file with its newline would break every request to the provider (each
    one a 500): it is a load error at its line instead, naming the problem but not the key."""
    up = "  up:\n    kind: openai\n    base_url: http://up/v1\n    api_key: ${UP_KEY}\n"
    text = BASE.replace("    kind: local\n", "    kind: local\n" + up)
    msg = problem_at(
        problems_of(text, {"UP_KEY": "sk-up-secret\n"}), line_of(text, "    api_key:"), "providers.up.api_key"
    )
    assert "line break" in msg and "sk-up-secret" not in msg
    assert parse_config(text, SRC, {"UP_KEY": "sk-up-secret"}).providers["up"].api_key == "sk-up-secret"

    headered = text.replace(
        "    api_key:", '    headers: {"X Org": a, X-Team: "b\\r\\nInjected: 1"}\n    api_key:'
    )
    problems = problems_of(headered, {"UP_KEY": "k"})
    line = line_of(headered, "    headers:")
    assert "cannot be an HTTP header name" in problem_at(problems, line, "providers.up.headers")
    value = problem_at(problems, line, "providers.up.headers.X-Team")
    assert "line break" in value and "Injected" not in value


def test_provider_headers_cannot_frame_requests_or_manage_connections():
    """A configured Content-Length or Transfer-Encoding went out beside the gateway's own, giving
    every JSON call to the provider two framings (which a server must refuse); Connection and its
    kin are the gateway's too. A Host of the provider's own is allowed: it replaces the URL's."""
    up = "  up:\n    kind: openai\n    base_url: http://up/v1\n    api_key: k\n"
    headers = "    headers: {Content-Length: '0', transfer-encoding: chunked, Host: api.example.com}\n"
    text = BASE.replace("    kind: local\n", "    kind: local\n" + up + headers)
    problems = problems_of(text)
    line = line_of(text, "    headers:")
    for name in ("Content-Length", "transfer-encoding"):
        assert "gateway's to set" in problem_at(problems, line, f"providers.up.headers.{name}")
    assert not [p for p in problems if "Host" in p], problems


def test_vertex_provider_needs_a_credential_at_load_not_at_the_first_request():
    vertex = "  vertex:\n    kind: vertex_veo\n    options:\n      project: demo\n"
    text = BASE.replace("    kind: local\n", "    kind: local\n" + vertex)
    msg = problem_at(problems_of(text), line_of(text, "  vertex:"), "providers.vertex")
    assert "api_key" in msg and "service_account_file" in msg
    with_token = text.replace("kind: vertex_veo\n", "kind: vertex_veo\n    api_key: ya29.token\n")
    assert parse_config(with_token, SRC, {}).providers["vertex"].api_key == "ya29.token"
    with_account = text.replace(
        "project: demo\n", "project: demo\n      service_account_file: /etc/sa.json\n"
    )
    assert (
        parse_config(with_account, SRC, {}).providers["vertex"].options["service_account_file"]
        == "/etc/sa.json"
    )


def test_local_provider_rejects_unknown_options():
    text = BASE.replace("    kind: local\n", "    kind: local\n    options:\n      speed: 3\n")
    problems = problems_of(text)
    msg = problem_at(problems, line_of(text, "speed:"), "providers.local.options.speed")
    assert "unknown key" in msg and "speed" in msg
    assert "queue_seconds" in msg, "the allowed options should be listed"
    ok = text.replace("speed: 3", "run_seconds: 0.5")
    assert parse_config(ok, SRC, {}).providers["local"].options == {"run_seconds": 0.5}


def test_unknown_provider_kind_lists_the_known_kinds():
    text = BASE.replace("kind: local", "kind: lokal")
    msg = problem_at(problems_of(text), line_of(text, "kind: lokal"), "providers.local.kind")
    assert "lokal" in msg and "local" in msg and "openai" in msg

    listed = BASE.replace("kind: local", "kind: [vertex_veo]")  # not a string: reported, no crash
    msg = problem_at(problems_of(listed), line_of(listed, "kind: [vertex_veo]"), "providers.local.kind")
    assert "is not one of" in msg


# --- keys --------------------------------------------------------------------------------------------


def test_sha256_key_form_matches_plain_key():
    other = "sk-second-key-42"
    digest = sha256_hex(other)
    assert digest == hashlib.sha256(other.encode()).hexdigest()
    text = BASE.replace(
        "providers:",
        f"  - name: hashed\n    sha256: {digest}\n  - name: hashed\n    sha256: {digest.upper()}\nproviders:",
    )
    config = parse_config(text, SRC, {})
    ci, hashed, upper = config.keys
    assert (ci.name, hashed.name, upper.name) == ("ci", "hashed", "hashed")
    assert ci.digest == bytes.fromhex(sha256_hex(KEY)) == hashlib.sha256(KEY.encode()).digest()
    assert hashed.digest == bytes.fromhex(digest) == hashlib.sha256(other.encode()).digest()
    assert upper.digest == hashed.digest
    assert ci.models is None
    assert KEY not in repr(config), "the plain key must not be kept in the config"


def test_malformed_sha256_and_short_key_are_errors():
    text = BASE.replace(f"    key: {KEY}\n", "    sha256: abc123\n")
    assert problem_at(problems_of(text), line_of(text, "sha256:"), "keys[0].sha256")
    text = BASE.replace(f"    key: {KEY}\n", "    key: short\n")
    assert "short" in problem_at(problems_of(text), line_of(text, "key: short"), "keys[0].key")


def test_duplicate_key_name_granting_other_models_is_an_error():
    text = BASE.replace("providers:", f"  - name: ci\n    key: {KEY}-2\n    models: [sora-2]\nproviders:")
    second = [n for n, line in enumerate(text.splitlines(), 1) if "- name: ci" in line][1]
    msg = problem_at(problems_of(text), second, "keys[1].name")
    assert '"ci"' in msg


# --- deployments ------------------------------------------------------------------------------------


def test_deployment_defaults():
    text = BASE.replace(
        "    kind: local\n", "    kind: local\n  up:\n    kind: openai\n    base_url: http://u\n"
    )
    text += "  sora-2-pro:\n    - provider: up\n      model: sora-2-pro-2025\n      weight: 2.5\n"
    text += "      priority: 1\n    - provider: local\n      name: fallback\n"
    config = parse_config(text, SRC, {})
    (only,) = config.models["sora-2"]
    assert (only.name, only.model, only.provider, only.upstream_model) == (
        "local/sora-2",
        "sora-2",
        "local",
        "sora-2",
    )
    assert only.weight == 1 and isinstance(only.weight, float)
    assert only.priority == 0
    first, second = config.models["sora-2-pro"]
    assert (first.name, first.upstream_model, first.weight, first.priority) == (
        "up/sora-2-pro-2025",
        "sora-2-pro-2025",
        2.5,
        1,
    )
    assert (second.name, second.upstream_model, second.model) == ("fallback", "sora-2-pro", "sora-2-pro")


def test_duplicate_deployment_name_is_an_error():
    text = BASE.replace("    provider: local\n", "    - provider: local\n    - provider: local\n")
    problems = problems_of(text)
    second = [n for n, line in enumerate(text.splitlines(), 1) if "- provider: local" in line][1]
    msg = problem_at(problems, second, "models.sora-2[1]")
    assert '"local/sora-2"' in msg and "twice" in msg

    # across models too: two public names served by the same upstream model
    text = BASE + "  alias:\n    provider: local\n    model: sora-2\n"
    msg = problem_at(problems_of(text), line_of(text, "  alias:"), "models.alias")
    assert '"local/sora-2"' in msg
    # an explicit name resolves it
    assert parse_config(text + "    name: alias-local\n", SRC, {}).models["alias"][0].name == "alias-local"


def test_every_problem_of_a_deployment_is_reported():
    text = BASE + "  sora-3:\n    provider: local\n    max_concurrent_uploads: 0\n    prority: 1\n"
    text += "  sora-4:\n    - {provider: local, weight: 0, max_concurrent_requests: 0}\n"
    problems = problems_of(text)
    assert (
        problem_at(problems, line_of(text, "max_concurrent_uploads"), "models.sora-3.max_concurrent_uploads")
        == "0 must be at least 1"
    )
    assert "prority" in problem_at(problems, line_of(text, "prority"), "models.sora-3.prority")
    assert (
        problem_at(problems, line_of(text, "weight: 0"), "models.sora-4[0].weight")
        == "0 must be greater than 0"
    )
    assert problem_at(problems, line_of(text, "weight: 0"), "models.sora-4[0].max_concurrent_requests")
    assert len(problems) == 4, problems


def test_a_model_left_without_settings_and_a_result_host_written_as_a_url_are_told_plainly():
    """An indentation slip leaves a model empty ("None is not of type 'object'" before); a result
    host written as a URL (or in capitals) loaded and never matched a redirect."""
    text = BASE + "  sora-3:\n  provider: local\n"
    empty = problem_at(problems_of(text), line_of(text, "sora-3:"), "models.sora-3")
    assert "has no settings" in empty and "indented" in empty, empty
    hosts = BASE.replace(
        "    kind: local\n",
        "    kind: local\n  up:\n    kind: openai\n"
        "    base_url: https://api.example.com/v1\n"
        "    result_hosts: [https://cdn.example.com/, CDN.Example.NET]\n",
    )
    (problem,) = problems_of(hosts)
    message = problem_at([problem], line_of(hosts, "result_hosts"), "providers.up.result_hosts[0]")
    assert "host name" in message and "not a URL" in message, message
    fixed = hosts.replace("https://cdn.example.com/, ", "")
    assert parse_config(fixed, SRC, {}).providers["up"].result_hosts == ("cdn.example.net",)


def test_workers_error_says_what_is_allowed():
    text = BASE + "server: {workers: 0}\n"
    message = problem_at(problems_of(text), line_of(text, "workers"), "server.workers")
    assert "1 or more" in message and '"auto"' in message


@pytest.mark.parametrize(
    ("section", "name"),
    [("models", "2025"), ("models", "yes"), ("providers", "5")],
)
def test_model_and_provider_names_must_be_strings(section: str, name: str):
    entry = {"models": "    provider: local\n", "providers": "    kind: local\n"}[section]
    text = BASE.replace(f"{section}:\n", f"{section}:\n  {name}:\n{entry}", 1)
    (problem,) = problems_of(text)
    assert "is not a string; quote it" in problem_at([problem], line_of(text, f"  {name}:"), section)
    quoted = text.replace(f"  {name}:", f'  "{name}":')
    assert name in getattr(parse_config(quoted, SRC, {}), section)


@pytest.mark.parametrize(
    ("setting", "path"),
    [
        ("models:\n  sora-2:\n    provider: local\n    weight: .inf\n", "models.sora-2.weight"),
        ("models:\n  sora-2:\n    - {provider: local, weight: .nan}\n", "models.sora-2[0].weight"),
        ("resilience:\n  backoff_seconds: .inf\n", "resilience.backoff_seconds"),
        ("server:\n  drain_seconds: .nan\n", "server.drain_seconds"),
        (
            "providers:\n  local:\n    kind: local\n    options: {run_seconds: .inf}\n",
            "providers.local.options.run_seconds",
        ),
        ("limits:\n  client_idle_timeout: -.inf\n", "limits.client_idle_timeout"),
    ],
)
def test_non_finite_numbers_are_errors(setting: str, path: str):
    section = setting.split(":", 1)[0]
    text = BASE.split(f"{section}:\n")[0] if section in ("models", "providers") else BASE
    if section == "providers":
        text += setting + "models:\n  sora-2:\n    provider: local\n"
    else:
        text += setting
    (problem,) = problems_of(text)
    assert "must be a finite" in problem_at([problem], line_of(text, setting.splitlines()[-1].strip()), path)


def test_duplicate_keys_are_errors_at_the_duplicate():
    text = BASE + "models:\n  sora-2:\n    provider: nowhere\n"
    text = text.replace("    kind: local\n", "    kind: local\n    kind: openai\n")
    problems = problems_of(text)
    second_models = [n for n, line in enumerate(text.splitlines(), 1) if line == "models:"][1]
    assert "duplicate key (first on line" in problem_at(problems, second_models, "models")
    assert "duplicate key" in problem_at(problems, line_of(text, "kind: openai"), "providers.local.kind")
    # what the loader kept is reported at the line it was kept from
    assert "nowhere" in problem_at(problems, line_of(text, "provider: nowhere"), "models.sora-2.provider")


def test_an_alias_loop_is_an_error():
    (problem,) = problems_of("keys: &k [*k]\nproviders: {}\nmodels: {}\n")
    assert problem.startswith(f"{SRC}:1: keys[0]: ") and "loop" in problem


SECRET = "Zq7-secret-value"


@pytest.mark.parametrize(
    ("written", "path"),
    [
        ("admin: {key: Zq7}\n", "admin.key"),
        ("admin: Zq7-secret-value\n", "admin"),
        ("metrics: {key: 987654321}\n", "metrics.key"),
        ("server: {signing_key: Zq7-short}\n", "server.signing_key"),
        ("  up: {kind: openai, base_url: http://u, api_key: 987654321}\n", "providers.up.api_key"),
        (
            "  up: {kind: openai, base_url: http://u, headers: {X-Key: 987654321}}\n",
            "providers.up.headers.X-Key",
        ),
        ("  up: {kind: openai, base_url: http://u, headers: Zq7-secret-value}\n", "providers.up.headers"),
        ("  - Zq7-secret-value\n", "keys[1]"),
        ("  - {name: short, key: Zq7}\n", "keys[1].key"),
    ],
)
def test_problems_never_quote_a_secret(written: str, path: str):
    value = re.search(r"(Zq7[\w-]*|987654321)", written).group(1)
    if written.startswith("  up:"):
        text = BASE.replace("    kind: local\n", "    kind: local\n" + written)
    elif written.startswith("  - "):
        text = BASE.replace("providers:", written + "providers:")
    else:
        text = BASE + written
    problems = problems_of(text)
    message = problem_at(problems, line_of(text, value), path)
    assert value not in message and message.strip(), problems
    assert all(value not in p for p in problems), problems


# --- YAML syntax -------------------------------------------------------------------------------------


def test_invalid_yaml_is_a_config_error_with_its_line():
    text = "server:\n  host: 127.0.0.1\n  port: 8080: 9090\nkeys: []\n"
    (problem,) = problems_of(text)
    assert problem.startswith(f"{SRC}:{line_of(text, '8080: 9090')}: ")
    assert "not valid YAML" in problem and "quote a value that holds ': '" in problem


def test_a_line_out_of_line_gets_an_indentation_hint_not_one_about_env_references():
    """PyYAML's words ("expected <block end>, but found '<block mapping start>'") say nothing of
    indentation; and the hint about ${ENV} in flow mappings came for any line with a ${...}."""
    text = BASE.replace(f"    key: {KEY}\n", f"    key: ${{KEY:-{KEY}}}\n   models: [x]\n")
    (problem,) = problems_of(text)
    assert "check the indentation" in problem and "quote ${ENV}" not in problem, problem


def test_empty_and_non_mapping_documents_are_config_errors():
    for text in ("", "# only a comment\n", "- a\n- b\n", "just a string\n"):
        problems = problems_of(text)
        assert all(p.startswith(SRC) for p in problems)


# --- robustness: whatever the document, only ConfigError ------------------------------------------

_KEYS = st.sampled_from(
    [
        "server",
        "port",
        "host",
        "keys",
        "providers",
        "models",
        "kind",
        "provider",
        "name",
        "key",
        "sha256",
        "models",
        "options",
        "base_url",
        "local",
        "openai",
        "default_model",
        "limits",
        "weight",
        "bogus",
    ]
)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 70000),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["local", "openai", "sora-2", "${X}", "${Y:-y}", "http://h", KEY, sha256_hex(KEY)]),
    st.text(max_size=8),
)
_DOCS = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(_KEYS, st.integers(0, 3)), inner, max_size=4),
    ),
    max_leaves=25,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=st.dictionaries(_KEYS, _DOCS, max_size=6))
def test_any_document_gives_a_config_or_a_config_error(doc):
    text = yaml.safe_dump(doc, sort_keys=False)
    try:
        config = parse_config(text, SRC, {"X": "x"})
    except ConfigError as exc:
        for p in exc.problems:
            assert p.startswith(f"{SRC}:"), p
            assert "\n" not in p.strip() or "not valid YAML" in p
    else:
        assert isinstance(config, GatewayConfig)


# --- the CLI -----------------------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIDEO_GATEWAY_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config_accepts_a_valid_file(tmp_path: Path):
    result = run_cli("check-config", str(REPO_CONFIG), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert str(REPO_CONFIG) in result.stdout
    config = load_config(REPO_CONFIG, env={})
    assert f"{len(config.providers)} providers" in result.stdout
    assert f"{len(config.models)} models" in result.stdout


def test_check_config_lists_problems_and_fails(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text(MANY_MISTAKES)
    result = run_cli("check-config", str(path), cwd=tmp_path)
    assert result.returncode == 1
    assert "OK" not in result.stdout
    problems = problems_of(MANY_MISTAKES)
    for p in problems:
        assert p.replace(SRC, str(path), 1) in result.stderr
    assert f"{len(problems)} problem" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_on_a_missing_file_fails_cleanly(tmp_path: Path):
    missing = tmp_path / "nope" / "gateway.yaml"
    result = run_cli("check-config", str(missing), cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert str(missing) in result.stderr
    assert "No such file" in result.stderr or "cannot read" in result.stderr


def test_check_config_on_a_non_utf8_file_fails_cleanly(tmp_path: Path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(BASE.encode() + b"# caf\xe9\n")
    result = run_cli("check-config", str(path), cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert str(path) in result.stderr
    with pytest.raises(ConfigError):
        load_config(path, env={})
