"""The README's pipeline example runs as written, offline (tiny pipeline, tiny VAE)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_the_offline_inpainting_example_writes_an_image(tiny_artifact, tmp_path):
    out = tmp_path / "inpainted.png"
    r = subprocess.run([sys.executable, "examples/inpaint_pipeline.py", "--tiny", "--artifact", str(tiny_artifact),
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "onnxruntime-cpu" in r.stdout and f"wrote {out}" in r.stdout
    im = np.asarray(Image.open(out))
    assert im.shape == (64, 96, 3) and im.dtype == np.uint8 and im.std() > 0


def test_the_example_says_what_it_needs(tmp_path):
    r = subprocess.run([sys.executable, "examples/inpaint_pipeline.py", "--out", str(tmp_path / "x.png")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "give --artifact, --image and --mask (or --tiny" in r.stderr
