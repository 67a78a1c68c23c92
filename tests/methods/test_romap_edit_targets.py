"""RoMaP edit targets: the offline procedural 2D editor (colour / pattern words, exact outside pixels, shading)."""

from __future__ import annotations

import pytest
import torch

from gsstudio_ext.methods.romap.edit_targets import (
    COLORS,
    EditTarget,
    ProceduralEdit,
    ProceduralEditConfig,
    parse_edit_prompt,
    unproject_depth,
)


def _image_and_mask(h: int = 32, w: int = 40) -> tuple:
    torch.manual_seed(0)
    image = 0.3 + 0.3 * torch.rand(3, h, w)  # luminance varies in 0.3..0.6
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[8:24, 10:30] = True
    return image, mask


def test_outside_pixels_exactly_unchanged_and_deterministic() -> None:
    image, mask = _image_and_mask()
    editor = ProceduralEditConfig().setup()
    assert isinstance(editor, ProceduralEdit) and isinstance(editor, EditTarget) and editor.name == "procedural"
    for prompt in ("a gold-textured nose", "red and white striped hair", "checkered blue", "dotted pink"):
        out = editor.edit(image, mask, prompt, view_index=0)
        assert out.shape == image.shape
        assert torch.equal(out[:, ~mask], image[:, ~mask])
        assert not torch.allclose(out[:, mask], image[:, mask])
        assert torch.equal(out, ProceduralEditConfig().setup().edit(image, mask, prompt, view_index=3))


def test_inside_tinted_to_colour_keeping_shading() -> None:
    image, mask = _image_and_mask()
    out = ProceduralEditConfig().setup().edit(image, mask, "turn it green", view_index=0)
    inside = out[:, mask]  # [3, M]
    paint = torch.tensor(COLORS["green"])
    # the hue is the paint's: every inside pixel is a positive multiple of the paint colour (no clamping here)
    chroma = inside / inside.sum(dim=0, keepdim=True)
    assert torch.allclose(chroma, (paint / paint.sum())[:, None].expand_as(chroma), atol=1e-5)
    assert bool((inside[1] > inside[0] + 0.2).all()) and bool((inside[1] > inside[2] + 0.2).all())
    # shading kept: output brightness is proportional to input luminance / its mean inside the mask
    luma = (image * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0)[mask]
    factor = inside[1] / paint[1]
    assert torch.allclose(factor, luma / luma.mean(), atol=1e-5)
    assert float(factor.std()) > 0.05
    # flat paint without shading
    flat = ProceduralEditConfig(shading=0.0).setup().edit(image, mask, "green", view_index=0)
    assert torch.allclose(flat[:, mask], paint[:, None].expand(3, int(mask.sum())), atol=1e-6)


def test_grey_primer_becomes_the_exact_colour() -> None:
    image = torch.full((3, 16, 16), 0.5)  # a prior-removed, uniformly mid-grey part
    mask = torch.ones(16, 16, dtype=torch.bool)
    out = ProceduralEditConfig().setup().edit(image, mask, "purple", view_index=0)
    assert torch.allclose(out, torch.tensor(COLORS["purple"])[:, None, None].expand(3, 16, 16), atol=1e-6)


def test_patterns() -> None:
    image = torch.full((3, 32, 32), 0.5)
    mask = torch.ones(32, 32, dtype=torch.bool)
    editor = ProceduralEditConfig(pattern_period_px=8.0, stripe_axis=0).setup()
    red, white = torch.tensor(COLORS["red"]), torch.tensor(COLORS["white"])
    striped = editor.edit(image, mask, "red and white striped", view_index=0)
    # horizontal bands 8 px high: rows 0-7 red, 8-15 white, ...
    assert torch.allclose(striped[:, 0, :], red[:, None].expand(3, 32), atol=1e-6)
    assert torch.allclose(striped[:, 8, :], white[:, None].expand(3, 32), atol=1e-6)
    assert torch.equal(striped[:, 3], striped[:, 17])
    checker = editor.edit(image, mask, "red and white checkered", view_index=0)
    assert torch.allclose(checker[:, 0, 0], red) and torch.allclose(checker[:, 0, 8], white)
    assert torch.allclose(checker[:, 8, 8], red)
    dotted = editor.edit(image, mask, "dotted red", view_index=0)  # dots in 0.35 x red at each cell centre
    assert torch.allclose(dotted[:, 4, 4], red * 0.35, atol=1e-6) and torch.allclose(dotted[:, 0, 0], red)
    frac = float((dotted[0] < 0.5).float().mean())
    assert abs(frac - 16 / 64) < 1e-6  # 16 of the 64 pixel centres of an 8x8 cell lie within 2.4 px of its centre


def test_world_space_pattern_is_view_consistent() -> None:
    # the same world points seen in two views with different pixel layouts get the same pattern colour
    editor = ProceduralEditConfig(pattern_period_world=0.25, stripe_axis=2).setup()
    torch.manual_seed(1)
    pts = torch.rand(16, 16, 3) * 2 - 1
    perm = torch.randperm(256)
    pts_b = pts.reshape(-1, 3)[perm].reshape(16, 16, 3)
    image = torch.full((3, 16, 16), 0.5)
    mask = torch.ones(16, 16, dtype=torch.bool)
    a = editor.edit(image, mask, "blue striped", 0, positions=pts)
    b = editor.edit(image, mask, "blue striped", 1, positions=pts_b)
    assert torch.equal(a.reshape(3, -1)[:, perm], b.reshape(3, -1))
    band = torch.floor(pts[..., 2] / 0.25).long() % 2 == 1
    assert torch.allclose(a[2][band], torch.tensor(COLORS["blue"][2] * 0.35))


def test_unproject_depth_roundtrip() -> None:
    K = torch.tensor([[20.0, 0, 8], [0, 20.0, 6], [0, 0, 1]])
    angle = torch.tensor(0.3)
    rot = torch.tensor([[torch.cos(angle), 0, torch.sin(angle)], [0, 1, 0], [-torch.sin(angle), 0, torch.cos(angle)]])
    viewmat = torch.eye(4)
    viewmat[:3, :3], viewmat[:3, 3] = rot, torch.tensor([0.1, -0.2, 2.0])
    depth = 1.0 + torch.rand(12, 16)
    world = unproject_depth(depth, viewmat, K)
    cam = world @ rot.T + viewmat[:3, 3]
    assert torch.allclose(cam[..., 2], depth, atol=1e-5)
    uv = (cam @ K.T)[..., :2] / cam[..., 2:]
    assert torch.allclose(uv[3, 5], torch.tensor([5.5, 3.5]), atol=1e-4)


def test_unknown_words_error_lists_known_words() -> None:
    image, mask = _image_and_mask()
    editor = ProceduralEditConfig().setup()
    with pytest.raises(ValueError, match="known colours: red, green, blue.*known patterns: striped"):
        editor.edit(image, mask, "hair made of metallic gears", view_index=0)
    with pytest.raises(ValueError, match="one pattern"):
        parse_edit_prompt("red striped checkered")
    with pytest.raises(ValueError, match="at most two colours"):
        parse_edit_prompt("red green blue dotted")
    with pytest.raises(ValueError, match="needs a pattern"):
        parse_edit_prompt("left blue and right green eye")
    with pytest.raises(ValueError, match="mask2d"):
        editor.edit(image, mask[:-1], "red", view_index=0)
    assert parse_edit_prompt("a Silver-textured nose") == ([COLORS["silver"]], None)
    assert parse_edit_prompt("pink polka dots") == ([COLORS["pink"]], "dotted")
