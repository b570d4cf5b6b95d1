"""asym-triton-repo: the model repository for Triton's native backends, checked with Triton's own
config schema (the model_config protobuf in tritonclient), the graph contract and the graphs.

Triton's onnxruntime and tensorrt backends are not installable here, so the repository is not
served in these tests; README "Serving" says what a GPU machine with Triton's container runs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

pytest.importorskip("tritonclient", reason="the serve extra is not installed (pip install -e '.[serve]')")

from asym_runtime import read_manifest  # noqa: E402
from asym_runtime.errors import ArtifactError  # noqa: E402
from asym_runtime.serving import config as tconfig  # noqa: E402
from asym_runtime.serving.cli import repo_main as main  # noqa: E402
from asym_runtime.serving.repository import RepoOptions, check_repository, write_repository  # noqa: E402
from asym_runtime.specs import GRAPHS  # noqa: E402


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_against_contract(repo: Path, manifest, want_form: str):
    from tritonclient.grpc import model_config_pb2 as mc

    models = sorted(p.name for p in repo.iterdir())
    assert models == sorted(GRAPHS), models
    for name in models:
        cfg = tconfig.parse_config((repo / name / "config.pbtxt").read_text())
        graph = GRAPHS[name]
        assert cfg.name == name and cfg.backend == "onnxruntime"
        assert cfg.max_batch_size == manifest.limits.max_batch
        assert [i.name for i in cfg.input] == graph.input_names
        assert [o.name for o in cfg.output] == graph.output_names
        for t in list(cfg.input) + list(cfg.output):
            assert t.data_type == mc.TYPE_FP32
            spec = graph.tensor(t.name)
            assert list(t.dims) == [d if isinstance(d, int) else -1 for d in spec.dims[1:]]
        assert cfg.dynamic_batching.max_queue_delay_microseconds == tconfig.DEFAULT_QUEUE_DELAY_US
        trail = json.loads((repo / name / "asym-export.json").read_text())
        assert trail["form"] == want_form and trail["generation"] == manifest.generation
        # the bytes are the manifest's: the model file and each data file
        src = manifest.files[trail["source"]]
        assert _sha(repo / name / "1" / "model.onnx") == src.sha256
        for rel, digest in trail["sha256"].items():
            assert _sha(repo / name / rel) == digest
            if rel != "1/model.onnx":
                assert digest in {e.sha256 for e in manifest.files.values()}
    assert check_repository(repo, manifest) == []


def test_tiny_repository_gpu_uses_the_cuda_form(tiny_artifact, tmp_path):
    manifest = read_manifest(tiny_artifact)
    repo = tmp_path / "repo"
    result = write_repository(tiny_artifact, repo)
    assert [m.name for m in result.models] == list(GRAPHS)
    _check_against_contract(repo, manifest, "cuda")
    cfg = tconfig.parse_config((repo / "decoder" / "config.pbtxt").read_text())
    assert cfg.parameters["cudnn_conv_algo_search"].string_value == "1"  # HEURISTIC for FP16, as the runtime
    assert cfg.instance_group[0].kind == cfg.instance_group[0].KIND_GPU
    (acc,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "cuda" and dict(acc.parameters) == {"use_tf32": "1", "fuse_conv_bias": "1"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging left behind"


def test_an_fp32_gpu_repository_turns_tf32_off(tiny_artifact, tmp_path):
    """ONNX Runtime's CUDA provider computes FP32 convolutions in TF32 unless told otherwise;
    the FP32 graphs were verified to 1e-3 without it, as the runtime runs them."""
    repo = tmp_path / "repo"
    write_repository(tiny_artifact, repo, RepoOptions(precision="fp32"))
    for graph in GRAPHS:
        cfg = tconfig.parse_config((repo / graph / "config.pbtxt").read_text())
        assert cfg.parameters["cudnn_conv_algo_search"].string_value == "0"  # EXHAUSTIVE, as the runtime
        (acc,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
        assert acc.name == "cuda" and dict(acc.parameters) == {"use_tf32": "0"}


def test_tiny_repository_cpu_fp32_portable(tiny_artifact, tmp_path):
    manifest = read_manifest(tiny_artifact)
    repo = tmp_path / "repo"
    write_repository(tiny_artifact, repo, RepoOptions(precision="fp32", kind="cpu", instances=2))
    _check_against_contract(repo, manifest, "portable")
    cfg = tconfig.parse_config((repo / "encoder" / "config.pbtxt").read_text())
    assert cfg.instance_group[0].count == 2 and "cudnn_conv_algo_search" not in cfg.parameters
    assert not cfg.optimization.execution_accelerators.gpu_execution_accelerator


def test_engines_become_tensorrt_models_on_gpu_instances_only(with_engines, tmp_path):
    """The folder's engines are copied unchanged as ``<graph>_trt`` tensorrt models with the
    engines' profile as their batch limit; a repository of CPU instances leaves them out (a
    CPU-only Triton refuses a tensorrt model) and says so. The plan bytes are not an engine
    (see tests/manifest_edits.py): what is checked is the repository, not TensorRT."""
    manifest = read_manifest(with_engines)
    said = []
    gpu = tmp_path / "gpu"
    result = write_repository(with_engines, gpu, progress=said.append)
    assert [m.name for m in result.models] == [*GRAPHS, "encoder_trt", "decoder_trt"]
    for graph in ("encoder", "decoder"):
        folder = gpu / f"{graph}_trt"
        cfg = tconfig.parse_config((folder / "config.pbtxt").read_text())
        assert cfg.backend == "tensorrt" and cfg.instance_group[0].kind == cfg.instance_group[0].KIND_GPU
        assert cfg.max_batch_size == manifest.data["engines"]["profile"]["max_batch"]
        assert (folder / "1" / "model.plan").read_bytes() == manifest.read_verified(f"engines/{graph}.plan")
    assert check_repository(gpu, manifest) == []
    assert not [m for m in said if "left out" in m]
    (line,) = [m for m in said if m.startswith("decoder_trt:")]  # the GPU the engines were built on
    assert "TensorRT 10.13.0.35, NVIDIA H100 80GB HBM3" in line, line

    said.clear()
    cpu = tmp_path / "cpu"
    result = write_repository(with_engines, cpu, RepoOptions(kind="cpu"), progress=said.append)
    assert [m.name for m in result.models] == list(GRAPHS)
    _check_against_contract(cpu, manifest, "portable")
    (note,) = [m for m in said if "left out" in m]
    assert "engines/encoder.plan" in note and "--kind gpu" in note


def test_the_tensorrt_accelerator_builds_once_for_the_shape_limits(tiny_artifact, tmp_path):
    """ONNX Runtime's TensorRT provider, left to size its optimization profile from the shapes
    it has seen, builds the engine again for every request outside them: the accelerator gets
    the folder's limits as an explicit profile (ONNX Runtime's ``name:AxBxC`` syntax), and the
    repository check holds the profile to the limits."""
    said = []
    repo = tmp_path / "repo"
    write_repository(tiny_artifact, repo, RepoOptions(form="portable", tensorrt_accelerator=True),
                     progress=said.append)
    want = {  # the tiny folder's limits: batch 1/1/4, 64x64 / 512x512 / 1024x1024, 4 latent channels
        "encoder": ("image:1x3x64x64", "image:1x3x512x512", "image:4x3x1024x1024"),
        "decoder": ("latent:1x4x8x8,image:1x3x64x64,mask:1x1x64x64",
                    "latent:1x4x64x64,image:1x3x512x512,mask:1x1x512x512",
                    "latent:4x4x128x128,image:4x3x1024x1024,mask:4x1x1024x1024"),
        "decoder_uncond": ("latent:1x4x8x8", "latent:1x4x64x64", "latent:4x4x128x128"),
    }
    for graph, (lo, opt, hi) in want.items():
        cfg = tconfig.parse_config((repo / graph / "config.pbtxt").read_text())
        trt, cuda = cfg.optimization.execution_accelerators.gpu_execution_accelerator
        assert (trt.name, cuda.name) == ("tensorrt", "cuda")  # TensorRT first, CUDA for what it leaves
        assert dict(trt.parameters) == {
            "precision_mode": "FP16", "max_workspace_size_bytes": str(4 << 30),
            "trt_profile_min_shapes": lo, "trt_profile_opt_shapes": opt, "trt_profile_max_shapes": hi}
    assert check_repository(repo, read_manifest(tiny_artifact)) == []
    assert [m for m in said if "without --tensorrt-cache" in m]

    text = (repo / "decoder" / "config.pbtxt").read_text()
    (repo / "decoder" / "config.pbtxt").write_text(text.replace("4x3x1024x1024", "4x3x2048x2048"))
    (problem,) = check_repository(repo)
    assert "decoder/config.pbtxt" in problem and "trt_profile_max_shapes" in problem


def test_the_tensorrt_cache_is_keyed_by_the_graph_files(tiny_artifact, tmp_path, capsys):
    """ONNX Runtime names a cached engine by the graph's structure, not its weights: a repository
    written again from an export with other weights at the same path would run engines built for
    the old ones. Each graph's cache folder carries the sha256 of its files."""
    repo = tmp_path / "repo"
    assert main([str(tiny_artifact), "--out", str(repo), "--form", "portable", "--tensorrt-accelerator",
                 "--tensorrt-cache", "/srv/trt-cache/"]) == 0
    said = capsys.readouterr().out.splitlines()
    paths = set()
    for graph in GRAPHS:
        cfg = tconfig.parse_config((repo / graph / "config.pbtxt").read_text())
        params = cfg.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters
        trail = json.loads((repo / graph / "asym-export.json").read_text())
        files = [trail["sha256"]["1/model.onnx"]] + [d for rel, d in trail["sha256"].items() if rel != "1/model.onnx"]
        key = hashlib.sha256("\n".join(["fp16", *files]).encode()).hexdigest()[:16]
        assert params["trt_engine_cache_enable"] == "1" and params["trt_timing_cache_enable"] == "1"
        assert params["trt_engine_cache_path"] == f"/srv/trt-cache/{graph}-fp16-{key}"
        assert params["trt_timing_cache_path"] == params["trt_engine_cache_path"]  # no file shared by graphs
        paths.add(params["trt_engine_cache_path"])
    assert len(paths) == len(GRAPHS)
    assert not [m for m in said if "without --tensorrt-cache" in m]

    from asym_runtime.serving.repository import tensorrt_parameters

    graph, limits = GRAPHS["decoder"], read_manifest(tiny_artifact).limits
    a = tensorrt_parameters(graph, limits, "fp16", ["1" * 64, "2" * 64], "/c")["trt_engine_cache_path"]
    assert a == tensorrt_parameters(graph, limits, "fp16", ["1" * 64, "2" * 64], "/c")["trt_engine_cache_path"]
    assert a != tensorrt_parameters(graph, limits, "fp16", ["1" * 64, "3" * 64], "/c")["trt_engine_cache_path"]
    assert a != tensorrt_parameters(graph, limits, "fp32", ["1" * 64, "2" * 64], "/c")["trt_engine_cache_path"]


