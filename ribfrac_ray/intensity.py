"""Intensity windowing: Hounsfield units to the [0, 1] network input range."""

from __future__ import annotations

import numpy as np

from ribfrac_ray.config import WindowConfig


def apply_window(hounsfield: np.ndarray, window: WindowConfig) -> np.ndarray:
    """Map HU linearly so that ``hu_min`` -> 0 and ``hu_max`` -> 1, clip, return float32."""
    if window.hu_max <= window.hu_min:
        raise ValueError(f"window.hu_max ({window.hu_max}) must be greater than window.hu_min ({window.hu_min})")
    scaled = (np.asarray(hounsfield, np.float32) - np.float32(window.hu_min)) / np.float32(window.hu_max - window.hu_min)
    return np.clip(scaled, 0.0, 1.0, out=scaled)
