"""Helpers shared by the runtime tests: seeded feeds and diffusers references."""

from __future__ import annotations

import numpy as np

from asym_runtime.specs import DECODER, ENCODER, Shape


def feed(graph_name: str, shape: Shape, seed: int = 0, mask: str = "random") -> dict[str, np.ndarray]:
    """The seeded inputs asym-export verifies with (images in [-1, 1], binary off-grid masks)."""
    from asym_export.feeds import make_feed

    graph = {"encoder": ENCODER, "decoder": DECODER}[graph_name]
    return make_feed(graph, shape, seed, 0.18215, mask=mask)


def diffusers_decode(vae, latent, image=None, mask=None) -> np.ndarray:
    import torch

    t = {k: (None if v is None else torch.from_numpy(v)) for k, v in
         {"latent": latent, "image": image, "mask": mask}.items()}
    with torch.no_grad():
        return vae.decode(t["latent"], image=t["image"], mask=t["mask"]).sample.numpy()


def diffusers_encode(vae, image):
    import torch

    with torch.no_grad():
        return vae.encode(torch.from_numpy(image)).latent_dist


def race(calls, threads: int = 4, rounds: int = 10, timeout: float = 300.0) -> dict[tuple[int, int], object]:
    """Run ``calls`` (zero-argument functions) from ``threads`` threads for ``rounds`` rounds, all
    threads released together by a barrier at the start of every round; thread t runs call
    ``(t + round) % len(calls)``, so with ``threads >= len(calls)`` every call meets every other
    in each round, and two threads share a call (the same shape and input) whenever
    ``threads > len(calls)``. Returns
    {(round, thread): result}; any exception in a thread, or a thread still running after
    ``timeout`` seconds, fails the test. Python's thread switch interval is cut to 10 us while it
    runs, so threads interleave inside the runtime's Python code, not only at blocking calls."""
    import sys
    import threading

    barrier = threading.Barrier(threads, timeout=timeout)
    results, errors = {}, []

    def worker(t):
        try:
            for r in range(rounds):
                barrier.wait()
                results[(r, t)] = calls[(t + r) % len(calls)]()
        except BaseException as e:  # surfaced below
            errors.append(e)
            barrier.abort()

    ts = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(threads)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for th in ts:
            th.start()
        for th in ts:
            th.join(timeout)
    finally:
        sys.setswitchinterval(interval)
    assert not [th for th in ts if th.is_alive()], f"threads still running after {timeout} s"
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    assert not errors, real or errors
    assert len(results) == threads * rounds
    return results


def check_race(results, serial, exact: bool = True, atol: float = 0.0) -> None:
    """Every raced result equals the serial result of its call."""
    for (r, t), got in results.items():
        i = (t + r) % len(serial)
        if exact:
            np.testing.assert_array_equal(got, serial[i], err_msg=f"round {r}, thread {t}, call {i}")
        else:
            np.testing.assert_allclose(got, serial[i], atol=atol, rtol=0, err_msg=f"round {r}, thread {t}, call {i}")


def pipeline_processors():
    """The image and mask processors StableDiffusionInpaintPipeline builds (VAE scale factor 8)."""
    from diffusers.image_processor import VaeImageProcessor

    return (VaeImageProcessor(vae_scale_factor=8),
            VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True))


def diffusers_inpaint_pixels(vae, photo, mask, width: int, height: int) -> np.ndarray:
    """What a diffusers user gets for ``photo``/``mask`` (PIL): VaeImageProcessor's pre- and
    post-processing around the reference model's encode (mean) and conditional decode, as an
    8-bit HxWx3 array."""
    import torch

    images, masks = pipeline_processors()
    x = images.preprocess(photo, height=height, width=width)
    m = masks.preprocess(mask, height=height, width=width)
    with torch.no_grad():
        out = vae.decode(vae.encode(x).latent_dist.mean, image=x, mask=m).sample
    return np.asarray(images.postprocess(out, output_type="pil")[0])


def assert_same_pixels(got: np.ndarray, want: np.ndarray) -> None:
    """8-bit images from the runtime and from the reference: the FP32 contract (max abs 1e-3 on
    [-1, 1], 0.13 of an 8-bit level) can move a value across a rounding boundary, so a pixel may
    differ by one level, and only rarely; anything else is a real difference."""
    assert got.shape == want.shape, (got.shape, want.shape)
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= 1, f"max difference {diff.max()} levels"
    assert (diff > 0).mean() < 0.01, f"{(diff > 0).mean():.2%} of the values differ"
