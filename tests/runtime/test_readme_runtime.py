"""The README's runtime examples run as written (on the tiny artifact instead of artifacts/x2)."""

import re
from pathlib import Path

import numpy as np
from PIL import Image

README = Path(__file__).resolve().parents[2] / "README.md"


def _runtime_blocks() -> list[str]:
    text = README.read_text()
    start = text.index("\n## Runtime\n")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], re.S)


def test_readme_runtime_examples_run(tiny_artifact, tmp_path, monkeypatch, capsys):
    blocks = _runtime_blocks()
    assert len(blocks) == 2
    assert len([line for line in blocks[0].splitlines() if line.strip()]) <= 10  # "ten lines of Python"
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save("photo.png")
    mask = np.zeros((300, 400), np.uint8)
    mask[100:200, 150:300] = 255
    Image.fromarray(mask).save("mask.png")
    for i, code in enumerate(blocks):
        assert '"artifacts/x2"' in code
        exec(compile(code.replace('"artifacts/x2"', repr(str(tiny_artifact))), f"README block {i}", "exec"), {})
    assert "(1, 3, 512, 512)" in capsys.readouterr().out
    out = Image.open(tmp_path / "inpainted.png")
    assert out.size == (768, 512) and out.mode == "RGB"  # width=768, height=512 as the example asks
