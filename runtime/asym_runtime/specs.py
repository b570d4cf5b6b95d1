"""The graph contract and the shape limits, declared once as data.

Every part of the toolkit derives from these declarations: the ONNX export (input/output
names, dynamic axes), the verification feeds, the TensorRT optimization profiles, the
manifest, and the runtime's input checks. See docs/contracts.md, "Graphs" and "Shape limits".

Dim names: ``batch``, ``height``, ``width`` (pixels) and ``latent_height``,
``latent_width`` (pixels / 8). Integers are fixed sizes.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from .errors import AsymInputError, ShapeOutOfLimitsError

#: Pixels per latent cell: 2 ** (number of up blocks - 1) for every published variant.
VAE_SCALE = 8
#: Latent channels of every published variant (and of the tiny test config).
LATENT_CHANNELS = 4

@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its name, symbolic dims and the range its values live in."""

    name: str
    dims: tuple  # of int | str
    #: Closed interval the values are meant to lie in (None: unbounded). ``sample`` and
    #: ``image`` use [-1, 1]; it is also the peak-to-peak range behind their PSNR.
    value_range: tuple[float, float] | None = None

    @property
    def channels(self) -> int:
        return int(self.dims[1])

    def shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        """Concrete shape for a request of ``batch`` images of ``height`` x ``width`` pixels."""
        sizes = dim_sizes(batch, height, width)
        return tuple(d if isinstance(d, int) else sizes[d] for d in self.dims)

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.dims) if isinstance(d, str)}


@dataclass(frozen=True)
class GraphSpec:
    """One exported graph: the file stem, what it computes, its inputs and outputs."""

    name: str  # also the file stem: encoder -> encoder.onnx, encoder.fp16.onnx, engines/encoder.plan
    doc: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def tensor(self, name: str) -> TensorSpec:
        for t in self.inputs + self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no tensor {name!r}")

    def file_name(self, precision: str = "fp32", form: str | None = None) -> str:
        """``decoder.onnx``, ``decoder.fp16.onnx``; with ``form="cuda"`` the CUDA form beside
        them: ``decoder.cuda.onnx``, ``decoder.fp16.cuda.onnx``."""
        parts = [self.name] + ([precision] if precision != "fp32" else []) + ([form] if form else [])
        return ".".join(parts) + ".onnx"

    def engine_name(self) -> str:
        return f"engines/{self.name}.plan"


IMAGE = TensorSpec("image", ("batch", 3, "height", "width"), (-1.0, 1.0))
MASK = TensorSpec("mask", ("batch", 1, "height", "width"), (0.0, 1.0))
LATENT = TensorSpec("latent", ("batch", LATENT_CHANNELS, "latent_height", "latent_width"))
SAMPLE = TensorSpec("sample", ("batch", 3, "height", "width"), (-1.0, 1.0))

ENCODER = GraphSpec(
    name="encoder",
    doc="image in [-1, 1] -> latent_dist.mean and latent_dist.logvar (clamped to [-30, 20])",
    inputs=(IMAGE,),
    outputs=(
        TensorSpec("latent_mean", ("batch", LATENT_CHANNELS, "latent_height", "latent_width")),
        TensorSpec("latent_logvar", ("batch", LATENT_CHANNELS, "latent_height", "latent_width")),
    ),
)
DECODER = GraphSpec(
    name="decoder",
    doc="vae.decode(latent, image=image, mask=mask).sample; mask 1 = repaint, image unmasked",
    inputs=(LATENT, IMAGE, MASK),
    outputs=(SAMPLE,),
)

DECODER_UNCOND = GraphSpec(
    name="decoder_uncond",
    doc="vae.decode(latent).sample: the plain decoder without the condition encoder (cheaper)",
    inputs=(LATENT,),
    outputs=(SAMPLE,),
)

#: Graphs every export writes, in export order.
GRAPHS: dict[str, GraphSpec] = {g.name: g for g in (ENCODER, DECODER, DECODER_UNCOND)}


def dim_sizes(batch: int, height: int, width: int) -> dict[str, int]:
    return {
        "batch": batch,
        "height": height,
        "width": width,
        "latent_height": height // VAE_SCALE,
        "latent_width": width // VAE_SCALE,
    }


# --------------------------------------------------------------------------- shapes

