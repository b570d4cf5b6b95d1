"""The README's two set-up commands and .ci/run stay in step."""

import re

import pytest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_ci_runs_the_readme_test_command():
    blocks = _bash_blocks()
    main_job, test_cmd = blocks[0], blocks[1]
    assert "asym-export --variant x2 --random-weights" in main_job
    assert test_cmd.endswith("python -m pytest -q -n 2 --dist loadgroup --durations=15")  # the slowest 15 tests in every CI log
    ci = (ROOT / ".ci" / "run").read_text()
    (ci_cmd,) = re.findall(r'^TEST_COMMAND="(.*)"$', ci, re.M)
    assert ci_cmd == test_cmd


def test_setup_never_pulls_a_cuda_torch():
    for cmd in _bash_blocks()[:2]:
        # torch is pinned to the CPU wheel before the project asks for torch>=...
        assert cmd.index("pip install torch==2.13.0") < cmd.index("pip install -e")


def test_the_install_notes_match_the_extras():
    """What the README says each extra brings is what pyproject.toml declares."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    text = " ".join((ROOT / "README.md").read_text().split())

    def names(extra):
        out = set()
        for req in extras[extra]:
            name = re.split(r"[<>=\[ ;#]", req, maxsplit=1)[0]
            if req.startswith("asym-export["):
                for inner in req[len("asym-export["):-1].split(","):
                    out |= names(inner)
            else:
                out.add(name)
        return out

    export = names("export") - {"torch"}
    assert all(n in text for n in export), export
    assert names("pipeline") - names("export") == {"transformers"} and "`.[pipeline]` adds transformers" in text
    assert names("openvino") == {"openvino"} and "`.[openvino]` adds OpenVINO" in text
    assert names("serve") == {"nvidia-pytriton", "tritonclient"} and "`.[serve]` adds nvidia-pytriton" in text
    assert names("test") == names("pipeline") | names("openvino") | names("serve") | {"pytest", "pytest-xdist", "accelerate"}
    assert "`.[test]` is `.[pipeline]`, `.[openvino]` and `.[serve]` plus pytest, pytest-xdist and accelerate" in text
    assert names("tensorrt") == {"tensorrt", "cuda-python"}


def test_every_file_the_readme_names_exists():
    text = (ROOT / "README.md").read_text()
    for path in set(re.findall(r"\]\(((?:docs|scripts|examples|asym_export|runtime|tests)/[^)#]+)\)", text)) | \
            set(re.findall(r"`((?:scripts|examples)/[\w./-]+\.py)`", text)):
        assert (ROOT / path).exists(), path
