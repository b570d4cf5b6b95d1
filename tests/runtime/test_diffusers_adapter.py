"""pipe.vae = runtime adapter: StableDiffusionInpaintPipeline's own calls run on the runtime."""

import numpy as np
import pytest
import torch
from PIL import Image
from runtime_helpers import diffusers_decode, diffusers_encode, feed

from asym_runtime.specs import Shape

#: Pipeline output images (output_type="np", values in [0, 1]) with the runtime VAE against
#: the PyTorch VAE. The VAE differs by ~1e-5 between ONNX Runtime and PyTorch; through the
#: encode -> 3 UNet steps -> conditional decode chain this measured 3e-5. 2e-4 is a twentieth
#: of one 8-bit level (1/255 = 3.9e-3), so the PNGs are identical, while a decode that lost
#: its image/mask conditioning differs by more than 1e-1 (asserted below).
PIPE_ATOL = 2e-4


def _example():
    """examples/inpaint_pipeline.py, whose tiny pipeline this test shares with the example."""
    from repo_files import load_file

    return load_file("examples/inpaint_pipeline.py", "inpaint_pipeline_example")


@pytest.fixture(scope="module")
def pipe(tiny_vae):
    # no text encoder or tokenizer: prompt embeddings go in directly, nothing is downloaded
    return _example().tiny_pipeline(tiny_vae)


def _inputs():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    m = np.zeros((64, 96), np.uint8)
    m[10:43, 21:70] = 255  # edges off the 8-pixel latent grid
    g = torch.Generator().manual_seed(1)
    return dict(image=image, mask_image=Image.fromarray(m), height=64, width=96, num_inference_steps=3,
                prompt_embeds=torch.randn(1, 7, 16, generator=g),
                negative_prompt_embeds=torch.randn(1, 7, 16, generator=g), output_type="np")


def _run(pipe):
    return pipe(**_inputs(), generator=torch.Generator().manual_seed(0)).images


def test_inpaint_pipeline_gives_the_same_images_with_the_runtime_vae(pipe, tiny_vae, tiny_rt):
    from diffusers import AsymmetricAutoencoderKL

    want = _run(pipe)
    adapter = tiny_rt.as_diffusers()
    assert isinstance(adapter, AsymmetricAutoencoderKL)
    calls = []
    decode = tiny_rt.decode

    def spy(latent, image=None, mask=None):
        calls.append((tuple(latent.shape), image is not None, mask is not None))
        return decode(latent, image=image, mask=mask)

    try:
        tiny_rt.decode = spy
        pipe.vae = adapter
        assert pipe.vae is adapter and pipe.vae_scale_factor == 8
        got = _run(pipe)
        # the pipeline's own conditional decode ran on the runtime
        assert calls == [((1, 4, 8, 12), True, True)]
        assert got.shape == want.shape == (1, 64, 96, 3)
        np.testing.assert_allclose(got, want, atol=PIPE_ATOL, rtol=0)

        # the test can fail: the same pipeline with the conditioning dropped is far off
        tiny_rt.decode = lambda latent, image=None, mask=None: decode(latent)
        plain = _run(pipe)
        assert np.abs(plain - want).max() > 0.1
    finally:
        del tiny_rt.decode
        pipe.vae = tiny_vae


def test_adapter_encode_decode_forward_match_diffusers(tiny_rt, tiny_vae):
    adapter = tiny_rt.as_diffusers()
    f = {k: torch.from_numpy(v) for k, v in feed("decoder", Shape(2, 64, 96), seed=31).items()}
    assert adapter.device == torch.device("cpu") and adapter.dtype == torch.float32
    assert adapter.config.scaling_factor == 0.18215 and adapter.config.latent_channels == 4
    with torch.no_grad():
        post = adapter.encode(f["image"]).latent_dist
        ref = diffusers_encode(tiny_vae, f["image"].numpy())
        np.testing.assert_allclose(post.mean.numpy(), ref.mean.numpy(), atol=1e-4, rtol=0)
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        np.testing.assert_allclose(post.sample(g1).numpy(), ref.sample(g2).numpy(), atol=1e-4, rtol=0)
        out = adapter.decode(f["latent"], image=f["image"], mask=f["mask"]).sample
        np.testing.assert_allclose(out.numpy(), diffusers_decode(tiny_vae, **{k: v.numpy() for k, v in f.items()}),
                                   atol=1e-4, rtol=0)
        (plain,) = adapter.decode(f["latent"], return_dict=False)
        np.testing.assert_allclose(plain.numpy(), diffusers_decode(tiny_vae, f["latent"].numpy()), atol=1e-4, rtol=0)
        fwd = adapter(f["image"], mask=f["mask"]).sample
        ref_fwd = tiny_vae(f["image"], mask=f["mask"]).sample
        np.testing.assert_allclose(fwd.numpy(), ref_fwd.numpy(), atol=1e-4, rtol=0)


