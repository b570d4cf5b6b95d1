"""asym-serve and asym-triton-repo follow the tools' convention (tests/test_cli_convention.py):
one line on stderr, exit 2 for usage and bad input, 1 for an unexpected error, traceback only with --debug."""

from __future__ import annotations

import json

import pytest
from cli_lines import one_line

pytest.importorskip("tritonclient", reason="the serve extra is not installed (pip install -e '.[serve]')")

from asym_runtime.backends.onnxrt import cuda_provider_available  # noqa: E402
from asym_runtime.serving import cli, repository, server  # noqa: E402

MAINS = {"asym-serve": cli.serve_main, "asym-triton-repo": cli.repo_main}
#: where each tool's work lives (what a test replaces to make it fail unexpectedly)
WORK = {"asym-serve": server, "asym-triton-repo": repository}


@pytest.mark.parametrize("tool", MAINS)
def test_an_unknown_flag_is_one_line_and_exit_2(tool, tmp_path, capsys):
    assert MAINS[tool]([str(tmp_path), "--no-such-flag"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"{tool}: error: ") and "--no-such-flag" in line and f"see {tool} --help" in line


@pytest.mark.parametrize("tool, argv", [("asym-serve", ["{folder}"]), ("asym-triton-repo", ["{folder}", "--out", "{out}"])])
def test_an_unusable_folder_is_one_line_and_exit_2(tool, argv, tmp_path, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"schema_version": 2, "files": {"a.onnx": {"sha256": 123}}}))
    assert MAINS[tool]([a.format(folder=folder, out=tmp_path / "r") for a in argv]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"{tool}: error: ") and "breaks the manifest schema" in line, line


@pytest.mark.parametrize("tool, target, argv", [
    ("asym-serve", "TritonServer", ["{folder}"]),
    ("asym-triton-repo", "write_repository", ["{folder}", "--out", "{out}"]),
])
def test_an_unexpected_error_is_one_line_exit_1_and_debug_shows_it(tool, target, argv, tiny_artifact, tmp_path,
                                                                   monkeypatch, capsys):
    def boom(*a, **k):
        raise KeyError("surprise")

    monkeypatch.setattr(WORK[tool], target, boom)
    args = [a.format(folder=tiny_artifact, out=tmp_path / "r") for a in argv]
    assert MAINS[tool](args) == 1
    line = one_line(capsys.readouterr().err)
    assert line == f"{tool}: unexpected error: KeyError: 'surprise' (rerun with --debug for the traceback)"
    with pytest.raises(KeyError, match="surprise"):
        MAINS[tool](args + ["--debug"])


def test_a_triton_that_dies_while_starting_is_exit_1_with_its_own_words(tiny_artifact, tmp_path, capsys):
    """The server process exits before it is ready (here: a tritonserver that cannot bind its
    port, as when another server holds it): exit 1, one asym-serve line, then Triton's log tail
    (what the user needs to act), no traceback. --tritonserver runs the given binary, so a
    two-line one stands in for the failing server; asym-serve's own code is all real."""
    root = tmp_path / "triton"
    (root / "backends" / "python").mkdir(parents=True)
    (root / "backends" / "python" / "libtriton_python.so").write_bytes(b"")
    (root / "bin").mkdir()
    exe = root / "bin" / "tritonserver"
    exe.write_text("#!/bin/sh\necho 'E1127 failed to start HTTP service: address in use' >&2\nexit 3\n")
    exe.chmod(0o755)
    assert cli.serve_main([str(tiny_artifact), "--tritonserver", str(exe), "--backend", "onnxruntime-cpu"]) == 1
    captured = capsys.readouterr()
    err = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert err[0] == "asym-serve: error: tritonserver exited with code 3 while starting:", captured.err
    assert err[1:] == ["E1127 failed to start HTTP service: address in use"], captured.err
    assert "Traceback" not in captured.err
    assert "asym-serve: serving" not in captured.out


