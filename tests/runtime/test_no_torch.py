"""asym_runtime imports and runs ONNX Runtime with torch and diffusers unavailable."""

import subprocess
import sys
import textwrap

import numpy as np
from runtime_helpers import feed

from asym_runtime.specs import Shape

SCRIPT = textwrap.dedent("""
    import sys

    class Block:  # any import of these fails, as on a machine without them
        BLOCKED = ("torch", "diffusers", "transformers", "tensorrt")

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.BLOCKED:
                raise ImportError(f"{name} is blocked for this test")
            return None

    sys.meta_path.insert(0, Block())
    for m in list(sys.modules):
        if m.split(".")[0] in Block.BLOCKED:
            del sys.modules[m]

    import numpy as np
    import asym_runtime

    folder, inputs, out = sys.argv[1:4]
    f = np.load(inputs)
    vae = asym_runtime.load(folder)  # auto: must settle on ONNX Runtime without torch
    assert vae.backend.startswith("onnxruntime"), vae.backend
    cond = vae.decode(f["latent"], image=f["image"], mask=f["mask"])
    plain = vae.decode(f["latent"])
    mean = vae.encode(f["image"]).mean
    sample = vae.encode(f["image"]).sample(np.random.default_rng(0))
    images = asym_runtime.batch_to_images(cond)
    assert len(images) == cond.shape[0]
    np.savez(out, cond=cond, plain=plain, mean=mean, sample=sample)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in Block.BLOCKED)
    assert not leaked, leaked
    print("ok")
""")


def test_decode_works_with_torch_unavailable(tiny_artifact, tiny_rt, tmp_path):
    f = feed("decoder", Shape(2, 64, 96), seed=21)
    np.savez(tmp_path / "in.npz", **f)
    script = tmp_path / "no_torch.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tiny_artifact), str(tmp_path / "in.npz"),
                           str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"
    got = np.load(tmp_path / "out.npz")
    # same numbers as this (torch-importing) process gets from the same folder
    np.testing.assert_array_equal(got["cond"], tiny_rt.decode(f["latent"], image=f["image"], mask=f["mask"]))
    np.testing.assert_array_equal(got["plain"], tiny_rt.decode(f["latent"]))
    np.testing.assert_array_equal(got["mean"], tiny_rt.encode(f["image"]).mean)
