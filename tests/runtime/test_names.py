"""One naming scheme: BACKEND/PRECISION[/OPTION] is parsed and written in one place, and each
name stands for the load() arguments it says."""

import pytest

import asym_runtime
from asym_runtime.errors import AsymInputError
from asym_runtime.names import BACKENDS, PRECISIONS, BackendName, parse_backend_name


@pytest.mark.parametrize("text, kwargs", [
    ("onnxruntime-cpu/fp32", {"backend": "onnxruntime-cpu", "precision": "fp32"}),
    ("openvino/bf16", {"backend": "openvino", "precision": "bf16"}),
    ("tensorrt", {"backend": "tensorrt", "precision": None}),
    ("onnxruntime-cuda/fp16/portable", {"backend": "onnxruntime-cuda", "precision": "fp16", "graph_form": "portable"}),
    ("onnxruntime-cuda/fp16/cudagraph", {"backend": "onnxruntime-cuda", "precision": "fp16", "cuda_graph": True}),
])
def test_a_written_name_round_trips_and_stands_for_load_arguments(text, kwargs):
    name = parse_backend_name(text)
    assert str(name) == text
    assert name.load_kwargs() == kwargs


@pytest.mark.parametrize("text, needle", [
    ("ort-cpu-fp32", "unknown backend 'ort-cpu-fp32'"),
    ("onnxruntime-cpu/fp8", "unknown precision 'fp8'"),
    ("onnxruntime-cuda/fp16/fast", "unknown option 'fast'"),
    ("onnxruntime-cpu//portable", "BACKEND[/PRECISION[/OPTION]]"),
    ("a/b/c/d", "BACKEND[/PRECISION[/OPTION]]"),
])
def test_a_bad_name_says_what_is_allowed(text, needle):
    with pytest.raises(AsymInputError) as e:
        parse_backend_name(text)
    assert needle in str(e.value)


def test_the_vocabulary_is_loads_own():
    assert asym_runtime.BACKENDS is BACKENDS and asym_runtime.api.PRECISIONS is PRECISIONS
    assert str(BackendName("openvino", "fp32")) == "openvino/fp32"
    with pytest.raises(AsymInputError, match="unknown backend 'diffusers'"):
        parse_backend_name("diffusers/fp32")  # a bench-only name needs the caller's backends
    assert parse_backend_name("diffusers/fp32", BACKENDS + ("diffusers",)).backend == "diffusers"


@pytest.mark.parametrize("text, allowed", [
    ("ort-cpu/fp32", "choose from " + ", ".join(BACKENDS)),
    ("onnxruntime-cpu/fp8", "choose from fp32, fp16, bf16"),
    ("onnxruntime-cuda/fp16/fast", "choose from portable, cudagraph"),
    ("onnxruntime-cpu//portable", "(e.g. onnxruntime-cpu/fp32)"),
])
def test_a_bad_name_lists_the_allowed_names(text, allowed):
    """The docstring promises an error "naming what is allowed": the list itself, not only the
    word that was wrong (a mutant that dropped "; choose from ..." passed the test above)."""
    with pytest.raises(AsymInputError) as e:
        parse_backend_name(text)
    assert allowed in str(e.value)


def test_a_name_from_a_command_line_or_a_file_may_carry_surrounding_whitespace():
    """asym-bench and asym-parity read names from arguments and files: a trailing newline or
    space is not part of the name."""
    assert parse_backend_name(" onnxruntime-cpu/fp32\n") == BackendName("onnxruntime-cpu", "fp32")
