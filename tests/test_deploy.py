"""Dockerfile, docker-compose.yml, Prometheus and Grafana provisioning agree with the project.

No Docker engine runs here, so these files are parsed and cross-checked instead: paths, ports,
commands, the config the container gets, and the health check, run against a real gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from gateway import cli
from gateway.config import GatewayConfig, load_config
from tests.conftest import ALPHA_KEY, RunningGateway, gateway_yaml
from tests.test_errors import closed_port

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CONSTRAINTS = ROOT / "constraints.txt"
README = ROOT / "README.md"
GATEWAY_CONFIG = ROOT / "deploy" / "gateway.yaml"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
DATASOURCES = ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDERS = ROOT / "grafana" / "provisioning" / "dashboards" / "video-gateway.yaml"
DASHBOARDS = ROOT / "grafana" / "dashboards"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))

_ENV_REF = re.compile(r"\$\{([A-Za-z_]\w*)(?::?-([^}]*))?\}")


# --- parsing -----------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def instruction(name: str) -> list[str]:
    return [args for keyword, args in dockerfile() if keyword == name]


def exec_form(args: str) -> list[str]:
    argv = json.loads(args)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), args
    return argv


def healthcheck() -> tuple[dict[str, str], list[str]]:
    (args,) = instruction("HEALTHCHECK")
    options, _, command = args.partition("CMD ")
    return dict(o.removeprefix("--").split("=", 1) for o in options.split()), exec_form(command)


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return data


def service(name: str) -> dict[str, Any]:
    svc: dict[str, Any] = compose()["services"][name]
    return svc


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """What Compose makes of a value, with ``env`` as the shell environment."""
    env = env or {}
    return _ENV_REF.sub(lambda m: env.get(m[1], m[2] or ""), value).replace("$$", "$")


def mounts(svc: dict[str, Any]) -> dict[str, str]:
    """Short-syntax volumes of a service: source -> target."""
    out = {}
    for volume in svc.get("volumes", []):
        source, target, *_ = volume.split(":")
        out[source] = target
    return out


def mount_target(svc: dict[str, Any], source: str) -> str:
    targets = mounts(svc)
    assert source in targets, f"{source} is not mounted (mounts: {targets})"
    return targets[source]


def container_ports(svc: dict[str, Any]) -> dict[int, int]:
    """Port mappings of a service: container port -> host port."""
    out = {}
    for mapping in svc.get("ports", []):
        host, container = str(mapping).rsplit(":", 1)
        out[int(container)] = int(host.rsplit(":", 1)[-1])
    return out


def deploy_config() -> GatewayConfig:
    env = {k: interpolate(str(v)) for k, v in service("gateway").get("environment", {}).items()}
    return load_config(GATEWAY_CONFIG, env=env)


def parse_cli(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """What ``video-gateway ARGV`` would run, without running it."""
    seen: list[argparse.Namespace] = []
    for command in ("serve", "simulate", "check_config", "healthcheck"):
        monkeypatch.setattr(cli, command, lambda args: seen.append(args) or 0)
    assert cli.main(argv) == 0
    (args,) = seen
    return args


def console_script(argv: list[str]) -> list[str]:
    """``argv`` minus the program, checked to be this project's console script."""
    assert argv[0] in PYPROJECT["project"]["scripts"], f"{argv[0]} is not a [project.scripts] entry"
    assert PYPROJECT["project"]["scripts"][argv[0]] == "gateway.cli:main"
    return argv[1:]


# --- compose -----------------------------------------------------------------------------------


def test_compose_mounts_exist_and_volumes_are_declared() -> None:
    data = compose()
    declared = set(data.get("volumes") or {})
    for name, svc in data["services"].items():
        for source in mounts(svc):
            if source.startswith((".", "/")):
                path = (ROOT / source).resolve()
                assert path.is_relative_to(ROOT), f"{name} mounts {source}, outside the repository"
                assert path.exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in declared, f"{name} uses undeclared volume {source}"
    assert {"gateway", "prometheus", "grafana", "traffic"} <= set(data["services"])


