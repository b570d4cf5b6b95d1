"""Publishing as one atomic switch: failed, killed and concurrent exports never cost the folder
its artifact, and never leave a mix (asym_export/artifact.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from onnx_cache import cli_command

import asym_runtime
from asym_export.artifact import STAGING_PREFIX, ArtifactWriter, OutputBusyError, OutputDirError
from asym_export.cli import main
from asym_runtime.manifest import GENERATION_PREFIX, read_manifest

CHILD = Path(__file__).with_name("publish_child.py")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file of the artifact: the manifest and the generations, not the export lock
    or a staging folder (checked separately: a killed export leaves one for the next to remove)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"
            and not p.relative_to(folder).parts[0].startswith(STAGING_PREFIX)}


def assert_complete(folder: Path) -> str:
    """The folder loads, and every file its manifest lists is there with its sha256; the generation."""
    m = read_manifest(folder)
    for name in m.files:
        m.read_verified(name)
    with asym_runtime.load(folder, backend="onnxruntime-cpu", graphs=("decoder_uncond",)) as rt:
        assert np.isfinite(rt.decode(np.zeros((1, 4, 8, 8), np.float32))).all()
    return m.generation


def debris(folder: Path, keep: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir()
                  if p.name.startswith(STAGING_PREFIX) or (p.name.startswith(GENERATION_PREFIX) and p.name != keep)
                  or p.name.endswith(".tmp"))


# --------------------------------------------------------------------------- failing re-exports

def _pickle_only_weights(folder: Path, tiny_vae) -> Path:
    tiny_vae.save_pretrained(folder, safe_serialization=False)
    assert not list(folder.glob("*.safetensors"))
    return folder


@pytest.mark.parametrize("kind", ["missing-weights", "pickle-weights", "failed-verification"])
def test_a_failing_reexport_leaves_the_old_artifact_byte_identical(tiny_artifact, copy_artifact, tmp_path,
                                                                   tiny_vae, capsys, kind, reuse_onnx_exports):
    folder = copy_artifact(tiny_artifact)
    before = snapshot(folder)
    argv, code = {
        "missing-weights": (["--weights", str(tmp_path / "nonexistent")], 2),
        "pickle-weights": (["--weights", str(_pickle_only_weights(tmp_path / "w", tiny_vae))]
                           if kind == "pickle-weights" else [], 2),
        # a late failure: graphs were exported and staged, then their check fails
        "failed-verification": (["--random-weights", "--atol", "1e-12", "--no-fp16", "--no-cuda-form"], 1),
    }[kind]
    assert main(["--variant", "tiny", "--out", str(folder), *argv]) == code
    err = capsys.readouterr().err
    assert "nothing was published: the folder is as it was" in err or code == 2, err
    assert snapshot(folder) == before
    assert_complete(folder)
    assert debris(folder, read_manifest(folder).generation) == []


# --------------------------------------------------------------------------- kill -9

def _publish(src: Path, out: Path, kill_at: int = 0, pause: float = 0.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHILD), str(src), str(out)], capture_output=True, text=True,
                          env={**ENV, "KILL_AT": str(kill_at), "PAUSE_S": str(pause)}, timeout=300)


def test_twenty_kill_points_leave_the_old_or_the_new_artifact(tiny_artifact, copy_artifact, tmp_path):
    """SIGKILL at 20 points spread over the publishing of an export (every file-system change
    the writer makes is a candidate), with a reader loading the folder in a loop alongside:
    after each kill the folder holds the complete old or the complete new artifact, and each
    of the reader's loads succeeded. The next export removes what the killed ones left."""
    folder = copy_artifact(tiny_artifact)
    old_manifest = (folder / "manifest.json").read_bytes()
    old = snapshot(folder)
    shutil.copytree(tiny_artifact, tmp_path / "probe")
    probe = _publish(tiny_artifact, tmp_path / "probe")  # count the changes of one whole re-export
    assert probe.returncode == 0, probe.stderr
    total = int(probe.stdout.split()[-1])
    assert total >= 40, total  # ~24 files: fsync + chmod each, plus the switch
    points = sorted({round(1 + i * (total - 1) / 19) for i in range(20)})
    assert len(points) == 20

    stop, loads, failures = threading.Event(), [], []

    def reader():
        while not stop.is_set():
            try:
                with asym_runtime.load(folder, backend="onnxruntime-cpu", graphs=("decoder_uncond",)) as rt:
                    loads.append(rt.manifest.generation)
            except Exception as e:  # noqa: BLE001 - any failure is the finding
                failures.append(repr(e))

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    outcomes = []
    try:
        for k in points:
            r = _publish(tiny_artifact, folder, kill_at=k, pause=0.002)
            assert r.returncode == -signal.SIGKILL, (k, r.returncode, r.stderr)
            manifest = (folder / "manifest.json").read_bytes()
            gen = assert_complete(folder)
            if manifest == old_manifest:
                now = snapshot(folder)
                assert {n: h for n, h in now.items() if n in old} == old, f"kill at {k} changed the old artifact"
                outcomes.append("old")
            else:
                assert json.loads(manifest)["created_utc"] == "child"
                outcomes.append("new")
                old_manifest, old = manifest, {n: h for n, h in snapshot(folder).items()
                                               if n == "manifest.json" or n.startswith(gen + "/")}
    finally:
        stop.set()
        t.join(120)
    assert not failures, failures[:3]
    assert loads, "the reader never loaded"
    assert "old" in outcomes and "new" in outcomes, outcomes  # kills fell before and after the switch

    r = _publish(tiny_artifact, folder)  # the next export cleans up
    assert r.returncode == 0, r.stderr
    gen = assert_complete(folder)
    assert debris(folder, gen) == []
    assert sorted(p.name for p in folder.iterdir()) == sorted([".lock", "manifest.json", gen])


