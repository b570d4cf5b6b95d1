"""The README's runtime examples run as written (on the tiny artifact instead of artifacts/x2)."""

import re
from pathlib import Path

import numpy as np
from PIL import Image
from runtime_helpers import assert_same_pixels, diffusers_decode, diffusers_inpaint_pixels

from asym_export.verify import FP32_MAX_ABS

README = Path(__file__).resolve().parents[2] / "README.md"


def _runtime_blocks() -> list[str]:
    text = README.read_text()
    start = text.index("\n## Runtime\n")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], re.S)


def test_readme_runtime_examples_run(tiny_artifact, tiny_vae, tmp_path, monkeypatch, capsys):
    blocks = _runtime_blocks()
    assert len(blocks) == 2
    assert len([line for line in blocks[0].splitlines() if line.strip()]) <= 10  # "ten lines of Python"
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save("photo.png")
    mask = np.zeros((300, 400), np.uint8)
    mask[100:200, 150:300] = 255
    Image.fromarray(mask).save("mask.png")
    spaces = []
    for i, code in enumerate(blocks):
        assert '"artifacts/x2"' in code
        spaces.append({})
        exec(compile(code.replace('"artifacts/x2"', repr(str(tiny_artifact))), f"README block {i}", "exec"),
             spaces[-1])
    assert "(1, 3, 512, 512)" in capsys.readouterr().out
    # block 0: the numbers are the reference model's, for its own inputs
    ns = spaces[0]
    z = ns["z"] / ns["vae"].config.scaling_factor
    np.testing.assert_allclose(ns["plain"], diffusers_decode(tiny_vae, z), atol=FP32_MAX_ABS, rtol=0)
    np.testing.assert_allclose(ns["inpainted"], diffusers_decode(tiny_vae, z, ns["image"], ns["mask"]),
                               atol=FP32_MAX_ABS, rtol=0)
    # block 1: the saved PNG is what diffusers' processors and the reference give for the files
    out = Image.open(tmp_path / "inpainted.png")
    assert out.size == (768, 512) and out.mode == "RGB"  # width=768, height=512 as the example asks
    assert_same_pixels(np.asarray(out), diffusers_inpaint_pixels(tiny_vae, Image.open("photo.png"),
                                                                 Image.open("mask.png"), 768, 512))
