"""Load the PyTorch reference: diffusers' own AsymmetricAutoencoderKL, never a rewrite.

Three sources (docs/contracts.md, "The model"):

* a local diffusers folder (``config.json`` + safetensors, as written by ``save_pretrained``),
* a hub id, downloaded through the hub cache (``huggingface_hub.snapshot_download``),
* seeded random weights with the exact variant config, for offline tests and benchmarks.

Pickle weights (``.bin``) can execute code when loaded; they are refused unless the caller
passes ``allow_pickle=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .variants import Variant

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SAFETENSORS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")
_PICKLE = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json")


class WeightsError(ValueError):
    """The requested weights cannot be used (missing folder, wrong config, pickle refused)."""


class WeightsUnavailableError(WeightsError):
    """The weights are not on this machine and cannot be downloaded (offline, no cache)."""


@dataclass
class WeightsSource:
    """Where the reference weights came from; recorded in the manifest."""

    kind: str  # "random" | "local" | "hub"
    location: str | None = None  # folder, or hub id
    seed: int | None = None
    revision: str | None = None  # hub commit
    files: dict = field(default_factory=dict)  # weight file name -> sha256
    state_dict_sha256: str | None = None  # digest of every parameter, in state-dict order

    def to_dict(self) -> dict:
        d = {"source": self.kind}
        for k in ("location", "seed", "revision", "files", "state_dict_sha256"):
            v = getattr(self, k)
            if v not in (None, {}):
                d[k] = v
        return d

    def describe(self) -> str:
        if self.kind == "random":
            return f"seeded random weights (seed {self.seed})"
        if self.kind == "hub":
            return f"hub {self.location}@{(self.revision or '?')[:10]}"
        return f"local folder {self.location}"


def state_dict_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (names, dtypes, shapes, bytes) in state-dict order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def random_model(variant: Variant, seed: int):
    """The exact variant config with weights drawn by diffusers' own init under ``seed``."""
    from diffusers import AsymmetricAutoencoderKL

    torch.manual_seed(seed)
    model = AsymmetricAutoencoderKL(**variant.config)
    return model.eval().requires_grad_(False)


def load_reference(
    variant: Variant,
    weights: str | None = None,
    *,
    random_weights: bool = False,
    seed: int = 0,
    allow_pickle: bool = False,
    revision: str | None = None,
):
    """Return ``(model, WeightsSource)`` for ``variant``: eval mode, float32, on the CPU.

    ``weights`` is a local diffusers folder or a hub id; ``None`` means the variant's hub id.
    Raises :class:`WeightsUnavailableError` when nothing can be had offline and
    :class:`WeightsError` for folders, configs or files that cannot be used.
    """
    if random_weights:
        if weights is not None:
            raise WeightsError("--weights and --random-weights exclude each other; pass one")
        log.info("building %s with seeded random weights (seed %d)", variant.name, seed)
        model = random_model(variant, seed)
        return model, WeightsSource("random", seed=seed, state_dict_sha256=state_dict_digest(model))

    if weights is None:
        if variant.hub_id is None:
            raise WeightsError(
                f"variant {variant.name} has no published checkpoint; pass --random-weights "
                "or --weights FOLDER"
            )
        weights = variant.hub_id

    path = Path(weights).expanduser()
    if path.exists():
        folder = _model_folder(path)
        source = WeightsSource("local", location=str(folder.resolve()))
    elif _HUB_ID.match(weights) and not weights.startswith((".", "~")):
        folder, commit = _download(weights, revision, allow_pickle)
        source = WeightsSource("hub", location=weights, revision=commit)
    else:
        raise WeightsError(f"--weights {weights!r}: no such folder (and it is not a hub id like org/name)")

    model, files = _load_folder(folder, variant, allow_pickle)
    source.files = files
    source.state_dict_sha256 = state_dict_digest(model)
    return model, source


def _model_folder(path: Path) -> Path:
    if not path.is_dir():
        raise WeightsError(f"--weights {path}: not a folder (expected a diffusers folder with config.json)")
    if (path / "config.json").is_file():
        return path
    if (path / "vae" / "config.json").is_file():  # a pipeline folder: use its vae/
        return path / "vae"
    raise WeightsError(
        f"--weights {path}: no config.json in it; expected a folder written by "
        "AsymmetricAutoencoderKL.save_pretrained (config.json + diffusion_pytorch_model.safetensors)"
    )


