"""SD3 rectified-flow provider with the tiny backend: shapes, caching, schedule, token positions, attention capture,
and the missing-weights error of the pretrained backend."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gsstudio_ext.models.errors import MissingWeightsError  # noqa: E402
from gsstudio_ext.models.rectified_flow import SD3Config  # noqa: E402
from gsstudio_ext.models.sd3_attention import JointAttentionCaptureProcessor  # noqa: E402
from gsstudio_ext.models.sd3_tiny import TinySD3Config  # noqa: E402

PROMPT = "A photo of man with croissant nose"


@pytest.fixture(scope="module")
def sd3():
    return TinySD3Config().setup().load()


def test_encode_velocity_decode_shapes(sd3) -> None:
    torch.manual_seed(0)
    embeds = sd3.encode_prompt([PROMPT, ""])
    assert embeds.prompt.shape == (2, 77 + 16, 32)  # 77 CLIP rows then 16 T5 rows, width = T5 width
    assert embeds.pooled.shape == (2, 32)  # CLIP-L 16 + CLIP-G 16
    assert embeds.tokens[0][:5] == ["<|startoftext|>", "a", "photo", "of", "man"]
    # CLIP features (8 + 16 = 24 wide) are zero padded to the T5 width
    assert torch.all(embeds.prompt[:, :77, 24:] == 0) and embeds.prompt[:, :77, :24].abs().sum() > 0
    x = torch.rand(1, 3, 64, 64)
    z = sd3.encode_image(x)
    assert z.shape == (1, 4, 32, 32) and sd3.vae_scale_factor == 2
    raw = sd3.vae.encode(2 * x - 1).latent_dist.mean
    assert torch.allclose(z, (raw - 0.0609) * 1.5305, atol=1e-6)
    v = sd3.velocity(z, torch.tensor([0.5]), sd3.encode_prompt([PROMPT]))
    assert v.shape == z.shape and torch.isfinite(v).all()
    v2 = sd3.velocity(torch.cat([z, z]), 0.5, embeds)  # one sigma for the batch, two prompts
    assert torch.allclose(v2[0], v[0], atol=1e-5) and not torch.allclose(v2[1], v[0], atol=1e-3)
    out = sd3.decode(z)
    assert out.shape == (1, 3, 64, 64) and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="multiples of 4"):
        sd3.encode_image(torch.rand(1, 3, 30, 30))


def test_prompt_cache_survives_release() -> None:
    model = TinySD3Config().setup()
    first = model.encode_prompt(["a red cat"])
    model.release_text_encoders()
    assert "text_encoder" not in model.model and "text_encoder_3" not in model.model
    again = model.encode_prompt(["a red cat"])
    assert torch.equal(first.prompt, again.prompt) and torch.equal(first.pooled, again.pooled)
    with pytest.raises(RuntimeError, match="released"):
        model.encode_prompt(["a blue dog"])


def test_schedule_values(sd3) -> None:
    # SD3 shift 3: sigma(index) = 3 s / (1 + 2 s), s = (1000 - index) / 1000
    assert float(sd3.sigma_at(0)) == pytest.approx(1.0)
    for idx in (300, 500, 980):
        s = (1000 - idx) / 1000
        assert float(sd3.sigma_at(idx)) == pytest.approx(3 * s / (1 + 2 * s), rel=1e-5)
    sig = sd3.sigmas(4)
    assert sig.shape == (5,) and float(sig[0]) == pytest.approx(1.0) and float(sig[-1]) == 0.0
    assert torch.all(sig[1:] < sig[:-1])


def test_word_token_positions_multi_token(sd3) -> None:
    rows = sd3.word_token_positions(PROMPT, ["croissant"])
    tokens = sd3.encode_prompt([PROMPT]).tokens[0]
    # "croissant" is not in the tiny vocabulary: 9 letter pieces, rows 6..14 after <bos> a photo of man with
    assert rows == list(range(6, 15))
    assert "".join(tokens[r].removeprefix("##") for r in rows) == "croissant"
    assert sd3.word_token_positions(PROMPT, ["nose"]) == [15] and tokens[15] == "nose"
    # compound part words, and `start` skips an earlier occurrence of the same word
    text = "a man with hair and man hair"
    assert sd3.word_token_positions(text, ["hair"]) == [4]
    assert sd3.word_token_positions(text, ["man", "hair"], start=text.index(" and ") + 5) == [6, 7]
    with pytest.raises(ValueError, match="not found"):
        sd3.word_token_positions(PROMPT, ["lips"])


def test_capture_processor_matches_default_and_records_logits(sd3) -> None:
    torch.manual_seed(1)
    z = torch.randn(1, 4, 16, 16)
    embeds = sd3.encode_prompt([PROMPT])
    rows = sd3.word_token_positions(PROMPT, ["croissant", "nose"])
    reference = sd3.velocity(z, 0.6, embeds)
    # inputs of block 0's attention, to recompute its logits by hand
    seen = {}

    def grab(module, args, kwargs):
        seen["h"], seen["c"] = kwargs["hidden_states"], kwargs["encoder_hidden_states"]

    attn0 = sd3.transformer.transformer_blocks[0].attn
    handle = attn0.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with sd3.capture_attention(rows, blocks=[0]) as store:
            assert isinstance(attn0.processor, JointAttentionCaptureProcessor)
            captured = sd3.velocity(z, 0.6, embeds)
    finally:
        handle.remove()
    assert (captured - reference).abs().max() < 1e-5
    assert not isinstance(attn0.processor, JointAttentionCaptureProcessor)  # restored on exit
    assert store.maps.shape == (len(rows), 8, 8) and store.blocks_seen == [0]
    heads, d = attn0.heads, attn0.to_q.out_features // attn0.heads
    q = attn0.add_q_proj(seen["c"]).view(1, -1, heads, d).transpose(1, 2)[:, :, rows]
    k = attn0.to_k(seen["h"]).view(1, -1, heads, d).transpose(1, 2)
    manual = (q @ k.transpose(-1, -2) / d**0.5).mean(1)[0].reshape(len(rows), 8, 8)
    assert torch.allclose(store.maps, manual, atol=1e-5)
    # all blocks: sum over both blocks, output still equal to the default processors
    with sd3.capture_attention(rows) as both:
        again = sd3.velocity(z, 0.6, embeds)
    assert (again - reference).abs().max() < 1e-5 and both.blocks_seen == [0, 1]
    assert not torch.allclose(both.maps, store.maps)


def test_missing_pretrained_weights(tmp_path) -> None:
    model = SD3Config(model_name_or_path=str(tmp_path / "no_sd3_here")).setup()
    with pytest.raises(MissingWeightsError) as err:
        model.load()
    assert "licence" in err.value.how and "no_sd3_here" in str(err.value)
    hub = SD3Config(model_name_or_path="gsstudio/not-a-real-sd3", cache_dir=tmp_path / "hf").setup()
    with pytest.raises(MissingWeightsError, match="not-a-real-sd3"):
        hub.load()
