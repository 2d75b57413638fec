"""config/schema.json is the loader's schema, written out for editors; the two never drift."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import yaml

from gateway.config import schema

REPO = Path(__file__).resolve().parents[1]
REGENERATE = (
    '.venv/bin/python -c "import json; from gateway.config import schema; '
    "open('config/schema.json','w').write(json.dumps(schema(), indent=2) + '\\n')\""
)


def test_schema_file_matches_the_loader() -> None:
    shipped = json.loads((REPO / "config" / "schema.json").read_text())
    assert shipped == schema(), f"config/schema.json is stale; regenerate it with: {REGENERATE}"


def test_shipped_config_validates_against_the_schema_file() -> None:
    shipped = json.loads((REPO / "config" / "schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(shipped)
    document = yaml.safe_load((REPO / "config" / "gateway.yaml").read_text())
    assert not list(jsonschema.Draft202012Validator(shipped).iter_errors(document))
