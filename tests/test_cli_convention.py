"""One convention for asym-export, asym-parity and asym-bench: one line on stderr, exit 2 for
usage and bad input, 1 for a failed check or an unexpected error, a traceback only with --debug."""

from __future__ import annotations

import json

import pytest
from cli_lines import one_line

from asym_export import bench, cli, parity

TOOLS = {"asym-export": cli, "asym-parity": parity, "asym-bench": bench}


REQUIRED = {"asym-export": ["--variant", "tiny", "--out", "o"], "asym-parity": ["dir"], "asym-bench": []}


@pytest.mark.parametrize("tool", TOOLS)
def test_an_unknown_flag_is_one_line_and_exit_2(tool, capsys):
    assert TOOLS[tool].main([*REQUIRED[tool], "--no-such-flag"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"{tool}: error: ") and "--no-such-flag" in line and f"see {tool} --help" in line


def _broken_folder(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"schema_version": 2, "files": {"a.onnx": {"sha256": 123}}}))
    return folder


@pytest.mark.parametrize("tool, argv", [
    ("asym-parity", ["{folder}"]),
    ("asym-bench", ["--artifact", "{folder}", "--sizes", "64", "--backends", "onnxruntime-cpu/fp32"]),
])
def test_an_unusable_folder_is_one_line_and_exit_2(tool, argv, tmp_path, capsys):
    folder = _broken_folder(tmp_path)
    assert TOOLS[tool].main([a.format(folder=folder) for a in argv]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"{tool}: error: ") and "breaks the manifest schema" in line, line


def test_a_config_json_that_is_not_an_object_is_bad_input(tmp_path, capsys):
    (tmp_path / "config.json").write_text("[1, 2]")
    assert cli.main(["--variant", "tiny", "--weights", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    line = one_line(capsys.readouterr().err)
    assert line == f"asym-export: error: {tmp_path}/config.json holds a JSON list; a diffusers config is a JSON " \
                   "object (written by save_pretrained)"


@pytest.mark.parametrize("tool, target, argv", [
    ("asym-parity", "run_parity", ["{folder}"]),
    ("asym-bench", "run_benchmark", ["--artifact", "{folder}", "--sizes", "64", "--backends", "onnxruntime-cpu/fp32"]),
])
def test_an_unexpected_error_is_one_line_exit_1_and_debug_shows_it(tool, target, argv, tmp_path, monkeypatch, capsys):
    def boom(*a, **k):
        raise KeyError("surprise")

    monkeypatch.setattr(TOOLS[tool], target, boom)
    args = [a.format(folder=tmp_path) for a in argv]
    assert TOOLS[tool].main(args) == 1
    line = one_line(capsys.readouterr().err)
    assert line == f"{tool}: unexpected error: KeyError: 'surprise' (rerun with --debug for the traceback)"
    with pytest.raises(KeyError, match="surprise"):
        TOOLS[tool].main(args + ["--debug"])
