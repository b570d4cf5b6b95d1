"""``asym_runtime.remote(url)``: a served artifact with the API of a loaded one.

    vae = asym_runtime.load("artifacts/x2")            # in process
    vae = asym_runtime.remote("localhost:8000")        # the same folder behind asym-serve
    out = vae.decode(latent, image=image, mask=mask)   # same checks, same results

The object is an :class:`~asym_runtime.AsymVAE` whose backends send each call to Triton: the
inputs are checked on the client exactly as in process (against the served folder's manifest,
which the server publishes in its model configuration), then sent over tritonclient HTTP
(``http://`` or a bare ``host:port``) or gRPC (``grpc://host:port``). Errors:

* the server refuses a request (its own checks; another client's limits): ``AsymInputError``
  with the server's message;
* no server, a stopped server, no answer within ``timeout``: ``BackendError`` in one line
  (``BackendUnavailableError`` from ``remote()`` itself).

Thread safety as in process: every thread gets its own tritonclient connection.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .. import arrays
from ..backends.base import Backend
from ..errors import AsymInputError, BackendError, BackendUnavailableError
from ..manifest import Manifest, parse_manifest_bytes
from ..specs import GRAPHS, GraphSpec
from .model import PARAM_BACKEND, PARAM_MANIFEST, PARAM_PRECISION

log = logging.getLogger(__name__)

PROTOCOLS = ("http", "grpc")


def _split_url(url: str, protocol: str | None) -> tuple[str, str]:
    scheme, sep, rest = url.partition("://")
    if sep:
        if scheme not in PROTOCOLS:
            raise ValueError(f"url {url!r}: the scheme must be http:// or grpc://")
        if protocol is not None and protocol != scheme:
            raise ValueError(f"url {url!r} and protocol={protocol!r} disagree")
        return scheme, rest.rstrip("/")
    protocol = protocol or "http"
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: choose http or grpc")
    return protocol, url.rstrip("/")


class _Connection:
    """tritonclient for one protocol, one client per thread, errors turned into the runtime's."""

    def __init__(self, protocol: str, address: str, timeout: float):
        self.protocol = protocol
        self.address = address
        self.timeout = float(timeout)
        self.label = f"{protocol}://{address}"
        self._local = threading.local()
        self._clients: list = []
        self._lock = threading.Lock()
        try:
            if protocol == "http":
                import tritonclient.http as tc
            else:
                import tritonclient.grpc as tc
        except ImportError as e:
            raise BackendUnavailableError(f"remote() needs tritonclient ({e}); pip install -e '.[serve]'") from None
        self.tc = tc
        from tritonclient.utils import InferenceServerException

        self.ServerError = InferenceServerException

    def timeout_kw(self) -> dict:
        """The per-call deadline: gRPC calls take it as ``client_timeout`` (its client has no
        connection timeout, so a call without it waits on a silent server for ever); HTTP's
        client has it from its construction."""
        return {} if self.protocol == "http" else {"client_timeout": self.timeout}

    def client(self):
        c = getattr(self._local, "client", None)
        if c is None:
            if self.protocol == "http":
                c = self.tc.InferenceServerClient(self.address, connection_timeout=self.timeout,
                                                  network_timeout=self.timeout)
            else:
                c = self.tc.InferenceServerClient(self.address)
            self._local.client = c
            with self._lock:
                self._clients.append(c)
        return c

    def close(self) -> None:
        """Close every thread's connection (an idle keep-alive connection holds a stopping server)."""
        with self._lock:
            clients, self._clients = self._clients, []
        for c in clients:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - closing a dead connection
                pass
        self._local = threading.local()

    def down(self, e: BaseException) -> str:
        text = " ".join(str(e).split()) or type(e).__name__
        return f"the Triton server at {self.label} did not answer ({text})"

    def call(self, what: str, fn):
        """Run ``fn(client)``; server refusals and transport failures as the runtime's errors."""
        try:
            return fn(self.client())
        except self.ServerError as e:
            status = str(e.status() or "")
            message = " ".join((e.message() or str(e)).split())
            if status in ("400", "StatusCode.INVALID_ARGUMENT"):
                raise AsymInputError(f"{what}: the server refused the request: {message}") from None
            if status in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "None", "") and not message.startswith("["):
                raise BackendError(self.down(e)) from None
            raise BackendError(f"{what}: the Triton server at {self.label} failed: {message}") from None
        except (OSError, TimeoutError, EOFError) as e:  # refused, reset, timed out (gevent's socket errors are OSError)
            self._local.client = None
            raise BackendError(self.down(e)) from None
        except Exception as e:  # noqa: BLE001 - tritonclient/gevent raise others for a dead peer
            if type(e).__module__.startswith(("gevent", "geventhttpclient", "grpc")):
                self._local.client = None
                raise BackendError(self.down(e)) from None
            raise


