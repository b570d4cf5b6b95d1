"""The TensorRT support table is rebuilt from its checked-in sources on every run, and it has
attribute rules for every operator the exported graphs use."""

import json
import shutil
import subprocess
import sys

import onnx
import pytest
from repo_files import ROOT, load_file

from asym_export.trt_readiness import support_table
from asym_runtime.manifest import generation_folder as gen
from asym_runtime.specs import GRAPHS

SCRIPT = ROOT / "scripts" / "make_trt_support.py"
mts = load_file("scripts/make_trt_support.py")


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_the_table_is_what_its_sources_build():
    r = _run("build", "--check")
    assert r.returncode == 0, r.stderr
    assert "matches its sources" in r.stdout
    built = mts.build(*mts.read_sources())
    assert built == support_table()
    assert [t["tensorrt"] for t in built["source"]["tables"]] == ["10.0", "10.15"]


def test_a_changed_source_fails_the_check(tmp_path):
    """Mutation: one data type dropped from one release's source makes the shipped file stale."""
    src = tmp_path / "src"
    shutil.copytree(mts.SOURCES, src)
    old = json.loads((src / "tensorrt-10.0.json").read_text())
    old["operators"]["Conv"]["types"].remove("FP16")
    (src / "tensorrt-10.0.json").write_text(json.dumps(old))
    r = _run("build", "--check", "--sources", src)
    assert r.returncode == 1
    assert "differs from what its sources build" in r.stderr and '"Conv"' in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    out = tmp_path / "table.json"
    assert _run("build", "--sources", src, "--out", out).returncode == 0
    assert json.loads(out.read_text())["operators"]["Conv"]["types"] == ["FP32", "BF16"]


#: A table in onnx-tensorrt's format, written for this test.
_DOC = """
TensorRT 10.99 supports operators in the inclusive range of opset 9 to opset 30. More below.

| Operator | Supported  | Supported Types | Restrictions |
|----------|------------|-----------------|--------------|
| Alpha    | Y          | FP32, FP16, INF64 |
| Beta     | N          |
| Gamma    | Y          | FP32 | `x` must be an initializer |
| Delta    | Y [EXPERIMENTAL] | FP16, BOOL |                |
"""


def test_extract_reads_a_release_table():
    src = mts.release_source(_DOC, "10.99", "https://example.invalid/ops.md", "2026-01-02")
    assert src["opset"] == [9, 30] and src["read_on"] == "2026-01-02"
    assert src["operators"] == {
        "Alpha": {"supported": True, "types": ["FP32", "FP16", "INT64"], "restricted": False},
        "Beta": {"supported": False},
        "Delta": {"supported": True, "types": ["FP16", "BOOL"], "restricted": False},
        "Gamma": {"supported": True, "types": ["FP32"], "restricted": True},
    }
    with pytest.raises(mts.SourceError, match="describes TensorRT 10.99, not 10.1"):
        mts.release_source(_DOC, "10.1", "u", "d")
    with pytest.raises(mts.SourceError, match="no 'TensorRT X supports"):
        mts.parse("| Alpha | Y | FP32 |")


def test_extract_writes_what_build_reads(tmp_path):
    doc = tmp_path / "ops.md"
    doc.write_text(_DOC)
    assert mts.main(["extract", "--doc", f"10.99={doc}=https://example.invalid/ops.md", "--sources", str(tmp_path)]) == 0
    written = (tmp_path / "tensorrt-10.99.json").read_text()
    src = json.loads(written)
    assert src["operators"] == mts.release_source(_DOC, "10.99", "u", "d")["operators"]
    assert written == mts.dump(src)  # one operator per line, as the checked-in sources
    assert sum('"Alpha": ' in line for line in written.splitlines()) == 1


def _release(version, opset, **ops):
    return {"tensorrt": version, "opset": opset, "url": f"u{version}", "read_on": "2026-01-0" + version[-1],
            "operators": {k: ({"supported": True, "types": v, "restricted": False} if v else {"supported": False})
                          for k, v in ops.items()}}


def test_build_keeps_only_what_every_release_supports():
    a = _release("10.1", [9, 20], Alpha=["FP32", "FP16"], Beta=["FP32"], Gamma=None, Only=["FP32"])
    b = _release("10.2", [11, 24], Alpha=["FP16", "FP32", "BF16"], Beta=None, Gamma=["FP32"], New=["FP32"])
    t = mts.build([b, a], {"operators": {}})  # order of the sources does not matter
    assert t["tensorrt_version"] == "10.1..10.2" and t["opset"] == {"min": 11, "max": 20}
    assert t["source"]["read_on"] == "2026-01-02"
    assert t["operators"] == {"Alpha": {"supported": True, "types": ["FP16", "FP32"]},
                              "Beta": {"supported": False}, "Gamma": {"supported": False}}


@pytest.mark.parametrize("rules, needle", [
    ({"Alpha": {"attributes": {"mode": {"allowed": ["a"], "default": "b"}}}}, "default 'b' is not allowed"),
    ({"Alpha": {"attributes": {"mode": {"allowed": ["a"], "default": "a", "any": True}}}}, "either 'allowed'"),
    ({"Alpha": {"restrictions": "x must be 1"}}, "no release.s table has"),
    ({"Beta": {"attributes": {}}}, "rules for Beta, which the table does not list as supported"),
    ({"Alpha": {"attrs": {}}}, "unknown keys"),
    ({"Alpha": {"attributes": {"mode": {"any": False}}}}, "either 'allowed'"),
], ids=["bad-default", "any-and-allowed", "restriction-not-in-table", "unsupported-op", "unknown-key", "any-false"])
def test_inconsistent_rules_fail_the_build(rules, needle):
    a = _release("10.1", [9, 20], Alpha=["FP32"], Beta=None)
    with pytest.raises(mts.SourceError, match=needle):
        mts.build([a], {"operators": rules})


def test_a_restriction_needs_our_words_whichever_release_has_it():
    """The table claims every release in its range, so an older release's restriction counts
    even when the newest lifted it (TensorRT 10.0 restricts Pad and Slice, 10.15 does not)."""
    old = _release("10.1", [9, 20], Alpha=["FP32"])
    new = _release("10.2", [9, 20], Alpha=["FP32"])
    old["operators"]["Alpha"]["restricted"] = True
    with pytest.raises(mts.SourceError, match="TensorRT 10.1 restricts Alpha; write the restriction"):
        mts.build([old, new], {"operators": {}})
    t = mts.build([old, new], {"operators": {"Alpha": {"restrictions": "x must be constant"}}})
    assert t["operators"]["Alpha"]["restrictions"] == "x must be constant"
    assert "restrictions" in support_table()["operators"]["Slice"]


def test_every_operator_the_graphs_use_has_attribute_rules(tiny_artifact):
    """Each node of every portable graph (FP32 and FP16) is of an operator with attribute rules,
    and each attribute it carries has one: nothing reaches TensorRT unread."""
    table = support_table()["operators"]
    used = {}
    for g in GRAPHS.values():
        for precision in ("fp32", "fp16"):
            model = onnx.load(str(gen(tiny_artifact) / g.file_name(precision)), load_external_data=False)
            for node in model.graph.node:
                used.setdefault(node.op_type, set()).update(a.name for a in node.attribute)
    assert {"Conv", "InstanceNormalization", "Resize", "Transpose", "Reshape", "Cast"} <= set(used)
    missing = {op: sorted(attrs - set(table[op].get("attributes", {})))
               for op, attrs in used.items() if "attributes" not in table[op] or attrs - set(table[op]["attributes"])}
    assert not missing, f"operators/attributes without rules: {missing}"