def test_compose_gateway_runs_the_image_command_on_the_mounted_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (cmd,) = instruction("CMD")
    argv = exec_form(cmd)
    gateway = service("gateway")
    assert gateway["build"] == "." and gateway.get("command", argv) == argv
    args = parse_cli(console_script(argv), monkeypatch)
    assert args.command == "serve"
    # the directory, not the file: git and editors replace a file, and a mount of the file would
    # go on showing reloads the old one
    config_dir = mount_target(gateway, "./deploy")
    assert args.config == f"{config_dir}/{GATEWAY_CONFIG.name}" and (ROOT / "deploy").is_dir()
    assert gateway["volumes"][0].endswith(":ro"), "the config is mounted read-only"
    assert args.host is None and args.port is None, "host and port come from the config"


def test_a_stop_leaves_the_gateway_its_drain() -> None:
    """Compose sends SIGKILL 10 s after SIGTERM unless told otherwise; the drain takes longer."""
    config = deploy_config()
    grace = service("gateway")["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) >= config.drain_delay_seconds + config.drain_seconds + 5
    assert service("traffic")["init"] is True, "PID 1 without a SIGTERM handler ignores a stop"


def test_the_image_keeps_data_on_its_volume_whichever_config_it_runs() -> None:
    """The embedded default and config/gateway.yaml keep data in $VIDEO_GATEWAY_DATA_DIR, else in
    the working directory, which the image's user cannot write."""
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(instruction("ENV"))))
    (volume,) = instruction("VOLUME")
    for path in (cli.EMBEDDED_CONFIG_PATH, ROOT / "config" / "gateway.yaml"):
        assert str(load_config(path, env=env).data_dir) == volume, path
    assert re.fullmatch(r"\d+:\d+", instruction("USER")[-1]), "Kubernetes' runAsNonRoot needs a number"


def test_ports_agree_everywhere() -> None:
    config = deploy_config()
    (exposed,) = instruction("EXPOSE")
    assert int(exposed) == config.port == 8080
    assert config.host == "0.0.0.0", "a container must listen on every interface"
    assert container_ports(service("gateway")) == {config.port: config.port}

    (job,) = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))["scrape_configs"]
    (target,) = [t for group in job["static_configs"] for t in group["targets"]]
    host, port = target.split(":")
    assert host == "gateway" and int(port) == config.port

    assert 9090 in container_ports(service("prometheus"))
    assert 3000 in container_ports(service("grafana"))


def test_deploy_config_is_valid_and_matches_the_containers(monkeypatch: pytest.MonkeyPatch) -> None:
    config = deploy_config()
    assert config.log_format == "json" and config.metrics_path is not None
    (volume,) = instruction("VOLUME")
    assert str(config.data_dir) == volume == "/data"
    assert config.store_path.is_relative_to(config.data_dir)
    assert mount_target(service("gateway"), "gateway-data") == volume
    assert config.default_model is not None
    (default,) = config.models[config.default_model]
    assert config.providers[default.provider].kind == "local", "the default model is rendered locally"

    # The compose default key is the config's; the CLI accepts the file.
    env_key = interpolate(service("gateway")["environment"]["VIDEO_GATEWAY_API_KEY"])
    assert [k.digest for k in config.keys] == [hashlib.sha256(env_key.encode()).digest()]
    monkeypatch.setenv("VIDEO_GATEWAY_API_KEY", env_key)
    assert cli.main(["check-config", str(GATEWAY_CONFIG)]) == 0

    # Every HTTP provider is a compose service, listening where the config expects it.
    for provider in config.providers.values():
        if provider.base_url is None:
            continue
        url = urlsplit(provider.base_url)
        assert url.hostname in compose()["services"], f"{provider.name}: {url.hostname} is not a service"
        svc = service(url.hostname)
        args = parse_cli(console_script(svc["command"]), monkeypatch)
        assert args.command == "simulate" and args.host == "0.0.0.0" and args.port == url.port
        assert url.path == "/v1"
        assert PurePosixPath(args.data_dir).is_relative_to(mount_target(svc, f"{url.hostname}-data"))


