"""asym-serve on a real Triton server (localhost, tiny artifact) and asym_runtime.remote against it.

Tolerance: results through the server must equal in-process results within 1e-6 (max abs).
Both run the same FP32 graph with ONNX Runtime on this CPU; the server may run a request
inside a larger batch, where a convolution may take another kernel path, so bit equality is not
promised, only agreement far below any FP32 parity bound (1e-4).
"""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest

import asym_runtime
from asym_runtime.errors import AsymInputError, BackendError, BackendUnavailableError

from serve_helpers import free_ports, start_server

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

EXACT = 1e-6


@pytest.fixture(scope="module")
def local(tiny_artifact):
    with asym_runtime.load(tiny_artifact, backend="onnxruntime-cpu") as vae:
        yield vae


def _inputs(seed: int, batch: int = 1, h: int = 64, w: int = 64):
    rng = np.random.default_rng(seed)
    image = rng.uniform(-1, 1, (batch, 3, h, w)).astype(np.float32)
    mask = (rng.uniform(0, 1, (batch, 1, h, w)) > 0.5).astype(np.float32)
    latent = rng.standard_normal((batch, 4, h // 8, w // 8)).astype(np.float32)
    return image, mask, latent


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_remote_equals_in_process(served, local, protocol):
    vae = asym_runtime.remote(served.url if protocol == "http" else served.grpc_url, timeout=60)
    assert vae.backend == "triton" and vae.variant == local.variant
    assert vae.limits == local.limits and vae.config.to_dict() == local.config.to_dict()
    for seed, (b, h, w) in enumerate([(2, 64, 64), (1, 64, 128)]):
        image, mask, latent = _inputs(seed, b, h, w)
        got, want = vae.encode(image), local.encode(image)
        assert np.abs(got.mean - want.mean).max() <= EXACT
        assert np.abs(got.logvar - want.logvar).max() <= EXACT
        assert np.abs(vae.decode(latent, image=image, mask=mask) - local.decode(latent, image=image, mask=mask)).max() <= EXACT
        assert np.abs(vae.decode(latent) - local.decode(latent)).max() <= EXACT
        assert vae.decode(latent).flags.writeable  # the caller owns it, as with load()


def test_remote_checks_on_the_client(served):
    """The client refuses what the runtime refuses before anything is sent."""
    vae = asym_runtime.remote(served.url)
    image, mask, latent = _inputs(0)
    with pytest.raises(AsymInputError, match="multiple of 8"):
        vae.encode(image[:, :, :60])
    with pytest.raises(AsymInputError, match="image and mask"):
        vae.decode(latent, image=image)


def _stats(url: str, model: str) -> dict[int, int]:
    import tritonclient.http as h

    stats = h.InferenceServerClient(url).get_inference_statistics(model_name=model)
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats["model_stats"][0].get("batch_stats", [])}


def _together(n: int, call) -> dict[int, object]:
    """``call(i)`` for i < n in n threads released at once by a barrier; result or exception per i."""
    barrier = threading.Barrier(n)
    results: dict[int, object] = {}

    def run(i: int):
        barrier.wait()
        try:
            results[i] = call(i)
        except Exception as e:  # noqa: BLE001 - the caller asserts on it
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_concurrent_clients_are_batched_and_correct(served, local):
    vae = asym_runtime.remote(served.url)
    before = _stats(served.url, "decoder_uncond")
    n = 16
    results = _together(n, lambda i: vae.decode(_inputs(100 + i)[2]))
    assert len(results) == n
    for i, out in results.items():
        assert isinstance(out, np.ndarray), f"client {i}: {out!r}"
        assert np.abs(out - local.decode(_inputs(100 + i)[2])).max() <= EXACT, f"client {i} got another answer"
    after = _stats(served.url, "decoder_uncond")
    formed = {b: after.get(b, 0) - before.get(b, 0) for b in after}
    assert sum(b * c for b, c in formed.items()) == n, formed  # every request ran exactly once
    assert any(b > 1 and c > 0 for b, c in formed.items()), f"the server formed no batch > 1: {formed}"
    import urllib.request

    with urllib.request.urlopen(served.metrics_url, timeout=10) as r:  # Triton's Prometheus metrics are on
        metrics = r.read().decode()
    assert 'nv_inference_request_success{model="decoder_uncond",version="1"}' in metrics


def _raw(url: str, model: str, **arrays):
    import tritonclient.http as h

    inputs = []
    for name, a in arrays.items():
        dt = {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64"}[a.dtype]
        i = h.InferInput(name, list(a.shape), dt)
        i.set_data_from_numpy(a)
        inputs.append(i)
    return h.InferenceServerClient(url).infer(model, inputs)


def _f(*shape, value=0.0):
    return np.full(shape, value, np.float32)


IMG = np.random.default_rng(0).uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
LAT, MASK = _f(1, 4, 8, 8), _f(1, 1, 64, 64, value=1.0)

#: (what is wrong, model, inputs, what the error must name). Each is sent past the client's checks.
BAD = [
    ("float64", "encoder", dict(image=IMG.astype(np.float64)), "FP64"),
    ("4 channels", "encoder", dict(image=_f(1, 4, 64, 64)), "unexpected shape for input 'image'"),
    ("rank 3", "encoder", dict(image=_f(3, 64, 64)), "unexpected shape for input 'image'"),
    ("mask missing", "decoder", dict(latent=LAT, image=IMG), "missing required input(s) ['mask']"),
    ("unknown input", "decoder_uncond", dict(latent=LAT, extra=LAT), "'extra'"),
    ("batch over the limit", "encoder", dict(image=_f(5, 3, 64, 64)), "batch-size must be <= 4"),
    ("height not a multiple of 8", "encoder", dict(image=_f(1, 3, 60, 64)), "not a multiple of 8"),
    ("height above the limit", "encoder", dict(image=_f(1, 3, 1032, 64)), "above this artifact's max_height"),
    ("sizes disagree", "decoder", dict(latent=LAT, image=_f(1, 3, 64, 128), mask=_f(1, 1, 64, 128)), "sizes disagree"),
    ("batches disagree", "decoder", dict(latent=_f(2, 4, 8, 8), image=IMG, mask=MASK), "batch size does not match"),
    ("NaN", "encoder", dict(image=_f(1, 3, 64, 64, value=np.nan)), "contains NaN"),
    ("Inf latent", "decoder_uncond", dict(latent=_f(1, 4, 8, 8, value=np.inf)), "contains Inf"),
    ("mask outside [0, 1]", "decoder", dict(latent=LAT, image=IMG, mask=MASK * 2), "mask values must lie in [0, 1]"),
    ("image in [0, 255]", "encoder", dict(image=IMG * 255), "image values must lie in [-1, 1]"),
]


@pytest.mark.parametrize("what,model,arrays,names", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_an_error_and_the_server_keeps_serving(served, what, model, arrays, names):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as e:
        _raw(served.url, model, **arrays)
    assert str(e.value.status()) == "400", f"{what}: {e.value}"
    assert names in e.value.message(), f"{what}: {e.value.message()}"
    good = _raw(served.url, "decoder", latent=LAT, image=IMG, mask=MASK).as_numpy("sample")
    assert good.shape == (1, 3, 64, 64) and np.isfinite(good).all()


def test_a_bad_request_in_a_batch_fails_alone(served, local):
    """A NaN request sent together with good requests of the same shape (so Triton may batch
    them): only it fails; the others get their own correct answers."""
    from tritonclient.utils import InferenceServerException

    n = 8
    results = _together(n, lambda i: _raw(served.url, "decoder_uncond", latent=_inputs(200 + i)[2] if i else
                                          _f(1, 4, 8, 8, value=np.nan)).as_numpy("sample"))
    assert isinstance(results[0], InferenceServerException) and "NaN" in results[0].message()
    for i in range(1, n):
        assert isinstance(results[i], np.ndarray), f"request {i} failed with the bad one: {results[i]}"
        assert np.abs(results[i] - local.decode(_inputs(200 + i)[2])).max() <= EXACT


def test_server_refusal_reaches_remote_as_input_error(served):
    """A request the client allows but the server refuses (here: the client's limits widened by hand)."""
    vae = asym_runtime.remote(served.url)
    from asym_runtime.specs import ShapeLimits

    vae.limits = ShapeLimits(max_height=2048, max_width=2048)
    with pytest.raises(AsymInputError, match="the server refused the request: encoder: height 1032 is above"):
        vae.encode(_f(1, 3, 1032, 64))


def test_no_server_is_one_clear_error():
    (port,) = free_ports(1)
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailableError) as e:
        asym_runtime.remote(f"127.0.0.1:{port}", timeout=5)
    assert time.monotonic() - t0 < 6
    assert "\n" not in str(e.value) and f"127.0.0.1:{port}" in str(e.value) and "asym-serve" in str(e.value)


def test_stopped_server_fails_within_the_timeout(tiny_artifact, tmp_path):
    """A server of the decoder alone (asym-serve --graphs decoder) reached through remote(): it
    decodes, says encode has no graph, caps batches at the server's; once stopped, a call fails
    within the timeout in one line."""
    s = start_server(tiny_artifact, tmp_path, "--graphs", "decoder", "--backend", "onnxruntime-cpu",
                     "--exit-timeout", "3", "--instances", "2", "--max-batch", "2")
    try:
        import tritonclient.http as h

        cfg = h.InferenceServerClient(s.url).get_model_config("decoder")
        assert cfg["instance_group"][0]["count"] == 2 and cfg["instance_group"][0]["kind"] == "KIND_CPU"
        assert cfg["max_batch_size"] == 2
        vae = asym_runtime.remote(s.url, timeout=5)  # the graphs served, as load(graphs=) takes a subset
        assert vae.limits.max_batch == 2  # the client refuses what the server's batcher cannot take
        with pytest.raises(AsymInputError, match="batch 3 is above"):
            vae.decode(np.zeros((3, 4, 8, 8), np.float32))
        assert sorted(vae.backends) == ["decoder"]
        with pytest.raises(RuntimeError, match="has no encoder graph"):
            vae.encode(IMG)
        assert vae.decode(LAT).shape == (1, 3, 64, 64)  # plain decode through the conditional graph
    finally:
        assert s.stop() == 0
    t0 = time.monotonic()
    with pytest.raises(BackendError) as e:
        vae.decode(LAT)
    assert time.monotonic() - t0 < 6
    assert "\n" not in str(e.value) and "did not answer" in str(e.value)


def test_serving_from_an_environment_that_is_not_activated(tiny_artifact, tmp_path, local):
    """``/path/.venv/bin/asym-serve`` as a service manager starts it, with systemd's default PATH:
    neither the venv nor this interpreter's folder is on it. The python backend's stub finds its
    Python through PATH, so it ran another one: on this project's machines /usr/bin/python3's
    standard library under this libpython (numpy failed to import) or, with the interpreter's
    base folder on PATH, its site-packages (numpy 2 there: every output arrived empty). The model
    must run on asym-serve's own environment either way."""
    import os

    env = dict(os.environ, PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env.pop("VIRTUAL_ENV", None)
    s = start_server(tiny_artifact, tmp_path, "--graphs", "decoder_uncond", "--backend", "onnxruntime-cpu",
                     "--exit-timeout", "3", env=env)
    try:
        vae = asym_runtime.remote(s.url, timeout=30)
        assert np.abs(vae.decode(LAT) - local.decode(LAT)).max() <= EXACT
    finally:
        assert s.stop() == 0


def test_the_model_file_puts_the_launching_environment_first(tmp_path):
    """The python backend's model file, run by an interpreter whose own site folder holds another
    numpy ahead of ours: it imports ours; and where another numpy was imported before it, it
    refuses to load with both versions named instead of serving through a numpy Triton's stub
    does not read."""
    import subprocess

    from asym_runtime.serving.server import model_py

    other = tmp_path / "base-site"
    (other / "numpy").mkdir(parents=True)
    (other / "numpy" / "__init__.py").write_text("__version__ = '0.0-other'\n")
    source = model_py()
    # -S: no site folder of ours on sys.path, as in the stub; the other one stands for its own
    ok = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, {str(other)!r})\n{source}\n"
                         "import numpy; print(numpy.__version__, TritonPythonModel.__module__)"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.split() == [np.__version__, "asym_runtime.serving.model"]
    refused = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, {str(other)!r}); "
                              f"import numpy\n{source}"], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert f"imports numpy 0.0-other from {other}" in refused.stderr
    assert f"runs with numpy {np.__version__}" in refused.stderr


