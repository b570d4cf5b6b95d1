"""asym-bench runs end to end and its numbers are well-formed (no timed assertions: speed is
what the benchmark reports, not what the tests check)."""

import json
import math

import pytest

from asym_export.bench import main
from asym_export.bench_contenders import Contender
from asym_export.bench_flops import graph_tflop
from asym_export.bench_measure import measure
from asym_runtime.specs import Shape

# what a machine without a GPU refuses (on a GPU these arguments start a real run)
no_gpu = pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="refusals of a machine without a GPU")


def test_bench_end_to_end_on_tiny(tiny_artifact, tmp_path, capsys):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "plots" / "bench.png"  # a folder to make
    code = main(["--variant", "tiny", "--artifact", str(tiny_artifact), "--sizes", "64,64x96",
                 "--batches", "1,2", "--warmup", "0", "--repeats", "2", "--json", str(out_json),
                 "--plot", str(out_png)])
    assert code == 0
    text = capsys.readouterr().out
    assert "x ref" in text and "onnxruntime-cpu/fp32" in text and "diffusers/fp32" in text
    r = json.loads(out_json.read_text())
    assert r["reference"] == "diffusers/fp32" and r["settings"]["interleaved"] is True
    assert r["machine"]["measured_peak_tflops"] > 0
    names = [b["name"] for b in r["backends"]]
    from asym_runtime.backends.openvino import bf16_reason

    bf16 = ["openvino/bf16", "diffusers/bf16"] if bf16_reason() is None else []  # where OpenVINO computes BF16
    assert sorted(names) == sorted(["diffusers/fp32", "onnxruntime-cpu/fp32", "onnxruntime-cpu/fp16", "openvino/fp32"] + bf16)
    assert all(b["load_s"] > 0 for b in r["backends"])
    assert {b["device"] for b in r["backends"]} == {"cpu"}  # OpenVINO was reported as "cuda" once
    graphs, shapes = {"encode", "decode", "decode_uncond"}, {"1x64x64", "1x64x96", "2x64x64", "2x64x96"}
    assert {(x["graph"], x["shape"], x["backend"]) for x in r["rows"]} == {
        (g, s, b) for g in graphs for s in shapes for b in names}
    for x in r["rows"]:
        assert len(x["times_s"]) == 2 and all(t > 0 for t in x["times_s"])
        assert x["median_s"] > 0 and x["p90_s"] >= min(x["times_s"]) and x["first_call_s"] > 0
        assert math.isclose(x["images_per_s"], x["batch"] / x["median_s"])
        assert x["tflop"] > 0 and math.isclose(x["tflops"], x["tflop"] / x["median_s"])
        assert 0 < x["peak_share"]
        ref = next(y for y in r["rows"] if (y["graph"], y["shape"], y["backend"]) ==
                   (x["graph"], x["shape"], "diffusers/fp32"))
        assert math.isclose(x["ratio_vs_reference"], ref["median_s"] / x["median_s"])
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bf16_contenders_are_compared_with_torch_bf16(tiny_artifact, tmp_path, capsys):
    """The CPU BF16 target is against torch's own BF16: every row says how it compares with
    diffusers/bf16 of the same round (diffusers/bf16 runs on any CPU, slowly without BF16 units)."""
    out_json = tmp_path / "bench.json"
    assert main(["--variant", "tiny", "--artifact", str(tiny_artifact), "--sizes", "64", "--warmup", "0",
                 "--repeats", "1", "--backends", "onnxruntime-cpu/fp32,diffusers/bf16", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "x torch bf16" in text and "x torch bf16 = diffusers/bf16 median / backend median" in text
    rows = json.loads(out_json.read_text())["rows"]
    for x in rows:
        bf16 = next(y for y in rows if (y["graph"], y["shape"], y["backend"]) == (x["graph"], x["shape"], "diffusers/bf16"))
        assert math.isclose(x["ratio_vs_torch_bf16"], bf16["median_s"] / x["median_s"])


def test_default_contenders_are_what_the_folder_offers(tiny_artifact, copy_artifact, tmp_path, capsys):
    """A folder without FP16 graphs (asym-export --no-fp16) is benchmarked with the defaults it
    can run, saying what it left out; before, the default onnxruntime-cpu/fp16 made the whole
    run exit 2 as if the folder were unusable. A contender named with --backends that the folder
    cannot run is still refused."""
    from manifest_edits import edit_manifest

    folder = copy_artifact(tiny_artifact)

    def fp32_only(d):
        for name in [k for k, e in d["files"].items() if e.get("precision") == "fp16"]:
            del d["files"][name]

    edit_manifest(folder, fp32_only)
    out_json = tmp_path / "bench.json"
    common = ["--variant", "tiny", "--artifact", str(folder), "--sizes", "64", "--graphs", "decode",
              "--warmup", "0", "--repeats", "1"]
    assert main([*common, "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert f"asym-bench: {folder} has no graphs or engines for onnxruntime-cpu/fp16" in text
    names = {b["name"] for b in json.loads(out_json.read_text())["backends"]}
    assert "onnxruntime-cpu/fp32" in names and not any(n.endswith("/fp16") for n in names), names
    assert main([*common, "--backends", "onnxruntime-cpu/fp16"]) == 2
    assert "has no fp16" in capsys.readouterr().err


def test_shapes_outside_the_limits_are_skipped_not_run(tiny_artifact, capsys):
    assert main(["--variant", "tiny", "--artifact", str(tiny_artifact), "--sizes", "32,64", "--graphs", "decode",
                 "--repeats", "1", "--backends", "onnxruntime-cpu/fp32"]) == 0
    out = capsys.readouterr().out
    assert "skipped decode 1x32x32: outside the shape limits (batch 1/1/4, size 64x64" in out
    assert "skipped decode 1x64x64" not in out


def test_nothing_inside_the_limits_is_refused_before_loading(tiny_artifact, capsys):
    """Every timing would be skipped: it used to load every backend, print an empty table and exit 0."""
    assert main(["--variant", "tiny", "--artifact", str(tiny_artifact), "--sizes", "2048",
                 "--backends", "onnxruntime-cpu/fp32"]) == 2
    captured = capsys.readouterr()
    assert "no batch x size asked for lies inside" in captured.err and "1024x1024" in captured.err
    assert "loading" not in captured.out
    assert main(["--variant", "tiny", "--artifact", str(tiny_artifact), "--sizes", "64", "--batches", "9",
                 "--backends", "onnxruntime-cpu/fp32"]) == 2
    # without --artifact: refused before the implicit export, against the limits it would have
    assert main(["--variant", "tiny", "--sizes", "2048", "--backends", "onnxruntime-cpu/fp32"]) == 2
    captured = capsys.readouterr()
    assert "the export made without --artifact" in captured.err and "exporting" not in captured.out


def test_a_failing_implicit_export_is_an_error_not_a_traceback(monkeypatch, capsys):
    import asym_export.wrappers as w

    orig = w.EncoderWrapper.forward
    monkeypatch.setattr(w.EncoderWrapper, "forward", lambda self, image: tuple(t + 1 for t in orig(self, image)))
    assert main(["--variant", "tiny", "--sizes", "64", "--repeats", "1", "--backends", "onnxruntime-cpu/fp32"]) == 1
    err = capsys.readouterr().err
    assert "asym-bench: error: onnx_fp32 verification failed" in err and "latent_mean: max abs" in err


def test_results_that_cannot_be_written_are_refused_before_measuring(tiny_artifact, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    common = ["--variant", "tiny", "--artifact", str(tiny_artifact), "--sizes", "64", "--graphs", "encode",
              "--repeats", "1", "--backends", "onnxruntime-cpu/fp32"]
    assert main([*common, "--json", str(tmp_path / "a-file" / "b.json")]) == 2  # its folder is a file
    captured = capsys.readouterr()
    assert "--json" in captured.err and "is a file, not a folder" in captured.err
    assert "loading" not in captured.out  # refused before any backend loaded
    assert main([*common, "--plot", str(tmp_path)]) == 2
    assert "--plot" in capsys.readouterr().err
    assert (tmp_path / "a-file").read_text() == ""


@pytest.mark.parametrize("argv, msg", [
    (["--variant", "x3"], "invalid choice: 'x3'"),
    (["--graphs", "decode,foo"], "unknown foo"),
    (["--sizes", "100"], "multiples of 8"),
    (["--backends", "ort-tpu-fp32"], "unknown ort-tpu-fp32"),
    (["--backends", "onnxruntime-cpu/bf16"], "unknown onnxruntime-cpu/bf16"),
    (["--reference", "onnxruntime-cpu/fp32"], "unknown onnxruntime-cpu/fp32"),
    (["--batches", "x"], "--batches 'x': comma-separated integers"),
    (["--batches", ","], "--batches: empty list"),
    pytest.param(["--reference", "diffusers/fp16"], "needs a GPU", marks=no_gpu),
    pytest.param(["--backends", "onnxruntime-cuda/fp16/cudagraph,torch-compile/fp16"], "need a GPU", marks=no_gpu),
    pytest.param(["--backends", "tensorrt"], "need a GPU", marks=no_gpu),
])
def test_bad_arguments_exit_2(argv, msg, capsys):
    assert main(argv) == 2
    assert msg in capsys.readouterr().err


def test_flop_counts_match_the_published_figures():
    # docs/contracts.md: x2 conditional decode at 512x512 is 18.4 TFLOP, the plain decode 16.0, encode 1.1
    s512 = Shape(1, 512, 512)
    assert graph_tflop("x2", "decode", s512, exported=False) == pytest.approx(18.4, abs=0.05)
    assert graph_tflop("x2", "decode_uncond", s512, exported=False) == pytest.approx(16.0, abs=0.05)
    assert graph_tflop("x2", "encode", s512, exported=False) == pytest.approx(1.1, abs=0.05)
    assert graph_tflop("x1.5", "decode", s512, exported=False) == pytest.approx(8.1, abs=0.05)
    assert graph_tflop("x2", "decode", Shape(2, 512, 512), exported=False) == pytest.approx(2 * 18.424, rel=1e-3)


def test_exported_graphs_need_fewer_flops():
    # x2 upsampler convs at 512x512 output: 1024ch 64->128, 1024ch 128->256, 512ch 256->512
    s512 = Shape(1, 512, 512)
    upsamplers = 2 * 9 * (128**2 * 1024**2 + 256**2 * 1024**2 + 512**2 * 512**2) / 1e12
    saved = upsamplers * (1 - 16 / 36)  # sub-pixel: 4 taps of 2x2 per phase instead of 9 per pixel
    for graph in ("decode", "decode_uncond"):
        assert graph_tflop("x2", graph, s512, exported=False) - graph_tflop("x2", graph, s512) == \
            pytest.approx(saved, rel=1e-6)
    assert graph_tflop("x2", "encode", s512) == graph_tflop("x2", "encode", s512, exported=False)


def test_rounds_are_interleaved_and_rotated():
    calls = []
    bs = [Contender(n, "cpu", calls={"g": (lambda feed, n=n: calls.append(n))}) for n in "abc"]
    res = measure(bs, "g", Shape(1, 8, 8), {}, warmup=1, repeats=3)
    timed = calls[6:]  # first call + 1 warm-up per backend come first
    assert timed == list("abc" "bca" "cab")
    assert all(len(ts) == 3 for _, ts in res.values())


@no_gpu
def test_earlier_names_are_accepted_with_a_note_and_printed_in_the_one_scheme(capsys):
    # an old name maps to today's before anything runs; the refusal then names today's name
    assert main(["--backends", "ort-cuda-fp16-cudagraph"]) == 2
    err = capsys.readouterr().err
    assert "note: --backends ort-cuda-fp16-cudagraph is now written onnxruntime-cuda/fp16/cudagraph" in err
    assert "asym-bench: error: --backends onnxruntime-cuda/fp16/cudagraph: need a GPU" in err


def test_every_contender_name_is_the_runtimes_scheme():
    from asym_export.bench_contenders import OLD_NAMES, RUNTIME_CONTENDERS, TORCH_CONTENDERS, parse_contender
    from asym_runtime.names import BACKENDS

    for text in RUNTIME_CONTENDERS + TORCH_CONTENDERS:
        name = parse_contender(text)
        assert str(name) == text
        assert name.backend in BACKENDS or text in TORCH_CONTENDERS
    assert set(OLD_NAMES.values()) <= set(RUNTIME_CONTENDERS + TORCH_CONTENDERS)


@pytest.mark.parametrize("support, verdict", [("units", "OpenVINO BF16: yes"),
                                              ("emulated", "OpenVINO BF16: emulated, slower than FP32"),
                                              ("none", "OpenVINO BF16: no")])
def test_the_cpu_line_says_how_openvino_computes_bf16(monkeypatch, support, verdict):
    """The report's CPU line tells a CPU with BF16 units from one where OpenVINO emulates BF16
    (AVX-512 without units: BF16 contenders run, slowly) and from one where it cannot."""
    ov = pytest.importorskip("asym_runtime.backends.openvino")
    if ov.unavailable_reason() is not None:
        pytest.skip(ov.unavailable_reason())
    from asym_export.bench_machine import device_name

    monkeypatch.setattr(ov, "bf16_support", lambda: support)
    line = device_name("cpu")
    if "logical CPUs (" not in line:
        pytest.skip("no /proc/cpuinfo flags on this machine")
    assert line.endswith(f"; {verdict})"), line
