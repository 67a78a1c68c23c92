"""Seeded procedural textures: a base colour modulated by a pattern, so objects keep their colour word.

The modulation is multiplicative and mild (about +-25 % brightness), which gives a 3DGS model texture to fit
without changing which colour word names the object.
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np

from gsstudio_ext.data.synthetic.catalogue import PATTERNS


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Bilinearly upsampled value noise in [-1, 1], tileable, of shape [size, size]."""
    grid = rng.uniform(-1.0, 1.0, size=(cells, cells))
    coords = np.arange(size) * cells / size
    i0 = np.floor(coords).astype(int)
    frac = coords - i0
    i1 = (i0 + 1) % cells
    rows = grid[i0] * (1 - frac)[:, None] + grid[i1] * frac[:, None]
    return rows[:, i0] * (1 - frac)[None, :] + rows[:, i1] * frac[None, :]


def pattern_field(pattern: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A pattern [size, size] in [-1, 1]; ``pattern`` is one of :data:`PATTERNS`."""
    v, u = np.meshgrid(np.arange(size) / size, np.arange(size) / size, indexing="ij")
    freq = int(rng.integers(3, 7))
    if pattern == "stripes":
        field = np.sign(np.sin(2 * math.pi * freq * (u + v * float(rng.uniform(-0.5, 0.5)))))
    elif pattern == "checker":
        field = np.where((np.floor(u * freq * 2) + np.floor(v * freq * 2)) % 2 == 0, 1.0, -1.0)
    elif pattern == "dots":
        cu, cv = (u * freq) % 1 - 0.5, (v * freq) % 1 - 0.5
        field = np.where(cu**2 + cv**2 < 0.09, -1.0, 0.4)
    elif pattern == "noise":
        field = _smooth_noise(rng, size, 8) * 0.6 + _smooth_noise(rng, size, 16) * 0.4
    elif pattern == "waves":
        field = np.sin(2 * math.pi * (freq * u + 0.6 * np.sin(2 * math.pi * 2 * v)))
    else:
        raise ValueError(f"unknown texture pattern '{pattern}'; choose from {PATTERNS}")
    return np.clip(field, -1.0, 1.0)


def make_texture(
    colour: Tuple[float, float, float],
    pattern: str,
    rng: np.random.Generator,
    size: int = 64,
    strength: float = 0.25,
    grain: float = 0.06,
) -> np.ndarray:
    """An RGB texture uint8 [size, size, 3]: ``colour`` times (1 + strength * pattern + grain * fine noise)."""
    field = pattern_field(pattern, rng, size)
    fine = _smooth_noise(rng, size, size // 4)
    gain = 1.0 + strength * field + grain * fine
    rgb = np.asarray(colour, dtype=np.float64)[None, None, :] * gain[..., None]
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


def table_texture(
    colour: Tuple[float, float, float], rng: np.random.Generator, size: int = 512, planks: int = 24
) -> np.ndarray:
    """A light plank texture uint8 [size, size, 3]: per-plank brightness, fine grain and dark seams."""
    v, u = np.meshgrid(np.arange(size) / size, np.arange(size) / size, indexing="ij")
    plank = np.floor(u * planks).astype(int)
    shade = rng.uniform(-0.08, 0.08, size=planks)[plank]
    grain = _smooth_noise(rng, size, 48) * 0.10 + _smooth_noise(rng, size, 12) * 0.06
    seam = np.where((u * planks) % 1 < 0.04, -0.25, 0.0)
    gain = 1.0 + shade + grain + seam
    rgb = np.asarray(colour, dtype=np.float64)[None, None, :] * gain[..., None]
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)