class TritonBackend(Backend):
    """One graph of the contract, run by the Triton model of the same name."""

    name = "triton"

    def __init__(self, graph: GraphSpec, connection: _Connection, model: str):
        super().__init__(graph)
        self.connection = connection
        self.model = model

    def _activate(self) -> None:
        pass

    def _deactivate(self) -> None:
        self.connection.close()  # shared by the graphs; closing twice is harmless

    def _infer(self, feed: dict[str, Any]) -> dict[str, Any]:
        ref = next(iter(feed.values()))
        host = {k: (v if isinstance(v, np.ndarray) else arrays.to_numpy(v)) for k, v in feed.items()}
        tc = self.connection.tc
        inputs = []
        for name in self.graph.input_names:
            x = np.ascontiguousarray(host[name], dtype=np.float32)
            i = tc.InferInput(name, list(x.shape), "FP32")
            i.set_data_from_numpy(x)
            inputs.append(i)
        outputs = [tc.InferRequestedOutput(n) for n in self.graph.output_names]
        kw = self.connection.timeout_kw()
        result = self.connection.call(
            self.graph.name, lambda c: c.infer(self.model, inputs, outputs=outputs, **kw))
        # as_numpy() views the response's immutable bytes (read-only): copy, so callers get arrays
        # they own, as from load() (and torch.from_numpy gets a writable buffer)
        out = {n: np.array(result.as_numpy(n), copy=True) for n in self.graph.output_names}
        return out if isinstance(ref, np.ndarray) else {k: arrays.like(v, ref) for k, v in out.items()}


class RemoteManifest(Manifest):
    """The served folder's manifest (fields, model config, shape limits); its files stay on the server."""

    def __init__(self, label: str, data: dict):
        super().__init__(Path("."), data)
        self.root = label  # the server's URL stands where the folder would

    def read_verified(self, name: str) -> bytes:
        raise BackendError(f"{name} lies on the server at {self.root}; remote() reads no files")


def remote(url: str = "localhost:8000", *, protocol: str | None = None, timeout: float = 60.0):
    """An :class:`~asym_runtime.AsymVAE` whose calls run on the Triton server at ``url``
    (started by ``asym-serve``).

    Args:
        url: ``host:port`` (HTTP), ``http://host:port`` or ``grpc://host:port``.
        protocol: ``"http"`` or ``"grpc"`` when ``url`` has no scheme (default http).
        timeout: seconds to connect and to wait for each answer (a decode at the largest size on
            a CPU takes minutes: raise it there).

    Raises:
        BackendUnavailableError: no server answers, it is not ready, or it serves no asym-export
            models.
        ValueError: a bad ``url``, ``protocol`` or ``timeout``.
    """
    from ..vae import AsymVAE

    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ValueError(f"timeout {timeout!r}: seconds, a finite number > 0")
    protocol, address = _split_url(url, protocol)
    conn = _Connection(protocol, address, timeout)
    try:
        ready = conn.call("remote", lambda c: c.is_server_ready(**conn.timeout_kw()))
    except BackendError as e:
        raise BackendUnavailableError(f"{e}; start one with: asym-serve ARTIFACT_DIR") from None
    if not ready:
        raise BackendUnavailableError(f"the Triton server at {conn.label} is not ready (still loading its models?)")
    backends: dict[str, Backend] = {}
    data = backend = precision = None
    max_batch = None  # the smallest max_batch_size of the served models (asym-serve --max-batch)
    for graph in GRAPHS.values():
        try:
            if not conn.call("remote", lambda c: c.is_model_ready(graph.name, **conn.timeout_kw())):
                continue
            cfg = conn.call("remote", lambda c: c.get_model_config(graph.name, **conn.timeout_kw()))
        except (BackendError, AsymInputError):
            continue
        params = _parameters(cfg, protocol)
        if PARAM_MANIFEST not in params:
            continue  # a model of that name that asym-serve did not write
        if data is None:
            data = parse_manifest_bytes(params[PARAM_MANIFEST].encode(), f"{conn.label} {graph.name} config")
            backend, precision = params.get(PARAM_BACKEND, "auto"), params.get(PARAM_PRECISION)
        backends[graph.name] = TritonBackend(graph, conn, graph.name).activate()
        mb = int(cfg.get("max_batch_size", 0)) if protocol == "http" else int(cfg.config.max_batch_size)
        max_batch = mb if max_batch is None else min(max_batch, mb)
    if data is None or not backends:  # any subset asym-serve --graphs served, like load(graphs=)
        raise BackendUnavailableError(
            f"the Triton server at {conn.label} serves no asym-serve models (no ready model named "
            f"{', '.join(GRAPHS)} with asym-serve's manifest parameter)")
    manifest = RemoteManifest(conn.label, data)
    precision = precision or "fp32"
    limits = manifest.limits
    if max_batch and max_batch < limits.max_batch:  # a request the server's batcher cannot take
        limits = dataclasses.replace(limits, max_batch=max_batch, opt_batch=min(limits.opt_batch, max_batch),
                                     min_batch=min(limits.min_batch, max_batch))
    log.info("remote %s: %s, models %s", conn.label, manifest.variant, ", ".join(backends))
    vae = AsymVAE(manifest, backends, backend="triton", precision=precision, limits=limits,
                  device="remote")
    vae.server_backend = backend  # what the server runs (asym_runtime.load's name)
    return vae


def _parameters(cfg: Any, protocol: str) -> dict[str, str]:
    """Model parameters of a config from either client (HTTP: JSON dict; gRPC: protobuf response)."""
    if protocol == "http":
        return {k: v.get("string_value", "") for k, v in (cfg.get("parameters") or {}).items()}
    return {k: v.string_value for k, v in cfg.config.parameters.items()}
