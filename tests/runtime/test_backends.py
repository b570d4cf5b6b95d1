"""The backend interface: activate / infer / deactivate, checked public methods, one place for options."""

import pytest
from runtime_helpers import feed

from asym_runtime.backends.onnxrt import OnnxRuntimeBackend, provider_options, session_options
from asym_runtime.backends.tensorrt import TensorRTBackend, unavailable_reason
from asym_runtime.errors import ArtifactError, BackendUnavailableError
from asym_runtime.specs import DECODER, ENCODER, Shape
from asym_runtime.manifest import generation_folder as gen


def test_lifecycle(tiny_artifact):
    b = OnnxRuntimeBackend(ENCODER, gen(tiny_artifact) / "encoder.onnx")
    image = feed("encoder", Shape(1, 64, 64))["image"]
    with pytest.raises(RuntimeError, match="not active: call activate"):
        b.infer({"image": image})
    with b as active:
        assert active is b and b.active and b.activate() is b  # idempotent
        out = b.infer({"image": image})
        assert sorted(out) == ["latent_logvar", "latent_mean"] and out["latent_mean"].shape == (1, 4, 8, 8)
        with pytest.raises(ValueError, match=r"takes inputs \['image'\], got \['sample'\]"):
            b.infer({"sample": image})
    assert not b.active and b.session is None
    b.deactivate()  # idempotent too


def test_a_graph_that_breaks_the_contract_is_refused_at_activation(tiny_artifact):
    with pytest.raises(ArtifactError, match=r"encoder.onnx has inputs \['image'\] .*the decoder contract"):
        OnnxRuntimeBackend(DECODER, gen(tiny_artifact) / "encoder.onnx").activate()
    with pytest.raises(ValueError, match="use cpu or cuda"):
        OnnxRuntimeBackend(DECODER, gen(tiny_artifact) / "decoder.onnx", device="tpu")


def test_session_options_per_provider():
    import onnxruntime as ort

    cpu, cuda = session_options("cpu"), session_options("cuda")
    for so in (cpu, cuda):
        assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert cpu.intra_op_num_threads == 0 and not cuda.enable_mem_pattern
    # per precision, as measured (README "ONNX Runtime on a GPU"): FP32 never gets TF32 and keeps
    # heuristic mode B; FP16 keeps the tensor cores (use_tf32=0 deselects them) and fuses the bias
    assert provider_options("cuda", 1) == {"device_id": "1", "cudnn_conv_algo_search": "EXHAUSTIVE",
                                           "use_tf32": "0"}
    assert provider_options("cuda", 0, "fp16") == {"device_id": "0", "cudnn_conv_algo_search": "HEURISTIC",
                                                   "use_tf32": "1", "fuse_conv_bias": "1"}
    # the caller's options replace single defaults, as strings
    assert provider_options("cuda", 0, "fp16", {"fuse_conv_bias": 0, "gpu_mem_limit": 1 << 30}) == {
        "device_id": "0", "cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "1", "fuse_conv_bias": "0",
        "gpu_mem_limit": str(1 << 30)}
    assert provider_options("cpu") == {}
    with pytest.raises(ValueError, match="cuda_graph needs the CUDA provider"):
        OnnxRuntimeBackend(DECODER, "decoder.onnx", device="cpu", cuda_graph=True)


def test_tensorrt_backend_activation_says_what_is_missing(tiny_artifact):
    if unavailable_reason() is None:
        pytest.skip("TensorRT can run here")
    b = TensorRTBackend(DECODER, b"plan")
    with pytest.raises(BackendUnavailableError, match=r"tensorrt|cuda-python|GPU"):
        b.activate()
    assert not b.active