@pytest.mark.parametrize("opts, needle", [
    (dict(tensorrt_cache="/srv/trt"), "needs --tensorrt-accelerator"),
    (dict(tensorrt_accelerator=True, form="portable", tensorrt_cache="trt-cache"), "absolute path"),
])
def test_tensorrt_cache_mistakes_are_refused(tiny_artifact, tmp_path, opts, needle, capsys):
    with pytest.raises(ValueError, match=needle):
        write_repository(tiny_artifact, tmp_path / "repo", RepoOptions(**opts))
    assert list(tmp_path.iterdir()) == []
    args = [str(tiny_artifact), "--out", str(tmp_path / "repo"), "--tensorrt-cache", opts["tensorrt_cache"]]
    if opts.get("tensorrt_accelerator"):
        args += ["--tensorrt-accelerator", "--form", "portable"]
    assert main(args) == 2
    assert needle in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("opts, needle", [
    (dict(kind="cpu", gpus=[0]), "--gpus needs --kind gpu"),
    (dict(kind="cpu", tensorrt_accelerator=True), "--tensorrt-accelerator needs --kind gpu"),
])
def test_gpu_only_options_on_cpu_instances_are_refused(tiny_artifact, tmp_path, opts, needle):
    """Triton ignores GPU ids and GPU accelerators on CPU instances: such a repository would
    silently not do what was asked, so none is written."""
    with pytest.raises(ValueError, match=needle):
        write_repository(tiny_artifact, tmp_path / "repo", RepoOptions(**opts))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_x2_repository_passes_the_schema_check(x2_artifact, tmp_path):
    manifest = read_manifest(x2_artifact)
    repo = tmp_path / "repo"
    write_repository(x2_artifact, repo, RepoOptions(tensorrt_accelerator=True))
    _check_against_contract(repo, manifest, "portable")  # the x2 fixture has no CUDA form
    cfg = tconfig.parse_config((repo / "decoder" / "config.pbtxt").read_text())
    trt, cuda = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP16"
    assert cuda.name == "cuda"  # what ONNX Runtime's TensorRT provider leaves to CUDA


