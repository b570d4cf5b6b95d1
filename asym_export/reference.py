"""The PyTorch reference: diffusers' ``AsymmetricAutoencoderKL`` built with the weights an
artifact is (or was) exported from, and what it computes for each graph of the contract.

Every check against PyTorch comes here for its truth: the export's verification
(:func:`reference_from_variant`), ``asym-parity`` and ``asym-bench`` (:func:`reference_from_manifest`,
which rebuilds the model from the manifest's weights source and checks its digest), and the
engine check on the GPU (:func:`true_fp32`). Which diffusers call each graph stands for is
declared in ``asym_export.graphs``; :func:`reference_outputs` runs it on numpy feeds.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path

import numpy as np
import torch

from asym_runtime.manifest import Manifest
from asym_runtime.specs import GraphSpec

from .graphs import export_graph

log = logging.getLogger(__name__)


class ReferenceWeightsError(ValueError):
    """The manifest's weights source cannot be rebuilt, or rebuilds other weights than the
    folder was exported from (its ``state_dict_sha256`` differs)."""


# --------------------------------------------------------------------------- building

def reference_from_variant(variant, weights: str | None = None, *, random_weights: bool = False,
                           seed: int = 0, allow_pickle: bool = False, revision: str | None = None):
    """``(model, WeightsSource)``: diffusers' model of ``variant`` (a :class:`Variant`) with the
    weights asked for (a local folder, a hub id, the variant's hub id, or seeded random
    weights), eval mode, FP32 on the CPU. What an export is verified against."""
    from .weights import load_reference

    return load_reference(variant, weights, random_weights=random_weights, seed=seed,
                          allow_pickle=allow_pickle, revision=revision)


def reference_from_manifest(manifest: Manifest, cache: dict | None = None, allow_pickle: bool = False):
    """diffusers' model with the weights the folder was exported from (digest checked), in
    FP32 on the CPU. ``cache``: a dict kept by the caller; a model built once is copied from
    it (building and hashing x2 costs seconds each time). ``allow_pickle``: the weights may be
    pickle files (an export made with --allow-pickle), which can run code when loaded: the
    caller's consent again, not the export's."""
    key = str(Path(manifest.root).resolve())
    if cache is not None and key in cache:
        return copy.deepcopy(cache[key])
    vae = _build_from_manifest(manifest, allow_pickle)
    if cache is not None:
        cache[key] = copy.deepcopy(vae)
    return vae


def _build_from_manifest(manifest: Manifest, allow_pickle: bool = False):
    from asym_runtime.errors import ArtifactError

    from .variants import VARIANTS, get_variant
    from .weights import load_reference, random_model, state_dict_digest

    if manifest.variant not in VARIANTS:  # the runtime runs any variant; the reference needs its model
        raise ArtifactError(f"{manifest.root}: variant {manifest.variant!r} is not one this asym-export can "
                            f"rebuild the reference of ({', '.join(VARIANTS)})")
    variant = get_variant(manifest.variant)
    w = manifest.data["weights"]
    source = w.get("source")
    if source == "random":
        vae = random_model(variant, int(w.get("seed", 0)))
    elif source in ("local", "hub"):
        vae, _ = load_reference(variant, w["location"], revision=w.get("revision"), allow_pickle=allow_pickle)
    else:
        raise ReferenceWeightsError(f"manifest weights source {source!r} is unknown")
    want = w.get("state_dict_sha256")
    got = state_dict_digest(vae)
    if want and got != want:
        raise ReferenceWeightsError(
            f"the reference weights ({source} {w.get('location') or w.get('seed')}) have state-dict "
            f"sha256 {got[:16]}..., the manifest records {want[:16]}...: they are not the weights "
            "this folder was exported from"
        )
    return vae


# --------------------------------------------------------------------------- calling

def diffusers_forward(vae, graph_name: str, t: dict) -> dict:
    """diffusers' own call that a contract graph stands for, on torch tensors named as the
    graph's inputs; outputs named as the graph's outputs. Which call each graph is, is
    declared once in ``asym_export.graphs``."""
    return export_graph(graph_name).diffusers_call(vae, t)


def reference_outputs(vae, graph: GraphSpec, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What diffusers itself computes for ``feed`` (not the wrapper): the verification truth.
    Runs on the model's device (CPU for the export checks, CUDA for engine verification)."""
    device = next(vae.parameters()).device
    t = {k: torch.from_numpy(v).to(device) for k, v in feed.items()}
    with torch.no_grad():
        out = diffusers_forward(vae, graph.name, t)
    return {k: v.float().cpu().numpy() for k, v in out.items()}


@contextlib.contextmanager
def true_fp32():
    """PyTorch may run float32 convolutions in TF32 on Ampere+ (cuDNN's default); the reference
    must not, or it would carry FP16-like error itself."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch 2.9+ API; mixing both raises
        knobs = [(conv, "fp32_precision", "ieee"), (torch.backends.cuda.matmul, "fp32_precision", "ieee")]
    else:
        knobs = [(torch.backends.cudnn, "allow_tf32", False), (torch.backends.cuda.matmul, "allow_tf32", False)]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in knobs]
    try:
        for obj, name, value in knobs:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
