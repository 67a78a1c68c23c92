"""Our LoRA on a tiny FluxTransformer2DModel and a plain MLP: targets, identity at init, disable, save/load, merge."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gsstudio_ext.models.errors import MissingWeightsError  # noqa: E402
from gsstudio_ext.models.lora import (  # noqa: E402
    LoRALinear,
    attach_lora,
    load_lora_state_dict,
    lora_disabled,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    save_lora,
)


def tiny_flux() -> nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )  # fmt: skip


def flux_inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(-1, 2)
    img_ids = torch.cat([torch.zeros(16, 1), img_ids.float()], dim=1)
    return {
        "hidden_states": torch.randn(2, 16, 64, generator=g),
        "encoder_hidden_states": torch.randn(2, 8, 32, generator=g),
        "pooled_projections": torch.randn(2, 32, generator=g),
        "timestep": torch.tensor([0.5, 0.7]),
        "guidance": torch.tensor([2.5, 2.5]),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(8, 3),
        "return_dict": False,
    }


def test_default_targets_on_flux_and_identity_at_init() -> None:
    model = tiny_flux()
    inputs = flux_inputs()
    with torch.no_grad():
        base = model(**inputs)[0]
    names = attach_lora(model, rank=4, alpha=8)
    # 8 attention projections + 4 feed-forward layers in the double block, 3 attention + 2 MLP in the single block
    assert len(names) == 17
    assert "transformer_blocks.0.attn.to_out.0" in names and "transformer_blocks.0.attn.to_add_out" in names
    assert "transformer_blocks.0.ff_context.net.2" in names
    assert {"single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out"} <= set(names)
    assert "proj_out" not in names and "x_embedder" not in names and "transformer_blocks.0.norm1.linear" not in names
    layer = lora_modules(model)["transformer_blocks.0.attn.to_q"]
    assert layer.scale == 2.0 and layer.lora_A.weight.shape == (4, 32) and layer.lora_B.weight.abs().sum() == 0
    with torch.no_grad():
        wrapped = model(**inputs)[0]
    assert torch.equal(wrapped, base)  # B = 0: exactly the base model
    params = lora_parameters(model)
    assert len(params) == 34 and all(p.requires_grad for p in params)
    with pytest.raises(ValueError, match="already attached"):
        attach_lora(model)


def test_perturbed_lora_changes_output_and_disable_restores_it_exactly() -> None:
    model = tiny_flux()
    inputs = flux_inputs()
    model.requires_grad_(False)
    with torch.no_grad():
        base = model(**inputs)[0]
    attach_lora(model, rank=4, alpha=4)
    with torch.no_grad():
        for p in lora_parameters(model):
            if p.shape[1] == 4:  # the B factors
                p.normal_(0, 0.1)
        changed = model(**inputs)[0]
        with lora_disabled(model):
            off = model(**inputs)[0]
            assert not any(m.enabled for m in lora_modules(model).values())
        again = model(**inputs)[0]
    assert (changed - base).abs().max() > 1e-3
    assert torch.equal(off, base)
    assert torch.equal(again, changed)  # state restored on exit


def test_gradients_reach_only_lora_factors() -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    mlp.requires_grad_(False)
    names = attach_lora(mlp, targets=["0", "2"], rank=2, alpha=2)
    assert names == ["0", "2"]
    mlp(torch.randn(5, 6)).square().sum().backward()
    assert mlp[0].base.weight.grad is None
    assert mlp[0].lora_A.weight.grad is not None and mlp[2].lora_B.weight.grad.abs().sum() > 0
    assert isinstance(mlp[2], LoRALinear) and mlp[2].weight is mlp[2].base.weight


def test_save_load_roundtrip_and_merge(tmp_path) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    src = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    dst = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    dst.load_state_dict(src.state_dict())
    attach_lora(src, targets=[r"\d"], rank=2, alpha=3)
    with torch.no_grad():
        for m in lora_modules(src).values():
            m.lora_B.weight.normal_(0, 0.5)
    path = save_lora(src, tmp_path / "lora" / "policy.safetensors")
    assert sorted(lora_state_dict(src)) == ["0.lora_A.weight", "0.lora_B.weight", "2.lora_A.weight", "2.lora_B.weight"]
    loaded = load_lora_state_dict(dst, path)  # attaches with rank 2 and the file's alpha 3
    assert loaded == ["0", "2"] and lora_modules(dst)["0"].scale == 1.5
    with torch.no_grad():
        expected = src(x)
        assert torch.allclose(dst(x), expected, atol=0)
        assert merge_lora(dst) == 2
        assert not lora_modules(dst) and isinstance(dst[0], nn.Linear)
        assert torch.allclose(dst(x), expected, atol=1e-6)
    # diffusers/peft naming with a prefix loads too; a wrong shape is refused
    prefixed = {f"transformer.{k}": v for k, v in lora_state_dict(src).items()}
    fresh = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    assert load_lora_state_dict(fresh, prefixed) == ["0", "2"] and lora_modules(fresh)["0"].scale == 1.0
    bad = dict(prefixed, **{"transformer.0.lora_A.weight": torch.zeros(2, 7)})
    with pytest.raises(ValueError, match="shape"):
        load_lora_state_dict(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), bad)
    with pytest.raises(MissingWeightsError, match="LoRA file"):
        load_lora_state_dict(fresh, tmp_path / "missing.safetensors")
