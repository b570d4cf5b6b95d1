"""Weights from seeded random init, a save_pretrained folder, or the hub (offline here)."""

import json
import shutil

import pytest
import torch

from asym_export.variants import get_variant
from asym_export.weights import (
    WeightsError,
    WeightsUnavailableError,
    load_reference,
    state_dict_digest,
)

TINY = get_variant("tiny")


def test_random_weights_are_seeded():
    a, sa = load_reference(TINY, random_weights=True, seed=3)
    b, sb = load_reference(TINY, random_weights=True, seed=3)
    c, sc = load_reference(TINY, random_weights=True, seed=4)
    assert sa.state_dict_sha256 == sb.state_dict_sha256 != sc.state_dict_sha256
    assert sa.to_dict() == {"source": "random", "seed": 3, "state_dict_sha256": sa.state_dict_sha256}
    assert not a.training and a.dtype == torch.float32


@pytest.fixture
def saved_folder(tmp_path, tiny_vae):
    folder = tmp_path / "tiny-vae"
    tiny_vae.save_pretrained(folder)  # diffusers writes config.json + safetensors
    return folder


def test_local_folder_loads_the_same_weights(saved_folder, tiny_vae):
    model, src = load_reference(TINY, str(saved_folder))
    assert src.kind == "local" and src.location == str(saved_folder.resolve())
    assert set(src.files) == {"diffusion_pytorch_model.safetensors"}
    assert src.state_dict_sha256 == state_dict_digest(tiny_vae)


def test_pipeline_folder_uses_its_vae_subfolder(tmp_path, tiny_vae):
    tiny_vae.save_pretrained(tmp_path / "pipe" / "vae")
    _, src = load_reference(TINY, str(tmp_path / "pipe"))
    assert src.location.endswith("vae")


def test_pickle_weights_are_refused_unless_allowed(tmp_path, tiny_vae):
    folder = tmp_path / "pickled"
    tiny_vae.save_pretrained(folder, safe_serialization=False)
    assert (folder / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(WeightsError, match="pickle.*--allow-pickle"):
        load_reference(TINY, str(folder))
    _, src = load_reference(TINY, str(folder), allow_pickle=True)
    assert src.state_dict_sha256 == state_dict_digest(tiny_vae)


def test_config_of_another_variant_is_refused(saved_folder):
    with pytest.raises(WeightsError, match="does not match variant x2.*up_block_out_channels"):
        load_reference(get_variant("x2"), str(saved_folder))


def test_wrong_class_is_refused(saved_folder):
    cfg = json.loads((saved_folder / "config.json").read_text())
    cfg["_class_name"] = "AutoencoderKL"
    (saved_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="AutoencoderKL, not an AsymmetricAutoencoderKL"):
        load_reference(TINY, str(saved_folder))


def test_folder_without_weights_is_refused(saved_folder):
    (saved_folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no diffusion_pytorch_model.safetensors"):
        load_reference(TINY, str(saved_folder))


def test_missing_folder(tmp_path):
    with pytest.raises(WeightsError, match="no such folder"):
        load_reference(TINY, str(tmp_path / "nope" / "deeper" / "x"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError, match="no config.json"):
        load_reference(TINY, str(empty))


def test_hub_offline_without_cache_names_both_ways_out(offline_hub):
    with pytest.raises(WeightsUnavailableError) as e:
        load_reference(get_variant("x2"))
    msg = str(e.value)
    assert "cross-attention/asymmetric-autoencoder-kl-x-2" in msg
    assert "--weights" in msg and "--random-weights" in msg


def test_hub_cache_is_used_when_populated(offline_hub, saved_folder):
    """A populated hub cache is read offline: the download path is real, only the network is not."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_hub / "hub" / "models--org--tiny-vae"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in saved_folder.iterdir():
        shutil.copy(f, snap / f.name)
    shutil.copy(saved_folder / "diffusion_pytorch_model.safetensors", snap / "diffusion_pytorch_model.fp16.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    _, src = load_reference(TINY, "org/tiny-vae")
    assert (src.kind, src.location, src.revision) == ("hub", "org/tiny-vae", commit)
    assert sorted(src.files) == ["diffusion_pytorch_model.safetensors"]  # what was loaded, not the fp16 variant


def _hub_answer(exc_type):
    """The exception huggingface_hub raises for an HTTP answer of the hub (a stand-in for the
    network, which no test machine reaches; the mapping below is ours)."""
    import httpx2

    response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/x"))
    return exc_type("404 Client Error", response=response)


@pytest.mark.parametrize("raised, kind, words", [
    ("RevisionNotFoundError", WeightsError, "--revision v9: the hub has no such branch, tag or commit in org/x"),
    ("GatedRepoError", WeightsError, "org/x is a gated repository: accept its terms"),
    ("RepositoryNotFoundError", WeightsError, "the hub has no repository org/x (or it is private"),
    ("ConnectError", WeightsUnavailableError, "downloading org/x from the Hugging Face hub failed (ConnectError"),
], ids=["revision", "gated", "not-found", "connection"])
def test_hub_errors_say_what_went_wrong(monkeypatch, raised, kind, words):
    import httpx2
    import huggingface_hub
    from huggingface_hub import errors

    if raised == "ConnectError":  # the HTTP client's own error: not an OSError, still one clear line
        exc = httpx2.ConnectError("[Errno 111] Connection refused")
    else:
        exc = _hub_answer(getattr(errors, raised))

    def snapshot_download(*args, **kwargs):
        raise exc

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(kind) as e:
        load_reference(TINY, "org/x", revision="v9")
    assert type(e.value) is kind and words in str(e.value) and "\n" not in str(e.value)


def test_weights_and_random_exclude_each_other(saved_folder):
    with pytest.raises(WeightsError, match="exclude each other"):
        load_reference(TINY, str(saved_folder), random_weights=True)
