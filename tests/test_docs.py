"""docs/spec-reference.md is generated from the spec's field descriptions and must not go stale."""

from __future__ import annotations

import json

from disaggctl.docgen import spec_json_schema, spec_reference_markdown
from disaggctl.spec import ClusterSpec, Pool
from tests.plugins.paths import REPO


def test_spec_reference_is_current() -> None:
    current = (REPO / "docs" / "spec-reference.md").read_text()
    assert current == spec_reference_markdown(), (
        "docs/spec-reference.md is stale: run `disaggctl schema --markdown > docs/spec-reference.md`"
    )


def test_every_field_has_a_description() -> None:
    text = spec_reference_markdown()
    for model in (ClusterSpec, Pool):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            assert f"| `{name}` |" in text


def test_json_schema_is_strict() -> None:
    schema = spec_json_schema()
    json.dumps(schema)
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["Pool"]["additionalProperties"] is False
    assert set(schema["required"]) == {"name", "model", "hosts", "kv_transfer", "target"}


def _map_section() -> str:
    text = (REPO / "docs" / "architecture.md").read_text()
    start = text.index("## Map: folders -> pipeline stages")
    return text[start : text.index("\n## ", start + 1)]


def test_architecture_map_names_every_module_and_subpackage() -> None:
    """The one-screen map stays true: a new module or subpackage needs its line in the map."""
    section = _map_section()
    pkg = REPO / "disaggctl"
    entries = [p for p in pkg.iterdir() if p.suffix == ".py" and p.name != "__init__.py"]
    entries += [p for p in pkg.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    entries += [p for p in (pkg / "targets").iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()]
    missing = [str(p.relative_to(pkg)) for p in entries if (p.name + ("/" if p.is_dir() else "")) not in section]
    assert not missing, f"docs/architecture.md's map does not name: {missing}"
