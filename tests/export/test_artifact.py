"""The artifact folder: complete manifest, hashes, atomic publishing, failures leave nothing loadable."""

import json
import math
import re

import pytest

from asym_export.artifact import ArtifactWriter, OutputDirError
from asym_export.export import ExportOptions, export_artifact
from asym_export.verify import VerificationError
from asym_runtime.manifest import SCHEMA_VERSION, read_manifest, sha256_file
from asym_runtime.specs import GRAPHS, ShapeLimits


def test_manifest_describes_every_file(tiny_artifact):
    m = read_manifest(tiny_artifact)
    d = m.data
    assert d["schema_version"] == SCHEMA_VERSION and d["variant"] == "tiny"
    assert d["scaling_factor"] == 0.18215 and d["model_config"]["up_block_out_channels"] == [8, 16, 32, 32]
    assert d["weights"]["source"] == "random" and d["weights"]["seed"] == 0
    assert m.limits == ShapeLimits()
    assert {"torch", "diffusers", "onnx", "onnxruntime", "python"} <= set(d["versions"])
    # the folder: the manifest, the export lock and one generation holding exactly the listed files
    assert sorted(p.name for p in tiny_artifact.iterdir()) == sorted([".lock", "manifest.json", m.generation])
    assert re.fullmatch(r"gen-\d{8}T\d{6}Z-[0-9a-f]{8}", m.generation)
    on_disk = {p.relative_to(m.folder).as_posix() for p in m.folder.rglob("*") if p.is_file()}
    assert on_disk == set(m.files)  # nothing staged or temporary left behind
    for name, e in m.files.items():
        assert e.sha256 == sha256_file(m.path(name))
        assert e.size == m.path(name).stat().st_size
        assert e.precision == ("fp16" if ".fp16." in name else "fp32")
    for g in GRAPHS.values():
        for precision in ("fp32", "fp16"):
            assert m.files[g.file_name(precision)].role == g.name
            assert [c.name for c in m.companions(g.file_name(precision))] == [g.file_name(precision) + ".data"]
    v = d["verification"]["onnx_fp32"]
    assert v["passed"] and v["tolerance"]["max_abs"] == 1e-3
    shapes = {c["shape"] for c in v["cases"]}
    assert {"2x64x64", "1x64x96", "3x64x72"} <= shapes  # export shape + another batch + non-square
    for c in v["cases"]:
        for stats in c["outputs"].values():
            assert stats["finite"] and stats["max_abs"] <= 1e-3 and stats["psnr_db"] > 80


def test_graph_that_computes_the_wrong_thing_fails_the_export(tmp_path, monkeypatch):
    """A genuinely wrong graph (final blend dropped) is exported, caught, and never published."""
    import asym_export.wrappers as w

    orig = w.DecoderWrapper.forward

    def no_final_blend(self, latent, image=None, mask=None):
        if not self.conditional:
            return orig(self, latent)
        d = self.decoder
        sample = d.mid_block(d.conv_in(self.post_quant_conv(latent)), None)
        feats = self._condition_features((1 - mask) * image)
        for up_block, level in zip(d.up_blocks, self.block_features):
            m_ = w.F.interpolate(mask, size=sample.shape[-2:], mode="nearest")
            sample = up_block(sample * m_ + feats[level] * (1 - m_), None)
        return d.conv_out(d.conv_act(d.conv_norm_out(sample)))

    monkeypatch.setattr(w.DecoderWrapper, "forward", no_final_blend)
    out = tmp_path / "bad"
    with pytest.raises(VerificationError) as e:
        export_artifact(ExportOptions(variant="tiny", out=out, random_weights=True))
    report = e.value.report
    assert not report
    failing = [c for c in report.cases if not c]
    assert {c.graph for c in failing} == {"decoder"} and len(failing) == 3  # every shape reported
    assert all("sample: max abs" in f for c in failing for f in c.failures)
    assert all(c for c in report.cases if c.graph == "encoder")
    assert not (out / "manifest.json").exists()
    assert [p.name for p in out.iterdir()] == [".lock"]  # nothing published, staging removed


