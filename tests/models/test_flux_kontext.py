"""FLUX.1-Kontext provider with the tiny backend: packing, ids, schedule, shapes, prompt cache, parity of edit() with
diffusers' FluxKontextPipeline, LoRA on the transformer, and the missing-weights errors of the pretrained backend."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gsstudio_ext.models.errors import MissingWeightsError  # noqa: E402
from gsstudio_ext.models.flux_kontext import (  # noqa: E402
    FluxKontextConfig,
    calculate_shift,
    kontext_buckets,
    latent_ids,
    pack_latents,
    shifted_sigmas,
    unpack_latents,
)
from gsstudio_ext.models.flux_tiny import TinyFluxKontextConfig  # noqa: E402
from gsstudio_ext.models.lora import attach_lora, lora_disabled, lora_parameters, save_lora  # noqa: E402

PROMPT = "make the cat red"


@pytest.fixture(scope="module")
def kontext():
    return TinyFluxKontextConfig().setup().load()


def image(seed: int = 1, size: int = 32) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_pack_unpack_and_ids() -> None:
    z = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    packed = pack_latents(z)
    assert packed.shape == (2, 6, 12)
    # token (row 0, col 1) holds the 2x2 cell z[:, :, 0:2, 2:4], channel-major
    assert torch.equal(packed[0, 1], z[0, :, 0:2, 2:4].reshape(-1))
    assert torch.equal(unpack_latents(packed, 4, 6), z)
    ids = latent_ids(2, 3, index=1)
    assert ids.shape == (6, 3) and ids[:, 0].eq(1).all()
    assert ids[4].tolist() == [1.0, 1.0, 1.0] and ids[2].tolist() == [1.0, 0.0, 2.0]


def test_schedule_matches_diffusers_dynamic_shift() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    assert calculate_shift(256) == pytest.approx(0.5) and calculate_shift(4096) == pytest.approx(1.15)
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, use_dynamic_shifting=True
    )
    for steps, seq in ((12, 4096), (28, 4096), (4, 64)):
        mu = calculate_shift(seq)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        ours = shifted_sigmas(steps, mu)
        assert ours.shape == (steps + 1,) and ours[0] == 1.0 and ours[-1] == 0.0
        assert torch.allclose(ours, scheduler.sigmas, atol=1e-7)
    # 12 steps on a 1024^2 grid (4096 tokens): the second sigma is well above the unshifted 11/12
    assert shifted_sigmas(12, 1.15)[1].item() == pytest.approx(0.97203, abs=1e-4)


def test_buckets() -> None:
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    assert kontext_buckets() == list(PREFERRED_KONTEXT_RESOLUTIONS) and len(kontext_buckets()) == 17
    tiny = kontext_buckets(1 / 32, 4)
    assert tiny[0] == (20, 48) and tiny[8] == (32, 32) and tiny[-1] == (48, 20)
    with pytest.raises(ValueError, match="smaller"):
        kontext_buckets(1 / 100, 16)


def test_shapes_of_encode_velocity_decode(kontext) -> None:
    assert kontext.vae_scale_factor == 2 and kontext.multiple_of == 4 and kontext.latent_channels == 16
    assert (32, 32) in kontext.buckets()
    embeds = kontext.encode_prompt([PROMPT, "a blue dog"])
    assert embeds.prompt.shape == (2, 16, 32) and embeds.pooled.shape == (2, 32)
    cond = kontext.encode_image(image())
    assert cond.latents.shape == (1, 64, 64) and cond.size == (32, 32)  # 16x16x16 latents -> 8x8 tokens of 64
    assert cond.ids[:, 0].eq(1).all() and cond.ids[-1].tolist() == [1.0, 7.0, 7.0]
    raw = kontext.vae.encode(2 * image() - 1).latent_dist.mean
    assert torch.allclose(cond.latents, pack_latents((raw - 0.1159) * 0.3611), atol=1e-6)
    noisy = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(0))
    one = kontext.encode_prompt(PROMPT)
    v = kontext.velocity(noisy, cond, 0.7, one)
    assert v.shape == noisy.shape and torch.isfinite(v).all()
    v_per_row = kontext.velocity(noisy, cond, torch.full((3,), 0.7), one)
    assert torch.allclose(v, v_per_row, atol=1e-6)
    assert (kontext.velocity(noisy, cond, 0.7, one, guidance=4.0) - v).abs().max() > 1e-5  # guidance embedding used
    assert (kontext.velocity(noisy, cond, 0.3, one) - v).abs().max() > 1e-5
    out = kontext.decode(noisy[:2], cond.size)
    assert out.shape == (2, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="multiples of 4"):
        kontext.encode_image(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match="tokens"):
        kontext.velocity(noisy[:, :32], cond, 0.5, one)


def test_prompt_cache_survives_release() -> None:
    editor = TinyFluxKontextConfig().setup()
    first = editor.encode_prompt(PROMPT)
    editor.release_text_encoders()
    assert "text_encoder" not in editor.model and "text_encoder_2" not in editor.model
    again = editor.encode_prompt([PROMPT])
    assert torch.equal(first.prompt, again.prompt) and torch.equal(first.pooled, again.pooled)
    with pytest.raises(RuntimeError, match="released"):
        editor.encode_prompt("a blue dog")


def test_cpu_offload_keeps_one_component_resident(monkeypatch) -> None:
    """Offload bookkeeping (real device moves need a GPU): a component moves in when used and out when another one
    is needed, so the transformer moves twice for a whole denoising loop, not twice per step."""
    from gsstudio_ext.models.flux_kontext import KontextEditor

    editor = TinyFluxKontextConfig(cpu_offload=True).setup().load()
    monkeypatch.setattr(KontextEditor, "_offloading", property(lambda self: True))
    moves = []

    def recording(name, original):
        def to(*args, **kwargs):
            moves.append(name)
            return original(*args, **kwargs)

        return to

    for name, module in editor.model.items():
        monkeypatch.setattr(module, "to", recording(name, module.to))
    editor.encode_prompt(PROMPT)
    assert moves == ["text_encoder", "text_encoder", "text_encoder_2"] and editor._resident == "text_encoder_2"
    moves.clear()
    editor.edit(image()[0], PROMPT, steps=3)
    # T5 out, VAE in (encode), VAE out, transformer in (3 steps), transformer out, VAE in (decode)
    assert moves == ["text_encoder_2", "vae", "vae", "transformer", "transformer", "vae"]


def test_edit_matches_diffusers_kontext_pipeline(kontext) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

    x = image(size=32)
    ours = kontext.edit(x[0], PROMPT, steps=3, seed=7)
    assert ours.shape == (3, 32, 32) and ours.dtype == torch.float32  # the grid size
    m = kontext.model
    pipe = FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15),
        vae=m["vae"], text_encoder=m["text_encoder"], tokenizer=kontext.tokenizers[0],
        text_encoder_2=m["text_encoder_2"], tokenizer_2=kontext.tokenizers[1], transformer=m["transformer"],
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(
        image=x, prompt=PROMPT, height=32, width=32, guidance_scale=2.5, num_inference_steps=3, max_area=32 * 32,
        generator=torch.Generator("cpu").manual_seed(7), _auto_resize=False, output_type="pt", max_sequence_length=16,
    ).images  # fmt: skip
    assert torch.allclose(ours, reference[0], atol=1e-5)
    assert (kontext.edit(x[0], PROMPT, steps=3, seed=8) - ours).abs().max() > 1e-3
    wide = kontext.edit(image(size=48)[..., :20], PROMPT, steps=2)  # a (H, W) = (48, 20) bucket, batch kept
    assert wide.shape == (1, 3, 48, 20)


def test_lora_on_the_editor_and_lora_path(tmp_path) -> None:
    editor = TinyFluxKontextConfig().setup().load()
    cond, embeds = editor.encode_image(image()), editor.encode_prompt(PROMPT)
    noisy = torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(3))
    base = editor.velocity(noisy, cond, 0.6, embeds)
    policy = editor.policy(cond, embeds)
    assert policy.latent_shape == (64, 64) and policy.module is editor.transformer
    assert torch.equal(policy.sigmas(5), editor.sigmas(5, 64))
    names = attach_lora(editor.transformer, rank=4, alpha=4)
    assert len(names) == 17
    assert torch.equal(policy.velocity(noisy, 0.6), base)  # unchanged at init
    with torch.no_grad():
        for p in lora_parameters(editor.transformer)[1::2]:  # B factors
            p.normal_(0, 0.05)
    tuned = policy.velocity(noisy, 0.6)
    assert (tuned - base).abs().max() > 1e-4
    with lora_disabled(editor.transformer):
        assert torch.equal(policy.velocity(noisy, 0.6), base)
    path = save_lora(editor.transformer, tmp_path / "rl3dedit_lora.safetensors")
    reloaded = TinyFluxKontextConfig(lora_path=path).setup().load()
    assert torch.allclose(reloaded.velocity(noisy, cond, 0.6, embeds), tuned, atol=1e-6)


def test_pretrained_backend_loads_a_local_diffusers_folder(kontext, tmp_path) -> None:
    """The real loading code on a folder in the FLUX.1-Kontext-dev layout (tiny weights saved by save_pretrained)."""
    for name, module in kontext.model.items():
        module.save_pretrained(tmp_path / name)
    kontext.tokenizers[0].save_pretrained(tmp_path / "tokenizer")
    kontext.tokenizers[1].save_pretrained(tmp_path / "tokenizer_2")
    real = FluxKontextConfig(model_name_or_path=str(tmp_path), dtype="float32", max_sequence_length=16).setup().load()
    cond, embeds = kontext.encode_image(image()), kontext.encode_prompt(PROMPT)
    noisy = torch.randn(1, 64, 64, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(real.encode_prompt(PROMPT).prompt, embeds.prompt, atol=1e-6)
    assert torch.allclose(real.encode_image(image()).latents, cond.latents, atol=1e-6)
    assert torch.allclose(
        real.velocity(noisy, cond, 0.5, embeds), kontext.velocity(noisy, cond, 0.5, embeds), atol=1e-6
    )


def test_pretrained_backend_missing_weights_are_clear(tmp_path) -> None:
    with pytest.raises(MissingWeightsError, match="FLUX.1-Kontext folder"):
        FluxKontextConfig(model_name_or_path=str(tmp_path / "nowhere")).setup().load()
    with pytest.raises(MissingWeightsError, match="FLUX.1-Kontext-dev"):
        FluxKontextConfig(cache_dir=tmp_path / "hf").setup().load()
    with pytest.raises(MissingWeightsError, match="rl3dedit-flux-kontext.safetensors"):
        FluxKontextConfig(transformer_file="rl3dedit", cache_dir=tmp_path / "hf").setup().load()
    with pytest.raises(MissingWeightsError, match="Flux transformer file"):
        FluxKontextConfig(transformer_file=str(tmp_path / "t.safetensors"), cache_dir=tmp_path / "hf").setup().load()
