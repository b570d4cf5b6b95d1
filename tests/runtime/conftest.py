"""Runtime fixtures (helper functions live in runtime_helpers.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_rt(tiny_artifact):
    """The tiny artifact on ONNX Runtime (CPU). Shared: tests must not close it."""
    import asym_runtime

    rt = asym_runtime.load(tiny_artifact, backend="onnxruntime-cpu")
    yield rt
    rt.close()