def test_check_finds_what_is_wrong(tiny_artifact, tmp_path):
    repo = tmp_path / "repo"
    write_repository(tiny_artifact, repo, RepoOptions(precision="fp32", kind="cpu"))
    manifest = read_manifest(tiny_artifact)
    assert check_repository(repo, manifest) == []
    # a changed byte in a graph
    onnx_file = repo / "encoder" / "1" / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-1] ^= 1
    onnx_file.write_bytes(bytes(data))
    # dims that disagree with the contract
    cfg_file = repo / "decoder" / "config.pbtxt"
    cfg_file.write_text(cfg_file.read_text().replace("dims: 3", "dims: 4", 1))
    # a field Triton's schema does not have
    uncond = repo / "decoder_uncond" / "config.pbtxt"
    uncond.write_text(uncond.read_text() + "\nmax_batch: 4\n")
    problems = check_repository(repo, manifest)
    text = "\n".join(problems)
    assert "encoder: sha256 of 1/model.onnx differs" in text
    assert "the model file is not encoder.onnx" in text
    assert "decoder/config.pbtxt: input image has dims [4, -1, -1], expected [3, -1, -1]" in text
    assert "decoder_uncond/config.pbtxt is not a valid Triton model configuration" in text


def test_refuses_to_replace_a_foreign_folder_and_leaves_no_staging(tiny_artifact, tmp_path, capsys):
    foreign = tmp_path / "models"
    (foreign / "something").mkdir(parents=True)
    assert main([str(tiny_artifact), "--out", str(foreign), "--force"]) == 2
    assert "not a repository asym-triton-repo wrote" in capsys.readouterr().err
    assert main([str(tiny_artifact), "--out", str(tmp_path / "r"), "--form", "cuda", "--kind", "cpu"]) == 2
    assert "--kind gpu" in capsys.readouterr().err
    assert main([str(tiny_artifact), "--out", str(tmp_path / "r"), "--gpus", "first"]) == 2
    assert "--gpus 'first': comma-separated GPU ids" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"], "a failed write left files behind"
    assert main([str(tiny_artifact), "--out", str(tmp_path / "r")]) == 0
    assert main([str(tiny_artifact), "--out", str(tmp_path / "r")]) == 2  # exists, no --force
    assert main([str(tiny_artifact), "--out", str(tmp_path / "r"), "--force", "--precision", "fp32"]) == 0
    assert main(["--check", str(tmp_path / "r")]) == 0
    assert "consistent" in capsys.readouterr().out
    (tmp_path / "r" / "decoder" / "1" / "model.onnx").write_bytes(b"x")
    assert main(["--check", str(tmp_path / "r")]) == 1


