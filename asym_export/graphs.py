"""The export side's one declaration per graph: for each graph of the contract
(``asym_runtime.specs.GRAPHS``) the module that exports it, the diffusers call it stands for,
the public ``asym_runtime`` call that runs it, and its name in ``asym-bench``.

The export and its verification loop over the contract's ``GRAPHS`` and reach each graph's
wrapper and diffusers call through this registry (``wrapper_for``, ``asym_export.reference``);
``asym-parity`` and ``asym-bench`` loop over :data:`EXPORT_GRAPHS` itself. None of them names a
graph. Adding a graph is a ``GraphSpec`` in ``runtime/asym_runtime/specs.py`` and one :class:`ExportGraph`
here (docs/architecture.md, "Adding a graph").

Importing this module imports neither torch nor diffusers (the CLIs build their help from it);
the wrapper factories import ``wrappers.py`` when they are called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from asym_runtime.specs import GRAPHS, GraphSpec


@dataclass(frozen=True)
class ExportGraph:
    """One graph of the contract, as the export side knows it."""

    spec: GraphSpec
    #: asym-bench's name for the graph (``--graphs``, the table's and the JSON's ``graph``)
    bench_name: str
    #: ``(vae, subpixel) -> nn.Module``: the export wrapper around diffusers' submodules
    #: (``subpixel=False`` keeps diffusers' own upsamplers; graphs without upsamplers ignore it)
    wrapper: Callable[[Any, bool], Any]
    #: ``(vae, tensors) -> outputs``: diffusers' own call the graph stands for, on torch tensors
    #: named as the graph's inputs; outputs named as the graph's outputs
    diffusers_call: Callable[[Any, dict], dict]
    #: ``(AsymVAE, arrays) -> outputs``: the public asym_runtime call that runs the graph, on
    #: arrays named as its inputs; outputs named as its outputs
    runtime_call: Callable[[Any, dict], dict]

    @property
    def name(self) -> str:
        return self.spec.name


# --------------------------------------------------------------------------- encoder

def _encoder_wrapper(vae, subpixel: bool = True):
    from .wrappers import EncoderWrapper

    return EncoderWrapper(vae).eval()


def _encoder_diffusers(vae, t: dict) -> dict:
    dist = vae.encode(t["image"]).latent_dist
    return {"latent_mean": dist.mean, "latent_logvar": dist.logvar}


def _encoder_runtime(rt, feed: dict) -> dict:
    dist = rt.encode(feed["image"])
    return {"latent_mean": dist.mean, "latent_logvar": dist.logvar}


# --------------------------------------------------------------------------- decoders

def _decoder_wrapper(conditional: bool):
    def make(vae, subpixel: bool = True):
        from .wrappers import DecoderWrapper

        return DecoderWrapper(vae, conditional=conditional, subpixel=subpixel).eval()
    return make


def _decoder_diffusers(vae, t: dict) -> dict:
    return {"sample": vae.decode(t["latent"], image=t["image"], mask=t["mask"]).sample}


def _decoder_runtime(rt, feed: dict) -> dict:
    return {"sample": rt.decode(feed["latent"], image=feed["image"], mask=feed["mask"])}


def _decoder_uncond_diffusers(vae, t: dict) -> dict:
    return {"sample": vae.decode(t["latent"]).sample}


def _decoder_uncond_runtime(rt, feed: dict) -> dict:
    return {"sample": rt.decode(feed["latent"])}


# --------------------------------------------------------------------------- the registry

_DECLARED = (
    ExportGraph(GRAPHS["encoder"], "encode", _encoder_wrapper, _encoder_diffusers, _encoder_runtime),
    ExportGraph(GRAPHS["decoder"], "decode", _decoder_wrapper(True), _decoder_diffusers, _decoder_runtime),
    ExportGraph(GRAPHS["decoder_uncond"], "decode_uncond", _decoder_wrapper(False),
                _decoder_uncond_diffusers, _decoder_uncond_runtime),
)
_missing = [g for g in GRAPHS if g not in {e.name for e in _DECLARED}]
if _missing:  # pragma: no cover - a declaration error, caught by the first import
    raise ImportError(f"runtime/asym_runtime/specs.py declares graph(s) {', '.join(_missing)} without an entry in "
                      "asym_export/graphs.py (export wrapper, diffusers call, runtime call)")

#: graph name -> its export declaration, in the contract's (export) order
EXPORT_GRAPHS: dict[str, ExportGraph] = {name: next(e for e in _DECLARED if e.name == name) for name in GRAPHS}
#: asym-bench's graph name -> the same declarations
BENCH_GRAPHS: dict[str, ExportGraph] = {e.bench_name: e for e in EXPORT_GRAPHS.values()}


def export_graph(graph_name: str) -> ExportGraph:
    try:
        return EXPORT_GRAPHS[graph_name]
    except KeyError:
        raise ValueError(f"no export declaration for graph {graph_name!r}; choose from "
                         f"{', '.join(EXPORT_GRAPHS)}") from None


def wrapper_for(vae, graph_name: str, subpixel: bool = True):
    """The export wrapper for one graph of the contract (``runtime/asym_runtime/specs.py``)."""
    return export_graph(graph_name).wrapper(vae, subpixel)

