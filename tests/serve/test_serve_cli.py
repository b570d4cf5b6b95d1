"""asym-serve and asym-triton-repo follow the tools' convention (tests/test_cli_convention.py):
one line on stderr, exit 2 for usage and bad input, 1 for an unexpected error, traceback only with --debug."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("tritonclient", reason="the serve extra is not installed (pip install -e '.[serve]')")

from asym_runtime.serving import cli, repository, server  # noqa: E402

MAINS = {"asym-serve": cli.serve_main, "asym-triton-repo": cli.repo_main}
#: where each tool's work lives (what a test replaces to make it fail unexpectedly)
WORK = {"asym-serve": server, "asym-triton-repo": repository}


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("asym-")]
    assert len(lines) == 1, lines
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("tool", MAINS)
def test_an_unknown_flag_is_one_line_and_exit_2(tool, tmp_path, capsys):
    assert MAINS[tool]([str(tmp_path), "--no-such-flag"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"{tool}: error: ") and "--no-such-flag" in line and f"see {tool} --help" in line


@pytest.mark.parametrize("tool, argv", [("asym-serve", ["{folder}"]), ("asym-triton-repo", ["{folder}", "--out", "{out}"])])
def test_an_unusable_folder_is_one_line_and_exit_2(tool, argv, tmp_path, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"schema_version": 2, "files": {"a.onnx": {"sha256": 123}}}))
    assert MAINS[tool]([a.format(folder=folder, out=tmp_path / "r") for a in argv]) == 2
    line = _one_line(capsys.readouterr().err)
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
    line = _one_line(capsys.readouterr().err)
    assert line == f"{tool}: unexpected error: KeyError: 'surprise' (rerun with --debug for the traceback)"
    with pytest.raises(KeyError, match="surprise"):
        MAINS[tool](args + ["--debug"])