def test_the_repository_is_readable_by_other_users_and_a_file_is_never_replaced(tiny_artifact, tmp_path, capsys):
    """The repository root came out 0700 (mkdtemp's mode, renamed into place), unreadable by a
    Triton running as another user; it now follows the umask like its subfolders. An --out that
    is a file with --force ended as an unexpected NotADirectoryError (exit 1)."""
    import os
    import stat

    repo = tmp_path / "repo"
    umask = os.umask(0o022)
    try:
        assert main([str(tiny_artifact), "--out", str(repo), "--kind", "cpu", "--precision", "fp32"]) == 0
    finally:
        os.umask(umask)
    assert stat.S_IMODE(repo.stat().st_mode) == 0o755
    assert stat.S_IMODE((repo / "decoder").stat().st_mode) == 0o755
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    capsys.readouterr()
    assert main([str(tiny_artifact), "--out", str(a_file), "--force"]) == 2
    assert "not a repository asym-triton-repo wrote" in capsys.readouterr().err and a_file.read_text() == "mine"


# --------------------------------------------------------------------------- refusals and the check, case by case
# (a mutation run of repository.py: 39 mutants, 19 survived the tests above; each test below fails on one)

def _drop_entries(folder: Path, keep) -> None:
    from manifest_edits import edit_manifest

    edit_manifest(folder, lambda d: d.update(files={n: e for n, e in d["files"].items() if keep(n, e)}))