def test_asym_serve_usage_errors(tiny_artifact, tmp_path, capsys):
    from asym_runtime.serving.cli import serve_main as main

    assert main([str(tmp_path)]) == 2
    assert "not an artifact folder" in capsys.readouterr().err
    assert main([str(tiny_artifact), "--http-port", "8000", "--grpc-port", "8000"]) == 2
    assert "must differ" in capsys.readouterr().err
    assert main([str(tiny_artifact), "--graphs", "encoder,vae"]) == 2
    assert "--graphs" in capsys.readouterr().err
    assert main([str(tiny_artifact), "--gpus", "0"]) == 2
    assert "--kind gpu" in capsys.readouterr().err


def test_a_server_not_ready_in_time_leaves_its_log_in_the_error(tiny_artifact, tmp_path, capsys):
    """The error said '(no server log)': the workspace, with Triton's log, was removed before
    the log's tail was read."""
    from asym_runtime.serving.cli import serve_main as main

    http, grpc, metrics = free_ports(3)
    assert main([str(tiny_artifact), "--graphs", "decoder_uncond", "--backend", "onnxruntime-cpu",
                 "--start-timeout", "0.5", "--http-port", str(http), "--grpc-port", str(grpc),
                 "--metrics-port", str(metrics)]) == 1
    err = capsys.readouterr().err
    assert "tritonserver was not ready within 0.5 s" in err and "(no server log)" not in err, err


def test_a_batch_triton_forms_is_cut_to_what_the_loaded_backend_takes():
    """Triton may queue up to the config's max_batch_size (the folder's limit); the loaded
    backend's limit can be lower (a TensorRT engine's profile). The model cuts each group of
    same-shape requests, in order, into runs within that limit, never splitting a request."""
    from asym_runtime.serving.model import batch_chunks

    members = [(i, {"latent": np.zeros((b, 4, 8, 8), np.float32)}) for i, b in enumerate([1, 2, 1, 2, 2, 1])]
    chunks = batch_chunks(members, 3)
    assert [[i for i, _ in c] for c in chunks] == [[0, 1], [2, 3], [4, 5]]
    assert all(sum(f["latent"].shape[0] for _, f in c) <= 3 for c in chunks)
    assert [[i for i, _ in c] for c in batch_chunks(members, 9)] == [[0, 1, 2, 3, 4, 5]]
    assert [[i for i, _ in c] for c in batch_chunks(members, 2)] == [[0], [1], [2], [3], [4], [5]]
