"""The few array operations the runtime needs, for numpy arrays and torch tensors alike.

torch is never imported here: a torch tensor can only exist if the caller imported torch, so
``sys.modules.get("torch")`` decides whether a value is one. Everything else is numpy.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

#: numpy dtypes accepted as input and converted to float32 (the graphs' I/O dtype).
_NP_FLOATS = (np.float16, np.float32, np.float64, np.longdouble)


def torch_module():
    """The torch module if the process imported it, else None (never imports it)."""
    return sys.modules.get("torch")


def is_torch(x: Any) -> bool:
    torch = torch_module()
    return torch is not None and isinstance(x, torch.Tensor)


def is_cuda_tensor(x: Any) -> bool:
    return is_torch(x) and x.is_cuda


def kind_of(x: Any) -> str:
    """``numpy``, ``torch`` (CPU tensor) or ``torch-cuda:N``; TypeError for anything else,
    ValueError for tensors without readable dense data (sparse, meta, other devices)."""
    if isinstance(x, np.ndarray):
        return "numpy"
    if is_torch(x):
        torch = torch_module()
        if x.layout != torch.strided:
            raise ValueError(f"a {str(x.layout).replace('torch.', '')} tensor; only dense (strided) tensors hold pixels")
        if x.device.type not in ("cpu", "cuda"):
            raise ValueError(f"a tensor on device {x.device.type!r}; only CPU and CUDA tensors carry data here")
        return f"torch-cuda:{x.device.index or 0}" if x.is_cuda else "torch"
    raise TypeError(type(x).__name__)


def dtype_name(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return x.dtype.name
    return str(x.dtype).replace("torch.", "")


def is_floating(x: Any) -> bool:
    if isinstance(x, np.ndarray):
        return x.dtype.type in _NP_FLOATS
    return bool(x.dtype.is_floating_point)


def to_float32(x: Any) -> Any:
    """Contiguous float32 with the same kind and device; no copy when it already is one."""
    if isinstance(x, np.ndarray):
        with np.errstate(over="ignore"):  # beyond float32's range becomes Inf, which the checks name
            return np.ascontiguousarray(x, dtype=np.float32)
    torch = torch_module()
    return x.detach().to(torch.float32).contiguous()


def min_max(x: Any) -> tuple[float, float]:
    """Smallest and largest value (NaN if any value is NaN). Two reductions, no temporary
    array; for a CUDA tensor only the two scalars cross to the host."""
    if isinstance(x, np.ndarray):
        return float(x.min()), float(x.max())
    torch = torch_module()
    lo, hi = torch.aminmax(x)  # documented to propagate NaN, like numpy's min/max
    return float(lo), float(hi)


def to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    return x.detach().cpu().numpy()


def like(arr: np.ndarray, ref: Any) -> Any:
    """``arr`` (numpy) as the kind of ``ref``: itself for numpy, a tensor on ref's device for torch."""
    if isinstance(ref, np.ndarray):
        return arr
    torch = torch_module()
    t = torch.from_numpy(arr)
    return t.to(ref.device) if ref.device.type != "cpu" else t


def full(ref: Any, shape: tuple[int, ...], value: float) -> Any:
    """A float32 array of ``shape`` filled with ``value``, of the same kind and device as ``ref``."""
    if isinstance(ref, np.ndarray):
        return np.full(shape, value, dtype=np.float32)
    torch = torch_module()
    return torch.full(shape, value, dtype=torch.float32, device=ref.device)
