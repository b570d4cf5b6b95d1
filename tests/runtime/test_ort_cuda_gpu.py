"""ONNX Runtime's CUDA provider on a GPU: the CUDA form's kernels against the portable graphs and
the reference, CUDA graphs, torch tensors. Skips itself without onnxruntime-gpu and a GPU (no
mock stands in for either); ``scripts/gpu_check.py`` runs the same paths on x2.

Every output is held to the artifact's contract against diffusers' FP32 decode of the same
input: max abs 1e-3 for FP32 graphs, PSNR >= 50 dB (and finite) for FP16 graphs. FP16 outputs
are never held to each other with a fixed bound, because two FP16 results of the same request
are not the same numbers on ONNX Runtime's GPU: its GroupNorm / SkipGroupNorm kernel adds each
group's partial sums with float atomics, in whatever order the blocks finish (ONNX Runtime says
so itself: "GroupNorm has no deterministic CUDA kernel" under deterministic compute), and a
capturing session runs other kernels (no fused conv bias). A different rounding of one FP16
activation can move an output pixel by as much as FP16 itself does: on the tiny VAE the export's
emulated FP16 CUDA form is 67-68 dB from FP32 with single pixels up to 2.7e-2 away. A request
that picked up another call's input or buffer, or a replay of stale inputs, is far outside the
contract (another input's decode is 8.5 dB from this one's reference on the tiny VAE)."""

from __future__ import annotations

import numpy as np
import pytest
from runtime_helpers import diffusers_decode, feed, race

import asym_runtime
from asym_export.verify import FP16_TOLERANCE, Tolerance, output_stats
from asym_runtime.backends.onnxrt import cuda_provider_available
from asym_runtime.specs import DECODER, Shape


def _gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return cuda_provider_available() and torch.cuda.is_available()


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _gpu(), reason="needs onnxruntime-gpu and a CUDA GPU")]

#: the export's own tolerances per graph precision (max abs 1e-3; PSNR >= 50 dB for images)
TOLERANCE = {"fp32": Tolerance(), "fp16": FP16_TOLERANCE}


def _contract_failure(out, ref, precision: str) -> str | None:
    """Why ``out`` breaks the contract against the FP32 reference ``ref``, or None: the
    export's verification judges it (asym_export.verify)."""
    out = np.asarray(out.cpu().numpy() if hasattr(out, "cpu") else out, dtype=np.float32)
    if out.shape != ref.shape:
        return f"shape {out.shape}, expected {ref.shape}"
    s = output_stats("sample", ref, out, DECODER.tensor("sample").value_range)
    failures = TOLERANCE[precision].failures(s)
    return f"{'; '.join(failures)} (max abs {s.max_abs:.3g}, PSNR {s.psnr_db:.1f} dB)" if failures else None


def _assert_contract(out, ref, precision: str, what: str) -> None:
    why = _contract_failure(out, ref, precision)
    assert why is None, f"{what}: {why}"


def _decode(rt, f):
    return rt.decode(f["latent"], image=f["image"], mask=f["mask"])


def _reference(vae, f):
    return diffusers_decode(vae, f["latent"], image=f["image"], mask=f["mask"])


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_form_matches_the_reference_and_the_portable_graph(tiny_artifact, tiny_vae, precision):
    f = feed("decoder", Shape(2, 64, 96), seed=3)
    ref = _reference(tiny_vae, f)
    failures = []
    for form in ("cuda", "portable"):  # both forms are run and reported before the verdict
        with asym_runtime.load(tiny_artifact, backend="onnxruntime-cuda", precision=precision,
                               graph_form=form) as rt:
            assert rt.graph_form == form
            why = _contract_failure(_decode(rt, f), ref, precision)
        if why:
            failures.append(f"{form} form: {why}")
    assert not failures, "; ".join(failures)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_graph_replays_new_inputs_and_other_shapes_still_run(tiny_artifact, tiny_vae, precision):
    """Two inputs of the captured shape, alternated (a replay that kept the first call's input
    would give the first decode again), another shape in between (the ordinary session), and
    back."""
    f = feed("decoder", Shape(1, 64, 64), seed=4)
    f2 = feed("decoder", Shape(1, 64, 64), seed=9)
    g = feed("decoder", Shape(2, 96, 64), seed=5)
    refs = {"f": _reference(tiny_vae, f), "f2": _reference(tiny_vae, f2), "g": _reference(tiny_vae, g)}
    order = ["f", "f", "f2", "f", "g", "f2", "f"]
    feeds = {"f": f, "f2": f2, "g": g}
    with asym_runtime.load(tiny_artifact, backend="onnxruntime-cuda", precision=precision, graphs=("decoder",),
                           cuda_graph=True) as rt:
        outs = [_decode(rt, feeds[k]) for k in order]
        assert rt.backends["decoder"].captured_shape is not None
    for i, (k, out) in enumerate(zip(order, outs)):
        _assert_contract(out, refs[k], precision, f"call {i} ({k})")


