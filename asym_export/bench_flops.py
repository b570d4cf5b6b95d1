"""asym-bench's FLOP count: what one call of a graph computes, counted by torch on the meta device."""

from __future__ import annotations

from asym_runtime.specs import Shape

from .graphs import BENCH_GRAPHS


def graph_tflop(variant: str, graph: str, shape: Shape, exported: bool = True) -> float:
    """TFLOP of one call (2 per multiply-add) from torch's flop counter, on the meta device
    (shapes only, no memory, no time). ``exported=True``: what the exported graphs compute
    (sub-pixel upsamplers); ``False``: diffusers' own formulation, what eager PyTorch runs."""
    import torch
    from diffusers import AsymmetricAutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    from .variants import get_variant

    entry = BENCH_GRAPHS[graph]
    with torch.device("meta"):
        model = AsymmetricAutoencoderKL(**get_variant(variant).config).eval()
        args = [torch.empty(t.shape(shape.batch, shape.height, shape.width)) for t in entry.spec.inputs]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        entry.wrapper(model, exported)(*args)
    return counter.get_total_flops() / 1e12