def test_adapter_decodes_plainly_when_only_one_of_image_and_mask_is_given(tiny_rt, tiny_vae):
    """diffusers conditions only on image AND mask; vae(x) without a mask is a plain decode."""
    adapter = tiny_rt.as_diffusers()
    f = {k: torch.from_numpy(v) for k, v in feed("decoder", Shape(1, 64, 64), seed=32).items()}
    with torch.no_grad():
        np.testing.assert_allclose(adapter(f["image"]).sample.numpy(), tiny_vae(f["image"]).sample.numpy(),
                                   atol=1e-4, rtol=0)
        for kw in (dict(image=f["image"]), dict(mask=f["mask"])):
            np.testing.assert_allclose(adapter.decode(f["latent"], **kw).sample.numpy(),
                                       tiny_vae.decode(f["latent"], **kw).sample.numpy(), atol=1e-4, rtol=0)


def test_encode_and_decode_run_the_offload_hook_as_diffusers_vae_does(tiny_rt, tiny_vae):
    """pipe.enable_model_cpu_offload() chains accelerate hooks text encoder -> UNet -> VAE; the
    pipeline calls vae.encode/vae.decode (never forward), and diffusers' VAE runs its hook there,
    whose pre_forward sends the UNet back to the CPU (when it is on a GPU) before the VAE runs.
    The adapter must run it too (without, the UNet stayed on the GPU through the decode).
    accelerate's own hooks, on the CPU, where the move itself is skipped: the calls are counted."""
    import copy

    accelerate = pytest.importorskip("accelerate")

    def hook_calls(vae) -> int:
        unet = torch.nn.Linear(2, 2)
        _, unet_hook = accelerate.cpu_offload_with_hook(unet, "cpu")
        vae, _ = accelerate.cpu_offload_with_hook(vae, "cpu", prev_module_hook=unet_hook)
        calls = []
        real = vae._hf_hook.pre_forward
        vae._hf_hook.pre_forward = lambda module, *a, **kw: (calls.append(module), real(module, *a, **kw))[1]
        f = {k: torch.from_numpy(v) for k, v in feed("decoder", Shape(1, 64, 64), seed=33).items()}
        with torch.no_grad():
            vae.encode(f["image"])
            vae.decode(f["latent"], image=f["image"], mask=f["mask"])
        assert all(m is vae for m in calls)
        return len(calls)

    assert hook_calls(copy.deepcopy(tiny_vae)) == 2  # diffusers' VAE: once per call
    assert hook_calls(tiny_rt.as_diffusers()) == 2


def test_an_image_or_mask_of_batch_1_is_broadcast_as_diffusers_does(tiny_rt, tiny_vae):
    """The inpainting pipeline passes one mask for several images (or one image for several
    masks): diffusers' blends broadcast it; the adapter repeats it for the runtime."""
    from asym_runtime.errors import AsymInputError

    adapter = tiny_rt.as_diffusers()
    f = {k: torch.from_numpy(v) for k, v in feed("decoder", Shape(2, 64, 64), seed=34).items()}
    z, image, mask = f["latent"], f["image"], f["mask"]
    with torch.no_grad():
        for kw in (dict(image=image, mask=mask[:1]), dict(image=image[1:], mask=mask),
                   dict(image=image[:1], mask=mask[:1])):
            got = adapter.decode(z, **kw).sample
            # the same decode with batch-2 inputs (diffusers' own fails when both have batch 1:
            # its condition encoder's features are looked up by the latents' shape)
            want = tiny_vae.decode(z, **{k: v.expand(2, -1, -1, -1) for k, v in kw.items()}).sample
            assert got.shape == want.shape == (2, 3, 64, 64)
            np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4, rtol=0)
            if kw["image"].shape[0] != kw["mask"].shape[0]:  # what diffusers' own broadcast gives
                np.testing.assert_allclose(got.numpy(), tiny_vae.decode(z, **kw).sample.numpy(), atol=1e-4, rtol=0)
        # the broadcast mask is not one of the two: each latent got the mask it was given
        assert not np.allclose(adapter.decode(z, image=image, mask=mask[:1]).sample.numpy(),
                               adapter.decode(z, image=image, mask=mask[1:]).sample.numpy(), atol=1e-3)
        three = {k: torch.from_numpy(v) for k, v in feed("decoder", Shape(3, 64, 64), seed=35).items()}
        with pytest.raises(AsymInputError, match="batch sizes disagree"):
            adapter.decode(z, image=three["image"], mask=mask)