@pytest.mark.parametrize("opts, error, words", [
    (RepoOptions(precision="bf16"), ValueError, "precision 'bf16': fp32 or fp16"),
    (RepoOptions(form="nhwc"), ValueError, "form 'nhwc': choose one of auto, cuda, portable"),
    (RepoOptions(tensorrt_accelerator=True), ValueError,  # auto picks the CUDA form on GPU instances
     "the TensorRT accelerator runs the portable graphs; pass --form portable with it"),
])
def test_write_refuses_options_it_cannot_honour(tiny_artifact, tmp_path, opts, error, words):
    with pytest.raises(error, match=words):
        write_repository(tiny_artifact, tmp_path / "repo", opts)
    assert not (tmp_path / "repo").exists() and not list(tmp_path.glob(".repo.staging-*"))


def test_form_cuda_on_a_folder_without_it_is_refused_not_swapped(tiny_artifact, copy_artifact, tmp_path):
    """--form cuda asks for the fused graphs; a folder exported without them must not quietly
    give the portable ones."""
    folder = copy_artifact(tiny_artifact)
    _drop_entries(folder, lambda n, e: e["format"] != "onnx_cuda")
    with pytest.raises(ArtifactError, match=r"has no fp16 CUDA-form graph for encoder"):
        write_repository(folder, tmp_path / "repo", RepoOptions(form="cuda"))
    result = write_repository(folder, tmp_path / "repo", RepoOptions(form="auto"))  # auto: the portable ones
    assert {m.source for m in result.models} == {"encoder.fp16.onnx", "decoder.fp16.onnx", "decoder_uncond.fp16.onnx"}


def test_encoder_and_decoder_are_required_the_plain_decoder_is_not(tiny_artifact, copy_artifact, tmp_path):
    folder = copy_artifact(tiny_artifact)
    _drop_entries(folder, lambda n, e: not (e["role"] == "decoder_uncond" and e.get("precision") == "fp32"))
    result = write_repository(folder, tmp_path / "r1", RepoOptions(precision="fp32", kind="cpu"))
    assert [m.name for m in result.models] == ["encoder", "decoder"]
    _drop_entries(folder, lambda n, e: not (e["role"] == "decoder" and e.get("precision") == "fp32"))
    with pytest.raises(ArtifactError, match=r"has no fp32 graph for decoder"):
        write_repository(folder, tmp_path / "r2", RepoOptions(precision="fp32", kind="cpu"))


def test_engines_can_be_left_out_and_keep_their_own_profile(with_engines, tmp_path):
    """--no-engines leaves the tensorrt models out; with them, a tensorrt model's batch limit is
    the engines' profile (they were built for it), not the folder's shape limits."""
    from manifest_edits import edit_manifest

    result = write_repository(with_engines, tmp_path / "none", RepoOptions(engines=False))
    assert [m.name for m in result.models] == list(GRAPHS)
    edit_manifest(with_engines, lambda d: d["engines"]["profile"].update(max_batch=2, opt_batch=1))
    write_repository(with_engines, tmp_path / "repo")
    cfg = tconfig.parse_config((tmp_path / "repo" / "decoder_trt" / "config.pbtxt").read_text())
    assert cfg.max_batch_size == 2
    assert tconfig.parse_config((tmp_path / "repo" / "decoder" / "config.pbtxt").read_text()).max_batch_size == 4
    assert check_repository(tmp_path / "repo", read_manifest(with_engines)) == []


def test_a_repository_failing_its_own_check_is_never_published(tiny_artifact, tmp_path, monkeypatch):
    real = tconfig.config_text
    monkeypatch.setattr(tconfig, "config_text", lambda cfg: real(cfg).replace("dims: 3", "dims: 5"))
    with pytest.raises(AssertionError, match=r"fails its own check: .*input image has dims \[5, -1, -1\]"):
        write_repository(tiny_artifact, tmp_path / "repo", RepoOptions(precision="fp32", kind="cpu"))
    assert list(tmp_path.iterdir()) == []


