"""``asym-serve DIR``: an artifact folder served by NVIDIA Triton Inference Server (the command
line is in :mod:`.cli`).

The server is Triton itself, the ``tritonserver`` binary and python backend that the
``nvidia-pytriton`` wheel carries (or, with ``--tritonserver``, an installed one such as
``/opt/tritonserver/bin/tritonserver`` in NVIDIA's container). ``asym-serve`` writes a model
repository into a private workspace, one python-backend model per graph of the contract
(``encoder``, ``decoder``, ``decoder_uncond``; each runs :mod:`.model`, ``asym_runtime``
loaded on the folder), starts Triton on it, waits until it is ready and stops it on Ctrl-C or
SIGTERM.

Why not PyTriton's own ``Triton.bind``: its proxy answers a whole batch with one error, so one
bad request would fail the good requests Triton batched with it; Triton's python backend
answers each request on its own (``InferenceResponse(error=...)``), which is what a service
needs. The binary is the same.

Three facts of the wheel's binary (0.7.0, Triton 2.51) this module deals with:

* its shared libraries lie in ``nvidia_pytriton.libs`` beside the package;
* the backend stub links ``libpython3.X.so``; under an interpreter that is not the system's
  (pyenv, conda) the loader finds the system's libpython first and the stub fails
  (``'_thread.RLock' object has no attribute '_recursion_count'``), so the running
  interpreter's own lib folder goes first on ``LD_LIBRARY_PATH``;
* the stub's Python finds its prefix through ``PATH`` like a bare ``python3``: a venv that is
  not activated lost to another Python (see ``server_env`` and ``_MODEL_PY``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BackendUnavailableError
from ..manifest import read_manifest
from ..specs import GRAPHS
from . import config as tconfig
from .model import (PARAM_ARTIFACT, PARAM_BACKEND, PARAM_GRAPH, PARAM_LOADED, PARAM_MANIFEST,
                    PARAM_PRECISION)

log = logging.getLogger(__name__)


_MODEL_PY = '''\
# Written by asym-serve: Triton's python backend runs asym_runtime's model for this graph.
# The stub's interpreter gets the launching environment's site folders (and their .pth files,
# which an editable install needs) AHEAD of its own before anything else is imported: the stub
# resolves its prefix as a bare `python3` would (through PATH), so for a venv that is not
# activated it is the base interpreter, whose site-packages would win (numpy 2 there made every
# output tensor arrive empty). numpy is then checked to be the launching environment's.
import site
import sys
_before = list(sys.path)
for _d in {site_dirs!r}:
    site.addsitedir(_d)
_ours = [_p for _p in sys.path if _p not in _before]
sys.path[:] = _ours + [_p for _p in sys.path if _p not in _ours]
_NUMPY, _LAUNCHER = {numpy_version!r}, {executable!r}
import numpy  # noqa: E402
if numpy.__version__ != _NUMPY:
    raise ImportError(
        f"Triton's python backend imports numpy {{numpy.__version__}} from {{numpy.__file__}}, but asym-serve "
        f"runs with numpy {{_NUMPY}} ({{_LAUNCHER}}): the backend's interpreter does not see asym-serve's "
        "environment (start asym-serve from an activated environment, or install into the interpreter "
        "Triton's python backend runs)")
from asym_runtime.serving.model import TritonPythonModel  # noqa: E402,F401
'''


def model_py() -> str:
    """The python-backend ``model.py`` of every served graph (see ``_MODEL_PY``)."""
    import numpy

    return _MODEL_PY.format(site_dirs=_site_dirs(), numpy_version=numpy.__version__, executable=sys.executable)


@dataclass
class ServeOptions:
    """What ``asym-serve`` serves and how (the CLI's arguments)."""

    artifact: Path
    backend: str = "auto"
    precision: str | None = None
    address: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    instances: int = 1
    #: the largest batch Triton may form (None: the folder's max_batch); 1 turns batching off
    max_batch: int | None = None
    kind: str = "cpu"
    gpus: list[int] | None = None
    queue_delay_us: int = tconfig.DEFAULT_QUEUE_DELAY_US
    graphs: tuple[str, ...] = tuple(GRAPHS)
    tritonserver: Path | None = None
    workspace: Path | None = None
    start_timeout_s: float = 600.0
    #: how long Triton drains on stop: in-flight requests, then open client connections (idle
    #: keep-alive ones included), then model unloading, all under this one timer
    exit_timeout_s: int = 10
    log_verbose: int = 0
    extra_env: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- Triton's files

@dataclass
class TritonInstall:
    """Where the ``tritonserver`` binary, its python backend and libraries are."""

    binary: Path
    python_backend: Path        # the folder with libtriton_python.so and triton_python_backend_utils.py
    stub: Path | None           # triton_python_backend_stub for this interpreter (None: the backend's own)
    lib_dirs: list[Path]


def find_triton(tritonserver: str | os.PathLike | None = None) -> TritonInstall:
    """The Triton to run: ``tritonserver`` if given (an installed Triton, its backends beside it
    as in NVIDIA's container), else the one in the ``nvidia-pytriton`` wheel."""
    if tritonserver is not None:
        binary = Path(tritonserver)
        if not binary.is_file():
            raise BackendUnavailableError(f"--tritonserver {binary}: no such file")
        backend = binary.resolve().parent.parent / "backends" / "python"
        if not (backend / "libtriton_python.so").is_file():
            raise BackendUnavailableError(f"{binary}: no python backend at {backend} (libtriton_python.so)")
        return TritonInstall(binary, backend, None, [])
    try:
        import pytriton
    except ImportError:
        raise BackendUnavailableError(
            "asym-serve needs Triton: install the serving extra (pip install -e '.[serve]', which brings "
            "nvidia-pytriton's tritonserver) or pass --tritonserver /opt/tritonserver/bin/tritonserver"
        ) from None
    dist = Path(pytriton.__file__).parent / "tritonserver"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in (dist / "python_backend_stubs").iterdir()) if (dist / "python_backend_stubs").is_dir() else []
        raise BackendUnavailableError(f"nvidia-pytriton has no Triton python-backend stub for Python {version} "
                                      f"(it has: {', '.join(have) or 'none'})")
    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    return TritonInstall(dist / "bin" / "tritonserver", dist / "backends" / "python", stub,
                         [libs] if libs.is_dir() else [])


