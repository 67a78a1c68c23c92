"""Fixtures for model-provider tests (the offline guard is in tests/conftest.py)."""

from __future__ import annotations

import pytest

TINY_CLIP_NAME = "gsstudio-tiny-test-clip"


@pytest.fixture(scope="session")
def tiny_openclip_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """Register the tiny CLIP architecture with open_clip and save its seeded random weights as a local checkpoint.

    Returns (model_name, checkpoint path); loading it through the OpenCLIP backends runs the real-weights code path.
    """
    import json

    import open_clip
    import torch

    from gsstudio_ext.models.image_text import TinyImageTextConfig

    folder = tmp_path_factory.mktemp("tiny_clip")
    cfg = TinyImageTextConfig()
    (folder / f"{TINY_CLIP_NAME}.json").write_text(
        json.dumps({"embed_dim": cfg.embed_dim, "vision_cfg": cfg.vision_cfg, "text_cfg": cfg.text_cfg})
    )
    open_clip.add_model_config(folder / f"{TINY_CLIP_NAME}.json")
    encoder = cfg.setup().load()
    path = folder / "tiny_clip.pt"
    torch.save(encoder.model.state_dict(), path)
    return TINY_CLIP_NAME, path
