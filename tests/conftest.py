"""Shared fixtures: tiny reference models, exported artifact folders, offline hub settings.

Artifact folders are exported once per session (module ``_artifacts``) and shared read-only;
tests that modify a folder copy it first.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Never touch the network from the tests: the hub is unreachable on CI machines.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Caches that follow XDG_CACHE_HOME (OpenVINO's compiled models, written by every load that does
# not pass cache_dir) go to a folder of this run, never the user's ~/.cache; the CLIs the tests
# start inherit it. One per process (pytest-xdist workers each import this file).
_CACHE_HOME = tempfile.mkdtemp(prefix="asym-test-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE_HOME
atexit.register(shutil.rmtree, _CACHE_HOME, True)


#: Session fixtures that build real-size models (minutes each): every test using one runs in the
#: same pytest-xdist worker (``-n 2 --dist loadgroup``), so each is built once per run.
_REAL_SIZE = {"x2_artifact", "x2_vae", "x15_artifact"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        if _REAL_SIZE & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group(name="real-size"))


def pytest_collection_finish(session):
    """Under ``--dist loadgroup`` pytest-xdist appends "@group" to each grouped test's id; if it did
    not (a pytest it does not know), every worker would build the real-size models: say so."""
    if getattr(session.config.option, "loadgroup", False):
        lost = [i.nodeid for i in session.items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
        if lost:
            raise pytest.UsageError(f"pytest-xdist ignored the xdist_group marks (e.g. {lost[0]}); "
                                    "install the pytest the test extra pins")


@pytest.fixture(scope="session")
def tiny_vae():
    from asym_export.variants import get_variant
    from asym_export.weights import random_model

    return random_model(get_variant("tiny"), seed=0)


def _export(tmp_root: Path, variant: str, **kw) -> Path:
    from asym_export.export import ExportOptions, export_artifact

    out = tmp_root / f"artifact-{variant}"
    export_artifact(ExportOptions(variant=variant, out=out, random_weights=True, seed=0, **kw))
    return out


@pytest.fixture(scope="session")
def onnx_cache_folder(tmp_path_factory) -> Path:
    """Where tests/onnx_cache.py keeps exported graphs during this run (shared by the workers)."""
    from onnx_cache import shared_folder

    return shared_folder(tmp_path_factory)


@pytest.fixture
def reuse_onnx_exports(onnx_cache_folder, monkeypatch):
    """Opt-in, for tests whose subject comes after ``torch.onnx.export``: export_artifact's graph
    exports are served from tests/onnx_cache.py (real the first time for a model, copied after;
    real whenever the test has replaced export code). Returns the cache (hits, misses)."""
    from onnx_cache import OnnxExportCache, install

    cache = OnnxExportCache(onnx_cache_folder)
    install(cache, monkeypatch)
    return cache


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, onnx_cache_folder) -> Path:
    """A verified tiny artifact folder (FP32 and FP16 graphs, random weights, seed 0). Read-only.
    Its graph exports go through tests/onnx_cache.py: the first worker to export them does it for
    real, and the tests that opt in reuse them."""
    from onnx_cache import OnnxExportCache, install

    with pytest.MonkeyPatch.context() as mp:
        install(OnnxExportCache(onnx_cache_folder), mp)
        return _export(tmp_path_factory.mktemp("tiny"), "tiny")


@pytest.fixture(scope="session")
def x2_artifact(tmp_path_factory) -> Path:
    """The default x2 export with seeded random weights, without the CUDA forms (their export
    path is the tiny artifact's; test_cuda_form.py rewrites x2 itself). Read-only."""
    return _export(tmp_path_factory.mktemp("x2"), "x2", cuda_form=False)


@pytest.fixture(scope="session")
def x15_artifact(tmp_path_factory) -> Path:
    """An x1.5 export with seeded random weights, verified at the export shape only (the x1.5
    graphs' numerics are covered by test_x15_export_matches_diffusers). Read-only."""
    from asym_runtime.specs import Shape

    return _export(tmp_path_factory.mktemp("x15"), "x1.5", verify_shapes=(Shape(2, 64, 64),), cuda_form=False)


@pytest.fixture(scope="session")
def x2_vae():
    from asym_export.variants import get_variant
    from asym_export.weights import random_model

    return random_model(get_variant("x2"), seed=0)


@pytest.fixture
def copy_artifact(tmp_path):
    """Copy a read-only session artifact into this test's tmp_path before changing it."""

    def _copy(src: Path) -> Path:
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        return dst

    return _copy


@pytest.fixture
def with_engines(tiny_artifact, copy_artifact):
    """A copy of the tiny folder whose manifest lists an encoder and a decoder engine (bytes that
    are not a plan, see tests/manifest_edits.py)."""
    from manifest_edits import add_engine_entries

    folder = copy_artifact(tiny_artifact)
    add_engine_entries(folder)
    return folder


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty hub cache with the hub switched off, as on a machine without network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"), raising=False)
    return tmp_path / "hf-home"


def pytest_runtest_logreport(report):
    """With ASYM_LIVE_REPORT=1 (scripts/gpu_check.py sets it for the GPU tests), each test's
    outcome, time and failure are written the moment it ends, as lines starting "LIVE ": a run
    killed at its time limit (a GPU session's minutes are few) still says what failed and why."""
    if os.environ.get("ASYM_LIVE_REPORT") != "1":
        return
    if report.when != "call" and not (report.failed or report.skipped):
        return
    import sys

    out = sys.__stderr__
    # on a line of its own: pytest's progress characters go to stdout, on the same terminal line
    out.write(f"\nLIVE {report.outcome.upper()} {report.when} {report.nodeid} ({report.duration:.1f} s)\n")
    if report.failed:
        for line in report.longreprtext.splitlines()[-40:]:
            out.write(f"LIVE | {line}\n")
    out.flush()
