"""RL3DEdit grid mode: tiling, buckets, template, seed, a tiny Kontext grid edit."""

from __future__ import annotations

import hashlib
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rl3dedit_scene import smooth_views  # noqa: E402  (tests/ is on sys.path)

from gsstudio_ext.methods.rl3dedit.grid import (  # noqa: E402
    GridEditConfig,
    cell_boxes,
    choose_bucket,
    edit_seed,
    edit_views,
    grid_instruction,
    grid_to_views,
    resize_image,
    split_grid,
    tile_grid,
    views_to_grid,
)
from gsstudio_ext.models.flux_kontext import kontext_buckets  # noqa: E402

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@pytest.fixture(scope="module")
def kontext():
    from gsstudio_ext.models.flux_tiny import TinyFluxKontextConfig

    return TinyFluxKontextConfig().setup().load()


# ======================================================================================================================
# grid mode
# ======================================================================================================================
def test_tile_split_layout_and_exact_roundtrip() -> None:
    views = torch.rand(9, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    grid = tile_grid(views)
    assert grid.shape == (3, 15, 21)
    assert torch.equal(grid[:, 5:10, 14:21], views[5])  # view 3r + c sits at row r, column c
    assert torch.equal(split_grid(grid), views)
    assert torch.equal(split_grid(torch.stack([grid, grid]))[1], views)
    for k, (top, left, h, w) in enumerate(cell_boxes((15, 21))):
        assert torch.equal(grid[:, top : top + h, left : left + w], views[k])
    # a grid that is not a multiple of 3 loses its last rows/columns, as the release's integer thirds
    assert split_grid(torch.rand(3, 17, 22)).shape == (9, 3, 5, 7)
    with pytest.raises(ValueError, match="9 equal-size views"):
        tile_grid(views[:4])


def test_bucket_choice() -> None:
    buckets = kontext_buckets()
    assert choose_bucket(1023, 1023, buckets) == (1024, 1024)  # 9 square views of 341 px
    assert choose_bucket(3 * 640, 3 * 360, buckets) == (1392, 752)  # 16:9 views: 1.778 -> 1.851 beats 1.660
    assert choose_bucket(3 * 480, 3 * 640, buckets) == (880, 1184)  # 3:4 portrait
    assert choose_bucket(10_000, 10, buckets) == (1568, 672)  # extreme ratios clamp to the ends
    with pytest.raises(ValueError):
        choose_bucket(10, 10, [])


def test_grid_roundtrip_is_exact_when_the_grid_is_a_bucket() -> None:
    buckets = kontext_buckets(3 / 64, 4)  # the square bucket is 48 x 48
    assert (48, 48) in buckets
    views = torch.rand(9, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    grid, size = views_to_grid(views, buckets)
    assert size == (48, 48) and torch.equal(grid, tile_grid(views))
    assert torch.equal(grid_to_views(grid, (16, 16)), views)


def test_grid_roundtrip_with_resizing() -> None:
    views = smooth_views(20, 20)  # grid 60 x 60
    for resample in ("lanczos", "bicubic"):
        # to the 48 x 48 bucket (cells of 16 px) and back: smooth content survives, away from the cell borders
        grid, size = views_to_grid(views, kontext_buckets(3 / 64, 4), resample)
        assert size == (48, 48) and grid.min() >= 0 and grid.max() <= 1
        back = grid_to_views(grid, (20, 20), resample)
        assert back.shape == views.shape and (back - views).abs().mean() < 0.005
        assert (back - views)[..., 3:-3, 3:-3].abs().max() < 0.005
        # a 32 x 32 bucket is not a multiple of 3: integer thirds drift (release behaviour), exact cells do not
        grid, size = views_to_grid(views, kontext_buckets(1 / 32, 4), resample)
        assert size == (32, 32)
        drift = (grid_to_views(grid, (20, 20), resample) - views)[..., 3:-3, 3:-3].abs().mean()
        exact = (grid_to_views(grid, (20, 20), resample, exact_cells=True) - views)[..., 3:-3, 3:-3].abs().mean()
        assert drift > 0.04 and exact < 0.005
    wide = resize_image(torch.rand(2, 3, 8, 8), (4, 12))
    assert wide.shape == (2, 3, 4, 12)
    with pytest.raises(ValueError, match="resample"):
        resize_image(torch.rand(3, 8, 8), (4, 4), "nearest")  # type: ignore[arg-type]


def test_instruction_template_and_seed() -> None:
    prompt = grid_instruction("  Turn the bear into a panda. ")
    assert prompt == (
        "Turn the bear into a panda in the 3x3 grid, maintaining consistent 3D positioning, orientation, and scale "
        "across all nine views, while keeping the rest of the scene and background unchanged."
    )
    expected = 42 ^ int(hashlib.md5(prompt.encode()).hexdigest()[:8], 16)
    assert edit_seed(prompt) == expected and edit_seed(prompt, 7) == 7 ^ (expected ^ 42)
    assert edit_seed(prompt) != edit_seed(grid_instruction("make it snow"))
    with pytest.raises(ValueError, match="empty"):
        grid_instruction(" . ")


def test_edit_views_with_the_tiny_kontext(kontext) -> None:
    views = smooth_views(8, 8)  # grid 24 x 24 -> square bucket 32 x 32
    config = GridEditConfig(steps=2)
    result = edit_views(kontext, views, "make the cat red", config)
    assert result.views.shape == (9, 3, 8, 8) and result.grid.shape == (3, 32, 32)
    assert result.source_grid.shape == (3, 32, 32)
    assert result.prompt.startswith("make the cat red in the 3x3 grid")
    assert result.seed == edit_seed(result.prompt, 42)
    again = edit_views(kontext, views, "make the cat red", config)
    assert torch.equal(again.views, result.views)  # seeded from the prompt: reproducible
    assert torch.allclose(result.grid, kontext.edit(result.source_grid, result.prompt, steps=2, seed=result.seed))
