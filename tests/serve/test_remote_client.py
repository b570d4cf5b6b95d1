"""remote()'s client side without a server: the URL forms it takes, and how each answer
tritonclient raises becomes the runtime's error (AsymInputError for a refused request,
BackendError otherwise, one line each). The exceptions are tritonclient's own class, built as
tritonclient builds them from a server's answer; test_serve.py meets the same paths with a real
Triton server."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("tritonclient", reason="the serve extra is not installed (pip install -e '.[serve]')")

from tritonclient.utils import InferenceServerException  # noqa: E402

import asym_runtime  # noqa: E402
from asym_runtime.errors import AsymInputError, BackendError  # noqa: E402
from asym_runtime.serving.client import _Connection, _split_url  # noqa: E402


@pytest.mark.parametrize("url, protocol, want", [
    ("localhost:8000", None, ("http", "localhost:8000")),
    ("http://gpu-box:8000/", None, ("http", "gpu-box:8000")),
    ("grpc://gpu-box:8001", None, ("grpc", "gpu-box:8001")),
    ("grpc://gpu-box:8001", "grpc", ("grpc", "gpu-box:8001")),
    ("gpu-box:8001", "grpc", ("grpc", "gpu-box:8001")),
])
def test_urls_with_and_without_a_scheme(url, protocol, want):
    assert _split_url(url, protocol) == want


@pytest.mark.parametrize("url, protocol, words", [
    ("https://gpu-box:8000", None, "the scheme must be http:// or grpc://"),
    ("grpc://gpu-box:8001", "http", "and protocol='http' disagree"),
    ("gpu-box:8001", "udp", "protocol 'udp': choose http or grpc"),
])
def test_bad_urls_are_refused_before_connecting(url, protocol, words):
    with pytest.raises(ValueError, match=words):
        asym_runtime.remote(url, protocol=protocol)


@pytest.mark.parametrize("timeout", [0, -1, math.nan, math.inf, None, "5", True])
def test_a_timeout_must_be_positive_seconds(timeout):
    """None and "5" raised TypeError from the comparison, where the docstring promises ValueError."""
    with pytest.raises(ValueError, match=r"seconds, a finite number > 0"):
        asym_runtime.remote("localhost:8000", timeout=timeout)


@pytest.mark.parametrize("scheme", ["", "grpc://"])
def test_a_server_that_never_answers_is_given_up_within_the_timeout(scheme):
    """A port that accepts connections and never answers (a hung server, a proxy): remote()
    says no server answers within its timeout, over gRPC too, whose readiness and config calls
    had no deadline and waited for ever."""
    import socket
    import threading
    import time

    from asym_runtime.errors import BackendUnavailableError

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    outcome = {}

    def connect():
        t0 = time.monotonic()
        try:
            asym_runtime.remote(f"{scheme}127.0.0.1:{silent.getsockname()[1]}", timeout=1)
        except Exception as e:  # noqa: BLE001 - judged below
            outcome["error"] = e
        outcome["s"] = time.monotonic() - t0

    t = threading.Thread(target=connect, daemon=True)
    try:
        t.start()
        t.join(15)
        assert not t.is_alive(), "remote() was still waiting after 15 s with timeout=1"
    finally:
        silent.close()
    assert isinstance(outcome["error"], BackendUnavailableError), outcome
    assert outcome["s"] < 5, outcome


def _raise(exc):
    def call(client):
        raise exc
    return call


@pytest.mark.parametrize("protocol, status, message, error, text", [
    ("http", "400", "decoder: height 1032 is above\n  this artifact's max_height 1024", AsymInputError,
     "decode: the server refused the request: decoder: height 1032 is above this artifact's max_height 1024"),
    ("grpc", "StatusCode.INVALID_ARGUMENT", "unexpected shape for input 'latent'", AsymInputError,
     "decode: the server refused the request: unexpected shape for input 'latent'"),
    ("http", "500", "decoder: ONNX Runtime failed", BackendError,
     "decode: the Triton server at http://127.0.0.1:9 failed: decoder: ONNX Runtime failed"),
    ("grpc", "StatusCode.UNAVAILABLE", "failed to connect to all addresses", BackendError,
     "the Triton server at grpc://127.0.0.1:9 did not answer ([StatusCode.UNAVAILABLE] failed to connect to all addresses)"),
    ("grpc", "StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", BackendError,
     "the Triton server at grpc://127.0.0.1:9 did not answer ([StatusCode.DEADLINE_EXCEEDED] Deadline Exceeded)"),
    ("http", None, "timed out", BackendError, "the Triton server at http://127.0.0.1:9 did not answer (timed out)"),
    # a message in the server's own "[...]" form is the server's answer, not a missing one
    ("http", None, "[request id: 7] model is not ready", BackendError,
     "decode: the Triton server at http://127.0.0.1:9 failed: [request id: 7] model is not ready"),
], ids=["http-400", "grpc-invalid", "http-500", "grpc-unavailable", "grpc-deadline", "no-status", "server-text"])
def test_server_answers_become_the_runtime_s_errors(protocol, status, message, error, text):
    conn = _Connection(protocol, "127.0.0.1:9", 5)
    with pytest.raises(error) as e:
        conn.call("decode", _raise(InferenceServerException(message, status=status)))
    assert type(e.value) is error and str(e.value) == text


def test_a_broken_connection_is_dropped_and_other_errors_pass_through():
    """A transport error (refused, reset) says the server did not answer and drops this thread's
    client, so the next call reconnects; an error that is not the server's is not disguised."""
    conn = _Connection("http", "127.0.0.1:9", 5)
    first = conn.client()
    with pytest.raises(BackendError, match=r"^the Triton server at http://127.0.0.1:9 did not answer "
                                           r"\(\[Errno 111\] Connection refused\)$"):
        conn.call("decode", _raise(ConnectionRefusedError(111, "Connection refused")))
    assert conn.client() is not first
    with pytest.raises(KeyError, match="sample"):
        conn.call("decode", _raise(KeyError("sample")))
    conn.close()
