"""PIL helpers: images and masks in, batches for the runtime out, and decoded batches back.

They follow diffusers' ``VaeImageProcessor`` as StableDiffusionInpaintPipeline configures it,
so a batch made here is the one the pipeline would hand the VAE:

* images: RGB, resized with Lanczos when a size is given, ``/ 255`` then ``* 2 - 1``
  -> float32 [B, 3, H, W] in [-1, 1];
* masks: grayscale, resized with Lanczos when a size is given, ``/ 255``, binarised at 0.5
  -> float32 [B, 1, H, W] in {0, 1}; white (1) = repaint, black (0) = keep;
* decoded batches: ``(x / 2 + 0.5)`` clipped to [0, 1], ``* 255`` rounded -> RGB images.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from . import arrays
from .errors import AsymInputError
from .specs import VAE_SCALE


#: PIL modes of more than 8 bits per channel: convert("RGB"/"L") clips them to 0..255 instead of
#: scaling (a 16-bit photo turns almost white, a float mask of 0.8 into 0), so they are refused
_WIDE_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")


def _as_list(images: Any, what: str) -> list[Image.Image]:
    items = [images] if isinstance(images, Image.Image) else list(images)
    if not items:
        raise AsymInputError(f"{what}: no images given")
    for im in items:
        if not isinstance(im, Image.Image):
            raise AsymInputError(f"{what}: expected PIL images, got {type(im).__name__}")
        if im.mode in _WIDE_MODES:
            raise AsymInputError(
                f"{what}: PIL mode {im.mode!r} ({'float' if im.mode == 'F' else 'more than 8-bit'} pixels) "
                "would be clipped to 0..255, not scaled; scale it to 8 bits first (modes RGB, RGBA, L, "
                "LA, P, 1, CMYK, YCbCr are taken), or pass a float array in [-1, 1] (masks: [0, 1])")
    return items


def _pixels(v: Any, name: str, what: str) -> int:
    """An integer number of pixels; strings, bools and fractions are refused, not coerced (a
    string size would otherwise be read digit by digit, '88' as 8x8)."""
    if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
        return int(v)
    raise AsymInputError(f"{what}: {name}={v!r} must be an integer number of pixels, got {type(v).__name__}")


def _target(size: Any, width: int | None, height: int | None, what: str) -> tuple[int, int] | None:
    """(height, width) to resize to, from ``width=``/``height=`` or a square ``size``; None: keep.

    PIL orders sizes (width, height), numpy and diffusers (height, width): a non-square pair is
    ambiguous, so it is refused rather than guessed."""
    if size is not None and (width is not None or height is not None):
        raise AsymInputError(f"{what}: pass either size= or width=/height=, not both")
    if width is not None or height is not None:
        if width is None or height is None:
            raise AsymInputError(f"{what}: pass both width= and height= (or size=N for a square)")
        return _pixels(height, "height", what), _pixels(width, "width", what)
    if size is None:
        return None
    if isinstance(size, (int, np.integer)) and not isinstance(size, (bool, np.bool_)):
        return int(size), int(size)
    try:
        if isinstance(size, (str, bytes)):
            raise TypeError
        a, b = size
    except (TypeError, ValueError):
        raise AsymInputError(f"{what}: size={size!r} must be one number (a square) or a square pair; "
                             "for other shapes pass width= and height=") from None
    a, b = _pixels(a, "size", what), _pixels(b, "size", what)
    if a != b:
        raise AsymInputError(
            f"{what}: size={tuple(size)!r} is ambiguous (PIL orders sizes (width, height), numpy "
            f"(height, width)); pass width= and height= instead, e.g. width={a}, height={b} or "
            f"width={b}, height={a}")
    return a, b


def _sized(images: Sequence[Image.Image], size: tuple[int, int] | None, what: str) -> list[Image.Image]:
    """Resize to ``size`` = (height, width) with Lanczos, or check that all share one valid size."""
    if size is not None:
        h, w = size
        if h < VAE_SCALE or w < VAE_SCALE or h % VAE_SCALE or w % VAE_SCALE:
            raise AsymInputError(f"{what}: size {h}x{w} is not allowed; height and width must be "
                                 f"positive multiples of {VAE_SCALE}")
        return [im if im.size == (w, h) else im.resize((w, h), resample=Image.Resampling.LANCZOS)
                for im in images]
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise AsymInputError(f"{what}: images have different sizes {sorted(sizes)} (width x height); "
                             "pass width= and height= to resize them to one")
    (w, h), = sizes
    if h < VAE_SCALE or w < VAE_SCALE:
        raise AsymInputError(f"{what}: image is {w}x{h} (width x height); both must be positive multiples "
                             f"of {VAE_SCALE}")
    if h % VAE_SCALE or w % VAE_SCALE:
        raise AsymInputError(
            f"{what}: image is {w}x{h} (width x height); both must be multiples of {VAE_SCALE}. "
            f"Pass width={w // VAE_SCALE * VAE_SCALE}, height={h // VAE_SCALE * VAE_SCALE} to resize, "
            "as diffusers does"
        )
    return list(images)


def images_to_batch(images: Image.Image | Iterable[Image.Image], size: Any = None, *,
                    width: int | None = None, height: int | None = None) -> np.ndarray:
    """PIL image(s) -> float32 [B, 3, H, W] in [-1, 1]. ``width=``/``height=`` (or ``size=N``
    for a square) resize with Lanczos, as diffusers' preprocessing does."""
    target = _target(size, width, height, "images_to_batch")
    items = _sized([im.convert("RGB") for im in _as_list(images, "images_to_batch")], target, "images_to_batch")
    batch = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in items])
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2) * 2.0 - 1.0, dtype=np.float32)