_SIZE_RE = re.compile(r"^\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*$")
_SHAPE_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_size(text: str) -> tuple[int, int]:
    """``"512"`` -> (512, 512); ``"512x768"`` -> (height 512, width 768). Multiples of 8."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise AsymInputError(
            f"size {text!r} is not of the form N or HxW (pixels, e.g. 512 or 512x768)"
        )
    h = int(m.group(1))
    w = int(m.group(2)) if m.group(2) else h
    check_pixel_size(h, w, what=f"size {text!r}")
    return h, w


def parse_shape(text: str) -> "Shape":
    """``"2x64x96"`` -> Shape(batch=2, height=64, width=96)."""
    m = _SHAPE_RE.match(str(text))
    if not m:
        raise AsymInputError(
            f"shape {text!r} is not of the form BxHxW (batch x height x width, e.g. 2x64x96)"
        )
    b, h, w = (int(g) for g in m.groups())
    if b < 1:
        raise AsymInputError(f"shape {text!r}: batch must be at least 1")
    check_pixel_size(h, w, what=f"shape {text!r}")
    return Shape(b, h, w)


def check_pixel_size(height: int, width: int, what: str = "image") -> None:
    for name, v in (("height", height), ("width", width)):
        if v < VAE_SCALE or v % VAE_SCALE:
            raise AsymInputError(
                f"{what}: {name} {v} is not allowed; pixel sizes must be positive multiples "
                f"of {VAE_SCALE} (the VAE downsamples by {VAE_SCALE})"
            )


@dataclass(frozen=True, order=True)
class Shape:
    """A request shape: batch of images of height x width pixels."""

    batch: int
    height: int
    width: int

    def __str__(self) -> str:
        return f"{self.batch}x{self.height}x{self.width}"


@dataclass(frozen=True)
class ShapeLimits:
    """What an artifact supports: min/opt/max batch and pixel height/width.

    One value feeds the TensorRT optimization profiles, the engine verification shapes,
    the manifest and the runtime's input checks. Sizes are pixels, multiples of 8.
    The default batch maximum is 4: large dynamic profiles are a known memory trap
    (a 300 MB VAE plan needed 20 GB to load at max batch 16, TensorRT #2826).
    """

    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 4
    min_height: int = 64
    opt_height: int = 512
    max_height: int = 1024
    min_width: int = 64
    opt_width: int = 512
    max_width: int = 1024

    def __post_init__(self) -> None:
        for axis in ("batch", "height", "width"):
            lo, opt, hi = (getattr(self, f"{k}_{axis}") for k in ("min", "opt", "max"))
            for k, v in (("min", lo), ("opt", opt), ("max", hi)):
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise AsymInputError(f"shape limits: {k} {axis} {v!r} must be a positive integer")
            if not lo <= opt <= hi:
                raise AsymInputError(
                    f"shape limits: {axis} needs min <= opt <= max, got {lo} / {opt} / {hi}"
                )
            if axis != "batch":
                for k, v in (("min", lo), ("opt", opt), ("max", hi)):
                    if v % VAE_SCALE:
                        raise AsymInputError(
                            f"shape limits: {k} {axis} {v} is not a multiple of {VAE_SCALE}"
                        )

    # ----- named corners
    @property
    def min(self) -> Shape:
        return Shape(self.min_batch, self.min_height, self.min_width)

    @property
    def opt(self) -> Shape:
        return Shape(self.opt_batch, self.opt_height, self.opt_width)

    @property
    def max(self) -> Shape:
        return Shape(self.max_batch, self.max_height, self.max_width)

    def contains(self, shape: Shape) -> bool:
        try:
            self.check(shape.batch, shape.height, shape.width)
        except ShapeOutOfLimitsError:
            return False
        return True

    def check(self, batch: int, height: int, width: int) -> None:
        """Raise :class:`ShapeOutOfLimitsError` naming the limit a request violates."""
        for axis, v in (("batch", batch), ("height", height), ("width", width)):
            lo, hi = getattr(self, f"min_{axis}"), getattr(self, f"max_{axis}")
            if v < lo:
                raise ShapeOutOfLimitsError(
                    f"{axis} {v} is below this artifact's min_{axis} {lo} "
                    f"(supported: {axis} {lo}..{hi})"
                    + ("" if axis == "batch" else "; re-export with a smaller --min-size to allow it")
                )
            if v > hi:
                raise ShapeOutOfLimitsError(
                    f"{axis} {v} is above this artifact's max_{axis} {hi} "
                    f"(supported: {axis} {lo}..{hi}); re-export with a larger --max-"
                    f"{'batch' if axis == 'batch' else 'size'} to allow it"
                )

    def profile(self, graph: GraphSpec) -> dict[str, tuple[tuple[int, ...], ...]]:
        """One TensorRT optimization profile: input name -> (min, opt, max) shapes."""
        return {
            t.name: tuple(t.shape(s.batch, s.height, s.width) for s in (self.min, self.opt, self.max))
            for t in graph.inputs
        }

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ShapeLimits":
        missing = [k for k in cls.__dataclass_fields__ if k not in d]
        if missing:
            raise AsymInputError(f"shape limits: missing {', '.join(missing)}")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    @classmethod
    def from_sizes(
        cls,
        min_size: str | tuple[int, int] = (64, 64),
        opt_size: str | tuple[int, int] = (512, 512),
        max_size: str | tuple[int, int] = (1024, 1024),
        min_batch: int = 1,
        opt_batch: int = 1,
        max_batch: int = 4,
    ) -> "ShapeLimits":
        sizes = [parse_size(s) if isinstance(s, str) else tuple(s) for s in (min_size, opt_size, max_size)]
        (mh, mw), (oh, ow), (xh, xw) = sizes
        return cls(
            min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
            min_height=mh, opt_height=oh, max_height=xh,
            min_width=mw, opt_width=ow, max_width=xw,
        )

    def __str__(self) -> str:
        return (
            f"batch {self.min_batch}/{self.opt_batch}/{self.max_batch}, "
            f"size {self.min_height}x{self.min_width} / {self.opt_height}x{self.opt_width} / "
            f"{self.max_height}x{self.max_width} (min/opt/max, HxW pixels)"
        )
