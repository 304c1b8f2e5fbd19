"""Turning user-supplied numbers into arrays, with errors that say which argument was wrong."""

from __future__ import annotations

from typing import Any

import numpy as np


def as_vector(x: Any, name: str, error: type[Exception], *, scalar_ok: bool = False) -> np.ndarray:
    """A 1-D float64 array from a list, numpy array or torch tensor; `error` (the caller's error class) names
    `name` when it is not numeric or not one-dimensional. A scalar becomes one entry only if `scalar_ok`."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().double().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise error(f"{name} must be numeric, got {type(x).__name__}: {exc}") from exc
    if arr.ndim == 0 and scalar_ok:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise error(f"{name} must be 1-D, got shape {arr.shape}")
    return arr