def masks_to_batch(masks: Image.Image | Iterable[Image.Image], size: Any = None, *,
                   width: int | None = None, height: int | None = None) -> np.ndarray:
    """PIL mask(s) -> float32 [B, 1, H, W] in {0, 1}: white (>= 0.5 after / 255) = 1 = repaint.
    ``width=``/``height=`` (or ``size=N``) resize as for images."""
    target = _target(size, width, height, "masks_to_batch")
    items = _sized([m.convert("L") for m in _as_list(masks, "masks_to_batch")], target, "masks_to_batch")
    batch = np.stack([np.asarray(m, dtype=np.float32) / 255.0 for m in items])[:, None]
    return (batch >= 0.5).astype(np.float32)


def batch_to_images(batch: Any) -> list[Image.Image]:
    """Decoded float batch [B, 3, H, W] (about [-1, 1]; numpy or torch) -> RGB PIL images."""
    try:
        arrays.kind_of(batch)
    except TypeError:
        raise AsymInputError(f"batch_to_images: expected a numpy array or a torch tensor, got "
                             f"{type(batch).__name__}") from None
    except ValueError as e:  # a tensor, but one without readable dense data: say which
        raise AsymInputError(f"batch_to_images: got {e}") from None
    if arrays.is_torch(batch) and batch.is_floating_point():
        batch = batch.detach().float()  # bfloat16 has no numpy dtype
    x = arrays.to_numpy(batch)
    if x.ndim != 4 or x.shape[1] != 3:
        raise AsymInputError(f"batch_to_images: expected [batch, 3, height, width], got shape {tuple(x.shape)}")
    if not np.issubdtype(x.dtype, np.floating):
        raise AsymInputError(f"batch_to_images: expected a float batch (the decoder's output, about [-1, 1]), "
                             f"got dtype {x.dtype}")
    if not np.isfinite(x).all():  # NaN would become black pixels without a word
        raise AsymInputError("batch_to_images: the batch contains NaN or Inf; there is no image to make of it")
    x = np.clip(x.astype(np.float32) / 2.0 + 0.5, 0.0, 1.0)
    x = (x.transpose(0, 2, 3, 1) * 255.0).round().astype(np.uint8)
    return [Image.fromarray(im) for im in x]
