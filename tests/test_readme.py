"""The README's two set-up commands and .ci/run stay in step."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_ci_runs_the_readme_test_command():
    blocks = _bash_blocks()
    main_job, test_cmd = blocks[0], blocks[1]
    assert "asym-export --variant x2 --random-weights" in main_job
    assert test_cmd.endswith("python -m pytest -q --durations=15")  # the slowest 15 tests in every CI log
    ci = (ROOT / ".ci" / "run").read_text()
    (ci_cmd,) = re.findall(r'^TEST_COMMAND="(.*)"$', ci, re.M)
    assert ci_cmd == test_cmd


def test_setup_never_pulls_a_cuda_torch():
    for cmd in _bash_blocks()[:2]:
        # torch is pinned to the CPU wheel before the project asks for torch>=...
        assert cmd.index("pip install torch==2.13.0") < cmd.index("pip install -e")