def test_torch_cuda_tensors_give_the_numpy_numbers(tiny_artifact, tiny_vae):
    import torch

    f = feed("decoder", Shape(1, 64, 64), seed=6)
    ref = _reference(tiny_vae, f)
    with asym_runtime.load(tiny_artifact, backend="onnxruntime-cuda", precision="fp16") as rt:
        want = _decode(rt, f)
        t = {k: torch.from_numpy(v).cuda() for k, v in f.items()}
        got = rt.decode(t["latent"], image=t["image"], mask=t["mask"])
        assert got.is_cuda
        plain = rt.decode(t["latent"])
        assert plain.shape == (1, 3, 64, 64)
    _assert_contract(want, ref, "fp16", "numpy call")
    _assert_contract(got, ref, "fp16", "torch CUDA call")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["plain", "cuda-graph"])
def test_each_input_kind_gets_its_own_kind_back(tiny_artifact, tiny_vae, cuda_graph, precision):
    """numpy in, numpy out; CPU tensors in, CPU tensors out; CUDA tensors in, CUDA tensors out:
    on the captured shape (bound buffers, replayed) and on another one (the ordinary session)."""
    import torch

    feeds = [feed("decoder", Shape(1, 64, 64), seed=7), feed("decoder", Shape(2, 64, 96), seed=8)]
    refs = [_reference(tiny_vae, f) for f in feeds]
    with asym_runtime.load(tiny_artifact, backend="onnxruntime-cuda", precision=precision, graphs=("decoder",),
                           cuda_graph=cuda_graph) as rt:
        for n, (f, ref) in enumerate(zip(feeds * 2, refs * 2)):  # the first shape is the captured one
            want = _decode(rt, f)
            assert isinstance(want, np.ndarray)
            _assert_contract(want, ref, precision, f"numpy, call {n}")
            for device in ("cpu", "cuda"):
                t = {k: torch.from_numpy(v).to(device) for k, v in f.items()}
                got = rt.decode(t["latent"], image=t["image"], mask=t["mask"])
                assert isinstance(got, torch.Tensor) and got.device.type == device, (type(got), device)
                _assert_contract(got, ref, precision, f"{device} tensors, call {n}")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["plain", "cuda-graph"])
def test_threads_give_serial_results(tiny_artifact, tiny_vae, cuda_graph, precision):
    """Per-call IO binding (plain) and, with cuda_graph=True, every call behind the backend's
    lock (the first call's shape is captured into bound buffers, the others run on the ordinary
    session): 4 threads released together for 25 rounds, two of them on the same call each
    round, each result within the contract of its own request's reference."""
    feeds = [feed("decoder", s, seed=40 + i) for i, s in enumerate([Shape(2, 256, 256), Shape(1, 128, 256),
                                                                    Shape(2, 256, 128)])]
    refs = [_reference(tiny_vae, f) for f in feeds]
    with asym_runtime.load(tiny_artifact, backend="onnxruntime-cuda", precision=precision, graphs=("decoder",),
                           cuda_graph=cuda_graph) as rt:
        calls = [lambda f=f: _decode(rt, f) for f in feeds]
        for i, c in enumerate(calls):  # serial first: the first call's shape is the captured one
            _assert_contract(c(), refs[i], precision, f"serial call {i}")
        if cuda_graph:
            assert rt.backends["decoder"].captured_shape is not None
        results = race(calls, threads=4, rounds=25)
    failures = []
    for (r, t), got in sorted(results.items()):
        i = (t + r) % len(calls)
        why = _contract_failure(got, refs[i], precision)
        if why:
            failures.append(f"round {r}, thread {t}, call {i}: {why}")
    assert not failures, f"{len(failures)} of {len(results)} raced results: " + "; ".join(failures[:5])


@pytest.mark.parametrize("precision, tf32", [("fp32", "0"), ("fp16", "1")])
def test_the_live_session_has_the_precisions_tf32_setting(tiny_artifact, precision, tf32):
    """What the session actually runs with, read back from ONNX Runtime: FP32 graphs never
    compute in TF32 (the 1e-3 contract; x2 at 512 breaks it with TF32), FP16 graphs keep tensor
    cores."""
    with asym_runtime.load(tiny_artifact, backend="onnxruntime-cuda", precision=precision, graphs=("decoder",)) as rt:
        opts = rt.backends["decoder"].session.get_provider_options()["CUDAExecutionProvider"]
    assert opts["use_tf32"] == tf32, opts
