"""The artifact folder: complete manifest, hashes, atomic publishing, failures leave nothing loadable."""

import json
import math

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
    on_disk = {p.relative_to(tiny_artifact).as_posix() for p in tiny_artifact.rglob("*") if p.is_file()}
    assert on_disk == set(m.files) | {"manifest.json"}  # nothing staged or temporary left behind
    for name, e in m.files.items():
        assert e.sha256 == sha256_file(tiny_artifact / name)
        assert e.size == (tiny_artifact / name).stat().st_size
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
    assert list(out.iterdir()) == []  # nothing published, staging removed


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
    assert err[-1] == "no manifest was written; the folder is not loadable."
    assert sum(ln.startswith("asym-export:") for ln in err) == 1
    assert list(out.iterdir()) == []


def test_reexport_removes_the_old_manifest_first(tmp_path, copy_artifact, tiny_artifact, monkeypatch):
    folder = copy_artifact(tiny_artifact)
    import asym_export.export as ex

    def fail(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(ex, "onnx_from_model", fail)
    with pytest.raises(RuntimeError):
        export_artifact(ExportOptions(variant="tiny", out=folder, random_weights=True))
    assert not (folder / "manifest.json").exists()  # old files may remain; nothing claims them
    assert not [p for p in folder.iterdir() if p.name.startswith(".staging-")]


def test_out_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputDirError, match="exists and is not a folder"):
        ArtifactWriter(blocker).open()
    with pytest.raises(OutputDirError, match="cannot create"):
        ArtifactWriter(blocker / "sub").open()


def test_manifest_is_written_last_and_readable(tmp_path):
    w = ArtifactWriter(tmp_path / "a")
    with w:
        p = w.stage_path("x.bin")
        p.write_bytes(b"abc")
        assert not (tmp_path / "a" / "x.bin").exists()  # staged, not yet published
        w.publish("x.bin", role="test", fmt="raw", precision=None)
        assert not (tmp_path / "a" / "manifest.json").exists()
        w.write_manifest({"variant": "tiny"})
    data = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert data["files"]["x.bin"]["size"] == 3
    assert (tmp_path / "a" / "manifest.json").stat().st_mode & 0o044  # readable by others