def server_env(install: TritonInstall, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    # The python backend's stub embeds libpython and finds its prefix as a bare `python3` does,
    # through PATH: this interpreter's folder first makes that prefix this environment (a venv
    # need not be activated; otherwise the stub ran the base interpreter's site-packages, or
    # another Python's standard library under this libpython).
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable)] + ([env["PATH"]] if env.get("PATH") else []))
    own_lib = sysconfig.get_config_var("LIBDIR")
    dirs = [str(d) for d in install.lib_dirs] + ([own_lib] if own_lib else [])
    if env.get("LD_LIBRARY_PATH"):
        dirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(dirs)
    env.update(extra or {})
    return env


# --------------------------------------------------------------------------- the model repository

def _site_dirs() -> list[str]:
    dirs = list(site.getsitepackages())
    user = site.getusersitepackages()
    if site.ENABLE_USER_SITE and user and os.path.isdir(user):
        dirs.append(user)
    return [d for d in dirs if os.path.isdir(d)]


def write_python_repository(opts: ServeOptions, repo: Path) -> list[str]:
    """One python-backend model per served graph in ``repo``; returns the model names."""
    manifest = read_manifest(opts.artifact)
    manifest_json = json.dumps(manifest.data, sort_keys=True, separators=(",", ":"))
    source = model_py()
    names = []
    for graph_name in opts.graphs:
        graph = GRAPHS[graph_name]
        params = {PARAM_ARTIFACT: str(opts.artifact.resolve()), PARAM_GRAPH: graph.name,
                  PARAM_BACKEND: opts.backend, PARAM_MANIFEST: manifest_json, PARAM_LOADED: manifest.generation}
        if opts.precision:
            params[PARAM_PRECISION] = opts.precision
        max_batch = min(manifest.limits.max_batch, opts.max_batch or manifest.limits.max_batch)
        cfg = tconfig.build_config(graph, backend="python", max_batch=max_batch,
                                   queue_delay_us=opts.queue_delay_us, instances=opts.instances,
                                   kind=opts.kind, gpus=opts.gpus, parameters=params)
        model_dir = repo / graph.name
        (model_dir / "1").mkdir(parents=True)
        (model_dir / "config.pbtxt").write_text(tconfig.config_text(cfg))
        (model_dir / "1" / "model.py").write_text(source)
        names.append(graph.name)
    return names


def _backend_dir(install: TritonInstall, workspace: Path) -> Path:
    """A backends folder whose python backend has this interpreter's stub."""
    backends = workspace / "backends"
    py = backends / "python"
    py.mkdir(parents=True)
    for f in install.python_backend.iterdir():
        if f.is_file():
            (py / f.name).symlink_to(f)
    if install.stub is not None:
        target = py / "triton_python_backend_stub"
        if target.exists() or target.is_symlink():
            target.unlink()
        shutil.copy2(install.stub, target)
    return backends


# --------------------------------------------------------------------------- the server

