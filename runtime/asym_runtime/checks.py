"""Input checks, derived from the graph contract (``specs.py``) and the artifact's shape limits.

Every call checks its inputs here before any backend sees them (docs/contracts.md, "The runtime"): type,
rank, fixed dims (channels), floating dtype, pixel sizes that are multiples of 8, batch and
sizes that agree between the inputs, the shape limits, then NaN/Inf and value ranges. Each
problem raises an :class:`~asym_runtime.errors.AsymInputError` (a ``ValueError``) whose
message names the call, the input, what was found and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from . import arrays
from .errors import AsymInputError, ShapeOutOfLimitsError
from .specs import VAE_SCALE, GraphSpec, Shape, ShapeLimits, TensorSpec

#: Symbolic dim name -> (axis of the request, pixels per unit of the dim).
DIM_AXES = {
    "batch": ("batch", 1),
    "height": ("height", 1),
    "width": ("width", 1),
    "latent_height": ("height", VAE_SCALE),
    "latent_width": ("width", VAE_SCALE),
}

#: How far outside its contract ``value_range`` an input may go. The mask is a blend weight:
#: outside [0, 1] it extrapolates, so it is held to the range exactly. Images are held loosely:
#: resampling (bicubic, Lanczos) overshoots [-1, 1] a little and the VAE copes, while
#: [0, 255] images or other unnormalised input land far outside [-1.5, 1.5].
RANGE_SLACK = {"mask": 0.0, "image": 0.5}


@dataclass
class Request:
    """Checked inputs of one call: float32, contiguous, all of one kind (numpy or torch)."""

    shape: Shape
    feed: dict[str, Any]


def _dims_text(spec: TensorSpec) -> str:
    return "[" + ", ".join(str(d) for d in spec.dims) + "]"


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape)


def check_inputs(call: str, specs: Sequence[TensorSpec], values: dict[str, Any],
                 limits: ShapeLimits) -> Request:
    """Check ``values`` (input name -> array) against ``specs`` and ``limits``.

    Returns the request shape and the inputs as contiguous float32 of the caller's kind.
    Raises :class:`AsymInputError` (or its subclass :class:`ShapeOutOfLimitsError`).
    """
    kinds: dict[str, str] = {}
    for spec in specs:
        x = values[spec.name]
        try:
            kinds[spec.name] = arrays.kind_of(x)
        except TypeError:
            hint = ""
            if type(x).__module__.startswith("PIL"):
                hint = "; convert PIL images with asym_runtime.images.images_to_batch / masks_to_batch"
            raise AsymInputError(
                f"{call}: {spec.name} must be a numpy array or a torch tensor, got "
                f"{type(x).__module__}.{type(x).__name__}{hint}"
            ) from None
        except ValueError as e:
            raise AsymInputError(f"{call}: {spec.name} is {e}") from None
    torch = arrays.torch_module()
    for spec in specs:
        x = values[spec.name]
        if arrays.is_torch(x) and x.requires_grad and torch.is_grad_enabled():
            # the graphs run outside autograd: an output would silently carry no gradient
            raise AsymInputError(
                f"{call}: {spec.name} requires grad, but no gradient can flow back through the exported "
                "graphs (inference only); call under torch.no_grad() or torch.inference_mode(), or pass "
                f"{spec.name}.detach(); where gradients are needed, use diffusers' AsymmetricAutoencoderKL"
            )
    if len(set(kinds.values())) > 1:
        raise AsymInputError(
            f"{call}: inputs must all be numpy arrays or all torch tensors on one device; got "
            + ", ".join(f"{n}: {k}" for n, k in kinds.items())
        )

    # rank, fixed dims, dtype
    for spec in specs:
        x = values[spec.name]
        shape = _shape(x)
        if len(shape) != len(spec.dims):
            raise AsymInputError(
                f"{call}: {spec.name} has rank {len(shape)} (shape {shape}); it must be rank "
                f"{len(spec.dims)}: {_dims_text(spec)}"
            )
        for i, (got, want) in enumerate(zip(shape, spec.dims)):
            if isinstance(want, int) and got != want:
                what = "channels" if i == 1 else f"entries in dim {i}"
                raise AsymInputError(
                    f"{call}: {spec.name} has {got} {what} (shape {shape}); it must be "
                    f"{_dims_text(spec)} with {want} {what}"
                )
            if got < 1:
                raise AsymInputError(f"{call}: {spec.name} has an empty dim (shape {shape})")
        if not arrays.is_floating(x):
            raise AsymInputError(
                f"{call}: {spec.name} has dtype {arrays.dtype_name(x)}; a floating dtype is "
                "required (float32; float16/float64/longdouble are converted). Images go in as floats in "
                "[-1, 1]: asym_runtime.images converts uint8/PIL images"
            )

    # pixel sizes: multiples of 8, and one batch / height / width shared by every input
    bound: dict[str, int] = {}
    for spec in specs:
        shape = _shape(values[spec.name])
        for got, dim in zip(shape, spec.dims):
            if isinstance(dim, int):
                continue
            axis, scale = DIM_AXES[dim]
            if axis != "batch" and scale == 1 and got % VAE_SCALE:
                raise AsymInputError(
                    f"{call}: {spec.name} {dim} {got} is not a multiple of {VAE_SCALE} (shape "
                    f"{shape}); pixel sizes must be multiples of {VAE_SCALE}, the VAE's downsampling"
                )
            bound.setdefault(axis, got * scale)
    for axis in ("batch", "height", "width"):
        sizes = {}
        for spec in specs:
            for got, dim in zip(_shape(values[spec.name]), spec.dims):
                if isinstance(dim, str) and DIM_AXES[dim][0] == axis:
                    sizes[spec.name] = got * DIM_AXES[dim][1]
        if len(set(sizes.values())) > 1:
            if axis == "batch":
                raise AsymInputError(
                    f"{call}: batch sizes disagree: "
                    + ", ".join(f"{n} has {v}" for n, v in sizes.items())
                    + "; every input must have the same batch"
                )
            raise AsymInputError(
                f"{call}: sizes disagree: "
                + ", ".join(f"{s.name} {_shape(values[s.name])} is {_pixels(s, values[s.name])} pixels"
                            for s in specs)
                + f"; image and mask must be {VAE_SCALE}x the latent's height and width"
            )

    shape = Shape(bound["batch"], bound["height"], bound["width"])
    try:
        limits.check(shape.batch, shape.height, shape.width)
    except ShapeOutOfLimitsError as e:
        raise ShapeOutOfLimitsError(f"{call}: {e}") from None

    feed = {spec.name: arrays.to_float32(values[spec.name]) for spec in specs}

    # values last: they cost a pass over the data
    for spec in specs:
        lo, hi = arrays.min_max(feed[spec.name])
        if math.isnan(lo) or math.isnan(hi):
            raise AsymInputError(f"{call}: {spec.name} contains NaN")
        if math.isinf(lo) or math.isinf(hi):
            olo, ohi = arrays.min_max(values[spec.name])  # the caller's own values, wider than float32?
            if not (math.isinf(olo) or math.isinf(ohi)):
                raise AsymInputError(f"{call}: {spec.name} has values beyond float32's range (min {olo:.4g}, max "
                                     f"{ohi:.4g}); the graphs compute in float32")
            raise AsymInputError(f"{call}: {spec.name} contains Inf")
        if spec.value_range is not None and spec.name in RANGE_SLACK:
            slack = RANGE_SLACK[spec.name]
            a, b = spec.value_range
            if lo < a - slack or hi > b + slack:
                meaning = " (1 = repaint, 0 = keep)" if spec.name == "mask" else ""
                allowed = f"[{a:g}, {b:g}]" + (f" (checked with slack {slack:g})" if slack else "")
                raise AsymInputError(  # 9 digits: a value one ulp past the bound must not print as it
                    f"{call}: {spec.name} values must lie in {allowed}{meaning}; got min {lo:.9g}, "
                    f"max {hi:.9g}"
                )
    return Request(shape, feed)


def _pixels(spec: TensorSpec, x: Any) -> str:
    hw = {}
    for got, dim in zip(_shape(x), spec.dims):
        if isinstance(dim, str) and DIM_AXES[dim][0] != "batch":
            hw[DIM_AXES[dim][0]] = got * DIM_AXES[dim][1]
    return f"{hw.get('height')}x{hw.get('width')}"


def request_shape(graph: GraphSpec, feed: dict[str, Any]) -> Shape:
    """The request shape of an already checked feed (no checks; for backends)."""
    sizes: dict[str, int] = {}
    for spec in graph.inputs:
        if spec.name not in feed:
            continue
        for got, dim in zip(feed[spec.name].shape, spec.dims):
            if isinstance(dim, str):
                axis, scale = DIM_AXES[dim]
                sizes.setdefault(axis, int(got) * scale)
    return Shape(sizes["batch"], sizes["height"], sizes["width"])


def output_shapes(graph: GraphSpec, shape: Shape) -> dict[str, tuple[int, ...]]:
    """Shape of every output of ``graph`` for a request of ``shape`` (from the contract)."""
    return {t.name: t.shape(shape.batch, shape.height, shape.width) for t in graph.outputs}