def test_a_missing_tritonserver_is_one_line_and_exit_2(tiny_artifact, tmp_path, capsys):
    assert cli.serve_main([str(tiny_artifact), "--tritonserver", str(tmp_path / "nowhere")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == [f"asym-serve: error: --tritonserver {tmp_path / 'nowhere'}: no such file"]


def test_a_port_already_served_is_refused_before_triton_starts(tiny_artifact, capsys):
    """Triton binds its ports only after loading the models, so an earlier server on the same port
    would answer the readiness probe and asym-serve would say 'serving' for the wrong server."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.serve_main([str(tiny_artifact), "--http-port", str(port), "--backend", "onnxruntime-cpu"]) == 1
    assert one_line(capsys.readouterr().err) == (
        f"asym-serve: error: port {port} (HTTP) on 127.0.0.1 is already in use (an earlier asym-serve "
        "or another server is listening there); stop it or pass another --http-port")


def test_a_second_interrupt_while_triton_drains_kills_it(tmp_path):
    """Ctrl-C once: SIGTERM, Triton drains (up to --exit-timeout plus 20 s). Ctrl-C again while it
    drains: it must be killed before the interrupt goes on, or it keeps the ports with nobody left
    to stop it. A process that ignores SIGTERM stands in for a draining Triton; stop() is real."""
    import _thread
    import signal
    import subprocess
    import sys
    import threading
    import time

    ready = tmp_path / "ready"
    child = subprocess.Popen(
        [sys.executable, "-c", "import signal, time, pathlib; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         f"pathlib.Path({str(ready)!r}).touch(); time.sleep(120)"], start_new_session=True)
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), "the stand-in process did not start"
    s = server.TritonServer(server.ServeOptions(artifact=tmp_path))
    s.process, s.workspace, s._own_workspace = child, tmp_path / "ws", True
    s.workspace.mkdir()
    # The second Ctrl-C, while stop() waits, repeated every 0.5 s until stop() has acted on one: a
    # CI run saw stop() wait out its timeout after a single interrupt_main, which CPython drops when
    # it lands in a finalizer that garbage collection runs just then, and which does nothing while
    # SIGINT is ignored or left to the OS (so Python's own handler is set for the duration).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    done = threading.Event()

    def ctrl_c():
        delay = 1.0
        while not done.wait(delay) and child.poll() is None:
            _thread.interrupt_main()
            delay = 0.5

    firer = threading.Thread(target=ctrl_c, daemon=True)
    firer.start()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            s.stop(timeout_s=60)
        survived = child.poll() is None  # stop() must have killed it before the interrupt went on
    finally:
        done.set()
        while True:  # one more may have fired just as stop() raised
            try:
                firer.join()
                time.sleep(0.01)  # lets a pending one be raised here
                break
            except KeyboardInterrupt:
                continue
        signal.signal(signal.SIGINT, previous)
        if child.poll() is None:
            child.kill()
    assert not survived, "the interrupt left the server running"
    assert time.monotonic() - started < 30, "stop() waited out its timeout instead of killing"
    assert child.returncode == -9  # SIGKILL, not the SIGTERM it ignores
    assert not (tmp_path / "ws").exists()


def test_a_model_that_fails_to_load_is_named_with_its_reason(tiny_artifact, tmp_path, capsys):
    """Triton logs why a model failed to load, then a banner of its options longer than the log
    tail asym-serve shows: the reason must still reach the user (it was cut off). Triton escapes
    the message's newlines; the python traceback after "At:" is left out. A stand-in binary
    writes such a log (as in the test above); asym-serve's code is all real."""
    root = tmp_path / "triton"
    (root / "backends" / "python").mkdir(parents=True)
    (root / "backends" / "python" / "libtriton_python.so").write_bytes(b"")
    (root / "bin").mkdir()
    failed = ("E1127 12:22:13.707832 17863 model_lifecycle.cc:642] \"failed to load 'decoder' version 1: Internal: "
              "ImportError: numpy is not the one asym-serve runs\\n\\nAt:\\n  /ws/models/decoder/1/model.py(17): <module>\\n\"")
    log = root / "log.txt"
    log.write_text("\n".join([failed, *(f"| option {i} | value |" for i in range(40)),
                              "error: creating server: Internal - failed to load all models"]) + "\n")
    exe = root / "bin" / "tritonserver"
    exe.write_text(f"#!/bin/sh\ncat '{log}'\nexit 1\n")
    exe.chmod(0o755)
    assert cli.serve_main([str(tiny_artifact), "--tritonserver", str(exe), "--backend", "onnxruntime-cpu"]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err[0] == "asym-serve: error: tritonserver exited with code 1 while starting:"
    assert err[1] == "failed to load 'decoder' version 1: Internal: ImportError: numpy is not the one asym-serve runs"
    assert not [ln for ln in err if "At:" in ln or "model.py(17)" in ln]
    assert err[-1] == "error: creating server: Internal - failed to load all models"


@pytest.mark.parametrize("argv, needle", [
    # each was found only inside Triton before (a model that failed to load: exit 1 after a start)
    (["--backend", "openvino", "--precision", "fp16"], "precision 'fp16': OpenVINO runs fp32 or bf16"),
    pytest.param(["--backend", "onnxruntime-cuda"], "has no CUDA provider",
                 marks=pytest.mark.skipif(cuda_provider_available(), reason="onnxruntime-gpu is installed")),
    # .invalid never resolves (RFC 6761)
    (["--address", "asym-serve-test.invalid"], "--address 'asym-serve-test.invalid' is no address this machine"),
    (["--start-timeout", "-5"], "--start-timeout -5.0: seconds, > 0"),
    (["--kind", "gpu", "--gpus", "-1"], "--gpus '-1': comma-separated GPU ids"),
])
def test_asym_serve_refuses_before_triton_starts(argv, needle, tiny_artifact, tmp_path, capsys):
    """--tritonserver names nothing: a check that let these through would fail on that instead."""
    assert cli.serve_main([str(tiny_artifact), "--tritonserver", str(tmp_path / "nowhere"), *argv]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("asym-serve: error: ") and needle in line, line


def test_asym_serve_refuses_a_damaged_folder_before_triton_starts(tiny_artifact, tmp_path, capsys):
    import shutil

    from asym_runtime import read_manifest

    folder = tmp_path / "copy"
    shutil.copytree(tiny_artifact, folder)
    manifest = read_manifest(folder)
    (data,) = manifest.companions("decoder.onnx")
    path = manifest.path(data.name)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 1
    path.write_bytes(bytes(raw))
    assert cli.serve_main([str(folder), "--tritonserver", str(tmp_path / "nowhere")]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"sha256 of {data.name}" in line and "changed after export" in line, line
