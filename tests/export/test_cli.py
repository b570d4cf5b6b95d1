"""asym-export on the command line: exit codes and one-line errors, never a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest
from cli_lines import said
from export_stubs import tensorrt_without_instance_norm

from asym_export.cli import UNCHANGED, main
from asym_export.onnx_export import ExportError
from asym_runtime.manifest import generation_folder as gen


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "asym_export.cli", *args], capture_output=True,
                          text=True, env=env, timeout=600)


def _one_line_error(r, code, *needles):
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr
    errors = said(r.stderr)  # everything on stderr but progress lines: exactly one line
    assert len(errors) == 1, r.stderr
    assert errors[0].startswith("asym-export: error: "), errors[0]
    for n in needles:
        assert n in errors[0], errors[0]


def test_help_explains_the_tool():
    r = _run("--help")
    assert r.returncode == 0
    for s in ("--variant", "--weights", "--random-weights", "--out", "exit codes", "manifest.json"):
        assert s in r.stdout


def test_tiny_export_end_to_end(tmp_path):
    r = _run("--variant", "tiny", "--random-weights", "--seed", "1", "--out", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    assert "decoder.onnx" in r.stdout and "onnx_fp32" in r.stdout and "PSNR" in r.stdout
    assert "[2] export encoder.onnx" in r.stderr  # progress on the long steps
    assert (tmp_path / "a" / "manifest.json").is_file()


@pytest.mark.parametrize("args, needles", [
    (["--variant", "x3"], ["unknown variant 'x3'", "x1.5, x2"]),
    (["--variant", "x2", "--weights", "/no/such/folder"], ["no such folder"]),
    (["--variant", "tiny", "--random-weights", "--verify-shapes", "1x60x64"], ["height 60", "multiples of 8"]),
    (["--variant", "tiny", "--random-weights", "--verify-shapes", "64x64"], ["BxHxW"]),
    (["--variant", "tiny", "--random-weights", "--max-size", "1020"], ["1020", "multiples of 8"]),
    (["--variant", "tiny", "--random-weights", "--min-size", "1024", "--max-size", "512"], ["min <= opt <= max"]),
    (["--variant", "tiny", "--random-weights", "--max-batch", "0"], ["batch"]),
    (["--variant", "tiny", "--random-weights", "--verify-shapes", "5x64x64"], ["--verify-shapes 5x64x64", "batch 5"]),
    (["--variant", "tiny", "--random-weights", "--min-size", "128", "--verify-shapes", "1x64x96"],
     ["--verify-shapes 1x64x96", "height 64"]),
    # an empty list verified the export shape only; inf passed the checks and failed after the
    # whole export, writing the manifest (JSON has no Infinity)
    (["--variant", "tiny", "--random-weights", "--verify-shapes", ","], ["--verify-shapes ','", "names no shape"]),
    (["--variant", "tiny", "--random-weights", "--atol", "inf"], ["--atol inf", "finite"]),
    (["--variant", "tiny", "--random-weights", "--fp16-headroom", "inf"], ["--fp16-headroom inf", "finite"]),
    (["--variant", "tiny", "--random-weights", "--engines", "--workspace-gib", "inf"], ["--workspace-gib inf", "finite"]),
])
def test_bad_arguments_exit_2(tmp_path, args, needles, capsys):
    code = main([*args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    for n in needles:
        assert n in err


def test_missing_required_argument(capsys):
    assert main(["--variant", "x2"]) == 2  # main() returns argparse's code, it does not raise it
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out" in err


def test_wrong_config_exit_2(tmp_path, tiny_vae):
    tiny_vae.save_pretrained(tmp_path / "w")
    r = _run("--variant", "x2", "--weights", str(tmp_path / "w"), "--out", str(tmp_path / "o"))
    _one_line_error(r, 2, "does not match variant x2")


def test_unwritable_out_exit_2(tmp_path):
    (tmp_path / "f").write_text("")
    r = _run("--variant", "tiny", "--random-weights", "--out", str(tmp_path / "f" / "o"))
    _one_line_error(r, 2, "--out", "cannot create")


def test_offline_hub_exit_2(tmp_path):
    import os

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_CACHE", None)
    r = _run("--variant", "x2", "--out", str(tmp_path / "o"), env=env)
    _one_line_error(r, 2, "--weights", "--random-weights")


def test_local_weights_folder_end_to_end(tmp_path, tiny_vae, reuse_onnx_exports):
    tiny_vae.save_pretrained(tmp_path / "w")
    assert main(["--variant", "tiny", "--weights", str(tmp_path / "w"), "--no-cuda-form",
                 "--out", str(tmp_path / "o")]) == 0
    import json

    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["weights"]["source"] == "local"
    assert set(m["weights"]["files"]) == {"diffusion_pytorch_model.safetensors"}


def test_default_verify_shapes_stay_inside_the_limits():
    from asym_export.export import DEFAULT_VERIFY_SHAPES, default_verify_shapes
    from asym_runtime.specs import Shape, ShapeLimits

    assert default_verify_shapes(ShapeLimits()) == DEFAULT_VERIFY_SHAPES
    big = ShapeLimits.from_sizes("256x384", "512", "1024", min_batch=1, opt_batch=1, max_batch=2)
    assert default_verify_shapes(big) == (Shape(1, 256, 384), Shape(2, 256, 416))
    one = ShapeLimits.from_sizes("512", "512", "512", min_batch=1, opt_batch=1, max_batch=1)
    assert default_verify_shapes(one) == (Shape(1, 512, 512),)
    for limits in (big, one):
        assert all(limits.contains(s) for s in default_verify_shapes(limits))


# ----------------------------------------------------------------------- paths through main()

def _stderr_lines(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    import asym_export.export as ex

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(ex, "export_artifact", boom)
    argv = ["--variant", "tiny", "--random-weights", "--out", str(tmp_path / "o")]
    assert main(argv) == 1
    assert _stderr_lines(capsys) == [
        "asym-export: unexpected error: RuntimeError: boom (rerun with --debug for the traceback)"]
    with pytest.raises(RuntimeError, match="boom"):
        main(argv + ["--debug"])


@pytest.mark.parametrize("argv, code, needle", [
    (["--variant", "x3", "--random-weights", "--out", "o"], 2, "unknown variant 'x3'"),
    (["--variant", "tiny", "--random-weights", "--atol", "0", "--out", "o"], 2, "--atol 0.0 must be a positive"),
    (["--variant", "tiny", "--random-weights", "--fp16-headroom", "0.5", "--out", "o"], 2, "--fp16-headroom 0.5"),
    (["--variant", "tiny", "--random-weights", "--seed", "-1", "--out", "o"], 2, "--seed -1 must be >= 0"),
    # past torch's 64 bits the seed failed after the folder was locked, as an unexpected error
    (["--variant", "tiny", "--random-weights", "--seed", str(2**64), "--out", "o"], 2, "< 2**64"),
    # flags the chosen weights or outputs would ignore: the run would not be the one asked for
    (["--variant", "tiny", "--weights", "w", "--seed", "3", "--out", "o"], 2, "--seed applies to --random-weights only"),
    (["--variant", "tiny", "--random-weights", "--revision", "main", "--out", "o"], 2,
     "--revision applies to hub weights"),
    (["--variant", "tiny", "--random-weights", "--allow-pickle", "--out", "o"], 2, "--allow-pickle applies to weight"),
    (["--variant", "tiny", "--random-weights", "--no-fp16", "--fp16-headroom", "2", "--out", "o"], 2,
     "--fp16-headroom applies to the FP16 graphs"),
    (["--variant", "tiny", "--random-weights", "--opt-level", "3", "--out", "o"], 2, "--opt-level"),
])
def test_bad_options_are_one_line_exit_2(tmp_path, monkeypatch, capsys, argv, code, needle):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == code
    err = _stderr_lines(capsys)
    assert len(err) == 1 and err[0].startswith("asym-export: error: ") and needle in err[0], err


def test_a_graph_tensorrt_cannot_take_is_exit_1_with_every_problem_and_nothing_published(
        tiny_artifact, tmp_path, monkeypatch, capsys):
    import onnx

    from asym_runtime.specs import GRAPHS

    tensorrt_without_instance_norm(monkeypatch, tiny_artifact)
    out = tmp_path / "o"
    assert main(["--variant", "tiny", "--random-weights", "--verify-shapes", "1x64x64", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    # one problem per InstanceNormalization node of the graphs the check reads (the FP16 ones)
    nodes = {g.name: sum(n.op_type == "InstanceNormalization" for n in onnx.load(
        str(gen(tiny_artifact) / g.file_name("fp16")), load_external_data=False).graph.node) for g in GRAPHS.values()}
    lines = said(err)
    assert lines[0] == "asym-export: TensorRT readiness check failed:"
    assert len(lines) == 1 + sum(nodes.values()) + 1, err
    for name, count in nodes.items():
        assert sum(ln.startswith(f"  {name}: node ") and "InstanceNormalization is marked unsupported" in ln
                   for ln in lines) == count
    assert lines[-1] == UNCHANGED and "Traceback" not in err
    assert [p.name for p in out.iterdir()] == [".lock"]


def test_an_export_error_is_exit_1_one_line_and_debug_shows_it(tmp_path, monkeypatch, capsys):
    import asym_export.export as ex

    def broken(vae, graph, path, **kw):
        raise ExportError(f"{graph.name}: exported graph breaks the contract: output 'sample' has rank 3")

    monkeypatch.setattr(ex, "onnx_from_model", broken)
    argv = ["--variant", "tiny", "--random-weights", "--out", str(tmp_path / "o")]
    assert main(argv) == 1
    assert said(capsys.readouterr().err) == [
        "asym-export: export failed: encoder: exported graph breaks the contract: output 'sample' has rank 3"]
    with pytest.raises(ExportError, match="rank 3"):
        main(argv + ["--debug"])
    assert [p.name for p in (tmp_path / "o").iterdir()] == [".lock"]


def test_every_option_reaches_the_export_as_given():
    """What the command line becomes (asym_export.cli._options): each flag lands in its field,
    and the defaults are the documented ones. The end-to-end tests run with defaults, so a flag
    dropped on the way (say --opt-batch, --revision or --no-cuda-form) would pass them."""
    from asym_export.cli import _options, build_parser
    from asym_export.engines import EngineOptions
    from asym_export.export import ExportOptions
    from asym_runtime.specs import Shape, ShapeLimits

    def options(*argv):
        return _options(build_parser().parse_args(["--out", "o", *argv]))

    assert options("--variant", "x2") == ExportOptions(variant="x2", out=Path("o"))  # the documented defaults
    got = options("--variant", "x1.5", "--weights", "org/vae", "--revision", "abc123", "--allow-pickle",
                  "--min-size", "128x64", "--opt-size", "256", "--max-size", "512x768", "--max-batch", "3",
                  "--opt-batch", "2", "--verify-shapes", "1x128x64, 3x512x768", "--atol", "2e-3",
                  "--no-fp16", "--no-cuda-form", "--engines", "--opt-level", "5",
                  "--workspace-gib", "6", "--version-compatible", "--hardware-compat", "ampere_plus")
    assert got == ExportOptions(
        variant="x1.5", out=Path("o"), weights="org/vae", revision="abc123", allow_pickle=True,
        limits=ShapeLimits(min_batch=1, opt_batch=2, max_batch=3, min_height=128, min_width=64, opt_height=256,
                           opt_width=256, max_height=512, max_width=768),
        verify_shapes=(Shape(1, 128, 64), Shape(3, 512, 768)), fp32_max_abs=2e-3, fp16=False,
        cuda_form=False,
        engine=EngineOptions(opt_level=5, workspace_gib=6.0, version_compatible=True, hardware_compat="ampere_plus"))
    seeded = options("--variant", "tiny", "--random-weights", "--seed", "7", "--engines", "--fp16-headroom", "8")
    assert (seeded.random_weights, seeded.seed, seeded.weights, seeded.fp16_headroom) == (True, 7, None, 8.0)
    assert seeded.engine == EngineOptions()  # --engines alone: level 3, TensorRT's workspace, this GPU only