def test_the_adapter_is_neither_saved_nor_loaded_as_diffusers_weights(tiny_rt, pipe, tmp_path):
    """It holds no weights: saving it wrote a config and an empty state dict, which loaded back
    as a VAE of random weights (AsymmetricAutoencoderKL.from_pretrained) or not at all."""
    from asym_runtime.diffusers_adapter import RuntimeAsymmetricAutoencoderKL

    adapter = tiny_rt.as_diffusers()
    with pytest.raises(NotImplementedError, match="holds no weights") as e:
        adapter.save_pretrained(tmp_path / "vae")
    assert str(tiny_rt.manifest.root) in str(e.value) and "put its PyTorch VAE back" in str(e.value)
    assert not (tmp_path / "vae").exists()
    original = pipe.vae
    try:
        pipe.vae = adapter
        with pytest.raises(NotImplementedError, match="holds no weights"):
            pipe.save_pretrained(tmp_path / "pipe")
    finally:
        pipe.vae = original
    for load in (RuntimeAsymmetricAutoencoderKL.from_pretrained, RuntimeAsymmetricAutoencoderKL.from_config):
        with pytest.raises(NotImplementedError, match=r"asym_runtime.load\(artifact_folder\).as_diffusers\(\)"):
            load(tmp_path)
    assert not (tmp_path / "vae").exists()


def test_inputs_that_require_grad_are_refused_not_silently_cut(tiny_rt):
    """The graphs run outside autograd: the output carried no gradient, and a loss mixing the
    VAE's output with other terms lost the VAE's part without a word."""
    from asym_runtime.errors import AsymInputError

    adapter = tiny_rt.as_diffusers()
    f = {k: torch.from_numpy(v) for k, v in feed("decoder", Shape(1, 64, 64), seed=36).items()}
    z = f["latent"].clone().requires_grad_(True)
    for call in (lambda: adapter.decode(z), lambda: tiny_rt.decode(z),
                 lambda: tiny_rt.decode(f["latent"], image=f["image"].requires_grad_(True), mask=f["mask"])):
        with pytest.raises(AsymInputError, match="requires grad, but no gradient can flow back"):
            call()
    f["image"].requires_grad_(False)
    with torch.no_grad():
        adapter.decode(z)
    with torch.inference_mode():
        tiny_rt.decode(z)
    tiny_rt.decode(z.detach())


def test_a_copied_pipeline_shares_the_runtime_and_gives_the_same_images(pipe, tiny_rt, tiny_vae):
    """copy.deepcopy(pipe) with the runtime VAE: the copy has its own adapter over the same runtime
    and gives the same images; the runtime itself refuses to be copied or pickled and says what to
    do instead (before, both failed inside deepcopy on ONNX Runtime's session)."""
    import copy
    import pickle

    try:
        pipe.vae = tiny_rt.as_diffusers()
        want = _run(pipe)
        twin = copy.deepcopy(pipe)
        assert twin.vae is not pipe.vae and twin.vae.runtime is tiny_rt
        assert twin.unet is not pipe.unet  # the rest of the pipeline was copied
        np.testing.assert_array_equal(_run(twin), want)
    finally:
        pipe.vae = tiny_vae
    for copier, what in ((copy.deepcopy, "copied"), (copy.copy, "copied"), (pickle.dumps, "pickled")):
        with pytest.raises(TypeError, match=rf"^an AsymVAE cannot be {what}: it holds live onnxruntime-cpu sessions "
                                            r"on cpu\. Share this one \(it is thread-safe\), or open another where "
                                            r"it is needed: asym_runtime\.load\("):
            copier(tiny_rt)