def _download(repo_id: str, revision: str | None, allow_pickle: bool) -> tuple[Path, str | None]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    # what from_pretrained reads: the unsharded file or the shards and their index; never the
    # variant files (diffusion_pytorch_model.fp16.safetensors), which it would not load
    patterns = ["config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                "diffusion_pytorch_model-*-of-*.safetensors"]
    if allow_pickle:
        patterns += ["diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json",
                     "diffusion_pytorch_model-*-of-*.bin"]
    log.info("fetching %s through the hub cache", repo_id)
    offline_ways = ("pass --weights FOLDER (a diffusers folder with config.json + safetensors) or "
                    "--random-weights --seed N")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except RevisionNotFoundError:  # subclasses of the HTTP error: the hub answered, the name is wrong
        raise WeightsError(f"--revision {revision}: the hub has no such branch, tag or commit in {repo_id}") from None
    except GatedRepoError:
        raise WeightsError(f"{repo_id} is a gated repository: accept its terms on huggingface.co and log in "
                           "(hf auth login or HF_TOKEN), or " + offline_ways) from None
    except RepositoryNotFoundError:
        raise WeightsError(f"the hub has no repository {repo_id} (or it is private: log in with hf auth login "
                           "or HF_TOKEN)") from None
    except LocalEntryNotFoundError as e:  # offline (or unreachable) and not in the local cache
        raise WeightsUnavailableError(
            f"cannot get {repo_id} from the Hugging Face hub and it is not in the local cache "
            f"({type(e).__name__}). Offline, {offline_ways}") from None
    except Exception as e:  # noqa: BLE001 - the HTTP client's own errors (connection, proxy, retries) are
        # not OSError; whatever it is, the download failed and the user needs the same two ways out
        raise WeightsUnavailableError(
            f"downloading {repo_id} from the Hugging Face hub failed ({type(e).__name__}: {e}); "
            f"retry, or {offline_ways}") from None
    commit = folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else None
    return folder, commit


def _load_folder(folder: Path, variant: Variant, allow_pickle: bool):
    from diffusers import AsymmetricAutoencoderKL

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{folder}/config.json is not readable JSON: {e}") from None
    if not isinstance(config, dict):
        raise WeightsError(f"{folder}/config.json holds a JSON {type(config).__name__}; a diffusers config is "
                           "a JSON object (written by save_pretrained)")
    cls = config.get("_class_name")
    if cls not in (None, "AsymmetricAutoencoderKL"):
        raise WeightsError(f"{folder}/config.json describes a {cls}, not an AsymmetricAutoencoderKL")
    bad = variant.mismatches(config)
    if bad:
        raise WeightsError(
            f"{folder}/config.json does not match variant {variant.name}: " + "; ".join(bad)
        )
    sf = config.get("scaling_factor")  # latents are divided by it (absent: diffusers' default)
    if "scaling_factor" in config and (isinstance(sf, bool) or not isinstance(sf, (int, float))
                                       or not 0 < sf < math.inf):
        raise WeightsError(f"{folder}/config.json: scaling_factor {sf!r} must be a positive finite number "
                           "(the latents are divided by it)")

    safetensors = [n for n in _SAFETENSORS if (folder / n).is_file()]
    pickles = [n for n in _PICKLE if (folder / n).is_file()]
    if not safetensors and not pickles:
        hint = ("" if allow_pickle else "; if its weights are pickle files (.bin) only, --allow-pickle takes them "
                "(they can run arbitrary code when loaded: only for a source you trust)")
        raise WeightsError(f"{folder}: no diffusion_pytorch_model.safetensors (or .bin) weights in it{hint}")
    if not safetensors and not allow_pickle:
        raise WeightsError(
            f"{folder} holds only pickle weights ({pickles[0]}), which can run arbitrary code when "
            "loaded; convert them to safetensors, or pass --allow-pickle if you trust the file"
        )
    use_safetensors = bool(safetensors)
    try:
        model = AsymmetricAutoencoderKL.from_pretrained(
            str(folder), use_safetensors=use_safetensors, torch_dtype=torch.float32
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"cannot load weights from {folder}: {e}") from None
    # diffusers leaves a tensor the file does not hold on the meta device (no values) and
    # loads the rest without a word
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise WeightsError(f"{folder}: the weights have no values for {len(empty)} of the model's tensors "
                           f"({', '.join(empty[:3])}{', ...' if len(empty) > 3 else ''}); not a complete "
                           f"AsymmetricAutoencoderKL {variant.name} checkpoint")
    files = {}
    from asym_runtime.manifest import sha256_file

    ext = ".safetensors" if use_safetensors else ".bin"
    shard = re.compile(r"diffusion_pytorch_model-\d+-of-\d+" + re.escape(ext))
    for name in sorted(p.name for p in folder.iterdir()):
        # the files from_pretrained loads: not variant files such as diffusion_pytorch_model.fp16.safetensors
        if name == "diffusion_pytorch_model" + ext or shard.fullmatch(name):
            files[name] = sha256_file(folder / name)
    return model.eval().requires_grad_(False), files
