"""Starting a real Triton server the way a user does (``asym-serve`` in its own process) on free localhost ports."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class Served:
    url: str
    grpc_url: str
    metrics_url: str
    process: subprocess.Popen
    output: Path

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)
        return self.process.returncode


def start_server(artifact: Path, log_dir: Path, *extra: str, timeout: float = 120.0, env: dict | None = None) -> Served:
    http, grpc, metrics = free_ports(3)
    out = log_dir / f"asym-serve-{http}.log"
    cmd = [sys.executable, "-c", "import sys; from asym_runtime.serving.cli import serve_main; sys.exit(serve_main())",
           str(artifact), "--http-port", str(http),
           "--grpc-port", str(grpc), "--metrics-port", str(metrics), *extra]
    with open(out, "wb") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"asym-serve exited with {p.returncode}:\n{out.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return Served(f"127.0.0.1:{http}", f"grpc://127.0.0.1:{grpc}",
                                  f"http://127.0.0.1:{metrics}/metrics", p, out)
        except OSError:
            pass
        time.sleep(0.25)
    p.kill()
    raise RuntimeError(f"asym-serve was not ready within {timeout} s:\n{out.read_text()}")
