"""RL3DEdit grid mode (spec §3.2): 9 views -> one 3x3 grid at a Kontext resolution -> one edit -> 9 views.

The released checkpoint edits *one* grid image [C]:

- the 9 equal-size views are tiled row-major into a 3x3 grid;
- the grid is resized (Lanczos) to the preferred Kontext resolution closest in aspect ratio (1024 x 1024 for square
  views, so ~341 px per view);
- the edited grid is split by integer thirds (W // 3, H // 3) [C]; we then resize each cell back to the original view
  size [I] (the release returns the cells as they are);
- the instruction is rephrased with the release's offline template [C], and the sampling seed is
  ``base_seed XOR int(md5(prompt)[:8], 16)`` of the rephrased prompt, base seed 42 [C].

Resampling: ``lanczos`` runs PIL's Lanczos filter on float32 ("F" mode) channels, so values are not quantised to 8
bits as in the release's RGB images; results are clamped to [0, 1] (Lanczos rings). ``bicubic`` is torch's
antialiased bicubic (differentiable, on any device) [I].
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, List, Literal, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

GRID_SIDE = 3
"""Views per grid side: 3x3 = 9 views [P]."""
GRID_TEMPLATE = (
    "{instruction} in the 3x3 grid, maintaining consistent 3D positioning, orientation, and scale across all nine "
    "views, while keeping the rest of the scene and background unchanged."
)
"""The release's offline instruction rewrite (its LLM rewrite falls back to it) [C]."""
Resample = Literal["lanczos", "bicubic"]


def grid_instruction(instruction: str, template: str = GRID_TEMPLATE) -> str:
    """Rephrase a user instruction for the grid: strip spaces and trailing full stops, then fill ``template`` [C]."""
    text = instruction.strip().rstrip(".")
    if not text:
        raise ValueError("empty editing instruction")
    return template.format(instruction=text)


def edit_seed(prompt: str, base_seed: int = 42) -> int:
    """``base_seed XOR`` the first 32 bits (8 hex digits) of md5(prompt) [C release ``_row_seed``]."""
    return int(base_seed) ^ int(hashlib.md5(prompt.encode()).hexdigest()[:8], 16)


# ======================================================================================================================
# tiling and resizing
# ======================================================================================================================
def tile_grid(views: Tensor) -> Tensor:
    """Float[9, C, h, w] -> Float[C, 3h, 3w], row-major (view 3r + c at row r, column c)."""
    n = GRID_SIDE * GRID_SIDE
    if views.ndim != 4 or views.shape[0] != n:
        raise ValueError(f"need {n} equal-size views [{n}, C, h, w], got {list(views.shape)}")
    c, h, w = views.shape[1:]
    rows = views.reshape(GRID_SIDE, GRID_SIDE, c, h, w).permute(2, 0, 3, 1, 4)  # [C, r, h, c, w]
    return rows.reshape(c, GRID_SIDE * h, GRID_SIDE * w)


def split_grid(grid: Tensor) -> Tensor:
    """Float[C, H, W] (or Float[B, C, H, W]) -> Float[9, C, H // 3, W // 3] (or Float[B, 9, ...]): cells cropped at
    integer thirds, row-major; the last H % 3 rows and W % 3 columns are dropped, as the release does [C]."""
    if grid.ndim == 4:
        return torch.stack([split_grid(g) for g in grid])
    c, height, width = grid.shape
    h, w = height // GRID_SIDE, width // GRID_SIDE
    cells = grid[:, : GRID_SIDE * h, : GRID_SIDE * w].reshape(c, GRID_SIDE, h, GRID_SIDE, w)
    return cells.permute(1, 3, 0, 2, 4).reshape(GRID_SIDE * GRID_SIDE, c, h, w)


def choose_bucket(width: int, height: int, buckets: Sequence[Tuple[int, int]]) -> Tuple[int, int]:
    """The (W, H) bucket whose aspect ratio is closest to ``width / height`` (ties: the first listed, i.e. the
    narrowest, as the release and diffusers do)."""
    if not buckets:
        raise ValueError("no resolution buckets given")
    ratio = width / height
    return min(buckets, key=lambda wh: abs(wh[0] / wh[1] - ratio))


