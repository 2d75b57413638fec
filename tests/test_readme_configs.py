"""The config examples in README.md are valid configs: what ops teams copy must load."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.config import parse_config

README = Path(__file__).resolve().parents[1] / "README.md"
KEYS = "keys:\n  - name: example\n    key: ${EXAMPLE_KEY}\n"


def examples() -> list[str]:
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S)
    return [b for b in blocks if re.search(r"^providers:", b, re.M) and re.search(r"^models:", b, re.M)]


def test_every_full_config_example_loads() -> None:
    found = examples()
    assert len(found) >= 2, "the Configuration and Providers sections show full examples"
    for block in found:
        text = block if re.search(r"^keys:", block, re.M) else KEYS + block
        env = {name: "example-value-0123456789" for name in re.findall(r"\$\{([A-Z_0-9]+)", text)}
        config = parse_config(text, "README.md", env)
        assert config.models and config.providers


def test_an_unquoted_reference_in_a_flow_mapping_gets_a_hint() -> None:
    import pytest

    from gateway.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        parse_config("providers:\n  a: {kind: veo, api_key: ${X}}\n", "gw.yaml", {"X": "x"})
    (problem,) = caught.value.problems
    assert problem.startswith("gw.yaml:2: not valid YAML") and "quote ${ENV} references" in problem
