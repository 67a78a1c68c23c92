"""RL3DEdit's single pass end to end with a tiny random FLUX.1-Kontext (with a LoRA attached): 9 ring views out of
12 cameras, one grid edit, the cells at the grid's cell size with scaled intrinsics, a short refit; and the offline
procedural editor's world-space patterns agree between views where image-space ones do not."""

from __future__ import annotations

import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gsstudio_ext.core.scene import GaussianScene  # noqa: E402
from gsstudio_ext.methods.rl3dedit.geometry import photometric_consistency  # noqa: E402
from gsstudio_ext.methods.rl3dedit.grid import GridEditConfig  # noqa: E402
from gsstudio_ext.methods.rl3dedit.refit import RefitConfig  # noqa: E402
from gsstudio_ext.methods.rl3dedit.single_pass import SinglePassConfig, SinglePassEdit  # noqa: E402
from gsstudio_ext.methods.rl3dedit.view_editors import (  # noqa: E402
    KontextGridEditorConfig,
    ProceduralViewEditor,
    ProceduralViewEditorConfig,
)
from gsstudio_ext.methods.romap.local_edit import EditViews  # noqa: E402
from gsstudio_ext.models.flux_tiny import TinyFluxKontextConfig  # noqa: E402
from gsstudio_ext.models.lora import attach_lora, lora_parameters  # noqa: E402

SIZE = 32


def _ring_cameras(count: int = 12) -> EditViews:
    import numpy as np

    from gsstudio_ext.core.cameras import viewmat_from_c2w
    from gsstudio_ext.data.synthetic.cameras import look_at

    eyes = [
        (2.5 * math.cos(2 * math.pi * i / count), 2.5 * math.sin(2 * math.pi * i / count), 1.0) for i in range(count)
    ]
    c2w = np.stack([look_at(np.asarray(e), np.zeros(3)) for e in eyes])
    K = torch.tensor([[40.0, 0.0, SIZE / 2], [0.0, 40.0, SIZE / 2], [0.0, 0.0, 1.0]])
    return EditViews(viewmat_from_c2w(torch.tensor(c2w, dtype=torch.float32)), K.expand(count, 3, 3), SIZE, SIZE)


def _blob(num: int = 400) -> GaussianScene:
    scene = GaussianScene.random(num, seed=2)
    scene.means = scene.means * 0.5
    scene.log_scales = scene.log_scales.clamp(-3.5, -2.0)
    return scene


def test_kontext_grid_edit_then_refit_with_a_tiny_model() -> None:
    kontext = TinyFluxKontextConfig().setup().load()
    attach_lora(kontext.transformer, rank=2, alpha=2)
    assert lora_parameters(kontext.transformer)
    editor_config = KontextGridEditorConfig(kontext=TinyFluxKontextConfig(), grid=GridEditConfig(steps=2))
    editor = editor_config.setup()
    editor.kontext = kontext  # the LoRA-carrying editor
    config = SinglePassConfig(refit=RefitConfig(steps=4, densify=False))
    scene, cameras = _blob(), _ring_cameras()
    result = SinglePassEdit(config, scene, cameras, torch.ones(3), editor=editor).run("make it red")
    assert result.view_indices.shape == (9,) and len(set(result.view_indices.tolist())) == 9
    grid = result.edited.grid
    assert grid is not None and grid.shape == (3, 32, 32) and result.edited.source_grid.shape == (3, 32, 32)
    cell = 32 // 3
    assert result.edited.images.shape == (9, 3, cell, cell)
    assert torch.allclose(result.edited.Ks[:, 0, 0], torch.full((9,), 40.0 * cell / SIZE))
    assert result.edited.prompt.startswith("make it red in the 3x3 grid")
    assert len(result.losses) == 4 and all(math.isfinite(x) for x in result.losses)
    assert result.scene.num_gaussians == scene.num_gaussians and torch.isfinite(result.scene.means).all()
    assert not torch.equal(result.scene.sh_dc, scene.sh_dc)  # the refit moved the colours
    assert set(result.timings) == {"render", "edit", "refit"}


def test_kontext_grid_needs_nine_views() -> None:
    editor = KontextGridEditorConfig(kontext=TinyFluxKontextConfig(), grid=GridEditConfig(steps=1)).setup()
    config = SinglePassConfig(num_views=4)
    edit = SinglePassEdit(config, _blob(), _ring_cameras(), editor=editor)
    sources = edit.sources(edit.view_indices())
    with pytest.raises(ValueError, match="9 views"):
        edit.edit_views(sources, "make it red")
    with pytest.raises(ValueError, match="instruction"):
        edit.edit_views(sources, "  ")


def test_procedural_world_patterns_agree_between_views() -> None:
    scene, cameras = _blob(1500), _ring_cameras()
    edit = SinglePassEdit(SinglePassConfig(editor="procedural"), scene, cameras)
    sources = edit.sources(edit.view_indices())
    ph = {}
    for world in (True, False):
        config = ProceduralViewEditorConfig(world_patterns=world)
        config.procedural.pattern_period_world, config.procedural.pattern_period_px = 0.15, 3.0
        edited = ProceduralViewEditor(config).edit(sources, "red striped")
        assert edited.images.shape == sources.images.shape and torch.equal(edited.Ks, sources.Ks)
        ph[world] = float(photometric_consistency(edited.images, sources.depths, sources.viewmats, sources.Ks))
    source_ph = float(photometric_consistency(sources.images, sources.depths, sources.viewmats, sources.Ks))
    print(f"Ph-Loss: sources {source_ph:.4f}, world stripes {ph[True]:.4f}, image stripes {ph[False]:.4f}")
    assert ph[True] < 0.8 * ph[False]