# --------------------------------------------------------------------------- concurrency

def _export_cmd(out: Path, seed: int, onnx_cache: Path | None = None) -> list[str]:
    """asym-export in a process of its own; with ``onnx_cache``, its graph exports are served from
    that folder (onnx_cache.cli_command)."""
    cli = [sys.executable, "-m", "asym_export.cli"] if onnx_cache is None else cli_command(onnx_cache)
    return [*cli, "--variant", "tiny", "--random-weights", "--seed", str(seed),
            "--no-fp16", "--no-cuda-form", "--out", str(out)]


def _wait_for(predicate, timeout=300.0, what=""):
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_second_export_into_a_busy_folder_fails_at_once_and_a_killed_one_changes_nothing(
        tiny_artifact, copy_artifact, capsys, onnx_cache_folder):
    """Export A (seed 1) runs; B into the same folder fails at once naming A's pid; A is then
    killed mid-export (graphs staged): the old artifact is intact; export C succeeds and
    removes A's staging folder. (A exports for real, which gives the test time to act while it
    runs; C reuses the session's exports of the seed-0 model.)"""
    folder = copy_artifact(tiny_artifact)
    before = snapshot(folder)
    a = subprocess.Popen(_export_cmd(folder, 1), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        lock = folder / ".lock"
        _wait_for(lambda: f'"pid": {a.pid}' in lock.read_text(errors="replace"), what="export A to take the lock")
        t0 = time.monotonic()
        assert main(["--variant", "tiny", "--random-weights", "--seed", "2", "--out", str(folder)]) == 2
        assert time.monotonic() - t0 < 10  # at once, not after waiting
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"another export is writing into this folder (pid {a.pid} on " in err[0], err

        def staged_graph():
            return any(p.name.endswith(".onnx") for s in folder.glob(STAGING_PREFIX + "*") for p in s.iterdir())

        _wait_for(lambda: staged_graph() or a.poll() is not None, what="export A to stage a graph")
        assert a.poll() is None, a.stderr.read()
        a.send_signal(signal.SIGKILL)
        a.wait(60)
    finally:
        if a.poll() is None:
            a.kill()
    assert snapshot(folder) == before
    assert_complete(folder)
    assert [p.name for p in folder.glob(STAGING_PREFIX + "*")], "the kill left no staging folder to clean"

    old = read_manifest(folder).generation
    c = subprocess.run(_export_cmd(folder, 0, onnx_cache_folder), env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert c.returncode == 0, c.stderr
    gen = assert_complete(folder)
    assert gen != old and read_manifest(folder).data["fp16"] is None  # C's (--no-fp16), not the old one
    assert sorted(p.name for p in folder.iterdir()) == sorted([".lock", "manifest.json", gen])


def test_the_lock_is_per_folder_and_released(tmp_path):
    a, b = ArtifactWriter(tmp_path / "x"), ArtifactWriter(tmp_path / "x")
    a.open()
    try:
        with pytest.raises(OutputBusyError, match=rf"pid {os.getpid()} on .*wait for it to finish or choose another --out"):
            b.open()
        with ArtifactWriter(tmp_path / "y"):  # another folder is free
            pass
    finally:
        a.close()
    b.open()  # released by close()
    b.close()


def test_a_manifest_of_another_schema_keeps_its_generation(tmp_path):
    """A folder written by a newer asym-export (schema this version cannot read) is not debris:
    an export that fails there leaves that generation alone."""
    out = tmp_path / "newer"
    (out / "gen-20300101T000000Z-0123abcd").mkdir(parents=True)
    (out / "gen-20300101T000000Z-0123abcd" / "decoder.onnx").write_bytes(b"graph")
    (out / "gen-20200101T000000Z-deadbeef").mkdir()  # named by no manifest: debris
    (out / "manifest.json").write_text(json.dumps({"schema_version": 3, "generation": "gen-20300101T000000Z-0123abcd"}))
    with ArtifactWriter(out):
        pass
    assert sorted(p.name for p in out.iterdir()) == [".lock", "gen-20300101T000000Z-0123abcd", "manifest.json"]


def test_only_names_an_export_makes_are_debris(tmp_path, capsys):
    """A user's own entries in --out whose names merely start like an export's (gen-images/,
    gen-notes.md, .staging-area/, a .manifest.json.*.tmp folder) survive an export, even one that
    fails at once; what killed exports leave (a generation no manifest names, a staging folder,
    a temporary manifest) is removed. Before, every name starting with gen- was deleted."""
    out = tmp_path / "out"
    mine = {"gen-images": "dir", "gen-notes.md": "file", ".staging-area": "dir", "gen-20200101T000000Z-deadbeef.txt":
            "file", ".manifest.json.abcd1234.tmp": "dir"}
    for name, kind in mine.items():
        if kind == "dir":
            (out / name).mkdir(parents=True)
            (out / name / "a.txt").write_text("precious")
        else:
            out.mkdir(exist_ok=True)
            (out / name).write_text("precious")
    left = ["gen-20200101T000000Z-deadbeef", ".staging-k3j_9x0a"]
    for name in left:
        (out / name).mkdir()
    (out / ".manifest.json.q1w2e3r4.tmp").write_text("{}")
    assert main(["--variant", "tiny", "--weights", str(tmp_path / "nonexistent"), "--out", str(out)]) == 2
    capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == sorted([".lock", *mine])
    for name, kind in mine.items():
        assert (out / name / "a.txt" if kind == "dir" else out / name).read_text() == "precious"


# --------------------------------------------------------------------------- the writer's own guarantees

def _fields(artifact: Path) -> dict:
    """A real export's manifest fields, less what write_manifest fills in itself."""
    return {k: v for k, v in read_manifest(artifact).data.items() if k not in ("schema_version", "generation", "files")}


def _stage(w: ArtifactWriter, name: str, data: bytes, mode: int = 0o600) -> None:
    """Stage ``name`` as ONNX's external-data writer does: a file only its owner can read."""
    fd = os.open(w.stage_path(name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _publish_one(w: ArtifactWriter, name: str) -> None:
    w.publish(name, role="external_data", fmt="onnx_external_data", precision="fp32")


def test_every_file_and_folder_is_on_disk_before_the_manifest_switches(tiny_artifact, tmp_path, monkeypatch):
    """The manifest vouches for files: each must be fsynced, the generation renamed into place and
    the folder's entries fsynced, all before manifest.json is replaced (a power cut after the
    switch must not find a manifest naming files that never reached the disk)."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        events.append(("replace", str(dst)))
        return real_replace(src, dst, *a, **k)

    def rename(src, dst, *a, **k):
        events.append(("rename", str(dst)))
        return real_rename(src, dst, *a, **k)

    out = tmp_path / "out"
    with ArtifactWriter(out) as w:
        staging = w.staging
        for name in ("a.bin", "sub/b.bin"):
            _stage(w, name, name.encode() * 100)
            _publish_one(w, name)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "rename", rename)
        w.write_manifest(_fields(tiny_artifact))
        monkeypatch.undo()
    gen = out / read_manifest(out).generation
    switch = events.index(("replace", str(out / "manifest.json")))
    before = events[:switch]
    assert ("rename", str(gen)) in before
    # publish() fsynced the files before write_manifest; write_manifest fsyncs the folders
    synced = [p for e, p in before if e == "fsync"]
    for d in (staging / "sub", staging, out):
        assert str(d) in synced, (d, synced)
    last_out_sync = max(i for i, e in enumerate(before) if e == ("fsync", str(out)))
    assert last_out_sync > before.index(("rename", str(gen))), "the folder's entries were not fsynced after the rename"


def test_publish_fsyncs_the_staged_file(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
    with ArtifactWriter(tmp_path / "out") as w:
        _stage(w, "a.bin", b"x" * 10)
        _publish_one(w, "a.bin")
        assert str(w.staging / "a.bin") in synced


def test_published_files_and_folders_are_readable_by_others(tiny_artifact, tmp_path):
    """ONNX's external-data writer and mkdtemp make owner-only files and folders; a served artifact
    is read by another user (Triton's): the writer gives files and folders the umask's modes."""
    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        with ArtifactWriter(out) as w:
            _stage(w, "sub/a.bin", b"data", mode=0o600)
            _publish_one(w, "sub/a.bin")
            w.write_manifest(_fields(tiny_artifact))
    finally:
        os.umask(old)
    gen = out / read_manifest(out).generation
    assert oct(os.stat(gen / "sub" / "a.bin").st_mode & 0o777) == oct(0o644)
    assert oct(os.stat(gen).st_mode & 0o777) == oct(0o755)
    assert oct(os.stat(out / "manifest.json").st_mode & 0o777) == oct(0o644)


@pytest.mark.parametrize("what", ["missing", "symlink", "folder"])
def test_only_a_staged_regular_file_can_be_published(tmp_path, what):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not the export's")
    with ArtifactWriter(tmp_path / "out") as w:
        p = w.stage_path("a.bin")
        if what == "symlink":
            os.symlink(outside, p)
        elif what == "folder":
            p.mkdir()
        with pytest.raises(FileNotFoundError, match="nothing staged under a.bin"):
            _publish_one(w, "a.bin")
        assert w.entries == {}


def test_files_staged_but_not_published_stay_out_of_the_generation(tiny_artifact, tmp_path):
    out = tmp_path / "out"
    with ArtifactWriter(out) as w:
        _stage(w, "a.bin", b"a")
        _publish_one(w, "a.bin")
        _stage(w, "twin/emulation.onnx", b"an intermediate file")
        w.write_manifest(_fields(tiny_artifact))
    m = read_manifest(out)
    assert sorted(p.relative_to(m.folder).as_posix() for p in m.folder.rglob("*") if p.is_file()) == ["a.bin"]
    assert list(m.files) == ["a.bin"]


def test_the_switch_leaves_no_temporary_manifest_and_a_new_export_removes_killed_ones(tiny_artifact, tmp_path):
    out = tmp_path / "out"
    with ArtifactWriter(out) as w:
        _stage(w, "a.bin", b"a")
        _publish_one(w, "a.bin")
        w.write_manifest(_fields(tiny_artifact))
    gen = read_manifest(out).generation
    assert sorted(p.name for p in out.iterdir()) == [".lock", gen, "manifest.json"]
    # what an export killed inside write_json_atomic leaves (mkstemp's name: 8 random characters),
    # next to files that are not the writer's
    (out / ".manifest.json.k1ll3d_x.tmp").write_text("{}")
    (out / "notes.txt").write_text("the user's")
    (out / ".manifest.json.k1ll3d").write_text("not a name the writer makes")
    (out / ".manifest.json.mine.tmp").write_text("nor this one")
    with ArtifactWriter(out):
        pass
    assert sorted(p.name for p in out.iterdir()) == [".lock", ".manifest.json.k1ll3d", ".manifest.json.mine.tmp",
                                                      gen, "manifest.json", "notes.txt"]


def test_a_reexport_over_a_schema_1_folder_removes_only_the_files_its_manifest_listed(tiny_artifact, tmp_path):
    """Version 1 kept the files beside the manifest; the new generation replaces them. Only
    listed names inside the folder are removed: not the user's other files, not a listed
    ``../`` name or a link."""
    out = tmp_path / "out"
    (out / "engines").mkdir(parents=True)
    for name in ("decoder.onnx", "engines/decoder.plan", "mine.txt", "target.txt"):
        (out / name).write_text(name)
    (tmp_path / "outside.txt").write_text("outside")
    os.symlink(out / "target.txt", out / "link.onnx")
    listed = ["decoder.onnx", "engines/decoder.plan", "../outside.txt", "link.onnx", "absent.onnx"]
    (out / "manifest.json").write_text(json.dumps({"schema_version": 1, "files": {n: {} for n in listed}}))
    with ArtifactWriter(out) as w:
        _stage(w, "a.bin", b"a")
        _publish_one(w, "a.bin")
        w.write_manifest(_fields(tiny_artifact))
    gen = read_manifest(out).generation
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert left == [".lock", "engines", gen, f"{gen}/a.bin", "link.onnx", "manifest.json", "mine.txt", "target.txt"]
    assert (tmp_path / "outside.txt").read_text() == "outside"


def test_previous_file_is_a_listed_regular_file_of_the_replaced_artifact(tiny_artifact, copy_artifact, tmp_path):
    folder = copy_artifact(tiny_artifact)
    m = read_manifest(folder)
    name = "decoder_uncond.onnx"
    with ArtifactWriter(tmp_path / "fresh") as w:  # nothing replaced
        assert w.previous is None and w.previous_file(name) is None
    with ArtifactWriter(folder) as w:
        assert w.previous_file(name) == m.path(name)
        assert w.previous_file("engines/decoder.plan") is None  # not listed
    m.path(name).unlink()
    os.symlink(m.path("decoder.onnx"), m.path(name))
    with ArtifactWriter(folder) as w:
        assert w.previous_file(name) is None  # a link is never reused


@pytest.mark.parametrize("what", ["symlink", "file"])
def test_out_must_be_a_real_folder(tmp_path, what):
    real = tmp_path / "real"
    real.mkdir()
    out = tmp_path / "out"
    if what == "symlink":
        os.symlink(real, out)
    else:
        out.write_text("a file")
    with pytest.raises(OutputDirError, match=rf"--out {out}: exists and is not a folder"):
        ArtifactWriter(out).open()
    assert list(real.iterdir()) == []  # nothing was written through the link


def test_a_manifest_that_breaks_the_schema_switches_nothing(tiny_artifact, copy_artifact):
    folder = copy_artifact(tiny_artifact)
    before = snapshot(folder)
    with ArtifactWriter(folder) as w:
        _stage(w, "a.bin", b"a")
        _publish_one(w, "a.bin")
        with pytest.raises(RuntimeError, match="breaks the schema"):
            w.write_manifest({**_fields(tiny_artifact), "scaling_factor": -1})
    assert snapshot(folder) == before
    assert debris(folder, read_manifest(folder).generation) == []