class TritonServer:
    """A running ``tritonserver`` on an artifact folder (``with TritonServer(opts) as s:``)."""

    def __init__(self, opts: ServeOptions):
        self.opts = opts
        self.process: subprocess.Popen | None = None
        self.workspace: Path | None = None
        self._own_workspace = False
        self.log_path: Path | None = None
        self.models: list[str] = []

    @property
    def _local_host(self) -> str:
        """Where this machine reaches the server: the listen address, loopback for 'all'."""
        return "127.0.0.1" if self.opts.address in ("0.0.0.0", "") else self.opts.address

    @property
    def http_url(self) -> str:
        return f"http://{self._local_host}:{self.opts.http_port}"

    def _check_ports(self) -> None:
        """Refuse ports something already listens on: Triton loads its models before it binds,
        so an earlier server on the same port would answer the readiness probe, and this start
        would report 'serving' for a server that then fails to bind."""
        import socket

        opts, host = self.opts, self._local_host
        for what, port in (("HTTP", opts.http_port), ("gRPC", opts.grpc_port), ("metrics", opts.metrics_port)):
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                if s.connect_ex((host, port)) == 0:
                    raise RuntimeError(f"port {port} ({what}) on {host} is already in use (an earlier asym-serve "
                                       "or another server is listening there); stop it or pass another "
                                       f"--{what.lower()}-port")

    def start(self, progress=None) -> "TritonServer":
        opts = self.opts
        self._check_ports()
        install = find_triton(opts.tritonserver)
        if opts.workspace is None:
            self.workspace = Path(tempfile.mkdtemp(prefix="asym-serve-"))
            self._own_workspace = True
        else:
            self.workspace = Path(opts.workspace)
            self.workspace.mkdir(parents=True, exist_ok=False)
        repo = self.workspace / "models"
        self.models = write_python_repository(opts, repo)
        backends = _backend_dir(install, self.workspace)
        self.log_path = self.workspace / "tritonserver.log"
        cmd = [str(install.binary), f"--model-repository={repo}", f"--backend-directory={backends}",
               f"--http-address={opts.address}", f"--http-port={opts.http_port}",
               f"--grpc-address={opts.address}", f"--grpc-port={opts.grpc_port}",
               f"--metrics-address={opts.address}", f"--metrics-port={opts.metrics_port}",
               "--allow-metrics=true", "--disable-auto-complete-config", "--exit-on-error=true",
               "--strict-readiness=true", f"--exit-timeout-secs={opts.exit_timeout_s}",
               f"--log-verbose={opts.log_verbose}"]
        log.info("starting %s", " ".join(cmd))
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                            env=server_env(install, opts.extra_env), start_new_session=True)
        self._wait_ready(progress)
        return self

    def _wait_ready(self, progress) -> None:
        deadline = time.monotonic() + self.opts.start_timeout_s
        url = f"{self.http_url}/v2/health/ready"
        last_note = 0.0
        while True:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(f"tritonserver exited with code {code} while starting:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            now = time.monotonic()
            if now > deadline:
                tail = self.log_tail()  # before stop(), which removes the workspace and the log with it
                self.stop()
                raise RuntimeError(f"tritonserver was not ready within {self.opts.start_timeout_s:g} s:\n{tail}")
            if progress and now - last_note > 10:
                progress(f"loading {', '.join(self.models)} ...")
                last_note = now
            time.sleep(0.25)

    def log_tail(self, lines: int = 25) -> str:
        """The end of Triton's log, after the models it failed to load and why (Triton writes
        those while loading, and a banner of its options after them, so the tail alone would
        show only the banner)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, AttributeError):
            return "(no server log)"
        all_lines = text.splitlines()
        tail = all_lines[-lines:]
        failures = []
        for line in all_lines:
            at = line.find("failed to load '")
            if line.startswith("E") and at >= 0 and line not in tail:
                # Triton escapes the message's own newlines; its first lines say what failed
                message = line[at:].rstrip('"').replace("\\n", "\n").split("\nAt:")[0].splitlines()
                failures.append("\n".join(m for m in message[:8] if m.strip()))
        return "\n".join(failures + tail)

    def wait(self) -> int:
        return self.process.wait()

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop Triton (SIGTERM: it drains in-flight requests), then remove the workspace.

        Triton is killed (its whole process group, python-backend stubs included) when it has not
        stopped within ``timeout_s``, or when the wait is interrupted (a second Ctrl-C): the
        KeyboardInterrupt is raised again after the kill, never before it, so no server is left
        running on the ports without the process that started it."""
        timeout_s = self.opts.exit_timeout_s + 20 if timeout_s is None else timeout_s
        p = self.process
        try:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("tritonserver did not stop within %.0f s; killing it", timeout_s)
                    self._kill(p)
                except KeyboardInterrupt:
                    log.warning("interrupted while tritonserver was stopping; killing it")
                    self._kill(p)
                    raise
            if p is not None:
                # Triton stopped while loading leaves its python-backend stubs running, orphaned
                # in its process group (seen after a start that timed out): end what is left
                self._kill(p)
        finally:
            if self._own_workspace and self.workspace is not None:
                shutil.rmtree(self.workspace, ignore_errors=True)
                self.workspace = None

    @staticmethod
    def _kill(p: subprocess.Popen) -> None:
        """SIGKILL to Triton's process group (it leads a session of its own), then reap it."""
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # the group is empty: nothing is left
            pass
        p.wait()

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