def resize_image(x: Tensor, size: Tuple[int, int], resample: Resample = "lanczos") -> Tensor:
    """Float[C, H, W] or Float[B, C, H, W] -> the same at ``size`` = (H', W'); unchanged when already that size.
    ``lanczos``: PIL on float32 channels, clamped to [0, 1] (no gradient); ``bicubic``: torch, antialiased."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if resample == "bicubic":
        batch = x if x.ndim == 4 else x[None]
        out = F.interpolate(batch.float(), size=tuple(size), mode="bicubic", antialias=True, align_corners=False)
        out = out.clamp(0.0, 1.0).to(x.dtype)
        return out if x.ndim == 4 else out[0]
    if resample != "lanczos":
        raise ValueError(f"resample must be 'lanczos' or 'bicubic', got {resample!r}")
    from PIL import Image

    flat = x.detach().float().cpu().reshape(-1, *x.shape[-2:]).numpy()
    out = [
        np.asarray(Image.fromarray(ch).resize((size[1], size[0]), Image.Resampling.LANCZOS)) for ch in flat
    ]  # PIL sizes are (W, H)
    res = torch.from_numpy(np.stack(out)).reshape(*x.shape[:-2], *size)
    return res.clamp(0.0, 1.0).to(device=x.device, dtype=x.dtype)


def views_to_grid(
    views: Tensor, buckets: Sequence[Tuple[int, int]], resample: Resample = "lanczos"
) -> Tuple[Tensor, Tuple[int, int]]:
    """Float[9, 3, h, w] -> (Float[3, H, W] grid resized to the closest bucket, its (H, W))."""
    grid = tile_grid(views)
    bw, bh = choose_bucket(grid.shape[-1], grid.shape[-2], buckets)
    return resize_image(grid, (bh, bw), resample), (bh, bw)


def grid_to_views(
    grid: Tensor, view_size: Tuple[int, int], resample: Resample = "lanczos", exact_cells: bool = False
) -> Tensor:
    """Float[3, H, W] (or Float[B, 3, H, W]) edited grid -> Float[9, 3, h, w] (or Float[B, 9, 3, h, w]) at
    ``view_size`` = (h, w).

    Default: split at integer thirds, then resize each cell [C]. When H or W is not a multiple of 3 the crops drift by
    up to 2/3 px per cell (negligible at 1024 px, visible on tiny grids). ``exact_cells`` resizes the whole grid to
    (3h, 3w) first and cuts exact cells instead [I]."""
    if exact_cells:
        full = resize_image(grid, (GRID_SIDE * view_size[0], GRID_SIDE * view_size[1]), resample)
        return split_grid(full)
    cells = split_grid(grid)
    shape = cells.shape
    flat = resize_image(cells.reshape(-1, *shape[-3:]), view_size, resample)
    return flat.reshape(*shape[:-2], *view_size)


# ======================================================================================================================
# one grid edit with an editor
# ======================================================================================================================
@dataclass
class GridEditConfig:
    """How 9 views are edited jointly as a 3x3 grid."""

    use_template: bool = True
    """Rephrase the instruction with :data:`GRID_TEMPLATE` (the release's offline rewrite, as trained) [C]."""
    template: str = GRID_TEMPLATE
    """Template with an ``{instruction}`` field."""
    base_seed: int = 42
    """Base seed, XOR-ed with md5 of the prompt (release default 42) [C]."""
    steps: int = 28
    """Denoising steps (release: 28) [C]."""
    guidance: float = 2.5
    """Distilled guidance scale (release: 2.5) [C]."""
    resample: Resample = "lanczos"
    """Grid and cell resampling filter: lanczos (release, PIL) or bicubic (torch, antialiased) [C/I]."""
    exact_cells: bool = False
    """Resize the edited grid to 3h x 3w before cutting cells, instead of the release's integer thirds [I]."""


@dataclass
class GridEdit:
    """Result of :func:`edit_views`."""

    views: Tensor
    """Float[9, 3, h, w] edited views at the input view size (or the grid's cell size)."""
    grid: Tensor
    """Float[3, H, W] edited grid at the bucket resolution."""
    source_grid: Tensor
    """Float[3, H, W] the input grid the editor saw."""
    prompt: str
    """The prompt given to the editor."""
    seed: int
    """The sampling seed used."""


def edit_views(
    editor: Any, views: Tensor, instruction: str, config: Optional[GridEditConfig] = None, cell_size: bool = False
) -> GridEdit:
    """Edit 9 views jointly: tile, resize to the editor's closest bucket, ``editor.edit``, split, resize back (with
    ``cell_size``: the cells as cut, at the grid's cell size).

    Args:
        editor: a :class:`~gsstudio_ext.models.flux_kontext.KontextEditor` (``buckets()`` and ``edit(...)``).
        views: Float[9, 3, h, w] in [0, 1], row-major order (consecutive = spatial neighbours).
        instruction: the user's instruction (rephrased with the template unless ``use_template`` is off).
    """
    config = config or GridEditConfig()
    prompt = grid_instruction(instruction, config.template) if config.use_template else instruction
    seed = edit_seed(prompt, config.base_seed)
    source, _ = views_to_grid(views, editor.buckets(), config.resample)
    grid = editor.edit(source, prompt, steps=config.steps, guidance=config.guidance, seed=seed)
    size = (grid.shape[-2] // GRID_SIDE, grid.shape[-1] // GRID_SIDE) if cell_size else tuple(views.shape[-2:])
    edited = grid_to_views(grid, size, config.resample, config.exact_cells).to(views.dtype)
    return GridEdit(views=edited, grid=grid, source_grid=source, prompt=prompt, seed=seed)


def cell_boxes(size: Tuple[int, int]) -> List[Tuple[int, int, int, int]]:
    """(top, left, height, width) of the 9 cells of a grid of ``size`` = (H, W), as :func:`split_grid` crops them."""
    h, w = size[0] // GRID_SIDE, size[1] // GRID_SIDE
    return [(r * h, c * w, h, w) for r in range(GRID_SIDE) for c in range(GRID_SIDE)]