def test_an_empty_folder_is_not_one_of_ours_to_replace(tiny_artifact, tmp_path):
    (tmp_path / "repo").mkdir()
    with pytest.raises(FileExistsError, match="is not a repository asym-triton-repo wrote"):
        write_repository(tiny_artifact, tmp_path / "repo", RepoOptions(kind="cpu", force=True))


def _retrail(model_dir: Path, change=None) -> None:
    """Re-hash the model folder's files into its trail (what an edit by hand would need to pass
    the sha256 check), after ``change(trail)``."""
    path = model_dir / "asym-export.json"
    trail = json.loads(path.read_text())
    if change:
        change(trail)
    trail["sha256"] = {rel: _sha(model_dir / rel) for rel in trail["sha256"] if (model_dir / rel).is_file()}
    path.write_text(json.dumps(trail))


def _edit_graph(model_dir: Path, change) -> None:
    import onnx

    path = model_dir / "1" / "model.onnx"
    m = onnx.load(str(path), load_external_data=False)
    change(m)
    path.write_bytes(m.SerializeToString())
    _retrail(model_dir)


def _rank_5(m):
    m.graph.input[0].type.tensor_type.shape.dim.add().dim_value = 1


def _channels(m):
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 4


def _float16(m):
    import onnx

    m.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16


def _rename(m):
    m.graph.input[0].name = "pixels"


@pytest.mark.parametrize("change, problem", [
    (_rename, "encoder/1/model.onnx: inputs ['pixels'], the contract has ['image']"),
    (_float16, "encoder/1/model.onnx: input image is not float32"),
    (_rank_5, "encoder/1/model.onnx: input image has rank 5, the contract 4"),
    (_channels, "encoder/1/model.onnx: input image has 4 channels, the contract 3"),
], ids=["name", "dtype", "rank", "channels"])
def test_check_reads_the_graph_s_own_inputs(tiny_artifact, tmp_path, change, problem):
    repo = tmp_path / "repo"
    write_repository(tiny_artifact, repo, RepoOptions(precision="fp32", kind="cpu"))
    _edit_graph(repo / "encoder", change)
    assert check_repository(repo) == [problem]


def test_check_ignores_initializers_listed_as_graph_inputs(tiny_artifact, tmp_path):
    """Graphs of IR version < 4 list their initializers among the inputs; those are not inputs."""
    repo = tmp_path / "repo"
    write_repository(tiny_artifact, repo, RepoOptions(precision="fp32", kind="cpu"))

    def list_initializer(m):
        init = m.graph.initializer[0]
        m.graph.input.add(name=init.name).type.tensor_type.elem_type = init.data_type

    _edit_graph(repo / "encoder", list_initializer)
    assert check_repository(repo) == []


def test_check_finds_missing_foreign_and_mislabelled_files(tiny_artifact, tmp_path):
    manifest = read_manifest(tiny_artifact)
    repo = tmp_path / "repo"
    write_repository(tiny_artifact, repo, RepoOptions(precision="fp32", kind="cpu"))
    (tmp_path / "empty").mkdir()
    assert check_repository(tmp_path / "empty") == [f"{tmp_path / 'empty'} holds no model folders"]
    data = next(rel for rel in json.loads((repo / "decoder" / "asym-export.json").read_text())["sha256"]
                if rel != "1/model.onnx")
    (repo / "decoder" / data).unlink()  # missing
    other = repo / "encoder" / next(rel for rel in json.loads((repo / "encoder" / "asym-export.json").read_text())["sha256"]
                                    if rel != "1/model.onnx")
    other.write_bytes(other.read_bytes()[:-4] + b"\0\0\0\0")
    _retrail(repo / "encoder")  # consistent with its trail, but not the folder's file
    _retrail(repo / "decoder_uncond", lambda t: t.update(graph="vae"))
    cfg = repo / "decoder" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace("max_batch_size: 4", "max_batch_size: 2"))
    assert sorted(check_repository(repo, manifest)) == sorted([
        f"decoder: {data} is missing",
        "decoder/config.pbtxt: max_batch_size 2, the limits say 4",
        f"encoder: {other.relative_to(repo / 'encoder').as_posix()} is no file of {manifest.root}",
        "decoder_uncond: asym-export.json names no graph of the contract",
    ])
