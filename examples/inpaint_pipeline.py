#!/usr/bin/env python3
"""Inpainting with diffusers' StableDiffusionInpaintPipeline whose VAE runs on asym_runtime.

A real checkpoint (the pipeline downloads once through the Hugging Face cache; the VAE folder
comes from `asym-export --variant x2 --out artifacts/x2`):

    python examples/inpaint_pipeline.py --artifact artifacts/x2 \\
        --pipeline runwayml/stable-diffusion-inpainting \\
        --image photo.png --mask mask.png --prompt "a red brick wall" --out inpainted.png

Offline, in under a minute on a CPU: a tiny pipeline with seeded random weights around a tiny
artifact exported on the spot (the same code path, nothing downloaded; the picture is noise):

    python examples/inpaint_pipeline.py --tiny --out inpainted.png

What runs where: the pipeline's UNet (and text encoder) run in PyTorch on the device you give
with --device; the VAE's encode and conditional decode run on asym_runtime's backend (TensorRT
engines, ONNX Runtime CUDA or CPU, whatever `asym_runtime.load` picks for the folder), taking
and returning torch tensors. `pipe.to("cuda")` moves the PyTorch parts only.
Needs: pip install -e '.[pipeline]'.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def tiny_pipeline(vae):
    """A StableDiffusionInpaintPipeline with a tiny seeded UNet and no text encoder."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=9, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2,
    ).eval()
    pipe = StableDiffusionInpaintPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=DDIMScheduler(steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_inputs(width: int = 96, height: int = 64) -> dict:
    """A seeded photo-sized noise image, a rectangular mask, and prompt embeddings (no tokenizer)."""
    import numpy as np
    import torch
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    m = np.zeros((height, width), np.uint8)
    m[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 255  # white = repaint
    g = torch.Generator().manual_seed(1)
    return dict(image=image, mask_image=Image.fromarray(m), height=height, width=width,
                prompt_embeds=torch.randn(1, 7, 16, generator=g),
                negative_prompt_embeds=torch.randn(1, 7, 16, generator=g))


def run(artifact: Path | None, out: Path, *, tiny: bool, pipeline: str | None = None, image: Path | None = None,
        mask: Path | None = None, prompt: str = "", steps: int = 30, device: str = "cpu", seed: int = 0):
    import torch
    from PIL import Image

    import asym_runtime

    with tempfile.TemporaryDirectory(prefix="asym-example-") as tmp:
        if tiny and artifact is None:
            from asym_export.export import ExportOptions, export_artifact

            artifact = Path(tmp) / "tiny"
            print(f"exporting a tiny artifact with seeded random weights into {artifact} ...", flush=True)
            export_artifact(ExportOptions(variant="tiny", out=artifact, random_weights=True, seed=0,
                                          fp16=False, cuda_form=False))
        vae = asym_runtime.load(artifact)
        print(f"VAE: {vae!r}")
        if tiny:
            from asym_export.variants import get_variant
            from asym_export.weights import random_model

            pipe = tiny_pipeline(random_model(get_variant("tiny"), seed=0))
            kwargs = tiny_inputs()
            steps = min(steps, 3)
        else:
            from diffusers import StableDiffusionInpaintPipeline

            pipe = StableDiffusionInpaintPipeline.from_pretrained(pipeline, safety_checker=None)
            kwargs = dict(prompt=prompt, image=Image.open(image).convert("RGB"), mask_image=Image.open(mask))
        pipe = pipe.to(device)
        pipe.vae = vae.as_diffusers()  # after .to(): the VAE is the runtime's, on its own backend
        result = pipe(**kwargs, num_inference_steps=steps, generator=torch.Generator(device).manual_seed(seed))
        result.images[0].save(out)
        vae.close()
    print(f"wrote {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", type=Path, help="an artifact folder written by asym-export")
    p.add_argument("--tiny", action="store_true", help="offline: tiny pipeline and (without --artifact) tiny VAE")
    p.add_argument("--pipeline", default="runwayml/stable-diffusion-inpainting",
                   help="the inpainting pipeline's hub id or folder (default runwayml/stable-diffusion-inpainting)")
    p.add_argument("--image", type=Path, help="the photo (RGB)")
    p.add_argument("--mask", type=Path, help="the mask (white = repaint)")
    p.add_argument("--prompt", default="", help="what to paint into the mask")
    p.add_argument("--steps", type=int, default=30, help="denoising steps (default 30; --tiny uses 3)")
    p.add_argument("--device", default="cpu", help="where the UNet runs: cpu (default) or cuda")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = p.parse_args(argv)
    if not args.tiny and not (args.artifact and args.image and args.mask):
        p.error("give --artifact, --image and --mask (or --tiny for the offline example)")
    run(args.artifact, args.out, tiny=args.tiny, pipeline=args.pipeline, image=args.image, mask=args.mask,
        prompt=args.prompt, steps=args.steps, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
