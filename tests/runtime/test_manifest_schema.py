"""The manifest's JSON Schema is the one description of the format: the export writes against
it, the runtime reads with it, and docs/contracts.md explains exactly its fields."""

from __future__ import annotations

import re
from pathlib import Path

from asym_runtime import manifest as mf
from asym_runtime.specs import GRAPHS

DOC = Path(__file__).resolve().parents[2] / "docs" / "contracts.md"


def _doc_section() -> str:
    text = DOC.read_text()
    return text[text.index("**`manifest.json`**"):text.index("## The runtime")]


def test_the_schema_is_a_valid_draft_2020_12_schema():
    from jsonschema import Draft202012Validator

    Draft202012Validator.check_schema(mf.schema())
    assert mf.schema()["properties"]["schema_version"]["const"] == mf.SCHEMA_VERSION


def test_the_format_doc_lists_exactly_the_schema_fields():
    section = _doc_section()
    rows = re.findall(r"^\| `(\w+)` \|", section, re.M)
    assert set(rows) == set(mf.schema()["properties"]), set(rows) ^ set(mf.schema()["properties"])
    entry = mf.schema()["$defs"]["file"]["properties"]
    for field, spec in entry.items():
        assert f"`{field}`" in section, field
        for value in spec.get("enum", []):
            assert f"`{value}`" in section or value is None, (field, value)


def test_the_schema_enums_are_the_code_s_names():
    entry = mf.schema()["$defs"]["file"]["properties"]
    assert set(entry["role"]["enum"]) == set(GRAPHS) | {mf.ROLE_EXTERNAL_DATA, mf.ROLE_TIMING_CACHE}
    assert set(entry["format"]["enum"]) == {mf.FORMAT_ONNX, mf.FORMAT_ONNX_CUDA, mf.FORMAT_ONNX_DATA,
                                            mf.FORMAT_PLAN, mf.FORMAT_TIMING_CACHE}


def test_an_exported_manifest_satisfies_the_schema(tiny_artifact):
    import json

    data = json.loads((tiny_artifact / "manifest.json").read_text())
    assert mf.schema_errors(data) == []
    assert re.fullmatch(mf.schema()["properties"]["generation"]["pattern"], data["generation"])
