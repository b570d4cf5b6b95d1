"""A real failure inside ONNX Runtime's run, for tests of what the runtime and its callers do
when a backend fails on checked input (on a GPU: a cuDNN launch, an allocation)."""

from __future__ import annotations


class TerminatingSession:
    """The real onnxruntime session, run with ONNX Runtime's own terminate flag: ONNX Runtime
    itself fails the run, nothing stands in for it."""

    def __init__(self, session):
        self._session = session

    def run(self, names, feed, run_options=None):
        import onnxruntime as ort

        ro = ort.RunOptions()
        ro.terminate = True
        return self._session.run(names, feed, ro)

    def __getattr__(self, name):
        return getattr(self._session, name)


def make_runs_fail(vae, graph: str) -> None:
    """Every later run of ``graph`` in ``vae`` (an ONNX Runtime CPU backend) fails inside ONNX Runtime."""
    backend = vae.backends[graph]
    backend.session = TerminatingSession(backend.session)


def make_sessions_fail(monkeypatch, tmp_path) -> None:
    """Every ONNX Runtime session created from now on fails inside ONNX Runtime while it is
    being created, on a graph that passed every check: its SessionOptions ask it to save the
    optimized graph into a folder that does not exist (ONNX Runtime's own failure, raised by
    InferenceSession as on a GPU whose cuDNN does not start)."""
    from asym_runtime.backends import onnxrt

    real = onnxrt.session_options

    def failing(device):
        so = real(device)
        so.optimized_model_filepath = str(tmp_path / "no-such-folder" / "optimized.onnx")
        return so

    monkeypatch.setattr(onnxrt, "session_options", failing)
