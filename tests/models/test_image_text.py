"""Image-text (CLIP) encoders: tiny random CLIP, the OpenCLIP real-weights path on a local checkpoint, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gsstudio_ext.models.errors import MissingWeightsError
from gsstudio_ext.models.image_text import (
    OpenCLIPImageTextConfig,
    TinyImageTextConfig,
    preprocess_images,
)
from gsstudio_ext.models.registry import image_text_encoder_config


def _images(n: int = 3, h: int = 40, w: int = 56, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g)


def test_tiny_shapes_normalised_and_lazy() -> None:
    enc = TinyImageTextConfig().setup(device="cpu")
    assert enc.model is None and enc.dim == 32
    img = enc.encode_images(_images())
    assert enc.model is not None
    txt = enc.encode_text(["a red mug", "a teddy bear"])
    assert img.shape == (3, 32) and txt.shape == (2, 32)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert enc.encode_images(_images(n=1)[0]).shape == (1, 32)  # a single [3, H, W] image


def test_tiny_deterministic_from_seed() -> None:
    x = _images()
    a = TinyImageTextConfig(seed=1).setup().encode_images(x)
    b = TinyImageTextConfig(seed=1).setup().encode_images(x)
    c = TinyImageTextConfig(seed=2).setup().encode_images(x)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    t1 = TinyImageTextConfig(seed=1).setup().encode_text(["a mug"])
    t2 = TinyImageTextConfig(seed=1).setup().encode_text(["a mug"])
    assert torch.equal(t1, t2)


def test_tiny_batch_consistency() -> None:
    enc = TinyImageTextConfig(batch_size=2).setup()
    x = _images(n=5)
    batched = enc.encode_images(x)
    for i in range(5):
        assert torch.allclose(batched[i], enc.encode_images(x[i : i + 1])[0], atol=1e-5)
    texts = ["a mug", "a small green box", "the bear"]
    together = enc.encode_text(texts)
    fresh = TinyImageTextConfig().setup()
    for i, t in enumerate(texts):
        assert torch.allclose(together[i], fresh.encode_text([t])[0], atol=1e-5)


def test_text_cache() -> None:
    enc = TinyImageTextConfig(cache_size=2).setup()
    a = enc.encode_text(["one", "two", "three"])  # more texts than the cache holds
    assert a.shape == (3, 32) and list(enc._texts) == ["two", "three"]


def test_not_a_module() -> None:
    enc = TinyImageTextConfig().setup().load()
    assert not isinstance(enc, torch.nn.Module)
    holder = torch.nn.Module()
    holder.clip = enc
    assert holder.state_dict() == {}


def test_input_validation() -> None:
    enc = TinyImageTextConfig().setup()
    with pytest.raises(ValueError, match="0..1"):
        enc.encode_images(_images() * 255)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        enc.encode_images(torch.rand(2, 4, 8, 8))
    with pytest.raises(ValueError, match="non-empty"):
        enc.encode_text([""])
    with pytest.raises(ValueError, match="resize_mode"):
        TinyImageTextConfig(resize_mode="stretch").setup()


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
def test_preprocess_modes(mode: str) -> None:
    x = _images(n=2, h=30, w=60)
    out = preprocess_images(x, size=16, mean=(0, 0, 0), std=(1, 1, 1), resize_mode=mode)
    assert out.shape == (2, 3, 16, 16)
    if mode == "longest":  # padded rows above and below the resized image
        assert torch.all(out[:, :, 0] == 0) and torch.all(out[:, :, -1] == 0)
    const = preprocess_images(torch.full((1, 3, 30, 60), 0.5), size=16, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert torch.allclose(const, torch.zeros_like(const), atol=1e-5)


def test_squash_differs_from_centre_crop() -> None:
    enc_crop = TinyImageTextConfig().setup()
    enc_squash = TinyImageTextConfig(resize_mode="squash").setup()
    x = _images(n=1, h=20, w=80)
    assert not torch.allclose(enc_crop.encode_images(x), enc_squash.encode_images(x))


def test_openclip_tag_without_network_raises(tmp_path: Path) -> None:
    enc = OpenCLIPImageTextConfig(model_name="ViT-B-16", pretrained="laion2b_s34b_b88k", cache_dir=tmp_path).setup()
    assert enc.model is None and enc.dim == 512
    with pytest.raises(MissingWeightsError, match="ViT-B-16 pretrained=laion2b_s34b_b88k") as err:
        enc.encode_images(_images(n=1))
    assert "huggingface.co/laion/CLIP-ViT-B-16-laion2B-s34B-b88K" in str(err.value)


def test_openclip_missing_checkpoint_path(tmp_path: Path) -> None:
    enc = OpenCLIPImageTextConfig(checkpoint_path=tmp_path / "ViT-B-32.pt").setup()
    with pytest.raises(MissingWeightsError, match="no such file"):
        enc.encode_text(["a mug"])


def test_openclip_local_checkpoint_equals_tiny(tiny_openclip_checkpoint) -> None:
    """The real-weights path (registered architecture + local file) reproduces the model the weights came from."""
    name, path = tiny_openclip_checkpoint
    real = OpenCLIPImageTextConfig(model_name=name, pretrained="", checkpoint_path=path).setup()
    tiny = TinyImageTextConfig().setup()
    x = _images()
    assert torch.allclose(real.encode_images(x), tiny.encode_images(x), atol=1e-5)
    texts = ["a red mug", "a teddy bear"]
    assert torch.allclose(real.encode_text(texts), tiny.encode_text(texts), atol=1e-5)
    assert real.preprocess_cfg["size"] in (32, (32, 32))


def test_registry() -> None:
    assert isinstance(image_text_encoder_config("tiny"), TinyImageTextConfig)
    cfg = image_text_encoder_config("openclip", resize_mode="squash")
    assert isinstance(cfg, OpenCLIPImageTextConfig) and cfg.resize_mode == "squash"
    with pytest.raises(ValueError, match="choose one of"):
        image_text_encoder_config("siglip")
