"""Triton model configurations from the graph contract (runtime/asym_runtime/serving/config.py):
what build_config refuses and writes, and what config_problems (asym-triton-repo --check) finds.
A mutation run found that only the dims check and the written dims/delay/parameters were held
by the repository tests; each case here fails on one of those mutants."""

from __future__ import annotations

import pytest

pytest.importorskip("tritonclient", reason="the serve extra is not installed (pip install -e '.[serve]')")

from tritonclient.grpc import model_config_pb2 as mc  # noqa: E402

from asym_runtime.serving import config as tconfig  # noqa: E402
from asym_runtime.specs import DECODER, ENCODER  # noqa: E402


def test_dims_drop_the_batch_axis_and_need_it():
    assert tconfig.tensor_dims(DECODER.tensor("mask").dims) == [1, -1, -1]
    with pytest.raises(ValueError, match=r"do not start with the batch axis"):
        tconfig.tensor_dims((3, "height", "width"))


@pytest.mark.parametrize("kw, words", [
    ({"backend": "pytorch"}, "backend 'pytorch': choose one of python, onnxruntime, tensorrt"),
    ({"kind": "tpu"}, "instance kind 'tpu': choose cpu or gpu"),
    ({"max_batch": 0}, "max_batch 0, instances 1, queue_delay_us 2000"),
    ({"instances": 0}, "max_batch 4, instances 0, queue_delay_us 2000"),
    ({"queue_delay_us": -1}, "max_batch 4, instances 1, queue_delay_us -1"),
])
def test_build_config_refuses_what_triton_would_not_load(kw, words):
    args = {"backend": "onnxruntime", "max_batch": 4, **kw}
    with pytest.raises(ValueError, match=words):
        tconfig.build_config(DECODER, **args)


def test_instances_are_placed_where_asked():
    cpu = tconfig.build_config(DECODER, backend="onnxruntime", max_batch=4, kind="cpu", gpus=[1], instances=3)
    (group,) = cpu.instance_group
    assert group.kind == mc.ModelInstanceGroup.KIND_CPU and group.count == 3
    assert list(group.gpus) == []  # a GPU list on CPU instances would make Triton look for those GPUs
    gpu = tconfig.build_config(DECODER, backend="onnxruntime", max_batch=4, kind="gpu", gpus=[0, 2])
    (group,) = gpu.instance_group
    assert group.kind == mc.ModelInstanceGroup.KIND_GPU and list(group.gpus) == [0, 2]
    plan = tconfig.build_config(ENCODER, backend="tensorrt", max_batch=2, kind="gpu", name="encoder_trt",
                                default_model_filename="model.plan")
    assert plan.name == "encoder_trt" and plan.default_model_filename == "model.plan"
    assert tconfig.parse_config(tconfig.config_text(plan)) == plan


def _good():
    return tconfig.build_config(DECODER, backend="onnxruntime", max_batch=4)


def _problems(change):
    cfg = _good()
    change(cfg)
    return tconfig.config_problems(cfg, DECODER, max_batch=4, backend="onnxruntime")


def _reorder_inputs(cfg):
    inputs = list(cfg.input)[::-1]
    del cfg.input[:]
    cfg.input.extend(inputs)


@pytest.mark.parametrize("change, problem", [
    (lambda c: setattr(c, "name", "vae"), "name is 'vae', expected 'decoder'"),
    (lambda c: setattr(c, "backend", "python"), "backend is 'python', expected 'onnxruntime'"),
    (lambda c: setattr(c, "max_batch_size", 8), "max_batch_size 8 is outside 1..4 (the shape limits)"),
    (lambda c: setattr(c, "max_batch_size", 0), "max_batch_size 0 is outside 1..4 (the shape limits)"),
    (_reorder_inputs, "inputs are ['mask', 'image', 'latent'], the contract has ['latent', 'image', 'mask']"),
    (lambda c: setattr(c.output[0], "data_type", mc.TYPE_FP16), "output sample is TYPE_FP16, expected TYPE_FP32"),
    (lambda c: c.ClearField("dynamic_batching"), "no dynamic_batching"),
], ids=["name", "backend", "max-batch-above", "max-batch-zero", "input-order", "output-dtype", "no-batching"])
def test_config_problems_finds_each_disagreement(change, problem):
    assert _problems(lambda c: None) == []
    assert _problems(change) == [problem]