def test_traffic_service_is_valid_python_against_the_gateway() -> None:
    traffic = service("traffic")
    assert traffic["image"] == service("gateway")["image"]
    assert traffic["entrypoint"] == ["python", "-c"]
    (script,) = traffic["command"]
    assert "$" not in script, "Compose would interpolate $ in the script"
    compile(script, "traffic", "exec")
    env = {k: interpolate(str(v)) for k, v in traffic["environment"].items()}
    url = urlsplit(env["GATEWAY_URL"])
    assert url.hostname == "gateway" and url.port == deploy_config().port
    assert env["VIDEO_GATEWAY_API_KEY"] == interpolate(
        service("gateway")["environment"]["VIDEO_GATEWAY_API_KEY"]
    )
    models = set(re.findall(r'"(sora[\w-]*)"', script))
    assert models and models <= set(deploy_config().models), models
    assert traffic["depends_on"]["gateway"]["condition"] == "service_healthy"
    assert traffic["healthcheck"] == {"disable": True}, "the image's health check does not apply"


# --- Prometheus and Grafana --------------------------------------------------------------------


def test_prometheus_scrapes_the_gateway_metrics_path() -> None:
    scrape = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    (job,) = scrape["scrape_configs"]
    assert job["job_name"] == "video-gateway"
    assert job["metrics_path"] == deploy_config().metrics_path == "/metrics"
    assert job.get("scrape_interval", scrape["global"]["scrape_interval"]) == "15s"
    prometheus = service("prometheus")
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    assert config_flag.split("=", 1)[1] == mount_target(prometheus, "./deploy/prometheus.yml")

    promtool = shutil.which("promtool")
    if promtool is not None:
        result = subprocess.run(
            [promtool, "check", "config", str(PROMETHEUS)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_is_provisioned_with_the_dashboard() -> None:
    grafana = service("grafana")
    provisioning = mount_target(grafana, "./grafana/provisioning")
    assert provisioning == "/etc/grafana/provisioning"
    dashboards_dir = mount_target(grafana, "./grafana/dashboards")

    (datasource,) = yaml.safe_load(DATASOURCES.read_text(encoding="utf-8"))["datasources"]
    assert datasource["type"] == "prometheus" and datasource["uid"] == "prometheus"
    url = urlsplit(datasource["url"])
    assert url.hostname == "prometheus" and url.port in container_ports(service("prometheus"))
    scrape = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    assert datasource["jsonData"]["timeInterval"] == scrape["global"]["scrape_interval"]

    (provider,) = yaml.safe_load(DASHBOARD_PROVIDERS.read_text(encoding="utf-8"))["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == dashboards_dir

    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    home = PurePosixPath(env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home.parent == PurePosixPath(dashboards_dir) and (DASHBOARDS / home.name).is_file()


# --- Dockerfile --------------------------------------------------------------------------------


def test_dockerfile_base_user_and_volume() -> None:
    (base,) = instruction("FROM")
    assert base == "python:3.11-slim"
    required = PYPROJECT["project"]["requires-python"].removeprefix(">=")
    version = tuple(int(p) for p in re.search(r"python:(\d+\.\d+)", base)[1].split("."))  # type: ignore[index]
    assert version >= tuple(int(p) for p in required.split("."))

    users = instruction("USER")
    assert users, "the image must not run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert any("useradd" in args and user in args for args in instruction("RUN"))
    assert [k for k, _ in dockerfile()].index("USER") > max(
        i for i, (k, a) in enumerate(dockerfile()) if k == "RUN" and "pip install" in a
    ), "packages are installed as root, before switching user"


def test_dockerfile_installs_dependencies_in_their_own_layer(tmp_path: Path) -> None:
    steps = dockerfile()
    keywords = [k for k, _ in steps]
    copies = [(i, a.split()) for i, (k, a) in enumerate(steps) if k == "COPY"]
    (pyproject_copy,) = [i for i, a in copies if a[0] == "pyproject.toml"]
    (code_copy,) = [i for i, a in copies if a[0].rstrip("/") == "gateway"]
    (deps_step,) = [i for i, (k, a) in enumerate(steps) if k == "RUN" and "tomllib" in a]
    (project_step,) = [i for i, (k, a) in enumerate(steps) if k == "RUN" and "--no-deps" in a]
    assert pyproject_copy < deps_step < code_copy < project_step
    assert all(k != "COPY" or i == pyproject_copy for i, k in enumerate(keywords[:deps_step]))

    # The dependency step, run on a copy of pyproject.toml, lists exactly its dependencies.
    words = shlex.split(steps[deps_step][1])
    code = words[words.index("-c") + 1]
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    assert out.splitlines() == PYPROJECT["project"]["dependencies"]


def test_every_dependency_is_pinned_within_its_range_and_every_install_uses_the_pins() -> None:
    """constraints.txt is what CI tests and the image ships: each dependency pyproject.toml names,
    runtime and test, at one exact version that its range admits, installed through it everywhere."""
    pins: dict[str, Version] = {}
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line!r}"
            pins[canonicalize_name(name)] = Version(version)
    declared = [*PYPROJECT["project"]["dependencies"], *PYPROJECT["project"]["optional-dependencies"]["test"]]
    for text in declared:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        pinned = pins.get(canonicalize_name(requirement.name))
        assert pinned is not None, f"{requirement.name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pinned, prereleases=True), f"{requirement.name}=={pinned}"

    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    readme_commands = README.read_text(encoding="utf-8").split("```bash", 1)[1].split("```", 1)[0]
    docker = [("Dockerfile", a) for a in instruction("RUN") if "pip install" in a and "--no-deps" not in a]
    for where, text in (("ci", ci), ("README", readme_commands), *docker):
        installs = re.findall(r"pip install[^&\n]*", text)
        assert installs, where
        for install in installs:
            if "--upgrade pip" not in install:
                assert "-c constraints.txt" in install, f"{where}: {install}"


def test_dockerfile_copies_what_the_build_needs_and_dockerignore_keeps_the_rest_out() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.removeprefix("**/")) for p in patterns)

    sources = [source for a in instruction("COPY") for source in a.split()[:-1]]
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not ignored(source.rstrip("/")), f".dockerignore excludes {source}"
    # pyproject's readme and package data must be in the build context.
    assert PYPROJECT["project"]["readme"] in sources
    assert not ignored("gateway/default.yaml")
    for unwanted in (".venv", ".git", "__pycache__", ".pytest_cache", ".video-gateway", "data"):
        assert ignored(unwanted), f".dockerignore should exclude {unwanted}"


def test_healthcheck_probes_the_config_the_image_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    options, argv = healthcheck()
    (cmd,) = instruction("CMD")
    served = parse_cli(console_script(exec_form(cmd)), monkeypatch)
    probe = parse_cli(console_script(argv), monkeypatch)
    assert probe.command == "healthcheck" and probe.config == served.config
    assert {"interval", "timeout", "retries"} <= set(options)


async def test_healthcheck_command_follows_the_configs_port_past_any_proxy(
    local_gateway: RunningGateway, tmp_path: Path
) -> None:
    """The port is the config's (the image's old probe always asked 8080), and the environment's
    HTTP proxy, which Docker puts into containers, is not asked: 127.0.0.1 is this container."""
    port = urlsplit(local_gateway.url).port
    config = tmp_path / "gw.yaml"

    async def run(port: int, *extra: str) -> int:
        config.write_text(gateway_yaml(tmp_path / "data", extra=f"server: {{host: 0.0.0.0, port: {port}}}"))
        env = {**os.environ, "ALPHA_KEY": ALPHA_KEY, "BETA_KEY": "sk-beta-xxxxxx"}
        env.update(http_proxy="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9", no_proxy="", NO_PROXY="")
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "healthcheck", "--config", str(config), *extra, env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        return await asyncio.wait_for(process.wait(), 30)

    assert port is not None and await run(port) == 0
    assert await run(closed_port()) == 1
    assert await run(closed_port(), "--port", str(port)) == 0  # as serve takes it


def test_readme_tells_how_to_run_the_stack() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "docker compose up" in readme
    assert "http://localhost:3000" in readme and "9090" in readme
    # The README's install runs the same console script the image runs.
    (cmd,) = instruction("CMD")
    assert f"{exec_form(cmd)[0]} serve" in readme
