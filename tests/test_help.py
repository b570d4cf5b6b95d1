"""Every tool's --help lists exactly what its code accepts: it is built from the same registries
(graphs, variants, backends) the code uses, in plain text, with examples and exit codes."""

from __future__ import annotations

import re

import pytest

from asym_export import bench, cli, parity
from asym_export.bench_contenders import OLD_NAMES, RUNTIME_CONTENDERS, TORCH_CONTENDERS
from asym_export.graphs import BENCH_GRAPHS
from asym_export.variants import PUBLISHED, VARIANTS
from asym_runtime.specs import GRAPHS


def _help(module) -> str:
    return module.build_parser().format_help()


@pytest.mark.parametrize("module", [cli, parity, bench], ids=["asym-export", "asym-parity", "asym-bench"])
def test_help_is_plain_text_with_examples_and_exit_codes(module):
    text = _help(module)
    assert "``" not in text and "**" not in text  # no markup from docstrings
    assert "examples:" in text
    assert re.search(r"exit codes: 0 .*; 1 .*; 2 ", text.replace("\n", " "))


def test_asym_export_help_lists_every_graph_and_variant():
    text = _help(cli)
    for g in GRAPHS.values():
        assert g.file_name() in text and " -> " + ", ".join(g.output_names) in text
    assert "{" + ",".join(PUBLISHED) + "}" in text
    for v in VARIANTS:  # the test-only config is named as such
        assert v in text
    assert "*.cuda.onnx" in text and "*.fp16.onnx" in text


def test_asym_bench_help_lists_every_backend_and_graph_it_accepts():
    text = " ".join(_help(bench).split())
    for name in list(RUNTIME_CONTENDERS) + list(TORCH_CONTENDERS):
        assert name in text, name
    for g in BENCH_GRAPHS:
        assert g in text
    for v in VARIANTS:
        assert v in text
    # and nothing it would refuse: every contender-looking name in the help is accepted, in the
    # one scheme (BACKEND/PRECISION[/OPTION]) or as an earlier release's name it maps
    words = set(re.findall(r"\b(?:onnxruntime-cuda|onnxruntime-cpu|tensorrt|openvino|diffusers|torch-compile)"
                           r"(?:/[a-z0-9]+)+", text))
    accepted = set(RUNTIME_CONTENDERS) | set(TORCH_CONTENDERS)
    assert words and words <= accepted, words - accepted
    old = set(re.findall(r"\b(?:ort|tensorrt|openvino|diffusers|torch-compile)-[a-z0-9-]+\b", text))
    assert old <= set(OLD_NAMES), old - set(OLD_NAMES)


def test_asym_parity_help_lists_the_backends_it_accepts():
    text = " ".join(_help(parity).split())
    for name in parity.PARITY_BACKENDS:
        assert name in text
    import asym_runtime

    # every forced load() backend can be compared; "auto"/"onnxruntime" choose among them
    assert set(parity.PARITY_BACKENDS) == set(asym_runtime.BACKENDS) - {"auto", "onnxruntime"}