def test_nan_fails_outright_through_the_cli(tmp_path, monkeypatch, capsys):
    """NaN fails the export, and the CLI's failure path: exit 1, the verification table and two
    lines of verdict on stderr, no manifest, nothing published."""
    import asym_export.wrappers as w
    from asym_export.cli import main

    orig = w.EncoderWrapper.forward
    monkeypatch.setattr(w.EncoderWrapper, "forward",
                        lambda self, image: tuple(t * math.nan for t in orig(self, image)))
    out = tmp_path / "nan"
    assert main(["--variant", "tiny", "--random-weights", "--no-fp16", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    err = [ln for ln in captured.err.splitlines() if ln.strip()]
    rows = [ln for ln in err if ln.startswith("onnx_fp32 ")]
    # 3 shapes x (2 encoder outputs + 1 decoder output + 1 plain decoder output), encoder rows failing
    assert len(rows) == 12 and sum("NaN/Inf" in ln or "FAIL" in ln for ln in rows) == 6, err
    # after the table: the verdict, one indented line per failing case, the consequence
    verdict = next(i for i, ln in enumerate(err) if ln.startswith("asym-export:"))
    assert err[verdict].startswith("asym-export: onnx_fp32 verification failed")
    failures = err[verdict + 1:-1]
    assert len(failures) == 6 and all(ln.startswith("  encoder @ ") and "NaN/Inf" in ln for ln in failures)
    assert err[-1] == "nothing was published: the folder is as it was (its previous artifact, if any, still loads)."
    assert sum(ln.startswith("asym-export:") for ln in err) == 1
    assert [p.name for p in out.iterdir()] == [".lock"]


def test_out_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputDirError, match="exists and is not a folder"):
        ArtifactWriter(blocker).open()
    with pytest.raises(OutputDirError, match="cannot create"):
        ArtifactWriter(blocker / "sub").open()


def test_manifest_is_written_last_and_readable(tmp_path, tiny_artifact):
    src = read_manifest(tiny_artifact)
    out = tmp_path / "a"
    w = ArtifactWriter(out)
    with w:
        name = "decoder.onnx"
        w.stage_path(name).write_bytes(src.path(name).read_bytes())
        w.publish(name, role="decoder", fmt="onnx", precision="fp32")
        assert not (out / "manifest.json").exists() and not list(out.glob("gen-*"))  # staged, not yet published
        fields = {k: v for k, v in src.data.items() if k not in ("schema_version", "generation", "files")}
        w.write_manifest(fields)
        assert w.staging is None  # it became the generation
    data = json.loads((out / "manifest.json").read_text())
    assert data["files"][name]["size"] == src.files[name].size
    assert (out / "manifest.json").stat().st_mode & 0o044  # readable by others
    assert (out / data["generation"]).stat().st_mode & 0o055 == 0o055  # a folder others can list


def test_a_manifest_that_breaks_the_schema_is_never_written(tmp_path, tiny_artifact):
    """The export checks what it writes against the schema the runtime reads with: a field of the
    wrong type is a bug caught before the switch, and the folder stays as it was."""
    src = read_manifest(tiny_artifact)
    out = tmp_path / "a"
    with ArtifactWriter(out) as w:
        w.stage_path("x.bin").write_bytes(b"abc")
        w.publish("x.bin", role="test", fmt="raw", precision=None)
        fields = {k: v for k, v in src.data.items() if k not in ("schema_version", "generation", "files")}
        with pytest.raises(RuntimeError, match=r"breaks the schema: 'files/x.bin/format': 'raw' is not one of .*'files/x.bin/role': 'test'"):
            w.write_manifest(fields)
        fields["scaling_factor"] = math.inf
        with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
            w.write_manifest(fields)
    assert [p.name for p in out.iterdir()] == [".lock"]
