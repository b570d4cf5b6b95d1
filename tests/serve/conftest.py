"""A real Triton server (``asym-serve``) on the tiny artifact, on free localhost ports."""

from __future__ import annotations

import pytest

pytest.importorskip("tritonclient", reason="the serve extra is not installed (pip install -e '.[serve]')")
pytest.importorskip("pytriton", reason="the serve extra is not installed (pip install -e '.[serve]')")

from serve_helpers import start_server  # noqa: E402


@pytest.fixture(scope="module")
def served(tiny_artifact, tmp_path_factory):
    """asym-serve on the tiny artifact, 50 ms queue delay so concurrent requests meet in batches."""
    s = start_server(tiny_artifact, tmp_path_factory.mktemp("serve"), "--max-queue-delay-us", "50000",
                     "--backend", "onnxruntime-cpu", "--exit-timeout", "3")
    yield s
    code = s.stop()
    assert code == 0, f"asym-serve did not stop cleanly on SIGTERM (exit {code}):\n{s.output.read_text()[-3000:]}"
