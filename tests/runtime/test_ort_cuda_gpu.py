"""ONNX Runtime's CUDA provider on a GPU: the CUDA form's kernels against the portable graphs and
the reference, CUDA graphs, torch tensors. Skips itself without onnxruntime-gpu and a GPU (no
mock stands in for either); ``scripts/gpu_check.py`` runs the same paths on x2."""

from __future__ import annotations

import numpy as np
import pytest
from runtime_helpers import check_race, diffusers_decode, feed, race

import asym_runtime
from asym_runtime.backends.onnxrt import cuda_provider_available
from asym_runtime.specs import Shape


def _gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return cuda_provider_available() and torch.cuda.is_available()


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _gpu(), reason="needs onnxruntime-gpu and a CUDA GPU")]

#: the export's FP32 tolerance (verify.FP32_MAX_ABS) and FP16 PSNR floor (verify.FP16_MIN_PSNR_DB)
FP32_ATOL, FP16_MIN_PSNR = 1e-3, 50.0


def _psnr(ref, out, peak=2.0):
    return 10 * np.log10(peak * peak / np.mean((ref.astype(np.float64) - out) ** 2))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_form_matches_the_reference_and_the_portable_graph(tiny_artifact, tiny_vae, precision):
    f = feed("decoder", Shape(2, 64, 96), seed=3)
    ref = diffusers_decode(tiny_vae, **f)
    outs = {}
    for form in ("cuda", "portable"):
        with asym_runtime.load(tiny_artifact, backend="onnxruntime-cuda", precision=precision,
                               graph_form=form) as rt:
            assert rt.graph_form == form
            outs[form] = rt.decode(f["latent"], image=f["image"], mask=f["mask"])
    for out in outs.values():
        if precision == "fp32":
            np.testing.assert_allclose(out, ref, atol=FP32_ATOL, rtol=0)
        else:
            assert _psnr(ref, out) >= FP16_MIN_PSNR


def test_cuda_graph_replays_the_same_numbers_and_other_shapes_still_run(tiny_artifact):
    f = feed("decoder", Shape(1, 64, 64), seed=4)
    g = feed("decoder", Shape(2, 96, 64), seed=5)
    with asym_runtime.load(tiny_artifact, backend="onnxruntime-cuda", precision="fp16", graphs=("decoder",)) as rt:
        want_f = rt.decode(f["latent"], image=f["image"], mask=f["mask"])
        want_g = rt.decode(g["latent"], image=g["image"], mask=g["mask"])
    with asym_runtime.load(tiny_artifact, backend="onnxruntime-cuda", precision="fp16", graphs=("decoder",),
                           cuda_graph=True) as rt:
        first = [rt.decode(f["latent"], image=f["image"], mask=f["mask"]) for _ in range(3)]
        other = rt.decode(g["latent"], image=g["image"], mask=g["mask"])
        again = rt.decode(f["latent"], image=f["image"], mask=f["mask"])
        assert rt.backends["decoder"].captured_shape is not None
    for out in first + [again]:
        np.testing.assert_allclose(out, want_f, atol=1e-2, rtol=0)
    np.testing.assert_allclose(other, want_g, atol=1e-2, rtol=0)


def test_torch_cuda_tensors_give_the_numpy_numbers(tiny_artifact):
    import torch

    f = feed("decoder", Shape(1, 64, 64), seed=6)
    with asym_runtime.load(tiny_artifact, backend="onnxruntime-cuda", precision="fp16") as rt:
        want = rt.decode(f["latent"], image=f["image"], mask=f["mask"])
        t = {k: torch.from_numpy(v).cuda() for k, v in f.items()}
        got = rt.decode(t["latent"], image=t["image"], mask=t["mask"])
        assert got.is_cuda
        plain = rt.decode(t["latent"])
        assert plain.shape == (1, 3, 64, 64)
    np.testing.assert_allclose(got.cpu().numpy(), want, atol=1e-2, rtol=0)


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["plain", "cuda-graph"])
def test_each_input_kind_gets_its_own_kind_back(tiny_artifact, cuda_graph):
    """numpy in, numpy out; CPU tensors in, CPU tensors out; CUDA tensors in, CUDA tensors out:
    on the captured shape (bound buffers, replayed) and on another one (the ordinary session)."""
    import torch

    feeds = [feed("decoder", Shape(1, 64, 64), seed=7), feed("decoder", Shape(2, 64, 96), seed=8)]
    with asym_runtime.load(tiny_artifact, backend="onnxruntime-cuda", precision="fp16", graphs=("decoder",),
                           cuda_graph=cuda_graph) as rt:
        for f in feeds * 2:  # the first shape is the captured one; each kind twice per shape
            want = rt.decode(f["latent"], image=f["image"], mask=f["mask"])
            assert isinstance(want, np.ndarray)
            for device in ("cpu", "cuda"):
                t = {k: torch.from_numpy(v).to(device) for k, v in f.items()}
                got = rt.decode(t["latent"], image=t["image"], mask=t["mask"])
                assert isinstance(got, torch.Tensor) and got.device.type == device, (type(got), device)
                np.testing.assert_allclose(got.cpu().numpy(), want, atol=2e-3, rtol=0)


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["plain", "cuda-graph"])
def test_threads_give_serial_results(tiny_artifact, cuda_graph):
    """Per-call IO binding (plain) and, with cuda_graph=True, every call behind the backend's
    lock (the first call's shape is captured into bound buffers, the others run on the ordinary
    session): 4 threads released together for 25 rounds, two of them on the same call each
    round, give the serial results of the same session."""
    feeds = [feed("decoder", s, seed=40 + i) for i, s in enumerate([Shape(2, 256, 256), Shape(1, 128, 256),
                                                                    Shape(2, 256, 128)])]
    with asym_runtime.load(tiny_artifact, backend="onnxruntime-cuda", precision="fp16", graphs=("decoder",),
                           cuda_graph=cuda_graph) as rt:
        calls = [lambda f=f: rt.decode(f["latent"], image=f["image"], mask=f["mask"]) for f in feeds]
        serial = [c() for c in calls]
        if cuda_graph:
            assert rt.backends["decoder"].captured_shape is not None
        # same session, same kernels per shape; FP16 outputs in [-1, 1] differ by at most a few
        # FP16 steps if a kernel is not bit-reproducible (2e-3), while another call's input or
        # buffer shows up as O(0.1) errors
        check_race(race(calls, threads=4, rounds=25), serial, exact=False, atol=2e-3)


@pytest.mark.parametrize("precision, tf32", [("fp32", "0"), ("fp16", "1")])
def test_the_live_session_has_the_precisions_tf32_setting(tiny_artifact, precision, tf32):
    """What the session actually runs with, read back from ONNX Runtime: FP32 graphs never
    compute in TF32 (the 1e-3 contract; x2 at 512 breaks it with TF32), FP16 graphs keep tensor
    cores."""
    with asym_runtime.load(tiny_artifact, backend="onnxruntime-cuda", precision=precision, graphs=("decoder",)) as rt:
        opts = rt.backends["decoder"].session.get_provider_options()["CUDAExecutionProvider"]
    assert opts["use_tf32"] == tf32, opts
