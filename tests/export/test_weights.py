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


@pytest.mark.parametrize("value", [-0.5, 0, "0.18", None, float("nan")])
def test_a_scaling_factor_that_is_not_positive_is_refused_at_once(saved_folder, value):
    """A non-positive (or null, or text) scaling_factor in config.json ran the whole export and
    ended as an unexpected error (negative: the manifest schema; zero: NaN in the reference)."""
    cfg = json.loads((saved_folder / "config.json").read_text())
    cfg["scaling_factor"] = value
    (saved_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"config.json: scaling_factor .* must be a positive finite number"):
        load_reference(TINY, str(saved_folder))


def test_weights_missing_tensors_are_refused_by_name(saved_folder):
    """diffusers loads a safetensors file lacking some tensors and leaves those on the meta
    device; the export then failed with 'Cannot copy out of meta tensor' (exit 1)."""
    from safetensors.torch import load_file, save_file

    path = saved_folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    gone = sorted(k for k in tensors if k.startswith("decoder.up_blocks.0."))
    assert gone
    save_file({k: v for k, v in tensors.items() if k not in gone}, path)
    with pytest.raises(WeightsError, match=rf"no values for {len(gone)} of the model's tensors \(decoder\.up_blocks\.0"):
        load_reference(TINY, str(saved_folder))


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
    assert "cross-attention/asymmetric-autoencoder-kl-x-2" in msg and "it is not in the local cache" in msg
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


def test_a_variant_without_a_checkpoint_needs_weights_or_random():
    with pytest.raises(WeightsError, match="variant tiny has no published checkpoint; pass --random-weights or --weights"):
        load_reference(TINY)


@pytest.mark.parametrize("content, words", [
    ("{not json", "config.json is not readable JSON"),
    ("[1, 2]", "config.json holds a JSON list; a diffusers config is a JSON object"),
])
def test_an_unusable_config_is_refused_in_one_sentence(saved_folder, content, words):
    (saved_folder / "config.json").write_text(content)
    with pytest.raises(WeightsError, match=words):
        load_reference(TINY, str(saved_folder))


def test_weights_that_are_a_file_are_refused(saved_folder):
    f = saved_folder / "diffusion_pytorch_model.safetensors"
    with pytest.raises(WeightsError, match=r"not a folder \(expected a diffusers folder with config.json\)"):
        load_reference(TINY, str(f))


def test_corrupt_weights_are_a_weights_error(saved_folder):
    f = saved_folder / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="cannot load weights from"):
        load_reference(TINY, str(saved_folder))


def test_safetensors_are_taken_over_pickle_in_the_same_folder(saved_folder, tiny_vae):
    """A folder with both (hub repos often carry both): the safetensors are loaded, the pickle is
    never unpickled, with or without --allow-pickle. The .bin here holds other weights, so
    loading it would show in the digest."""
    other, _ = load_reference(TINY, random_weights=True, seed=99)
    other.save_pretrained(saved_folder / "other", safe_serialization=False)
    shutil.move(saved_folder / "other" / "diffusion_pytorch_model.bin", saved_folder / "diffusion_pytorch_model.bin")
    for allow in (False, True):
        model, src = load_reference(TINY, str(saved_folder), allow_pickle=allow)
        assert src.state_dict_sha256 == state_dict_digest(tiny_vae) != state_dict_digest(other)
        assert set(src.files) == {"diffusion_pytorch_model.safetensors"}


def test_a_loaded_folder_is_an_inference_model(saved_folder):
    model, _ = load_reference(TINY, str(saved_folder))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_the_digest_covers_names_dtypes_and_shapes_not_only_bytes():
    def module(**tensors):
        m = torch.nn.Module()
        for k, v in tensors.items():
            m.register_buffer(k, v)
        return m

    data = torch.arange(6, dtype=torch.float32)
    base = state_dict_digest(module(w=data.reshape(2, 3)))
    assert base == state_dict_digest(module(w=data.reshape(2, 3).clone()))
    assert base != state_dict_digest(module(w=data.reshape(3, 2)))  # same bytes, other shape
    assert base != state_dict_digest(module(v=data.reshape(2, 3)))  # other name
    assert base != state_dict_digest(module(w=data.view(torch.int32).reshape(2, 3)))  # same bytes, other dtype


@pytest.mark.parametrize("allow_pickle", [False, True])
def test_the_download_asks_for_what_from_pretrained_loads_and_no_more(monkeypatch, saved_folder, allow_pickle):
    """snapshot_download's patterns: config and the safetensors (whole or sharded), never the
    variant files (fp16 copies that from_pretrained would not load) and no pickle unless allowed.
    The hub is replaced by a function recording what it was asked for (no test machine reaches it)."""
    import fnmatch

    import huggingface_hub

    asked = {}

    def snapshot_download(repo_id, **kwargs):
        asked.update(kwargs, repo_id=repo_id)
        return str(saved_folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    load_reference(TINY, "org/x", revision="main", allow_pickle=allow_pickle)
    assert asked["repo_id"] == "org/x" and asked["revision"] == "main"

    def fetched(name):
        return any(fnmatch.fnmatch(name, p) for p in asked["allow_patterns"])

    for name in ("config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                 "diffusion_pytorch_model-00001-of-00002.safetensors"):
        assert fetched(name), name
    for name in ("diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
                 "README.md", "model.onnx"):
        assert not fetched(name), name
    for name in ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json",
                 "diffusion_pytorch_model-00001-of-00002.bin"):
        assert fetched(name) == allow_pickle, name
